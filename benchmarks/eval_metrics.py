"""What each evaluation score costs per image: DINO, CLIP-I, CLIP-T and the copy-paste pixel check, with tiny and
real-size encoders (DINOv2-base, CLIP ViT-L/14; random weights, the cost does not depend on the values).

The scores of one image share work: CLIP-I and CLIP-T use the same image embedding, and each reference and prompt
is embedded once per batch here (a run embeds them per batch too). The judge's cost is tokens at the judge's
prices, not compute here: see docs/evaluation.md.

    python benchmarks/eval_metrics.py [--sizes tiny real] [--images 16] [--batch 8] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dsd_model.eval.embeddings import Encoders, pixel_difference
from dsd_model.eval.random_encoders import write_random_encoders
from latent_cache import median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=("tiny", "real"), default=["tiny", "real"])
    parser.add_argument("--images", type=int, default=16, help="images scored per measurement")
    parser.add_argument("--batch", type=int, default=8, help="images per encoder forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(args.images)]
    reference, prompt = images[0], "a red plush fox wearing a blue scarf, sitting on a wooden table in the snow"
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.images} images of 512 px, "
          f"batches of {args.batch}")
    print(f"| encoders | {'DINO':>10} | {'CLIP-I':>10} | {'CLIP-T':>10} | {'pixels':>10} |  (ms per image)")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as root:
            encoders = Encoders(*write_random_encoders(Path(root), size), args.device)

        def batches(function):
            def run():
                for start in range(0, len(images), args.batch):
                    function(images[start: start + args.batch])
            return run

        dino = median_seconds(batches(lambda chunk: encoders.dino_embeddings(chunk)), args.repeats)
        clip_i = median_seconds(batches(lambda chunk: encoders.clip_image_embeddings(chunk)), args.repeats)
        clip_t = median_seconds(batches(lambda chunk: encoders.clip_text_embeddings([prompt] * len(chunk))),
                                args.repeats)
        pixels = median_seconds(lambda: [pixel_difference(reference, image) for image in images], args.repeats)
        per_image = [1000 * t / len(images) for t in (dino, clip_i, clip_t, pixels)]
        print(f"| {size} | " + " | ".join(f"{ms:10.2f}" for ms in per_image) + " |")


if __name__ == "__main__":
    main()
