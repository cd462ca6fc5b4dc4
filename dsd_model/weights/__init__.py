"""The weights on disk: `dsd weights pull` fills a directory from a model hub and writes `weights.lock.json`;
`dsd weights verify` and the service's start-up check compare the directory with that lock file.

`lock` needs only the standard library (the service imports it at every start); `pull` needs `huggingface_hub`
(the `hub` extra) and runs only from the command line, never at service start.
"""
