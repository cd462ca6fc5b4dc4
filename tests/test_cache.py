"""The condition-latent cache on a real redis-server (loopback, free port) and the in-process prompt cache."""

import copy
import hashlib
import logging
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from prometheus_client import REGISTRY

from dsd_model import GenerationRequest, images
from dsd_model.serving.engine import Engine, Job
from dsd_model.serving.latent_cache import LatentCache, decode_parameters, encode_parameters, open_latent_cache
from dsd_model.serving.prompt_cache import PromptCache
from dsd_model.settings import Settings
from dsd_model.tiny import tiny_vae_config
from dsd_serve.runtime import canvas_digest
from helpers import alpha_ramp, png_bytes, random_image
from servers import RedisServer, start_service, wait_ready

SIZE = 64


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def request(seed: int = 0, image_seed: int = 0, digest: bool = True, **overrides) -> GenerationRequest:
    image = random_image(seed=image_seed)
    values = dict(image=image, prompt="the same toy on a beach", num_inference_steps=2, size=SIZE, seed=seed,
                  image_digest=hashlib.sha256(png_bytes(image)).hexdigest() if digest else None)
    values.update(overrides)
    return GenerationRequest(**values)


def run(engine: Engine, generation: GenerationRequest) -> Job:
    job = engine.submit(generation)
    job.future.result(timeout=60)
    return job


def same_output(a: Job, b: Job) -> bool:
    return torch.equal(a.state.latents, b.state.latents) and np.array_equal(
        np.asarray(a.future.result().image), np.asarray(b.future.result().image)
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_server):
    """The module's Redis, running and empty."""
    if redis_server.process is None:
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    return client


@pytest.fixture
def engine_with(fresh_pipe, start_engine):
    return lambda cache, start=True: start_engine(fresh_pipe, latent_cache=cache, start=start)


def latent_cache(url: str, vae, **overrides) -> LatentCache:
    values = dict(ttl_s=60, max_entry_bytes=2**20, timeout_s=0.2, backoff_s=0.1)
    values.update(overrides)
    return LatentCache(url, vae, **values)


def test_hit_reproduces_miss_bit_for_bit(store, redis_server, fresh_pipe, engine_with):
    cache = latent_cache(redis_server.url, fresh_pipe.vae)
    engine = engine_with(cache)
    encodes = count_calls(fresh_pipe.vae.encoder)
    hits, misses = counter("dsd_cache_hits_total"), counter("dsd_cache_misses_total")
    read, written = counter("dsd_cache_read_bytes_total"), counter("dsd_cache_written_bytes_total")

    uncached = run(engine, request(seed=7, digest=False))
    miss = run(engine, request(seed=7))
    assert (counter("dsd_cache_misses_total") - misses, len(encodes)) == (1, 2)
    hit = run(engine, request(seed=7))
    assert (counter("dsd_cache_hits_total") - hits, len(encodes)) == (1, 2)

    assert torch.equal(hit.state.condition, miss.state.condition)
    assert same_output(miss, uncached) and same_output(hit, miss)
    entry = len(store.get(cache.key(request().image_digest, SIZE)))
    assert counter("dsd_cache_written_bytes_total") - written == entry
    assert counter("dsd_cache_read_bytes_total") - read == entry
    assert store.ttl(cache.key(request().image_digest, SIZE)) <= 60


def test_one_lookup_per_reference_in_a_batch(store, redis_server, fresh_pipe, engine_with):
    engine = engine_with(latent_cache(redis_server.url, fresh_pipe.vae), start=False)
    encodes = count_calls(fresh_pipe.vae.encoder)
    misses = counter("dsd_cache_misses_total")
    jobs = [engine.submit(request(seed=seed)) for seed in range(3)] + [engine.submit(request(image_seed=1))]
    engine.start(warmup=False)
    for job in jobs:
        job.future.result(timeout=60)
    assert (counter("dsd_cache_misses_total") - misses, len(encodes), len(store.keys("dsd:condition:*"))) == (2, 2, 2)


def test_key_changes_with_every_keyed_input(monkeypatch):
    def vae(**config):
        torch.manual_seed(3)
        return AutoencoderKL(**dict(tiny_vae_config(), **config)).eval()

    def key(model, digest="a" * 64, size=SIZE) -> str:
        return latent_cache("redis://127.0.0.1:1/0", model).key(digest, size)

    base = vae()
    nudged = copy.deepcopy(base)
    with torch.no_grad():
        nudged.encoder.conv_in.bias[0] += 1e-6
    keys = [
        key(base), key(base, digest="b" * 64), key(base, size=SIZE + 16), key(nudged),
        key(vae(scaling_factor=0.5)), key(copy.deepcopy(base).to(torch.bfloat16)),
    ]
    monkeypatch.setattr(images, "PREPROCESS_VERSION", images.PREPROCESS_VERSION + 1)
    keys.append(key(base))
    assert len(set(keys)) == len(keys), keys
    monkeypatch.undo()
    assert key(vae()) == keys[0], "the key of an identical VAE built again must not change"


