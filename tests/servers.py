"""The test suite's name for the local-server helpers."""

from dsd_serve.local import BENTOML, ROOT, RedisServer, Server, descendants, free_port, start_service, wait_ready

__all__ = ["BENTOML", "ROOT", "RedisServer", "Server", "descendants", "free_port", "start_service", "wait_ready"]
