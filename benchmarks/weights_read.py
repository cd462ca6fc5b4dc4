"""How fast a replica reads its weights at start, the part of a cold start that does not depend on the GPU.

Safetensors shards of bfloat16 tensors (FLUX-block-sized matrices) are written to a directory, then loaded the way
the service loads a checkpoint (`dsd_model.adapters.read_safetensors`: safetensors' mmap, then a copy to the device)
once with the files in the page cache (a restart on the same node), once cold (pages dropped with fsync +
posix_fadvise(DONTNEED), as on a node that never read them). The read time of a whole
weights directory (`--weights-gb`, about 35 GB for FLUX.1-dev without its transformer, the DSD transformer and a
LoRA) follows from the measured throughput. `benchmarks/gpu_bench.py` runs the same measurement on a GPU.

    python benchmarks/weights_read.py --gb 4 --dir /tmp
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsd_model.adapters import read_safetensors

FULL_WEIGHTS_GB = 35.0
"""FLUX.1-dev without its transformer (T5-XXL 9.5, CLIP 0.25, VAE 0.17 GB), the DSD transformer (23.8 GB in bf16)
and the official LoRA."""
TENSOR_SHAPE = (3072, 4096)
"""Close to a FLUX block's linear layers (hidden 3072): 24 MiB in bfloat16."""


def write_shards(directory: Path, total_bytes: int, shard_bytes: int = 2 * 10**9) -> list[Path]:
    """Random bfloat16 tensors, about `total_bytes` in shards of about `shard_bytes` (at least one tensor)."""
    tensor_bytes = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    tensors = max(1, total_bytes // tensor_bytes)
    per_shard = max(1, shard_bytes // tensor_bytes)
    generator = torch.Generator().manual_seed(0)
    paths = []
    for first in range(0, tensors, per_shard):
        state = {f"blocks.{i}.weight": torch.randn(*TENSOR_SHAPE, generator=generator).to(torch.bfloat16)
                 for i in range(first, min(tensors, first + per_shard))}
        path = directory / f"shard-{len(paths):05d}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return paths


def drop_pages(paths: list[Path]) -> None:
    """Flush the files and ask the kernel to drop their pages (clean pages only, hence the fsync first)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def load(paths: list[Path], device: torch.device) -> float:
    """Seconds to read every shard as the service does and bring its bytes into `device` memory. safetensors maps
    the file and hands out tensors backed by the mapping, so the bytes are read when first copied: to the GPU, or
    on a CPU into fresh memory."""
    seconds = 0.0
    for path in paths:
        start = time.perf_counter()
        state, _ = read_safetensors(path)
        loaded = [tensor.to(device, copy=True) for tensor in state.values()]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        del state, loaded
    return seconds


def measure(directory: Path, gigabytes: float, device: torch.device) -> dict:
    """Write `gigabytes` of shards under `directory` (removed afterwards) and load them from the page cache and
    cold; returns the bytes and GB/s of each."""
    work = Path(tempfile.mkdtemp(prefix="dsd-weights-read-", dir=directory))
    try:
        paths = write_shards(work, int(gigabytes * 1e9))
        size = sum(path.stat().st_size for path in paths)
        load(paths, device)
        cached = load(paths, device)
        drop_pages(paths)
        cold = load(paths, device)
        return {"bytes": size, "page_cache_gb_s": size / 1e9 / cached, "cold_gb_s": size / 1e9 / cold}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_seconds(result: dict, weights_gb: float = FULL_WEIGHTS_GB) -> tuple[float, float]:
    """Seconds to load `weights_gb` of weights at the measured rates: (cold, from the page cache)."""
    return weights_gb / result["cold_gb_s"], weights_gb / result["page_cache_gb_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=4.0, help="gigabytes written and read back")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the shards go")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights-gb", type=float, default=FULL_WEIGHTS_GB)
    args = parser.parse_args()
    result = measure(args.dir, args.gb, torch.device(args.device))
    cold, cached = load_seconds(result, args.weights_gb)
    rows = [(f"load to {args.device}, page cache", f"{result['page_cache_gb_s']:.2f} GB/s"),
            (f"load to {args.device}, cold (pages dropped)", f"{result['cold_gb_s']:.2f} GB/s"),
            (f"{args.weights_gb:.0f} GB of weights, cold", f"{cold:.0f} s"),
            (f"{args.weights_gb:.0f} GB of weights, page cache", f"{cached:.0f} s")]
    print(f"{result['bytes'] / 1e9:.2f} GB in {args.dir}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
