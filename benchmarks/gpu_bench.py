"""Speed goals of the denoising path, measured in one run against the official DSD baseline on the same weights.

Real-size FLUX.1-dev-shaped DSD transformer (19 double + 38 single blocks, random weights, bf16) and VAE, text
encoders of FLUX's widths with one layer (prompt encoding is outside every timed loop), two rank-512 LoRA adapters
on the attention projections. Canvas `size` x 2`size` (512: 2048 image + 512 text tokens).

- official baseline: eager, native attention, LoRA unfused, one request at a time, true CFG as three sequential
  batch-1 forwards (the official inference loop, re-implemented in `official_image`);
- lossless: per-adapter folded LoRA, regionally compiled blocks, rows padded to buckets, true CFG as rows of one
  forward (`DSDPipeline.step`);
- fp8 (opt-in): the lossless path with the active adapter fused and torchao float8 weights and activations;
- step cache (opt-in): the lossless path with the per-row step cache at several thresholds;
- throughput over 1/2/4/8 rows, and the engine's step-level against whole-request batching at 80% load;
- mixed adapters: 8 rows of 2 or 8 adapters in one forward against 8 rows of the folded single adapter, with
  folding on (the default on cuda) and fully unfused;
- cold start: the weights loaded from the page cache and cold (benchmarks/weights_read.py), compile with a cold
  and a warm artefact cache (a restart), the warm-up forwards, and the time to `/readyz` they add up to.

An image's time is its denoising loop plus its VAE decode (prompt and reference encoding are excluded: both are
cached in serving). Prints one table and writes gpu_bench.json to $OUT (default ./out) after every section; exits 1
when a section failed.

`--rehearsal` runs every section on the CPU at tiny size (the tiny profile's components, a 64 px canvas, 3 steps,
compiled): the GPU check rehearsed before a GPU is lent. A section that needs a GPU raises `DeviceError` and is
reported as such; any other failure fails the rehearsal. A new section needs nothing more than `report.section`.

    python benchmarks/gpu_bench.py                      # the GPU check (about 7 minutes on an H200)
    python benchmarks/gpu_bench.py --rehearsal          # every section on a CPU at tiny size
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.errors import DeviceError
from dsd_model.serving.acceleration import (
    Denoiser, RowBuckets, compile_blocks, quantize_fp8, save_compile_cache, use_compile_cache, warm_up,
)
from dsd_model.serving.step_cache import EVALUATIONS_KEY, StepCache, blocks_per_row
from dsd_model.tiny import (
    FLUX_SCHEDULER_CONFIG, build_real_size_transformer, build_real_size_vae, build_real_width_text_encoders,
    build_tiny_components, build_tiny_tokenizers, tiny_lora_state_dict,
)
from serving import REFERENCE, percentile, poisson_arrivals, run_engine, workload
from weights_read import FULL_WEIGHTS_GB, load_seconds, measure

PEAK_BF16_FLOPS = 989e12
"""Dense bf16 tensor-core peak of an H100/H200 SXM (the MFU denominator)."""
ADAPTERS = ("identity", "structure")
REHEARSAL = dict(device="cpu", components="tiny", size=64, steps=3, text_tokens=16, repeats=1, calls=2, rank=4,
                 buckets=[1, 2], thresholds=[0.05], requests=4, read_gb=0.05, budget_s=math.inf)
"""The arguments of `--rehearsal`: every size at its smallest, every section run (no time budget), compiled."""


def forward_flops(config, image_tokens: int, text_tokens: int, rows: int = 1) -> float:
    """Matrix-multiply FLOPs of one transformer forward (linear layers and attention; elementwise work excluded)."""
    d = config.num_attention_heads * config.attention_head_dim
    tokens = image_tokens + text_tokens
    double = 2 * image_tokens * (4 * d * d + 8 * d * d) + 2 * text_tokens * (4 * d * d + 8 * d * d)
    single = 2 * tokens * (3 * d * d + d * 4 * d + 5 * d * d)
    attention = 4 * tokens * tokens * d
    blocks = config.num_layers * (double + attention) + config.num_single_layers * (single + attention)
    embed = 2 * image_tokens * config.in_channels * d + 2 * text_tokens * config.joint_attention_dim * d
    return rows * (blocks + embed + 2 * image_tokens * d * config.out_channels)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args) -> DSDPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.components == "tiny":
        pipe = DSDPipeline(**build_tiny_components())
    else:
        tokenizer, tokenizer_2 = build_tiny_tokenizers()
        clip, t5 = build_real_width_text_encoders(len(tokenizer), len(tokenizer_2), device=args.device)
        pipe = DSDPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
            vae=build_real_size_vae(dtype, device=args.device), text_encoder=clip, tokenizer=tokenizer,
            text_encoder_2=t5, tokenizer_2=tokenizer_2,
            transformer=build_real_size_transformer(*args.blocks, dtype=dtype, device=args.device),
        )
    pipe = pipe.to(device=device, dtype=dtype)
    transformer = pipe.transformer
    pipe.set_progress_bar_config(disable=True)
    pipe.max_sequence_length = args.text_tokens
    for seed, name in enumerate(ADAPTERS, start=1):
        pipe.load_adapter(tiny_lora_state_dict(transformer, seed=seed, rank=args.rank, std=0.01), name)
    pipe.set_adapter(ADAPTERS[0])
    return pipe


def states(pipe, args, count: int = 1, cfg: bool = False, steps: int | None = None, seed: int = 0,
           adapters: list[str] | None = None):
    """Prepared requests of the identity adapter (or of `adapters[i]`)."""
    image = Image.open(REFERENCE).convert("RGB")
    return pipe.prepare([
        GenerationRequest(image=image, prompt="the same toy on a beach", num_inference_steps=steps or args.steps,
                          size=args.size, seed=seed + i, image_guidance_scale=2.0 if cfg else 1.0,
                          text_guidance_scale=1.5 if cfg else 1.0,
                          adapter=adapters[i] if adapters else ADAPTERS[0])
        for i in range(count)
    ])


def official_image(pipe, state) -> torch.Tensor:
    """The official DSD inference loop for one request: batch-1 forwards, true CFG as three in a row."""
    transformer, dtype, device = pipe.transformer, pipe.transformer.dtype, pipe._execution_device
    size = state.request.size
    img_ids = pipe_image_ids(pipe, size)
    txt_ids = torch.zeros(state.prompt_embeds.shape[1], 3, device=device, dtype=dtype)
    while not state.done:
        x, c = state.latents, state.condition
        t = state.timesteps[state.step_index].expand(1).to(dtype) / 1000
        g = torch.full((1,), state.request.guidance_scale, device=device)

        def forward(condition, text, pooled):
            return transformer(hidden_states=torch.cat([x, condition], dim=2), timestep=t, guidance=g,
                               pooled_projections=pooled, encoder_hidden_states=text, txt_ids=txt_ids,
                               img_ids=img_ids, return_dict=False)[0]

        v = forward(c, state.prompt_embeds, state.pooled_prompt_embeds)
        if state.rows == 3:
            negative = (state.negative_prompt_embeds, state.negative_pooled_prompt_embeds)
            u, u_t = forward(torch.zeros_like(c), *negative), forward(c, *negative)
            r = state.request
            v = u + r.image_guidance_scale * (u_t - u) + r.text_guidance_scale * (v - u_t)
        sigma, sigma_next = state.sigmas[state.step_index], state.sigmas[state.step_index + 1]
        state.latents = (x.float() + (sigma_next - sigma) * v).to(v.dtype)
        state.step_index += 1
    return pipe.decode(state)


def pipe_image_ids(pipe, size: int) -> torch.Tensor:
    from dsd_model.pipeline import latent_image_ids

    return latent_image_ids(2 * (size // 16), 2 * (2 * size // 16), pipe._execution_device, pipe.transformer.dtype)


def our_image(pipe, state) -> torch.Tensor:
    while not state.done:
        pipe.step([state])
    return pipe.decode(state)


def image_seconds(pipe, args, generate, cfg: bool, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Seconds per image over `repeats` images (same seed) and the last decoded image in [0, 1]."""
    times, image = [], None
    for _ in range(repeats):
        state = states(pipe, args, cfg=cfg)[0]
        sync(pipe.transformer.device)
        start = time.perf_counter()
        image = generate(pipe, state)
        sync(pipe.transformer.device)
        times.append(time.perf_counter() - start)
    return times, (image.float() / 2 + 0.5).clamp(0, 1).cpu()


