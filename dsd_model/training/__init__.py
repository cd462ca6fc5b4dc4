"""LoRA training of DSD adapters on a paired dataset (`dsd train`).

    config = TrainConfig(dataset="data/pairs", output_dir="runs/identity", rank=128)
    result = train(config, pipe)                  # pipe: a DSDPipeline; the tiny profile when omitted
    pipe.load_adapter(result.adapter_path, "identity")
"""

from .config import TrainConfig
from .errors import CheckpointError, DatasetError, IncompatibleModelError, TrainingError, TrainingOutOfMemoryError
from .trainer import TrainResult, train

__all__ = [
    "CheckpointError",
    "DatasetError",
    "IncompatibleModelError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingOutOfMemoryError",
    "train",
]
