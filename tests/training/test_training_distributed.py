"""Data-parallel training: 2 processes (gloo on CPU, launched by torchrun as on a GPU node) train the same adapter
as 1 process with the same global batch, and a 2-process checkpoint resumes in 1 process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from training_helpers import max_difference, train_two_processes, write_dataset

from dsd_model.training import CheckpointError, TrainConfig, train
from dsd_model.training.checkpoint import list_checkpoints

RUN = dict(size=64, rank=4, batch_size=1, max_steps=4, checkpoint_every=2, learning_rate=1e-2,
           gradient_checkpointing=False)
TOLERANCE = 1e-5
"""Max abs difference of adapter weights (values ~0.2) between 2 processes x 1 micro-batch (gradients averaged by
an all-reduce) and 1 process x 2 accumulated micro-batches: the same examples and draws, summed in another order."""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distributed")
    dataset = write_dataset(root / "dataset")
    train_two_processes(dataset, root / "two", RUN)
    return dataset, root / "two"


def test_two_processes_train_as_one_with_the_same_global_batch(two_process_run, tmp_path):
    dataset, two = two_process_run
    one = train(TrainConfig(dataset=dataset, output_dir=tmp_path / "one", gradient_accumulation_steps=2, **RUN))

    assert max_difference(one.adapter_path, two / "adapter.safetensors") <= TOLERANCE
    two_losses = [float(line.split(",")[1]) for line in (two / "loss.csv").read_text().splitlines()[1:]]
    assert one.losses == pytest.approx(two_losses, abs=1e-5)
    assert [p.name for p in list_checkpoints(two)] == ["step-0000002", "step-0000004"]
    assert sorted(p.name for p in (two / "checkpoints/step-0000002").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path):
    dataset, two = two_process_run
    whole = train(TrainConfig(dataset=dataset, output_dir=tmp_path / "whole", gradient_accumulation_steps=2, **RUN))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints/step-0000002", resumed_dir / "checkpoints/step-0000002")

    resumed = train(TrainConfig(dataset=dataset, output_dir=resumed_dir, gradient_accumulation_steps=2,
                                resume_from="latest", **RUN))

    assert max_difference(whole.adapter_path, resumed.adapter_path) <= TOLERANCE
    assert resumed.losses[-2:] == pytest.approx(whole.losses[-2:], abs=1e-5)


def test_resume_refuses_another_global_batch(two_process_run, tmp_path):
    dataset, two = two_process_run
    with pytest.raises(CheckpointError, match=r"global batch of 2 examples per step; this run has 1 \(1 process"):
        train(TrainConfig(dataset=dataset, output_dir=tmp_path / "other",
                          resume_from=two / "checkpoints/step-0000002", **RUN))