def step_seconds(pipe, batch, calls: int) -> list[float]:
    """Seconds of each of `calls` repetitions of the same step over `batch` (step indices rewound each time)."""
    start_index = [s.step_index for s in batch]
    times = []
    for _ in range(calls):
        sync(pipe.transformer.device)
        start = time.perf_counter()
        pipe.step(batch)
        sync(pipe.transformer.device)
        times.append(time.perf_counter() - start)
        for state, index in zip(batch, start_index):
            state.step_index = index
    return times


def drift(image: torch.Tensor, reference: torch.Tensor) -> dict:
    mse = float(((image - reference) ** 2).mean())
    return {"psnr_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
            "max_abs": float((image - reference).abs().max())}


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Report:
    """The rows of the table and the JSON document, filled section by section."""

    def __init__(self, args):
        self.rows: list[tuple[str, str, str, str]] = []
        self.data: dict = {"arguments": vars(args), "sections": {}}
        self.started = time.perf_counter()
        self.budget_s = args.budget_s

    def row(self, check: str, measured: str, goal: str = "", met: bool | None = None) -> None:
        self.rows.append((check, measured, goal, "" if met is None else ("yes" if met else "NO")))
        print(f"  {check}: {measured}" + (f"  (goal {goal})" if goal else ""), flush=True)

    def section(self, name: str, function, *arguments, optional: bool = False):
        """Run one section; a failure is reported in the table and the run goes on. Its outcome (`ok`, `failed`,
        `needs a GPU`, `skipped`) goes to the JSON."""
        if optional and time.perf_counter() - self.started > self.budget_s:
            self.row(name, "skipped: over the time budget")
            self.data["sections"][name] = "skipped"
            return None
        print(f"\n== {name}", flush=True)
        try:
            result = function(self, *arguments)
            self.data["sections"][name] = "ok"
            return result
        except DeviceError as exc:
            self.data["sections"][name] = "needs a GPU"
            self.row(name, f"needs a GPU: {str(exc).splitlines()[0]}")
            return None
        except Exception as exc:  # a benchmark reports a failed section and measures the rest
            self.data["sections"][name] = "failed"
            self.data.setdefault("errors", {})[name] = repr(exc)
            self.row(name, f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        finally:
            self.save()

    @property
    def failed(self) -> list[str]:
        return [name for name, outcome in self.data["sections"].items() if outcome == "failed"]

    def save(self) -> Path:
        """Written after every section, so a run cut short by its time limit keeps what it measured."""
        self.data["table"] = [dict(zip(("check", "measured", "goal", "met"), r)) for r in self.rows]
        self.data["total_s"] = time.perf_counter() - self.started
        path = Path(os.environ.get("OUT") or "out") / "gpu_bench.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2, default=str))
        return path

    def print_table(self) -> None:
        width = [max(len(r[i]) for r in self.rows + [("check", "measured", "goal", "met")]) for i in range(4)]
        print("\n" + "  ".join(h.ljust(w) for h, w in zip(("check", "measured", "goal", "met"), width)))
        print("  ".join("-" * w for w in width))
        for r in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, width)))
        print(f"\nwrote {self.save()} ({self.data['total_s']:.0f} s)")


