"""Seconds per denoising step, and batched three-pass true CFG against three sequential forwards.

Runs on whatever device is available (CPU here). Two transformers:
- tiny: the embedded default profile;
- real-size: FLUX.1-dev width (3072 hidden, 24 heads, 4096-d T5 context) with random weights and a reduced number of
  blocks (a full 19 + 38 block model needs 24 GB even in bf16); the full-model time is extrapolated per block
  kind from two depths measured in the same run.

    python benchmarks/pipeline_step.py [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.pipeline import DenoiseState
from dsd_model.tiny import build_real_size_transformer, build_real_size_vae, build_tiny_components


def synthetic_state(pipe: DSDPipeline, size: int, cfg: bool) -> DenoiseState:
    """A state with random inputs of the right shapes, positioned where true CFG is on (step 2)."""
    transformer = pipe.transformer.config
    packed = transformer.in_channels // 2
    tokens = (size // 16) * (2 * size // 16)
    text = pipe.max_sequence_length
    request = GenerationRequest(
        image=Image.new("RGB", (size, size)), prompt="benchmark", num_inference_steps=1000, size=size,
        image_guidance_scale=2.0 if cfg else 1.0,
    )
    timesteps, sigmas = pipe.schedule(request.num_inference_steps, tokens)
    embeds = torch.randn(1, text, transformer.joint_attention_dim)
    pooled = torch.randn(1, transformer.pooled_projection_dim)
    return DenoiseState(
        request=request, seed=0, latents=torch.randn(1, tokens, packed), condition=torch.randn(1, tokens, packed),
        prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds.clone(),
        negative_pooled_prompt_embeds=pooled.clone(), timesteps=timesteps, sigmas=sigmas, step_index=2,
    )


def seconds(pipe: DSDPipeline, states: list[DenoiseState], repeats: int, calls: int = 1) -> float:
    """Median wall time of `calls` consecutive `pipe.step` calls over the same states."""
    pipe.step(states)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            pipe.step(states)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def real_size_pipeline(blocks: int) -> DSDPipeline:
    """Tiny text encoders (unused: the states carry random embeddings), real-size transformer and VAE."""
    components = build_tiny_components()
    components.update(
        transformer=build_real_size_transformer(num_layers=blocks, num_single_layers=blocks), vae=build_real_size_vae()
    )
    return DSDPipeline(**components)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="reference side; the canvas is size x 2*size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    tiny = DSDPipeline(**build_tiny_components())
    rows = [("tiny", "1+1", tiny, args.repeats * 5)]
    rows += [("real-size", f"{n}+{n}", real_size_pipeline(n), args.repeats) for n in (1, 2)]

    tokens = (args.size // 16) * (2 * args.size // 16)
    print(f"device cpu, float32, canvas {args.size}x{2 * args.size} = {tokens} image tokens + "
          f"{tiny.max_sequence_length} text tokens, median of {args.repeats}+ runs\n")
    header = f"{'model':<10} {'blocks':>6} {'s/step 1 row':>13} {'CFG: 3 rows batched':>20} {'3 x 1 row':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    measured = {}
    for name, blocks, pipe, repeats in rows:
        plain = seconds(pipe, [synthetic_state(pipe, args.size, cfg=False)], repeats)
        batched = seconds(pipe, [synthetic_state(pipe, args.size, cfg=True)], repeats)
        sequential = seconds(pipe, [synthetic_state(pipe, args.size, cfg=False)], repeats, calls=3)
        measured[(name, blocks)] = (plain, batched)
        print(f"{name:<10} {blocks:>6} {plain:>13.4f} {batched:>20.4f} {sequential:>10.4f} {sequential / batched:>5.2f}x")

    (p1, b1), (p2, b2) = measured[("real-size", "1+1")], measured[("real-size", "2+2")]
    per_pair, per_pair_cfg = p2 - p1, b2 - b1
    fixed, fixed_cfg = p1 - per_pair, b1 - per_pair_cfg
    print("\nreal-size FLUX.1-dev extrapolated (19 double + 38 single blocks, cost split by parameter count 2.4:1):")
    for label, base, pair in (("1 row", fixed, per_pair), ("CFG 3 rows", fixed_cfg, per_pair_cfg)):
        double, single = pair * 2.4 / 3.4, pair * 1.0 / 3.4
        print(f"  {label:<11} {base + 19 * double + 38 * single:8.1f} s/step")


if __name__ == "__main__":
    main()
