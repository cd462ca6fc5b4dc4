"""Step-time jitter a joining request causes: how long the denoising thread spends between two forwards of the running
batch at a step boundary where a new request joins (its prompt encoding, VAE encode and noise, if the engine does
them there) against a steady boundary.

One long request runs; `--joiners` short requests with distinct references and prompts arrive while it does. The gap
between the end of one step of the long request and the start of its next is classified as `join` when a request
entered the batch at that boundary, `steady` otherwise; the step times themselves grow with the batch's rows and are
reported apart. Only the engine's public API and `DSDPipeline.step` are used, so the same script measures any
engine version.

    python benchmarks/step_jitter.py [--model tiny|real-size] [--size 64] [--joiners 8]

`real-size`: FLUX.1-dev's VAE and a 1 double + 1 single block transformer of FLUX.1-dev width (random weights), with
text encoders reduced to one layer of the widths the transformer reads (4096-d T5, 768-d pooled CLIP), T5 length 64.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.serving.engine import Engine, EngineConfig
from dsd_model.tiny import build_real_size_transformer, build_real_size_vae, build_tiny_components


class TimedPipeline(DSDPipeline):
    """Records when each step started and ended and which requests it advanced."""

    steps: list[tuple[float, float, frozenset[int]]]

    def step(self, states):
        started = time.perf_counter()
        super().step(states)
        self.steps.append((started, time.perf_counter(), frozenset(id(state.request) for state in states)))


def real_size_components() -> dict:
    components = build_tiny_components()
    torch.manual_seed(0)
    components["text_encoder_2"] = T5EncoderModel(T5Config(
        vocab_size=len(components["tokenizer_2"]), d_model=4096, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    components["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=768, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=1, vocab_size=len(components["tokenizer"]), max_position_embeddings=77, projection_dim=768,
    )).eval()
    components.update(transformer=build_real_size_transformer(num_layers=1, num_single_layers=1),
                      vae=build_real_size_vae())
    return components


def reference(seed: int, size: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "real-size"], default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--joiners", type=int, default=8)
    parser.add_argument("--long-steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = TimedPipeline(**(real_size_components() if args.model == "real-size" else build_tiny_components()))
    if args.model == "real-size":
        pipe.max_sequence_length = 64
    pipe.set_progress_bar_config(disable=True)
    pipe.steps = []
    engine = Engine(pipe, EngineConfig(max_batch_rows=2 + args.joiners, max_queue=100))
    engine.start(warmup=False)
    warm = engine.submit(GenerationRequest(image=reference(0, args.size), prompt="warm-up", num_inference_steps=2,
                                           size=args.size, seed=0))
    warm.future.result()
    pipe.steps.clear()

    long = engine.submit(GenerationRequest(image=reference(1, args.size), prompt="a long one",
                                           num_inference_steps=args.long_steps, size=args.size, seed=1))
    while len(pipe.steps) < 3:
        time.sleep(0.001)
    every = max(1, (args.long_steps - 10) // args.joiners)
    joiners = []
    for i in range(args.joiners):
        target = len(pipe.steps) + every
        while len(pipe.steps) < target:
            time.sleep(0.001)
        joiners.append(engine.submit(GenerationRequest(
            image=reference(10 + i, args.size), prompt=f"joiner number {i}", num_inference_steps=4, size=args.size,
            seed=10 + i)))
    long.future.result()
    for job in joiners:
        job.future.result()
    engine.drain(timeout=60)

    mine = [step for step in pipe.steps if id(long.request) in step[2]]
    gaps = {"steady": [], "join": []}
    intervals = {"steady": [], "join": []}
    for (_, ended, previous), (started, next_ended, current) in zip(mine, mine[1:]):
        kind = "join" if current - previous else "steady"
        gaps[kind].append(started - ended)
        intervals[kind].append(next_ended - ended)
    forwards = [ended - started for started, ended, _ in mine]
    print(f"{args.model}, canvas {args.size}x{2 * args.size}, {torch.get_num_threads()} intra-op thread(s), "
          f"{args.joiners} joiners over {args.long_steps} steps of the running request; "
          f"step p50 {1000 * statistics.median(forwards):.1f} ms\n")
    header = f"{'boundary':<8} {'count':>6} {'gap p50 ms':>11} {'gap max ms':>11} {'step-to-step p50 ms':>20}"
    print(header)
    print("-" * len(header))
    for kind, values in gaps.items():
        print(f"{kind:<8} {len(values):>6} {1000 * statistics.median(values):>11.2f} {1000 * max(values):>11.2f} "
              f"{1000 * statistics.median(intervals[kind]):>20.1f}")


if __name__ == "__main__":
    main()