def baseline(report: Report, pipe, args) -> None:
    device = pipe.transformer.device
    reset_peak(device)
    plain, _ = image_seconds(pipe, args, official_image, cfg=False, repeats=args.repeats + 1)
    cfg, _ = image_seconds(pipe, args, official_image, cfg=True, repeats=args.repeats)
    report.data["official"] = {"image_s": plain[1:], "cfg_image_s": cfg, "peak_gib": peak_gib(device)}
    report.row("official baseline p50, 1 image", f"{statistics.median(plain[1:]):.3f} s")
    report.row("official baseline p50, true CFG (3 passes)", f"{statistics.median(cfg):.3f} s")
    report.row("peak GPU memory, official baseline", f"{peak_gib(device)} GiB")


def lora_cost(report: Report, pipe, args) -> None:
    """Unfused (two adapters loaded, one active) against folded per adapter, eager, one row; and a switch."""
    batch = states(pipe, args)
    unfused = statistics.median(step_seconds(pipe, batch, args.calls))
    pipe.adapters.fold_on_activate()
    switches = []
    for name in (*ADAPTERS[1:], ADAPTERS[0]) * 2:
        sync(pipe.transformer.device)
        start = time.perf_counter()
        pipe.set_adapter(name)
        sync(pipe.transformer.device)
        switches.append(time.perf_counter() - start)
    folded = statistics.median(step_seconds(pipe, batch, args.calls))
    report.data["lora"] = {"unfused_step_s": unfused, "folded_step_s": folded, "switch_s": switches}
    report.row("LoRA unfused vs folded per adapter (eager step)",
               f"{unfused * 1e3:.1f} vs {folded * 1e3:.1f} ms; a switch re-folds in {statistics.median(switches) * 1e3:.1f} ms",
               "folded is the default on cuda", folded < unfused)


