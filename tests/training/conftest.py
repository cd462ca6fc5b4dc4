from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import SIZE, build_training_pipe, write_dataset

from dsd_model.pipeline import DSDPipeline
from dsd_model.training import TrainConfig


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "dataset")


@pytest.fixture
def training_pipe() -> DSDPipeline:
    return build_training_pipe()


@pytest.fixture
def build_pipe():
    """For tests that need more than one pipeline."""
    return build_training_pipe


@pytest.fixture
def make_config(dataset: Path, tmp_path: Path):
    """Settings for a short tiny run writing under tmp_path/<name>; keyword arguments override."""

    def make(name: str = "run", **overrides) -> TrainConfig:
        settings = dict(
            dataset=dataset, output_dir=tmp_path / name, size=SIZE, rank=4, batch_size=2, learning_rate=1e-2,
            max_steps=3, gradient_checkpointing=False, checkpoint_every=100,
        )
        settings.update(overrides)
        return TrainConfig(**settings)

    return make
