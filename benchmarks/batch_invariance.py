"""How far a request's image moves when it shares forwards with other requests: the bound of the reproducibility
contract (docs/serving.md, "Reproducibility").

Each of `--requests` seeded requests (random prompt, 2-6 steps, some with true CFG) is generated alone, then again
inside `--mixes` random batches of 2-8 requests with different step counts, so its rows meet other rows at every
position of their schedules. Reported: the largest absolute difference of the float images in [0, 1] and of the
8-bit images, against the request alone; exact requests (`exact=True`) in the same mixes, which must differ by 0.

    python benchmarks/batch_invariance.py [--requests 16] [--mixes 40] [--size 64]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from PIL import Image

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.tiny import build_tiny_components


def seeded_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (80, 96, 3), dtype=np.uint8))


def random_request(rng: random.Random, index: int, size: int) -> GenerationRequest:
    return GenerationRequest(
        image=seeded_image(rng.randrange(4)), prompt=f"a toy, scene {rng.randrange(10)}",
        num_inference_steps=rng.randint(2, 6), guidance_scale=rng.choice([1.0, 3.5, 5.0]),
        image_guidance_scale=rng.choice([1.0, 1.0, 1.5, 2.0]), text_guidance_scale=rng.choice([1.0, 1.5]),
        size=size, seed=index,
    )


def generate(pipe: DSDPipeline, requests: list[GenerationRequest], exact: list[bool]) -> torch.Tensor:
    """Float images in [0, 1] of `requests` generated together."""
    return pipe(
        [r.image for r in requests], [r.prompt for r in requests],
        num_inference_steps=[r.num_inference_steps for r in requests],
        guidance_scale=[r.guidance_scale for r in requests],
        image_guidance_scale=[r.image_guidance_scale for r in requests],
        text_guidance_scale=[r.text_guidance_scale for r in requests],
        seed=[r.seed for r in requests], size=requests[0].size, exact=exact, output_type="pt",
    ).images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--mixes", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rng = random.Random(0)
    pipe = DSDPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    requests = [random_request(rng, i, args.size) for i in range(args.requests)]
    alone = [generate(pipe, [r], [False]) for r in requests]

    worst = {False: [0.0, 0], True: [0.0, 0]}
    compared = {False: 0, True: 0}
    for _ in range(args.mixes):
        chosen = rng.sample(range(len(requests)), rng.randint(2, 8))
        exact = [rng.random() < 0.25 for _ in chosen]
        images = generate(pipe, [requests[i] for i in chosen], exact)
        for image, index, is_exact in zip(images, chosen, exact):
            reference = alone[index][0]
            difference = (image - reference).abs().max().item()
            levels = ((image * 255).round() - (reference * 255).round()).abs().max().item()
            worst[is_exact][0] = max(worst[is_exact][0], difference)
            worst[is_exact][1] = max(worst[is_exact][1], int(levels))
            compared[is_exact] += 1

    print(f"tiny profile, float32, {torch.get_num_threads()} intra-op thread(s), canvas {args.size}x{2 * args.size}, "
          f"{args.requests} requests in {args.mixes} random batches of 2-8\n")
    header = f"{'rows':<22} {'compared':>9} {'max |diff| [0,1]':>17} {'max 8-bit levels':>17}"
    print(header)
    print("-" * len(header))
    for is_exact, label in ((False, "shared forward"), (True, "exact (own forward)")):
        difference, levels = worst[is_exact]
        print(f"{label:<22} {compared[is_exact]:>9} {difference:>17.2e} {levels:>17d}")


if __name__ == "__main__":
    main()