def compile_and_warm_up(pipe, args, buckets: RowBuckets) -> dict:
    """What the service does at start after loading: compile the blocks (through the artefact cache), then one
    forward per (row bucket, adapter state). The first pass compiles and runs, a second pass only runs: their
    difference is the compile time, the second pass the warm-up."""
    if args.compile:
        use_compile_cache(args.compile_cache_dir)
        compile_blocks(pipe.transformer, args.compile_mode, shapes=64)
    pipe.denoiser = Denoiser(pipe.transformer, buckets)
    first = warm_up(pipe, [args.size], buckets)
    again = warm_up(pipe, [args.size], buckets)
    return {"warm_up_s": first, "compile_s": first - again, "forwards_s": again}


def compile_path(report: Report, pipe, args, buckets: RowBuckets) -> None:
    start = time.perf_counter()
    startup = compile_and_warm_up(pipe, args, buckets)
    first, _ = image_seconds(pipe, args, our_image, cfg=False, repeats=1)
    report.data["startup"] = {**startup, "first_image_s": first[0], "total_s": time.perf_counter() - start}
    if args.compile:
        save_compile_cache(args.compile_cache_dir)
    report.row("time to first image after start (compile + warm-up of "
               f"{len(buckets.sizes)} row buckets x {len(pipe.adapters.names) + 1} adapter states + image)",
               f"{time.perf_counter() - start:.1f} s (compile {startup['compile_s']:.1f} s with a cold artefact "
               f"cache, warm-up forwards {startup['forwards_s']:.1f} s)")


