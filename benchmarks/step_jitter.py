"""Step-time jitter a joining request causes: how long the denoising thread spends between two forwards of the running
batch at a step boundary where a new request joins (its prompt encoding, VAE encode and noise, if the engine does
them there) against a steady boundary.

One long request runs; `--joiners` short requests with distinct references and prompts arrive while it does. The gap
between the end of one step of the long request and the start of its next is classified as `join` when a request
entered the batch at that boundary, `steady` otherwise; the step times themselves grow with the batch's rows and are
reported apart. Only the engine's public API and `DSDPipeline.step` are used, so the same script measures any
engine version.

    python benchmarks/step_jitter.py [--model tiny|real-size] [--size 64] [--joiners 8] [--adapters]

`--adapters`: the measurement twice, joiners naming an adapter loaded at start (`pinned`) and each naming an adapter
store file never loaded before (`loading`: read, checked and moved on the preparing thread while the batch runs), with
the ratio of the step-gap p99s over every boundary (goal: loading / pinned <= 1.2).

`real-size`: FLUX.1-dev's VAE and a 1 double + 1 single block transformer of FLUX.1-dev width (random weights), with
text encoders reduced to one layer of the widths the transformer reads (4096-d T5, 768-d pooled CLIP), T5 length 64.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.serving.adapter_store import AdapterStore
from dsd_model.serving.engine import Engine, EngineConfig
from dsd_model.tiny import (
    build_real_size_transformer, build_real_size_vae, build_tiny_components, tiny_lora_state_dict,
)


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


def measure(pipe: TimedPipeline, args, adapter_of, store: AdapterStore | None = None) -> dict[str, list[float]]:
    """One long request and `args.joiners` joiners (joiner i names `adapter_of(i)`); the gaps at steady and join
    boundaries of the long request's steps, and its forwards."""
    pipe.steps = []
    engine = Engine(pipe, EngineConfig(max_batch_rows=2 + args.joiners, max_queue=100), adapter_store=store)
    engine.start(warmup=False)
    warm = engine.submit(GenerationRequest(image=reference(0, args.size), prompt="warm-up", num_inference_steps=2,
                                           size=args.size, seed=0, adapter=adapter_of(None)))
    warm.future.result()
    pipe.steps.clear()

    long = engine.submit(GenerationRequest(image=reference(1, args.size), prompt="a long one",
                                           num_inference_steps=args.long_steps, size=args.size, seed=1,
                                           adapter=adapter_of(None)))
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
            seed=10 + i, adapter=adapter_of(i))))
    long.future.result()
    for job in joiners:
        job.future.result()
    engine.drain(timeout=60)

    mine = [step for step in pipe.steps if id(long.request) in step[2]]
    gaps = {"steady": [], "join": [], "forward": [ended - started for started, ended, _ in mine]}
    for (_, ended, previous), (started, _, current) in zip(mine, mine[1:]):
        gaps["join" if current - previous else "steady"].append(started - ended)
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "real-size"], default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--joiners", type=int, default=8)
    parser.add_argument("--long-steps", type=int, default=60)
    parser.add_argument("--adapters", action="store_true", help="compare joiners loading adapters with pinned ones")
    parser.add_argument("--adapter-rank", type=int, default=64, help="rank of the adapters of --adapters")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per variant with --adapters")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = TimedPipeline(**(real_size_components() if args.model == "real-size" else build_tiny_components()))
    if args.model == "real-size":
        pipe.max_sequence_length = 64
    pipe.set_progress_bar_config(disable=True)
    if not args.adapters:
        report(args, {"plain": measure(pipe, args, lambda i: None)})
        return
    with tempfile.TemporaryDirectory() as directory:
        pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=0, rank=args.adapter_rank), "pinned")
        runs = {"pinned": [], "loading": []}
        for round_ in range(args.rounds):
            for variant in (("pinned", "loading") if round_ % 2 == 0 else ("loading", "pinned")):
                if variant == "pinned":
                    runs[variant].append(measure(pipe, args, lambda i: "pinned"))
                    continue
                names = [f"r{round_}-j{i}" for i in range(args.joiners)]
                for seed, name in enumerate(names, start=1 + 100 * round_):
                    save_file(tiny_lora_state_dict(pipe.transformer, seed=seed, rank=args.adapter_rank),
                              f"{directory}/{name}.safetensors")
                store = AdapterStore(pipe.adapters, [Path(directory)], budget_bytes=2**34)
                runs[variant].append(measure(pipe, args, lambda i: "pinned" if i is None else names[i], store))
        merged = {variant: {kind: [v for run in measured for v in run[kind]] for kind in measured[0]}
                  for variant, measured in runs.items()}
        report(args, merged)
        size = pipe.adapters.adapters["pinned"].nbytes / 2**20
        every = {variant: gaps["steady"] + gaps["join"] for variant, gaps in merged.items()}
        ratio = percentile(every["loading"], 0.99) / percentile(every["pinned"], 0.99)
        print(f"\nstep-gap p99 over every boundary, loading / pinned: {1000 * percentile(every['loading'], 0.99):.2f} / "
              f"{1000 * percentile(every['pinned'], 0.99):.2f} ms = {ratio:.2f} (goal <= 1.2); adapters of rank "
              f"{args.adapter_rank}, {size:.1f} MiB each")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(args, variants: dict[str, dict[str, list[float]]]) -> None:
    print(f"{args.model}, canvas {args.size}x{2 * args.size}, {torch.get_num_threads()} intra-op thread(s), "
          f"{args.joiners} joiners over {args.long_steps} steps of the running request\n")
    header = (f"{'run':<8} {'boundary':<8} {'count':>6} {'gap p50 ms':>11} {'gap p99 ms':>11} {'gap max ms':>11} "
              f"{'step p50 ms':>12}")
    print(header)
    print("-" * len(header))
    for variant, gaps in variants.items():
        for kind in ("steady", "join"):
            values = gaps[kind]
            print(f"{variant:<8} {kind:<8} {len(values):>6} {1000 * statistics.median(values):>11.2f} "
                  f"{1000 * percentile(values, 0.99):>11.2f} {1000 * max(values):>11.2f} "
                  f"{1000 * statistics.median(gaps['forward']):>12.1f}")


if __name__ == "__main__":
    main()
