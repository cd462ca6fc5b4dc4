"""What identity scores, the NudeNet check and best-of-n cost.

1. Per image, on one CPU thread (the scoring thread of a replica): dlib's face scorer (detection, landmarks,
   descriptor) on photographs with and without a face, the tiny profile's random DINOv2, a real-size (DINOv2-base)
   random-weight encoder with `--real-size` (the cost does not depend on the weights), and NudeNet's detector.
   Photographs from scikit-image's packaged data: `astronaut` (a face) and `coffee` (none), at 512 px.
2. Best-of-k on the tiny profile, in-process: one request with `best_of=k` against k independent one-image requests
   submitted at once (both score every image), side by side in one run; the seconds per returned image and their
   ratio. Each candidate is one engine row, so the ratio approaches k when generation dominates.

    OMP_NUM_THREADS=1 python benchmarks/identity.py [--repeats 5] [--steps 8] [--size 256] [--real-size]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsd_model.scoring.faces import FaceEmbedder
from dsd_model.scoring.subjects import SubjectEmbedder, tiny_subject_embedder
from dsd_model.serving.safety import NUDENET_UNSAFE, NudeNetCheck
from dsd_model.settings import Settings
from dsd_serve.runtime import Runtime
from dsd_serve.schemas import GenerateParams
from latent_cache import median_seconds

SIDE = 512


def photographs() -> dict[str, Image.Image]:
    from skimage import data

    return {name: Image.fromarray(getattr(data, name)()).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
            for name in ("astronaut", "coffee")}


def scorer_costs(repeats: int, real_size: bool) -> list[tuple[str, str, float]]:
    photos = photographs()
    faces = FaceEmbedder()
    rows = [("face scorer (dlib-resnet-v1)", f"{name}, {SIDE} px", median_seconds(lambda i=image: faces.face(i),
                                                                                   repeats))
            for name, image in photos.items()]
    encoders = [("tiny-random-dino", tiny_subject_embedder())]
    with tempfile.TemporaryDirectory() as root:
        if real_size:
            from dsd_model.eval.random_encoders import write_random_encoders

            dino, _ = write_random_encoders(Path(root), "real")
            encoders.append(("DINOv2-base, random weights", SubjectEmbedder(dino, "cpu")))
        for name, encoder in encoders:
            seconds = median_seconds(lambda e=encoder: e.similarities(photos["astronaut"], [photos["coffee"]] * 4),
                                     repeats)
            rows.append((f"subject encoder ({name})", f"reference + 4 images, {SIDE} px, per image", seconds / 5))
    nudenet = NudeNetCheck("output", NUDENET_UNSAFE, 0.5)
    rows += [("NudeNet check", f"{name}, {SIDE} px", median_seconds(lambda i=image: nudenet.flag(i), repeats))
             for name, image in photos.items()]
    return rows


async def best_of_costs(runtime: Runtime, reference: bytes, ks: list[int], steps: int, size: int):
    warm_up = GenerateParams(prompt="the subject on a beach", steps=steps, size=size, seed=0, best_of=2)
    await (await runtime.submit(warm_up, reference)).result()
    rows = []
    for k in ks:
        params = dict(prompt="the subject on a beach", steps=steps, size=size, seed=1000 * k)
        start = time.perf_counter()
        best = await (await runtime.submit(GenerateParams(**params, best_of=k), reference)).result()
        best_s = time.perf_counter() - start
        start = time.perf_counter()
        submissions = [await runtime.submit(GenerateParams(**{**params, "seed": params["seed"] + i}, identity=True),
                                            reference) for i in range(k)]
        alone = await asyncio.gather(*(submission.result() for submission in submissions))
        alone_s = time.perf_counter() - start
        assert len(best.images) == 1 and sum(len(result.images) for result in alone) == k
        rows.append((k, best_s, best_s, alone_s, alone_s / k))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--real-size", action="store_true", help="also time a DINOv2-base-sized encoder")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| scorer | image | ms per image |\n|---|---|---:|")
    for name, image, seconds in scorer_costs(args.repeats, args.real_size):
        print(f"| {name} | {image} | {seconds * 1000:.1f} |")

    runtime = Runtime(Settings(profile="tiny", device="cpu", max_sequence_length=32, max_batch_rows=16,
                               max_images=16, watermark=False))
    runtime.start()
    reference = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(reference, "PNG")
    try:
        rows = asyncio.run(best_of_costs(runtime, reference.getvalue(), args.ks, args.steps, args.size))
    finally:
        runtime.drain()
    print(f"\nbest-of-k, tiny profile, {args.size} px, {args.steps} steps, one image returned per best-of request\n")
    print("| k | best_of=k s | s per returned image | k independent requests s | s per returned image | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for k, best_s, per_best, alone_s, per_alone in rows:
        print(f"| {k} | {best_s:.2f} | {per_best:.2f} | {alone_s:.2f} | {per_alone:.2f} | {per_best / per_alone:.2f} |")


if __name__ == "__main__":
    main()