def lossless(report: Report, pipe, args, official: dict) -> torch.Tensor:
    device = pipe.transformer.device
    reset_peak(device)
    plain, image = image_seconds(pipe, args, our_image, cfg=False, repeats=args.repeats)
    cfg, _ = image_seconds(pipe, args, our_image, cfg=True, repeats=args.repeats)
    steps = step_seconds(pipe, states(pipe, args), args.calls * 3)
    p50_step = statistics.median(steps)
    flops = forward_flops(pipe.transformer.config, (args.size // 16) * (2 * args.size // 16), pipe.max_sequence_length)
    mfu = flops / p50_step / PEAK_BF16_FLOPS
    speedup = statistics.median(official["image_s"]) / statistics.median(plain)
    cfg_speedup = statistics.median(official["cfg_image_s"]) / statistics.median(cfg)
    report.data["lossless"] = {"image_s": plain, "cfg_image_s": cfg, "step_s": steps, "flops_per_forward": flops,
                               "mfu": mfu, "peak_gib": peak_gib(device)}
    report.row("lossless p50, 1 image, no true CFG", f"{statistics.median(plain):.3f} s = {speedup:.2f}x faster",
               ">= 2.2x", speedup >= 2.2)
    report.row("lossless MFU (1 row, per step)", f"{mfu:.1%} of {PEAK_BF16_FLOPS / 1e12:.0f} TFLOP/s "
               f"({flops / 1e12:.1f} TFLOP per forward, {p50_step * 1e3:.1f} ms)", ">= 60%", mfu >= 0.6)
    report.row("lossless p50 with true CFG", f"{statistics.median(cfg):.3f} s = {cfg_speedup:.2f}x faster",
               ">= 2.5x", cfg_speedup >= 2.5)
    jitter = (percentile(steps, 0.99) - p50_step) / p50_step
    report.row("step-time jitter (p99 - p50) / p50, 1 row", f"{jitter:.1%} over {len(steps)} steps")
    report.row("peak GPU memory, lossless", f"{peak_gib(device)} GiB")
    return image


def throughput(report: Report, pipe, args) -> float:
    batch = states(pipe, args, count=8)
    curve = {}
    for rows in (1, 2, 4, 8):
        curve[rows] = rows / statistics.median(step_seconds(pipe, batch[:rows], args.calls))
    report.data["throughput_rows_per_s"] = curve
    ratio = curve[8] / curve[1]
    report.row("throughput rows/s at 1/2/4/8 rows", " / ".join(f"{curve[r]:.2f}" for r in curve) +
               f"; 8 rows = {ratio:.2f}x batch 1", ">= 1.05x", ratio >= 1.05)
    return curve[8]


def step_cache(report: Report, pipe, args, buckets: RowBuckets, reference: torch.Tensor) -> None:
    plain = Denoiser(pipe.transformer, buckets)
    cached = Denoiser(pipe.transformer, buckets, StepCache(0.0))
    batch = states(pipe, args)
    times = {"off": [], "0": []}
    for _ in range(args.calls):
        for key, denoiser in (("off", plain), ("0", cached)):
            pipe.denoiser = denoiser
            times[key] += step_seconds(pipe, batch, 2)
    overhead = statistics.median(times["0"]) / statistics.median(times["off"]) - 1
    report.row("step cache overhead per step, nothing skipped (threshold 0)", f"{overhead:+.1%}", "<= 3%",
               overhead <= 0.03)
    full = args.steps * blocks_per_row(pipe.transformer)
    results = {}
    for threshold in args.thresholds:
        pipe.denoiser = Denoiser(pipe.transformer, buckets, StepCache(threshold))
        state = states(pipe, args)[0]
        sync(pipe.transformer.device)
        start = time.perf_counter()
        image = (our_image(pipe, state).float() / 2 + 0.5).clamp(0, 1).cpu()
        seconds = time.perf_counter() - start
        evaluations = state.extras[EVALUATIONS_KEY]
        results[threshold] = {"block_evaluations": evaluations, "fewer": full / evaluations, "image_s": seconds,
                              **drift(image, reference)}
    pipe.denoiser = plain
    report.data["step_cache"] = {"overhead": overhead, "uncached_block_evaluations": full, "thresholds": results}
    met = [t for t, r in results.items() if r["fewer"] >= 1.8]
    for threshold, r in results.items():
        report.row(f"step cache threshold {threshold}", f"{r['fewer']:.2f}x fewer block evaluations "
                   f"({r['block_evaluations']} of {full}); drift PSNR {r['psnr_db']:.1f} dB, max abs {r['max_abs']:.3f}",
                   ">= 1.8x at some threshold" if threshold == max(results) else "", bool(met) if threshold == max(results) else None)


def mixed_adapters(report: Report, pipe, args) -> None:
    """8 rows of one adapter (folded: the fast path) against 8 rows of 2 adapters (4 + 4) and of 8 adapters, with
    folding on (the default on cuda: each forward folds its most-used adapter when that is cheaper, `fold_for`, and
    applies the other rows' LoRA per segment) and unfused (every row's LoRA per segment on the base weights), each
    step timed after one untimed step of its layout (which compiles it)."""
    extra = [f"extra-{k}" for k in range(8 - len(ADAPTERS))]
    for seed, name in enumerate(extra, start=len(ADAPTERS) + 1):
        if name not in pipe.adapters.names:
            pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=seed, rank=args.rank, std=0.01), name)
    layouts = {"1 adapter": [ADAPTERS[0]] * 8, "2 adapters": list(ADAPTERS) * 4, "8 adapters": [*ADAPTERS, *extra]}
    batches = {name: states(pipe, args, count=8, adapters=rows) for name, rows in layouts.items()}
    times = {}
    for design in ("folding", "unfused"):
        if design == "unfused":
            pipe.adapters.stop_folding()
        for layout, batch in batches.items():
            step_seconds(pipe, batch, 1)
            times[(design, layout)] = statistics.median(step_seconds(pipe, batch, args.calls))
    pipe.adapters.fold_on_activate()
    single = times[("folding", "1 adapter")]
    report.data["mixed_adapters"] = {f"{design} {layout}": seconds for (design, layout), seconds in times.items()}
    for layout in ("2 adapters", "8 adapters"):
        for design in ("folding", "unfused"):
            ratio = times[(design, layout)] / single
            report.row(f"mixed step, 8 rows of {layout}, {design}", f"{times[(design, layout)] * 1e3:.1f} ms = "
                       f"{ratio:.2f}x the folded single-adapter step ({single * 1e3:.1f} ms)",
                       "<= 1.15x" if design == "folding" else "", ratio <= 1.15 if design == "folding" else None)
    report.row("unfused single-adapter step, 8 rows", f"{times[('unfused', '1 adapter')] * 1e3:.1f} ms = "
               f"{times[('unfused', '1 adapter')] / single:.2f}x folded")


