"""What prompt enhancement adds to a request: a call to the enhancement model (miss) against a cache hit, in-process
and in Redis, for a reference at the official 512 px.

The enhancement model is the test suite's scripted OpenAI-compatible server on loopback, answering at once, so a miss
shows this service's own cost (cache key, JPEG encode, HTTP round trip); a real VLM adds its generation time (seconds)
on top. Redis is a redis-server started on a free loopback port.

    python benchmarks/prompt_enhancement.py [--size 512] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from data.conftest import ChatServer  # noqa: E402

from dsd_model.serving.enhance import PromptEnhancer  # noqa: E402
from dsd_serve.local import RedisServer  # noqa: E402
from dsd_model.settings import Settings  # noqa: E402


class CaptionServer(ChatServer):
    def answer(self, kind: str, body: dict) -> str:
        return "A red plush fox with a blue scarf sitting on a wooden table, soft daylight, shallow depth of field."


def median_ms(enhancer: PromptEnhancer, reference: Image.Image, prompts, repeats: int, outcome: str) -> float:
    times = []
    for _ in range(repeats):
        prompt = next(prompts)
        started = time.perf_counter()
        result = asyncio.run(enhancer.enhance(reference, prompt))
        times.append(time.perf_counter() - started)
        assert result.outcome == outcome, result
    return 1000 * sorted(times)[len(times) // 2]


def measure(enhancer: PromptEnhancer, reference: Image.Image, repeats: int, label: str) -> list[tuple[str, float]]:
    fresh = (f"{label} prompt {i}" for i in itertools.count())
    miss = median_ms(enhancer, reference, fresh, repeats, "enhanced")
    hit = median_ms(enhancer, reference, itertools.repeat(f"{label} prompt 0"), repeats, "cached")
    return [(f"miss: model call ({label} cache)", miss), (f"hit: {label} cache", hit)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    reference = Image.open(ROOT / "tests" / "assets" / "reference.png").convert("RGB").resize((args.size, args.size))
    chat = CaptionServer()
    common = dict(profile="tiny", enhance_base_url=chat.url, enhance_model="bench-vlm")
    rows = []
    memory = PromptEnhancer(Settings(**common))
    rows += measure(memory, reference, args.repeats, "in-process")
    memory.close()
    if shutil.which("redis-server"):
        with tempfile.TemporaryDirectory() as workdir:
            redis_server = RedisServer(Path(workdir))
            redis_server.start()
            try:
                in_redis = PromptEnhancer(Settings(**common, redis_url=redis_server.url))
                rows += measure(in_redis, reference, args.repeats, "Redis")
                in_redis.close()
            finally:
                redis_server.stop()
    chat.close()
    print(f"reference {args.size} px, median of {args.repeats}, scripted model answering at once")
    print("| path | ms |\n| --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
