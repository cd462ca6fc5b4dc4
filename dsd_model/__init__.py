"""DSD Serve model package: the DSD pipeline, adapters, checkpoint conversion and the tiny offline profile.

Imports no transport (HTTP or gRPC); transports import this package.
"""

from .errors import InputError, WeightsError
from .pipeline import DenoiseState, DSDPipeline, DSDPipelineOutput, GenerationRequest

__all__ = ["DSDPipeline", "DSDPipelineOutput", "DenoiseState", "GenerationRequest", "InputError", "WeightsError"]