def batching(report: Report, pipe, args, rows_per_s: float) -> None:
    requests = workload(args.requests, seed=1, size=args.size)
    row_steps = statistics.mean(r.num_inference_steps * (3 if r.uses_cfg else 1) for r in requests)
    rate = 0.8 * rows_per_s / row_steps
    arrivals = poisson_arrivals(len(requests), rate)
    results = {}
    for mode in ("request", "step"):
        latencies, makespan = run_engine(mode, requests, arrivals, pipe=pipe)
        results[mode] = {"p50_s": percentile(latencies, 0.5), "p99_s": percentile(latencies, 0.99),
                         "makespan_s": makespan}
    ratio = results["step"]["p50_s"] / results["request"]["p50_s"]
    report.data["batching"] = {"rate_per_s": rate, **results}
    report.row(f"step-level / whole-request p50 at 80% load ({len(requests)} requests, 8/16/28 steps, 1 in 4 CFG)",
               f"{results['step']['p50_s']:.2f} / {results['request']['p50_s']:.2f} s = {ratio:.2f}", "<= 0.6",
               ratio <= 0.6)


def fp8(report: Report, args, lossless_image: torch.Tensor, lossless_p50: float, buckets: RowBuckets) -> None:
    """A second pipeline (same seeds, so the same weights), the identity adapter fused, float8 blocks. Its memory
    is counted above what the lossless pipeline holds."""
    device = torch.device(args.device)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    pipe = build(args)
    pipe.adapters.fuse(ADAPTERS[0])
    layers = quantize_fp8(pipe.transformer)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    weights = (torch.cuda.memory_allocated(device) - held) / 2**30 if device.type == "cuda" else None
    one = RowBuckets([1])
    if args.compile:
        compile_blocks(pipe.transformer, args.compile_mode, shapes=8)
    pipe.denoiser = Denoiser(pipe.transformer, one)
    warm_up(pipe, [args.size], one)
    reset_peak(device)
    seconds, image = image_seconds(pipe, args, our_image, cfg=False, repeats=args.repeats)
    peak = (torch.cuda.max_memory_allocated(device) - held) / 2**30 if device.type == "cuda" else None
    speedup = lossless_p50 / statistics.median(seconds)
    report.data["fp8"] = {"layers": layers, "image_s": seconds, "allocated_after_load_gib": weights,
                          "peak_gib": peak, **drift(image, lossless_image)}
    report.row("fp8 p50, 1 image", f"{statistics.median(seconds):.3f} s = {speedup:.2f}x faster than lossless",
               ">= 1.5x", speedup >= 1.5)
    d = report.data["fp8"]
    report.row("fp8 drift vs bf16 (decoded image)", f"PSNR {d['psnr_db']:.1f} dB, max abs {d['max_abs']:.3f}")
    report.row("peak GPU memory, fp8 (all components)", f"{d['peak_gib']} GiB; {weights} GiB allocated after load",
               "fits 24 GB", d["peak_gib"] is not None and d["peak_gib"] < 22.3)


