"""FSDP training: 2 processes (gloo on CPU, launched by torchrun) shard the frozen base, train the same adapter as 1
process with the same global batch, and their checkpoints resume in 1 process and back. The eval split, which needs
the whole model in the main process, is refused."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from training_helpers import launch_two_processes, max_difference, train_two_processes, write_dataset

from dsd_model.training import TrainConfig, train
from dsd_model.training.checkpoint import list_checkpoints

RUN = dict(size=64, rank=4, batch_size=1, max_steps=4, checkpoint_every=2, learning_rate=1e-2,
           gradient_checkpointing=False)
TOLERANCE = 1e-5
"""Max abs difference of adapter weights (values ~0.2) between 2 FSDP processes x 1 micro-batch (gradients
reduce-scattered, each process updating its rows) and 1 process x 2 accumulated micro-batches: the same examples and
draws, summed in another order."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The dataset, a 1-process run, and the 2-process FSDP run with the same global batch."""
    root = tmp_path_factory.mktemp("fsdp")
    dataset = write_dataset(root / "dataset")
    train(TrainConfig(dataset=dataset, output_dir=root / "one", gradient_accumulation_steps=2, **RUN))
    stdout = train_two_processes(dataset, root / "fsdp", {**RUN, "fsdp": True})
    return {"dataset": dataset, "one": root / "one", "fsdp": root / "fsdp", "stdout": stdout}


def test_fsdp_shards_the_base_and_trains_as_one_process(runs):
    held, total = (int(n.replace(",", "")) for n in re.search(r"holds ([\d,]+) of the ([\d,]+)", runs["stdout"]).groups())
    assert held < 0.55 * total, "each of 2 processes holds about half of the model"

    assert max_difference(runs["one"] / "adapter.safetensors", runs["fsdp"] / "adapter.safetensors") <= TOLERANCE
    losses = [(runs[r] / "loss.csv").read_text().splitlines()[1:] for r in ("one", "fsdp")]
    assert [float(line.split(",")[1]) for line in losses[1]] == pytest.approx(
        [float(line.split(",")[1]) for line in losses[0]], abs=1e-5)
    assert [p.name for p in list_checkpoints(runs["fsdp"])] == ["step-0000002", "step-0000004"]


def test_an_fsdp_checkpoint_resumes_in_one_process(runs, tmp_path):
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"] / "checkpoints/step-0000002", resumed_dir / "checkpoints/step-0000002")

    resumed = train(TrainConfig(dataset=runs["dataset"], output_dir=resumed_dir, gradient_accumulation_steps=2,
                                resume_from="latest", **RUN))

    assert max_difference(runs["one"] / "adapter.safetensors", resumed.adapter_path) <= TOLERANCE


def test_a_one_process_checkpoint_resumes_sharded(runs, tmp_path):
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(runs["one"] / "checkpoints/step-0000002", resumed_dir / "checkpoints/step-0000002")

    train_two_processes(runs["dataset"], resumed_dir,
                        {**RUN, "fsdp": True, "gradient_accumulation_steps": 1, "resume_from": "latest"})

    assert max_difference(runs["one"] / "adapter.safetensors", resumed_dir / "adapter.safetensors") <= TOLERANCE


def test_fsdp_refuses_the_eval_split(runs, tmp_path):
    settings = {**RUN, "fsdp": True, "eval_every": 2, "eval_benchmark": tmp_path / "benchmark"}
    done = launch_two_processes(runs["dataset"], tmp_path / "eval", settings)
    assert done.returncode != 0
    assert "eval_every=2: the eval split runs in the main process on the whole model" in done.stderr + done.stdout
