"""Condition encoding with and without the latent cache: a VAE encode (miss) against a Redis GET + decode (hit).

The VAE is FLUX.1-dev's architecture at full size with random weights (the cost does not depend on the values),
encoding the [reference | black] canvas as `DSDPipeline.encode_condition_distribution` does. Redis is a
redis-server started on a free loopback port, or the one at `--redis-url`. Goal: a hit at least 20x faster.

    python benchmarks/latent_cache.py [--size 512] [--repeats 3] [--redis-url redis://host:port/0]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np
import redis
import torch
from PIL import Image

from dsd_model.images import condition_canvas
from dsd_model.serving.latent_cache import LatentCache, decode_parameters
from dsd_model.tiny import build_real_size_vae


def median_seconds(function, repeats: int) -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def loopback_redis():
    """A redis-server without persistence on a free 127.0.0.1 port, for the duration of the block."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (`make redis-server`), or pass --redis-url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            for _ in range(500):
                with contextlib.suppress(redis.ConnectionError):
                    redis.Redis.from_url(url).ping()
                    break
                time.sleep(0.01)
            yield url
        finally:
            process.terminate()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="reference side; the canvas is size x 2*size")
    parser.add_argument("--repeats", type=int, default=3, help="VAE encodes timed (cache calls: 20x as many)")
    parser.add_argument("--redis-url", help="an existing Redis instead of a loopback redis-server")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    vae = build_real_size_vae()
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))

    def encode() -> torch.Tensor:
        return vae.encode(condition_canvas(reference, args.size)).latent_dist.parameters

    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(loopback_redis())
        started = time.perf_counter()
        cache = LatentCache(url, vae, ttl_s=600, max_entry_bytes=64 * 2**20, timeout_s=1.0)
        identity_s = time.perf_counter() - started
        digest = "0" * 64
        parameters = encode()
        cache.put(digest, args.size, parameters)
        key = cache.key(digest, args.size)
        value = cache.redis.get(key)
        if not torch.equal(cache.get(digest, args.size), parameters):
            raise SystemExit("a cache hit did not reproduce the encoded parameters")

        calls = 20 * args.repeats
        miss = median_seconds(encode, args.repeats)
        hit = median_seconds(lambda: cache.get(digest, args.size), calls)
        round_trip = median_seconds(lambda: cache.redis.get(key), calls)
        decode = median_seconds(lambda: decode_parameters(value, cache.shape(args.size), cache.dtype), calls)
        store = median_seconds(lambda: cache.put(digest, args.size, parameters), calls)
        cache.redis.delete(key)

    print(f"FLUX.1-dev VAE (random weights), cpu float32, {torch.get_num_threads()} threads, canvas "
          f"{args.size}x{2 * args.size}, cached value {len(value) / 2**20:.2f} MiB, Redis {cache.address}\n")
    rows = [
        ("miss: VAE encode", miss, args.repeats),
        ("hit: Redis GET + decode", hit, calls),
        ("  Redis round trip (GET)", round_trip, calls),
        ("  decode + checksum", decode, calls),
        ("store after a miss: encode + SET", store, calls),
    ]
    header = f"{'condition stage':<34} {'median ms':>10} {'runs':>5}"
    print(header)
    print("-" * len(header))
    for name, seconds, runs in rows:
        print(f"{name:<34} {1000 * seconds:>10.2f} {runs:>5}")
    print(f"\nhit vs miss: {miss / hit:.0f}x faster (goal >= 20x)")
    print(f"once at load: VAE identity (digest of config and {sum(p.numel() for p in vae.parameters()) / 1e6:.0f}M "
          f"weights) {1000 * identity_s:.0f} ms")


if __name__ == "__main__":
    main()