def restart(report: Report, args) -> None:
    """A second process loads the compiled artefacts saved above, then compiles and warms up the same shapes."""
    command = [sys.executable, __file__, "--restart-probe", *sys.argv[1:], "--compile-cache-dir", args.compile_cache_dir]
    probe = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        raise RuntimeError(f"the restart probe exited with {probe.returncode}: {probe.stderr.strip()[-2000:]}")
    startup = json.loads(probe.stdout.strip().splitlines()[-1])
    cold = report.data["startup"]["warm_up_s"]
    report.data["restart"] = startup
    report.row("compile + warm-up after a restart with the artefact cache",
               f"{startup['warm_up_s']:.1f} s (compile {startup['compile_s']:.1f} s; cold cache: {cold:.1f} s)")


def restart_probe(args, buckets: RowBuckets) -> None:
    pipe = build(args)
    pipe.adapters.fold_on_activate()
    print(json.dumps(compile_and_warm_up(pipe, args, buckets)))


def weights_read(report: Report, args) -> None:
    """The weights loaded as the service loads them, from the page cache and cold (benchmarks/weights_read.py)."""
    device = torch.device(args.device)
    result = measure(Path(args.read_dir), args.read_gb, device)
    report.data["weights_read"] = result
    report.row(f"weights loaded to {device.type} ({result['bytes'] / 1e9:.2f} GB, safetensors mmap)",
               f"{result['cold_gb_s']:.2f} GB/s cold, {result['page_cache_gb_s']:.2f} GB/s from the page cache")


