"""Data-parallel training: 2 processes (gloo on CPU, launched by torchrun as on a GPU node) train the same adapter
as 1 process with the same global batch, and a 2-process checkpoint resumes in 1 process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dsd_model.training import CheckpointError, TrainConfig, train
from dsd_model.training.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[2]
RUN = dict(size=64, rank=4, batch_size=1, max_steps=4, checkpoint_every=2, learning_rate=1e-2,
           gradient_checkpointing=False)
TOLERANCE = 1e-5
"""Max abs difference of adapter weights (values ~0.2) between 2 processes x 1 micro-batch (gradients averaged by
an all-reduce) and 1 process x 2 accumulated micro-batches: the same examples and draws, summed in another order."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_flags(settings: dict) -> list[str]:
    flags = []
    for name, value in settings.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


def train_two_processes(dataset: Path, output_dir: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "dsd_model.cli", "train", str(dataset),
        "--output-dir", str(output_dir), *cli_flags(RUN),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1, "the main process reports the run, once"


def max_difference(first: Path, second: Path) -> float:
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> tuple[Path, Path]:
    from training_helpers import write_dataset

    root = tmp_path_factory.mktemp("distributed")
    dataset = write_dataset(root / "dataset")
    train_two_processes(dataset, root / "two")
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
