"""The serving machinery around the pipeline: the step-level batching engine and its speed features, the caches,
the identity step (scores against the reference, best-of-n) and the output stage (safety checks, provenance,
encoding).

Imports no transport (HTTP or gRPC); `dsd_serve` builds its transports on it.
"""