def time_to_ready(report: Report) -> None:
    """A replica's start to `/readyz` for the full weights, from the parts measured above: loading the weights,
    compiling (cold artefact cache on a new node, warm one on a restart) and the warm-up forwards."""
    cold, cached = load_seconds(report.data["weights_read"])
    startup = report.data["startup"]
    ready = {"new_node_s": cold + startup["compile_s"] + startup["forwards_s"]}
    text = f"{ready['new_node_s']:.0f} s on a new node (cold pages, cold artefact cache)"
    if "restart" in report.data:
        restart = report.data["restart"]
        ready["restart_s"] = cached + restart["compile_s"] + restart["forwards_s"]
        text += f"; {ready['restart_s']:.0f} s on a restart (page cache, artefact cache)"
    report.data["time_to_ready"] = ready
    report.row(f"time to /readyz with {FULL_WEIGHTS_GB:.0f} GB of weights (load + compile + warm-up)", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rehearsal", action="store_true", help="every section on the CPU at tiny size")
    parser.add_argument("--components", choices=("real-size", "tiny"), default="real-size",
                        help="FLUX.1-dev-sized random weights, or the tiny profile's components")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--blocks", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    parser.add_argument("--repeats", type=int, default=3, help="images per p50")
    parser.add_argument("--calls", type=int, default=5, help="steps per step-time median")
    parser.add_argument("--rank", type=int, default=512, help="LoRA rank (the paper trains 512)")
    parser.add_argument("--buckets", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--requests", type=int, default=16, help="requests per batching policy")
    parser.add_argument("--compile-mode", default="default")
    parser.add_argument("--compile-cache-dir", default=None, help="default: a new temporary directory")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--read-gb", type=float, default=4.0, help="gigabytes written and loaded to measure the "
                        "weights' load rate (at 4 GB, about 30 s)")
    parser.add_argument("--read-dir", default=tempfile.gettempdir(), help="where they are written")
    parser.add_argument("--budget-s", type=float, default=360, help="skip the optional sections past this")
    parser.add_argument("--restart-probe", action="store_true", help=argparse.SUPPRESS)
    if parser.parse_known_args()[0].rehearsal:
        parser.set_defaults(**REHEARSAL)
    args = parser.parse_args()
    if args.compile_cache_dir is None:
        args.compile_cache_dir = tempfile.mkdtemp(prefix="dsd-compile-cache-")
    torch.set_grad_enabled(False)
    buckets = RowBuckets(args.buckets)
    if args.restart_probe:
        restart_probe(args, buckets)
        return

    report = Report(args)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    blocks = "tiny components" if args.components == "tiny" else f"{args.blocks[0]}+{args.blocks[1]} blocks"
    print(f"{name}, torch {torch.__version__}, {args.dtype}, {blocks}, canvas {args.size}x{2 * args.size}, "
          f"{args.steps} steps, LoRA rank {args.rank} x {len(ADAPTERS)} adapters", flush=True)
    report.data["device"] = name
    start = time.perf_counter()
    pipe = build(args)
    report.row(f"build ({args.components} components, random weights)", f"{time.perf_counter() - start:.1f} s")
    report.section("weights read", weights_read, args)
    report.section("official baseline", baseline, pipe, args)
    report.section("LoRA cost", lora_cost, pipe, args)
    if "lora" not in report.data:
        pipe.adapters.fold_on_activate()
    report.section("compile", compile_path, pipe, args, buckets)
    lossless_image = report.section("lossless", lossless, pipe, args, report.data.get("official", {}))
    rows_per_s = report.section("throughput", throughput, pipe, args)
    report.section("mixed adapters", mixed_adapters, pipe, args)
    if lossless_image is not None:
        report.section("step cache", step_cache, pipe, args, buckets, lossless_image)
    if lossless_image is not None:
        p50 = statistics.median(report.data["lossless"]["image_s"])
        report.section("fp8", fp8, args, lossless_image, p50, buckets)
        gc.collect()
    if rows_per_s:
        report.section("batching", batching, pipe, args, rows_per_s, optional=True)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.compile and "startup" in report.data:
        report.section("restart", restart, args, optional=True)
    if "weights_read" in report.data and "startup" in report.data:
        report.section("time to ready", time_to_ready)
    report.print_table()
    if report.failed:
        sys.exit(f"failed sections: {', '.join(report.failed)}")


if __name__ == "__main__":
    main()
