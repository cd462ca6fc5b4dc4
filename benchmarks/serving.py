"""Serving benchmarks on the tiny profile (CPU), each ratio measured side by side in one run.

1. HTTP overhead: end-to-end `POST /generate` p50 on the real BentoML server against the in-process pipeline p50
   for the same request (goal: ratio <= 1.10).
2. Step-level against whole-request batching: the same seeded, staggered (Poisson) arrival pattern at ~80% of the
   whole-request engine's saturated throughput; p50/p99 latency and throughput (goals: p50 <= 0.6x, throughput
   >= 1.0x).
3. The cost of exact mode: `--concurrent` requests submitted together, all normal (sharing forwards) against all
   `exact` (a forward each), alternating runs; p50 latency and throughput.
4. Mixed traffic against uniform traffic: the same seeded Poisson arrivals (80% of the uniform engine's saturated
   throughput, 8 steps, 8 rows per forward) for all `identity` at 64 px; 50/50 `identity`/`structure`; one adapter
   at 64 and 96 px 50/50, with the sizes packed into one forward and stepped in turn; and 8 adapters drawn
   uniformly. `uniform 96 px` (all requests at the larger size) shows what the larger canvas costs by itself. Runs alternate over `--rounds`; medians of p50, p99 and throughput, each as a ratio to uniform (goals:
   p50 <= 1.15x, throughput >= 0.9x).

    python benchmarks/serving.py [--requests 60] [--http-runs 15] [--concurrent 8] [--sections 1,2,3,4]
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

from dsd_model import GenerationRequest
from dsd_model.loading import load_pipeline
from dsd_model.serving.engine import Engine, EngineConfig
from dsd_model.settings import Settings
from dsd_serve.local import ROOT, start_service, wait_ready

REFERENCE = ROOT / "tests" / "assets" / "reference.png"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def http_overhead(runs: int, size: int, steps: int) -> None:
    """In-process and HTTP runs alternate, so both see the same background load."""
    pipe = load_pipeline(Settings(profile="tiny"))
    image = Image.open(REFERENCE).convert("RGB")
    prompt = "the same toy on a beach"
    payload = dict(image=base64.b64encode(REFERENCE.read_bytes()).decode(), prompt=prompt, steps=steps, size=size)
    local, remote = [], []
    with tempfile.TemporaryDirectory() as workdir:
        server = start_service(Path(workdir))
        try:
            wait_ready(server)
            with httpx.Client(timeout=600) as client:
                for seed in range(-1, runs):
                    start = time.perf_counter()
                    pipe(image, prompt, num_inference_steps=steps, size=size, seed=max(seed, 0), adapter="identity")
                    middle = time.perf_counter()
                    client.post(f"{server.url}/generate", json=payload | {"seed": max(seed, 0)}).raise_for_status()
                    if seed >= 0:
                        local.append(middle - start)
                        remote.append(time.perf_counter() - middle)
        finally:
            server.stop()
    p50_local, p50_http = statistics.median(local), statistics.median(remote)
    print(f"\n1. HTTP end-to-end vs in-process pipeline: size {size}, {steps} steps, {runs} alternating pairs")
    print(f"{'path':<22} {'p50 s':>8} {'p90 s':>8}")
    print(f"{'in-process pipeline':<22} {p50_local:>8.3f} {percentile(local, 0.9):>8.3f}")
    print(f"{'HTTP POST /generate':<22} {p50_http:>8.3f} {percentile(remote, 0.9):>8.3f}")
    print(f"overhead ratio (HTTP p50 / in-process p50): {p50_http / p50_local:.3f}  (goal <= 1.10)")


def workload(count: int, seed: int, size: int = 64) -> list[GenerationRequest]:
    rng = random.Random(seed)
    image = Image.open(REFERENCE).convert("RGB")
    return [
        GenerationRequest(
            image=image, prompt=f"the same toy, scene {i}", num_inference_steps=rng.choice([8, 16, 28]), size=size,
            seed=i, image_guidance_scale=rng.choice([1.0, 1.0, 1.0, 1.5]), adapter="identity",
        )
        for i in range(count)
    ]


def run_engine(
    mode: str, requests: list[GenerationRequest], arrivals: list[float], pipe=None, pack_sizes: bool = False
) -> tuple[list[float], float]:
    """Submit each request at its arrival offset; return per-request latencies and the makespan. Without `pipe`,
    a fresh tiny pipeline with a warmed-up engine."""
    engine = Engine(pipe or load_pipeline(Settings(profile="tiny")), EngineConfig(max_batch_rows=8, max_queue=10_000,
                                                                                 batching=mode, pack_sizes=pack_sizes))
    engine.start(warmup=pipe is None)
    start = time.monotonic()
    jobs = []
    for request, offset in zip(requests, arrivals):
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        jobs.append(engine.submit(request))
    for job in jobs:
        job.future.result()
    makespan = max(job.finished for job in jobs) - start
    engine.drain(timeout=10)
    return [job.finished - job.submitted for job in jobs], makespan


def poisson_arrivals(count: int, rate: float, seed: int = 2) -> list[float]:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(count):
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


def batching(count: int) -> None:
    requests = workload(count, seed=1)
    _, saturated = run_engine("request", requests, [0.0] * count)
    capacity = count / saturated
    rate = 0.8 * capacity
    arrivals = poisson_arrivals(count, rate)
    results = {mode: run_engine(mode, requests, arrivals) for mode in ("request", "step")}
    print(f"\n2. step-level vs whole-request batching: {count} requests (8/16/28 steps, 1 in 4 with true CFG),")
    print(f"   Poisson arrivals at {rate:.2f} req/s = 80% of whole-request saturated throughput "
          f"({capacity:.2f} req/s), max 8 rows per forward")
    print(f"{'batching':<15} {'p50 s':>8} {'p99 s':>8} {'throughput req/s':>17}")
    for mode, (latencies, makespan) in results.items():
        print(f"{mode:<15} {percentile(latencies, 0.5):>8.3f} {percentile(latencies, 0.99):>8.3f} "
              f"{count / makespan:>17.2f}")
    (whole, whole_span), (step, step_span) = results["request"], results["step"]
    print(f"p50 ratio step/whole: {percentile(step, 0.5) / percentile(whole, 0.5):.2f} (goal <= 0.6); "
          f"p99 ratio: {percentile(step, 0.99) / percentile(whole, 0.99):.2f}; "
          f"throughput ratio: {whole_span / step_span:.2f} (goal >= 1.0)")


def exact_cost(concurrent: int, runs: int, steps: int) -> None:
    pipe = load_pipeline(Settings(profile="tiny"))
    engine = Engine(pipe, EngineConfig(max_batch_rows=max(8, concurrent), max_queue=10_000))
    engine.start()
    image = Image.open(REFERENCE).convert("RGB")
    measured: dict[bool, list[tuple[list[float], float]]] = {False: [], True: []}
    for run in range(runs):
        for exact in (False, True):
            start = time.monotonic()
            jobs = [engine.submit(GenerationRequest(image=image, prompt=f"the same toy, scene {i}", size=64, seed=i,
                                                    num_inference_steps=steps, adapter="identity", exact=exact))
                    for i in range(concurrent)]
            for job in jobs:
                job.future.result()
            measured[exact].append(([job.finished - job.submitted for job in jobs], time.monotonic() - start))
    engine.drain(timeout=10)
    print(f"\n3. exact mode: {concurrent} concurrent requests (64 px, {steps} steps), median of {runs} alternating runs")
    print(f"{'requests':<10} {'p50 s':>8} {'throughput req/s':>17}")
    summary = {}
    for exact, label in ((False, "normal"), (True, "exact")):
        p50 = statistics.median(percentile(latencies, 0.5) for latencies, _ in measured[exact])
        throughput = statistics.median(concurrent / span for _, span in measured[exact])
        summary[exact] = (p50, throughput)
        print(f"{label:<10} {p50:>8.3f} {throughput:>17.2f}")
    print(f"exact/normal: p50 {summary[True][0] / summary[False][0]:.2f}x, "
          f"throughput {summary[True][1] / summary[False][1]:.2f}x")


MIXES = {
    "uniform": lambda i, rng: ("identity", 64),
    "uniform 96 px": lambda i, rng: ("identity", 96),
    "50/50 modes": lambda i, rng: (rng.choice(["identity", "structure"]), 64),
    "50/50 sizes": lambda i, rng: ("identity", rng.choice([64, 96])),
    "8 adapters": lambda i, rng: (f"adapter-{rng.randrange(8)}", 64),
}
"""Traffic mixes: (adapter, canvas size) of request i; the same seeded draws for every round."""
RUNS = {"uniform": ("uniform", False), "uniform 96 px": ("uniform 96 px", False), "50/50 modes": ("50/50 modes", False),
        "50/50 sizes, packed": ("50/50 sizes", True), "50/50 sizes, in turn": ("50/50 sizes", False),
        "8 adapters": ("8 adapters", False)}
"""What section 4 runs: (mix, whether canvas sizes are packed into one forward or stepped in turn)."""


def mixed_pipeline():
    from dsd_model.tiny import tiny_lora_state_dict

    pipe = load_pipeline(Settings(profile="tiny"))
    for k in range(8):
        pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=100 + k), f"adapter-{k}")
    return pipe


def mixed_workload(mix: str, count: int, steps: int) -> list[GenerationRequest]:
    rng = random.Random(7)
    image = Image.open(REFERENCE).convert("RGB")
    requests = []
    for i in range(count):
        adapter, size = MIXES[mix](i, rng)
        requests.append(GenerationRequest(image=image, prompt=f"the same toy, scene {i}", num_inference_steps=steps,
                                          size=size, seed=i, adapter=adapter))
    return requests


def mixed_traffic(count: int, steps: int, rounds: int) -> None:
    pipe = mixed_pipeline()
    run_engine("step", mixed_workload("8 adapters", 16, steps), [0.0] * 16, pipe)  # warm every adapter and size
    _, saturated = run_engine("step", mixed_workload("uniform", count, steps), [0.0] * count, pipe)
    rate = 0.8 * count / saturated
    arrivals = poisson_arrivals(count, rate)
    measured: dict[str, list[tuple[float, float, float]]] = {run: [] for run in RUNS}
    for round_ in range(rounds):
        order = list(RUNS) if round_ % 2 == 0 else list(reversed(RUNS))
        for run in order:
            mix, packed = RUNS[run]
            latencies, makespan = run_engine("step", mixed_workload(mix, count, steps), arrivals, pipe, packed)
            measured[run].append((percentile(latencies, 0.5), percentile(latencies, 0.99), count / makespan))
    print(f"\n4. mixed traffic vs uniform: {count} requests, {steps} steps, Poisson arrivals at {rate:.2f} req/s = 80% "
          f"of uniform saturated throughput ({count / saturated:.2f} req/s), max 8 rows per forward, median of "
          f"{rounds} alternating rounds")
    print(f"{'traffic':<21} {'p50 s':>7} {'p99 s':>7} {'req/s':>7} {'p50 x':>7} {'p99 x':>7} {'thru x':>7}")
    base = [statistics.median(values[k] for values in measured["uniform"]) for k in range(3)]
    for mix, values in measured.items():
        p50, p99, throughput = (statistics.median(v[k] for v in values) for k in range(3))
        print(f"{mix:<21} {p50:>7.3f} {p99:>7.3f} {throughput:>7.2f} {p50 / base[0]:>7.2f} {p99 / base[1]:>7.2f} "
              f"{throughput / base[2]:>7.2f}")
    print("goals: p50 <= 1.15x and throughput >= 0.9x of uniform")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--http-runs", type=int, default=15)
    parser.add_argument("--size", type=int, default=512, help="HTTP benchmark canvas side (official: 512)")
    parser.add_argument("--steps", type=int, default=28, help="HTTP benchmark steps (official: 28)")
    parser.add_argument("--concurrent", type=int, default=8, help="exact-mode comparison: requests at once")
    parser.add_argument("--sections", default="1,2,3,4", help="which comparisons to run, e.g. 3")
    parser.add_argument("--mixed-requests", type=int, default=60, help="mixed-traffic comparison: requests per run")
    parser.add_argument("--rounds", type=int, default=3, help="mixed-traffic comparison: alternating rounds")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if "1" in sections:
        http_overhead(args.http_runs, args.size, args.steps)
    if "2" in sections:
        batching(args.requests)
    if "3" in sections:
        exact_cost(args.concurrent, runs=3, steps=8)
    if "4" in sections:
        mixed_traffic(args.mixed_requests, steps=8, rounds=args.rounds)


if __name__ == "__main__":
    main()