def test_redis_down_slow_and_back(store, redis_server, fresh_pipe, engine_with):
    cache = latent_cache(redis_server.url, fresh_pipe.vae, timeout_s=0.2, backoff_s=0.1)
    engine = engine_with(cache)
    expected = run(engine, request(seed=2, digest=False))
    run(engine, request(seed=2))

    def errors(kind):
        return sum(counter("dsd_cache_errors_total", operation=op, kind=kind) for op in ("get", "put"))

    unavailable = errors("unavailable")
    redis_server.stop()
    for _ in range(3):
        assert same_output(run(engine, request(seed=2)), expected)
        time.sleep(cache.backoff_s)
    assert errors("unavailable") - unavailable >= 3

    redis_server.start()
    time.sleep(cache.backoff_s)
    misses = counter("dsd_cache_misses_total")
    assert same_output(run(engine, request(seed=2)), expected)
    assert counter("dsd_cache_misses_total") - misses == 1, "the restarted Redis is empty"

    timeouts = errors("timeout")
    redis_server.pause()
    try:
        started = time.monotonic()
        assert same_output(run(engine, request(seed=2)), expected)
        assert time.monotonic() - started < 5
    finally:
        redis_server.resume()
    assert errors("timeout") - timeouts == 1

    time.sleep(cache.backoff_s)
    hits = counter("dsd_cache_hits_total")
    assert same_output(run(engine, request(seed=2)), expected)
    assert counter("dsd_cache_hits_total") - hits == 1


