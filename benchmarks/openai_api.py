"""What the OpenAI Images API adds, measured side by side with what it adds to:

1. Partial images. A preview costs the denoising thread the clean-image estimate of the previewed steps
   (x0 = x_t - sigma_t v: one multiply-add over the latents), and the finishing thread one VAE decode of that
   estimate, then the output stage (check, watermark, encode) on a transport thread. Measured in-process on the
   tiny profile: a step with and without its estimate kept, a preview decode against a step, and requests through
   the engine with 3 partial images against requests with none. `--real-vae` adds the decode of the real-size
   FLUX VAE (random weights; on cuda when available: on a CPU it takes minutes).
2. URL outputs. A live service (tiny profile) answers the same edit as `b64_json` and as `url`, followed by the GET
   of the URL, with the image store in Redis and in-process; and the store's own put and get of the same image.

    python benchmarks/openai_api.py [--size 512] [--steps 8] [--repeats 5] [--real-vae]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.serving.engine import Engine, EngineConfig
from dsd_model.serving.outputs import OutputStage
from dsd_model.serving.provenance import Claim
from dsd_model.settings import Settings
from dsd_model.tiny import build_real_size_vae, build_tiny_components
from dsd_serve.image_urls import ImageURLs
from dsd_serve.local import RedisServer, start_service, wait_ready
from dsd_serve.openai_api import Edit, EditOptions
from dsd_serve.schemas import GenerateParams
from latent_cache import median_seconds

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "tests" / "assets" / "reference.png").read_bytes()
PARTIALS = 3


def median_ms(function, repeats: int) -> float:
    return 1000 * median_seconds(function, repeats)


def request(size: int, steps: int, preview_steps: tuple[int, ...] = (), seed: int = 0) -> GenerationRequest:
    image = Image.open(io.BytesIO(REFERENCE)).convert("RGB")
    return GenerationRequest(image=image, prompt="the same toy on a beach", num_inference_steps=steps, size=size,
                             seed=seed, preview_steps=preview_steps)


def stage_costs(pipe: DSDPipeline, size: int, steps: int, repeats: int) -> dict[str, float]:
    """Milliseconds of a step without and with its estimate kept, of a preview decode and of the output stage."""
    every = tuple(range(1, steps + 1))

    def loop(preview_steps):
        (state,) = pipe.prepare([request(size, steps, preview_steps)])
        started = time.perf_counter()
        while not state.done:
            pipe.step([state])
            state.extras.pop("preview", None)
        return 1000 * (time.perf_counter() - started) / steps

    plain = statistics.median(loop(()) for _ in range(repeats))
    kept = statistics.median(loop(every) for _ in range(repeats))
    (state,) = pipe.prepare([request(size, steps, (1,))])
    pipe.step([state])
    estimate = state.extras["preview"]

    def decode():
        state.extras["preview"] = estimate
        return pipe.preview(state)

    image = decode()
    outputs = OutputStage(Settings(profile="tiny"))
    claim = Claim(request_id="bench", model=outputs.model_name, adapter=None, profile="tiny", prompt="")
    return {"step": plain, "step + estimate": kept, "preview decode": median_ms(decode, repeats),
            "output stage (png)": median_ms(lambda: outputs.finish(image, "png", claim), repeats)}


def engine_latency(pipe: DSDPipeline, size: int, steps: int, repeats: int) -> dict[int, tuple[float, float]]:
    """Per partial-image count: median request seconds and median step interval (ms), one request at a time,
    alternating the counts so that both see the same machine."""
    engine = Engine(pipe, EngineConfig())
    engine.start(warmup=False)
    measured: dict[int, list[tuple[float, float]]] = {0: [], PARTIALS: []}
    try:
        for index in range(repeats + 1):
            for count in measured:
                params = GenerateParams(prompt="x", steps=steps)
                preview_steps = Edit(params, EditOptions(stream=True, partial_images=count), b"").preview_steps
                started = time.perf_counter()
                job = engine.submit(request(size, steps, preview_steps, seed=index))
                job.future.result()
                steps_at = [event.at for event in job.history if event.kind == "step"]
                interval = 1000 * statistics.median(b - a for a, b in zip(steps_at, steps_at[1:]))
                if index:  # the first round warms up
                    measured[count].append((time.perf_counter() - started, interval))
    finally:
        engine.drain(timeout=60)
    return {count: (statistics.median(r for r, _ in runs), statistics.median(i for _, i in runs))
            for count, runs in measured.items()}


def real_vae_decode(size: int, repeats: int) -> tuple[str, float]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    vae = build_real_size_vae(dtype=dtype, device=device)
    latents = torch.randn(1, vae.config.latent_channels, size // 8, 2 * size // 8, device=device, dtype=dtype)

    def decode():
        vae.decode(latents)
        if device == "cuda":
            torch.cuda.synchronize()

    return device, median_ms(decode, repeats)


def url_overhead(size: int, repeats: int) -> list[tuple[str, dict[str, float]]]:
    """Per image store: milliseconds of the b64_json answer, the url answer, the GET of the URL; bytes of each."""
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisServer(Path(workdir))
        redis.start()
        try:
            for store, settings in (("redis", {"redis_url": redis.url}), ("in-process", {})):
                (Path(workdir) / store).mkdir()
                server = start_service(Path(workdir) / store, **settings)
                try:
                    wait_ready(server)
                    rows.append((store, measure_urls(server.url, size, repeats)))
                finally:
                    server.stop()
        finally:
            redis.stop()
    return rows


def measure_urls(url: str, size: int, repeats: int) -> dict[str, float]:
    fields = {"prompt": "the same toy on a beach", "size": f"{size}x{size}", "steps": "1", "seed": "1"}
    files = {"image": ("reference.png", REFERENCE, "image/png")}
    times: dict[str, list[float]] = {"b64_json": [], "url": [], "GET url": []}
    sizes = {}
    with httpx.Client(base_url=url, timeout=300) as client:
        for index in range(repeats + 1):
            same = {"X-Request-ID": f"bench-{index}"}  # the watermark carries the request id
            started = time.perf_counter()
            b64 = client.post("/v1/images/edits", data=fields, files=files, headers=same)
            b64_s = time.perf_counter() - started
            started = time.perf_counter()
            answer = client.post("/v1/images/edits", data={**fields, "response_format": "url"}, files=files,
                                 headers=same)
            url_s = time.perf_counter() - started
            started = time.perf_counter()
            image = client.get(answer.json()["data"][0]["url"])
            get_s = time.perf_counter() - started
            assert image.content == base64.b64decode(b64.json()["data"][0]["b64_json"])
            sizes = {"b64_json": len(b64.content), "url": len(answer.content), "GET url": len(image.content)}
            if index:
                for name, seconds in (("b64_json", b64_s), ("url", url_s), ("GET url", get_s)):
                    times[name].append(1000 * seconds)
    result = {name: statistics.median(values) for name, values in times.items()}
    result.update({f"{name} bytes": count for name, count in sizes.items()})
    return result


def store_costs(size_bytes: int, repeats: int) -> list[tuple[str, float, float]]:
    """Milliseconds of ImageURLs.publish and .open of one image, per store."""
    data = bytes(range(256)) * (size_bytes // 256)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisServer(Path(workdir))
        redis.start()
        try:
            for store, redis_url in (("redis", redis.url), ("in-process", None)):
                urls = ImageURLs(Settings(profile="tiny", redis_url=redis_url, image_url_secret="benchmark"))
                link = urls.publish(data, "png", "http://127.0.0.1")
                image_id = link.split("/")[5]
                query = dict(part.split("=") for part in link.partition("?")[2].split("&"))
                rows.append((store, median_ms(lambda: urls.publish(data, "png", "http://127.0.0.1"), repeats),
                             median_ms(lambda: urls.open(image_id, query["expires"], query["signature"]), repeats)))
        finally:
            redis.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="output side (the canvas is size x 2*size)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--real-vae", action="store_true", help="also time the real-size FLUX VAE decode")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    pipe = DSDPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)

    print(f"1. Partial images: tiny profile, cpu, {args.size} px, {args.steps} steps, median of {args.repeats}\n")
    costs = stage_costs(pipe, args.size, args.steps, args.repeats)
    print(f"{'stage':<22} {'thread':<10} {'ms':>9} {'x step':>7}")
    threads = {"step": "denoising", "step + estimate": "denoising", "preview decode": "finishing",
               "output stage (png)": "transport"}
    for name, ms in costs.items():
        print(f"{name:<22} {threads[name]:<10} {ms:>9.1f} {ms / costs['step']:>6.2f}x")
    if args.real_vae:
        device, ms = real_vae_decode(args.size, max(1, args.repeats // 2))
        print(f"{'real-size VAE decode':<22} {device:<10} {ms:>9.1f}")
    latency = engine_latency(pipe, args.size, args.steps, args.repeats)
    (plain_s, plain_step), (partial_s, partial_step) = latency[0], latency[PARTIALS]
    print(f"\nthrough the engine, one request at a time ({PARTIALS} partial images vs none):")
    print(f"{'partial images':<15} {'request s':>10} {'step interval ms':>17}")
    for count, (seconds, interval) in latency.items():
        print(f"{count:<15} {seconds:>10.3f} {interval:>17.1f}")
    print(f"per request: +{partial_s - plain_s:.3f} s ({partial_s / plain_s:.2f}x); per partial image: "
          f"+{(partial_s - plain_s) / PARTIALS:.3f} s; step interval {partial_step / plain_step:.2f}x")

    print(f"\n2. URL outputs: live service (tiny profile, 1 step, {args.size} px PNG), median of {args.repeats}\n")
    print(f"{'store':<11} {'b64_json ms':>12} {'url ms':>8} {'GET ms':>8} {'url+GET - b64':>14} "
          f"{'b64 bytes':>10} {'url bytes':>10} {'GET bytes':>10}")
    for store, row in url_overhead(args.size, args.repeats):
        print(f"{store:<11} {row['b64_json']:>12.1f} {row['url']:>8.1f} {row['GET url']:>8.1f} "
              f"{row['url'] + row['GET url'] - row['b64_json']:>+14.1f} {row['b64_json bytes']:>10} "
              f"{row['url bytes']:>10} {row['GET url bytes']:>10}")
    image_bytes = 2**20
    print(f"\nthe store alone, one {image_bytes // 1024} KiB image, median of {10 * args.repeats}:")
    print(f"{'store':<11} {'publish ms':>11} {'open ms':>8}")
    for store, publish, read in store_costs(image_bytes, 10 * args.repeats):
        print(f"{store:<11} {publish:>11.2f} {read:>8.2f}")


if __name__ == "__main__":
    main()
