"""Memory of references: what a full admission queue of 40 MP references keeps resident, and the peak of decoding
12 uploads at once, for this tree's request path against a baseline revision's.

Each scenario runs in its own process: an in-process `Runtime` on the tiny profile whose engine is not started, so
every submission stays queued, fed through `Runtime.submit`. Figures are resident-set sizes above the process's
level before the scenario (`VmRSS`), and the high-water mark above it (`VmHWM`, reset before the scenario).
With `--baseline REV`, the same scenarios run on that git revision's code (`git archive`) as well.

Goal: resident memory of the queued references at most 2 x (queue length x one canvas), one canvas being the
reference at `size` in 8-bit RGB.

    python benchmarks/memory.py [--queue 64] [--concurrent 12] [--size 512] [--baseline e24caf6]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MIB = 2**20
WIDTH, HEIGHT = 6400, 6250
"""40 M pixels, the largest reference accepted."""


def reference_files(directory: Path) -> dict[str, Path]:
    """A 40 MP PNG (smooth, so it compresses to a small upload) and the same picture as a JPEG."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    picture = np.dstack([x / WIDTH * 255, y / HEIGHT * 255, (x + y) / (WIDTH + HEIGHT) * 255]).astype(np.uint8)
    image = Image.fromarray(picture)
    files = {"png": directory / "reference.png", "jpeg": directory / "reference.jpg"}
    image.save(files["png"])
    image.save(files["jpeg"], quality=90)
    return files


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def run_scenario(count: int, concurrent: bool, image_file: str, size: int) -> dict:
    """In this process: submit `count` uploads of `image_file` (all at once or one after another)."""
    from dsd_model.settings import Settings
    from dsd_serve.runtime import Runtime
    from dsd_serve.schemas import GenerateParams

    runtime = Runtime(Settings(profile="tiny", max_queue=count + 1, max_images=1, size=size))
    params = GenerateParams(prompt="a toy", size=size)
    data = Path(image_file).read_bytes()
    small = io.BytesIO()
    Image.new("RGB", (size, size)).save(small, format="PNG")
    # one small request first, so that imports, codec plugins and worker threads are not counted
    asyncio.run(runtime.submit(params, small.getvalue()))

    async def scenario() -> list:
        if concurrent:
            return await asyncio.gather(*(runtime.submit(params, data) for _ in range(count)))
        return [await runtime.submit(params, data) for _ in range(count)]

    gc.collect()
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    queued = asyncio.run(scenario())
    gc.collect()
    resident, peak = status_kib("VmRSS") - before, status_kib("VmHWM") - before
    assert runtime.engine.queue_depth == len(queued) + 1
    return {"resident_mib": resident / 1024, "peak_mib": peak / 1024}


def run_child(tree: str, **scenario) -> dict:
    environment = dict(os.environ, PYTHONPATH=tree)
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(scenario)], capture_output=True, text=True,
                          env=environment, cwd=tree)
    if done.returncode:
        raise SystemExit(f"{scenario} on {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", type=int, default=64, help="queued 40 MP references (DSD_MAX_QUEUE is 64)")
    parser.add_argument("--concurrent", type=int, default=12, help="uploads decoded at once")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--baseline", help="git revision to compare with, e.g. the commit before a change")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_scenario(**json.loads(args.child))))
        return

    canvas_mib = args.size * args.size * 3 / MIB
    repository = str(Path(__file__).resolve().parents[1])
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        trees = {"current": repository}
        if args.baseline:
            trees = {args.baseline: f"{directory}/baseline", **trees}
            os.makedirs(trees[args.baseline])
            archive = subprocess.run(["git", "-C", repository, "archive", args.baseline], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", trees[args.baseline]], input=archive, check=True)
        files = reference_files(Path(directory))
        scenarios = [(f"queue of {args.queue}, PNG", args.queue, False, files["png"]),
                     (f"{args.concurrent} at once, PNG", args.concurrent, True, files["png"]),
                     (f"{args.concurrent} at once, JPEG", args.concurrent, True, files["jpeg"])]
        for name, count, concurrent, image_file in scenarios:
            for code, tree in trees.items():
                result = run_child(tree, count=count, concurrent=concurrent, image_file=str(image_file),
                                   size=args.size)
                rows.append((name, code, count, result))

    print(f"40 MP references ({WIDTH}x{HEIGHT}); one {args.size} px canvas = {canvas_mib:.2f} MiB; "
          f"goal for the queue: resident <= 2 x {args.queue} x canvas = {2 * args.queue * canvas_mib:.0f} MiB\n")
    print(f"| {'scenario':<22} | {'code':<8} | {'resident MiB':>12} | {'per upload MiB':>14} | {'peak MiB':>9} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 14}|{'-' * 16}|{'-' * 11}|")
    for name, code, count, result in rows:
        print(f"| {name:<22} | {code:<8} | {result['resident_mib']:>12.0f} | "
              f"{result['resident_mib'] / count:>14.2f} | {result['peak_mib']:>9.0f} |")


if __name__ == "__main__":
    main()
