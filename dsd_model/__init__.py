"""DSD Serve model package: the DSD pipeline, adapters, checkpoint conversion and the tiny offline profile.

Imports no transport (HTTP or gRPC); transports import this package. The pipeline classes load torch and diffusers
on first use, so light modules (errors, limits, metrics, settings) import quickly.
"""

from .errors import InputError, WeightsError

_LAZY = {"DSDPipeline", "DSDPipelineOutput", "DenoiseState", "GenerationRequest"}

__all__ = ["DSDPipeline", "DSDPipelineOutput", "DenoiseState", "GenerationRequest", "InputError", "WeightsError"]


def __getattr__(name: str):
    if name in _LAZY:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'dsd_model' has no attribute {name!r}")
