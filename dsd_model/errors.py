"""Errors of the model package, importable without torch so transports can map them.

Every client fault is an `InputError`: it names the field, the offending value and the limit, so each transport can
map it to a 4xx / INVALID_ARGUMENT without parsing messages. `EngineError`s are the other outcomes of a request.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request or argument value outside its documented limits."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class WeightsError(ValueError):
    """Model or adapter weights that are missing, malformed or do not fit the model."""


class DeviceError(ValueError):
    """A feature that needs a device this machine lacks, e.g. fp8 without a GPU of compute capability 8.9 (the GPU
    check's rehearsal on a CPU tells these apart from real failures)."""


class EngineError(Exception):
    """Base of the engine's request outcomes other than success."""


class QueueFull(EngineError):
    def __init__(self, depth: int, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"admission queue is full ({depth} waiting); retry after {retry_after:.0f} s")


class Draining(EngineError):
    def __init__(self):
        super().__init__("the engine is shutting down and admits no new requests")


class EngineFailed(Draining):
    """An engine thread died of an unexpected fault: the replica answers 503 until it is restarted."""

    def __init__(self, reason: str):
        self.reason = reason
        EngineError.__init__(self, f"the engine stopped after an internal fault ({reason}); this replica restarts")


class RequestCancelled(EngineError):
    def __init__(self, request_id: str):
        super().__init__(f"request {request_id} was cancelled")


class DeadlineExceeded(EngineError):
    def __init__(self, request_id: str, step: int, total: int):
        super().__init__(f"request {request_id} passed its deadline at step {step} of {total}")


class InternalError(EngineError):
    def __init__(self, request_id: str):
        super().__init__(f"internal error while generating request {request_id}; see the server log")


class ContentPolicyError(Exception):
    """A safety check withheld the request or its output (a client-side outcome: the request was well-formed)."""

    def __init__(self, check: str, message: str, field: str | None = None):
        self.check = check
        self.field = field
        super().__init__(f"content policy ({check}): {message}")
