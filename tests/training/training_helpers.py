"""Tiny pairs on disk and a tiny pipeline: what every training test runs on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from dsd_model.data.pairs import Pair, write_pairs
from dsd_model.pipeline import DSDPipeline
from dsd_model.tiny import build_tiny_components

NUM_PAIRS = 4
SIZE = 64
ROOT = Path(__file__).resolve().parents[2]


def write_dataset(directory: Path, num_pairs: int = NUM_PAIRS) -> Path:
    """Pairs of 64x64 PNGs: a noisy colour field as reference, the same field shifted as target."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(num_pairs):
        reference = np.clip(rng.integers(0, 256, (1, 1, 3)) + rng.integers(-40, 40, (SIZE, SIZE, 3)), 0, 255)
        reference = reference.astype(np.uint8)
        Image.fromarray(reference).save(directory / f"images/{i}_ref.png")
        Image.fromarray(np.roll(reference, SIZE // 4, axis=1)).save(directory / f"images/{i}_tgt.png")
        pairs.append(Pair(id=f"pair-{i}", reference=f"images/{i}_ref.png", target=f"images/{i}_tgt.png",
                          caption=f"the same object number {i}, moved to the right"))
    write_pairs(directory, pairs)
    return directory


def build_training_pipe() -> DSDPipeline:
    """The tiny profile with 32 prompt tokens instead of 512: the same math at a tenth of the cost."""
    pipe = DSDPipeline(**build_tiny_components())
    pipe.max_sequence_length = 32
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def launch_two_processes(dataset: Path, output_dir: Path, settings: dict) -> subprocess.CompletedProcess:
    """`dsd train` in 2 CPU processes (gloo), launched by torchrun as on a GPU node."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "dsd_model.cli", "train", str(dataset),
        "--output-dir", str(output_dir), *cli_flags(settings),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def train_two_processes(dataset: Path, output_dir: Path, settings: dict) -> str:
    """A 2-process run that must succeed; returns its stdout."""
    done = launch_two_processes(dataset, output_dir, settings)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1, "the main process reports the run, once"
    return done.stdout


def max_difference(first: Path, second: Path) -> float:
    """Max abs difference of two adapter files with the same tensors."""
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