def flip_last_byte(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 1])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda value: b"not a latent",
        lambda value: value[: len(value) // 2],
        flip_last_byte,
        lambda value: encode_parameters(torch.zeros(1, 8, 4, 8)),
        lambda value: encode_parameters(torch.zeros(1, 8, SIZE // 8, SIZE // 4, dtype=torch.float64)),
        lambda value: value[:4] + (10**6).to_bytes(4, "little") + value[8:],
    ],
    ids=["garbage", "truncated", "altered", "wrong-shape", "wrong-dtype", "bad-header-length"],
)
def test_corrupt_entry_is_ignored_and_replaced(store, redis_server, fresh_pipe, engine_with, corrupt):
    cache = latent_cache(redis_server.url, fresh_pipe.vae)
    engine = engine_with(cache)
    first = run(engine, request(seed=4))
    key = cache.key(request().image_digest, SIZE)
    valid = store.get(key)
    store.set(key, corrupt(valid))
    corrupted = counter("dsd_cache_errors_total", operation="get", kind="corrupt")

    assert same_output(run(engine, request(seed=4)), first)
    assert counter("dsd_cache_errors_total", operation="get", kind="corrupt") - corrupted == 1
    assert store.get(key) == valid
    hits = counter("dsd_cache_hits_total")
    run(engine, request(seed=4))
    assert counter("dsd_cache_hits_total") - hits == 1


def test_value_round_trip_and_oversized_entries(store, redis_server, fresh_pipe):
    parameters = torch.randn(1, 8, 8, 16, dtype=torch.bfloat16)
    assert torch.equal(decode_parameters(encode_parameters(parameters), (1, 8, 8, 16), torch.bfloat16), parameters)
    cache = latent_cache(redis_server.url, fresh_pipe.vae, max_entry_bytes=1024)
    too_large = counter("dsd_cache_errors_total", operation="put", kind="too_large")
    cache.put("c" * 64, SIZE, fresh_pipe.encode_condition_distribution(random_image(), SIZE))
    assert counter("dsd_cache_errors_total", operation="put", kind="too_large") - too_large == 1
    assert store.keys("*") == []


def test_disabled_without_redis_url(monkeypatch, caplog, fresh_pipe):
    monkeypatch.delenv("DSD_REDIS_URL", raising=False)
    with caplog.at_level(logging.WARNING, logger="dsd_model.serving.latent_cache"):
        assert open_latent_cache(Settings(profile="tiny"), fresh_pipe.vae) is None
    assert [r.message for r in caplog.records if "DSD_REDIS_URL is not set" in r.message]


def test_prompt_embeddings_are_reused_and_bounded(fresh_pipe):
    pipe = fresh_pipe
    cache = PromptCache(2, pinned=[("", pipe.max_sequence_length)])
    pipe.set_prompt_cache(cache)
    encodes = count_calls(pipe.text_encoder_2)
    hits, misses = counter("dsd_prompt_cache_hits_total"), counter("dsd_prompt_cache_misses_total")

    def prepare(*prompts, cfg=False):
        before = len(encodes)
        states = pipe.prepare([request(prompt=p, digest=False, image_guidance_scale=2.0 if cfg else 1.0)
                               for p in prompts])
        return states, len(encodes) - before

    fresh = pipe.encode_prompt(["a red toy"])
    states, calls = prepare("a red toy")
    assert calls == 1
    states, calls = prepare("a red toy")
    assert calls == 0 and torch.equal(states[0].prompt_embeds, fresh[0])
    assert torch.equal(states[0].pooled_prompt_embeds, fresh[1])
    assert counter("dsd_prompt_cache_hits_total") - hits == 1 and counter("dsd_prompt_cache_misses_total") - misses == 1

    assert prepare("b", cfg=True)[1] == 2, "the prompt and the empty negative prompt, each encoded alone"
    assert prepare("c", "d")[1] == 2
    assert len(cache) == 3
    assert prepare("d", cfg=True)[1] == 0, "the pinned empty negative prompt must survive evictions"
    assert prepare("a red toy")[1] == 1, "the least recently used prompt is evicted"
    pipe.max_sequence_length = 64
    assert prepare("a red toy")[1] == 1, "entries are keyed by max_sequence_length too"


def test_prompt_cache_is_thread_safe():
    cache = PromptCache(16)

    def work(offset):
        for i in range(2000):
            cache.put((offset + i % 40, 512), i)
            cache.get((offset + (i * 7) % 40, 512))

    threads = [threading.Thread(target=work, args=(t * 10,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 16


def test_http_same_canvas_is_a_hit_and_another_background_is_another_entry(tmp_path, store, redis_server):
    """The key is the preprocessed canvas: the same transparent upload on another background is another canvas, so it
    never gets the first background's latents."""
    server = start_service(tmp_path, redis_url=redis_server.url)
    try:
        wait_ready(server)
        rgb = np.asarray(random_image(seed=5))
        reference = png_bytes(Image.fromarray(np.dstack([rgb, alpha_ramp()]), "RGBA"))
        images_by_background = {}
        for prompt, seed, background in (("a toy on a beach", 1, "#000000"), ("the same toy in snow", 2, "#000000"),
                                         ("a toy on a beach", 1, "#ffffff")):
            response = httpx.post(f"{server.url}/generate", data=dict(prompt=prompt, steps="1", size="64",
                                  seed=str(seed), background=background),
                                  files={"image": ("ref.png", reference, "image/png")}, timeout=60)
            assert response.status_code == 200, response.text
            images_by_background.setdefault(background, response.json()["images"][0])
        assert (server.metric("dsd_cache_misses_total"), server.metric("dsd_cache_hits_total")) == (2, 1)
        assert server.metric("dsd_cache_errors_total") == 0
        digests = {key.decode().rsplit(":", 1)[1] for key in store.keys("dsd:condition:p*:64:*")}
        expected = {canvas_digest(images.read_reference(reference, size=64, background=colour).image)
                    for colour in ((0, 0, 0), (255, 255, 255))}
        assert digests == expected and len(digests) == 2
        assert images_by_background["#000000"] != images_by_background["#ffffff"]
    finally:
        assert server.stop() == 0, server.log_tail()


def test_a_stalled_redis_costs_running_requests_nothing(store, redis_server, fresh_pipe, engine_with):
    """Redis accepts connections but never answers (SIGSTOP): the running request keeps stepping at its pace, a new
    request waits at most the timeout for its lookup and is served without the cache; after SIGCONT it is used."""
    cache = latent_cache(redis_server.url, fresh_pipe.vae, timeout_s=1.0, backoff_s=0.1)
    engine = engine_with(cache)
    run(engine, request(seed=3))  # stores the reference's latents
    running = engine.submit(request(seed=1, digest=False, num_inference_steps=100, image_guidance_scale=2.0))
    until = time.monotonic() + 30
    while running.state is None or running.state.step_index < 5:
        assert time.monotonic() < until
        time.sleep(0.01)
    timeouts = counter("dsd_cache_errors_total", operation="get", kind="timeout")
    redis_server.pause()
    try:
        stalled = run(engine, request(seed=3))
    finally:
        redis_server.resume()
    assert counter("dsd_cache_errors_total", operation="get", kind="timeout") - timeouts == 1
    assert stalled.finished - stalled.submitted < cache.timeout_s + 2.0
    steps = [e.at for e in running.history if e.kind == "step" and stalled.submitted <= e.at <= stalled.finished]
    gaps = np.diff(steps)
    assert len(steps) >= 10 and gaps.max() < cache.timeout_s / 2, (len(steps), gaps.max())

    time.sleep(cache.backoff_s)
    hits = counter("dsd_cache_hits_total")
    run(engine, request(seed=4))
    assert counter("dsd_cache_hits_total") - hits == 1
    running.cancel()
