"""Prompt enhancement against a scripted OpenAI-compatible VLM on loopback: in-process, and through the real service
(REST and gRPC, Redis cache)."""

import asyncio
import base64
import io
import time

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from data.conftest import ChatServer
from dsd_model.serving.enhance import KEY_PREFIX, PROMPT_VERSION, MemoryCache, PromptEnhancer, instructions
from dsd_model.settings import Settings
from dsd_serve.grpc_stubs import dsd_pb2 as pb
from dsd_serve.grpc_stubs import dsd_pb2_grpc
from dsd_serve.runtime import Runtime
from dsd_serve.schemas import GenerateParams
from helpers import png_bytes, random_image, unmarked
from servers import RedisServer, start_service, wait_ready

REFERENCE = png_bytes(random_image(96, 80, seed=1))
TIMEOUT_S = 1.0
OVER_WINDOW = "a red plush fox " * 120
"""A reply of 480 words: within the 2000 characters of a prompt, over the T5 window of 512 tokens."""
OVER_CHARS = "a red plush fox in " + "é" * 2000
"""A reply over the 2000 characters of a prompt yet within the T5 window: the tiny T5 tokenizer reads the run of
letters it does not know as one token."""


class CaptionServer(ChatServer):
    """The scripted chat server answering every request with a caption built from the request's prompt."""

    def answer(self, kind: str, body: dict) -> str:
        return caption(user_text(body).removeprefix("Request: "))


def caption(prompt: str) -> str:
    return f"A red plush fox with a blue scarf, shown as asked: {prompt}. Soft daylight, shallow depth of field."


def user_text(body: dict) -> str:
    return next(part["text"] for part in body["messages"][1]["content"] if part["type"] == "text")


def user_image(body: dict) -> Image.Image:
    url = next(part["image_url"]["url"] for part in body["messages"][1]["content"] if part["type"] == "image_url")
    header, data = url.split(",", 1)
    assert header == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture
def chat():
    server = CaptionServer()
    yield server
    server.close()


def enhancer_for(chat: ChatServer, **overrides) -> PromptEnhancer:
    values = dict(profile="tiny", enhance_base_url=chat.url, enhance_model="test-vlm", enhance_timeout_s=TIMEOUT_S)
    return PromptEnhancer(Settings(**{**values, **overrides}))


def test_enhancement_sends_instructions_prompt_and_reference_and_caches_the_reply(chat):
    enhancer = enhancer_for(chat)
    reference = random_image(8, 8, seed=3).resize((64, 64), Image.BILINEAR)  # smooth, so JPEG keeps it close
    try:
        first = asyncio.run(enhancer.enhance(reference, "on a beach"))
        again = asyncio.run(enhancer.enhance(reference, "on a beach"))
        other_prompt = asyncio.run(enhancer.enhance(reference, "in snow"))
        other_image = asyncio.run(enhancer.enhance(random_image(64, 64, seed=4), "on a beach"))
    finally:
        enhancer.close()
    assert (first.prompt, first.outcome, first.notice) == (caption("on a beach"), "enhanced", None)
    assert (again.prompt, again.outcome) == (caption("on a beach"), "cached")
    assert (other_prompt.outcome, other_image.outcome) == ("enhanced", "enhanced")
    assert chat.count() == 3
    body = chat.requests[0][1]
    assert body["model"] == "test-vlm" and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": instructions(PROMPT_VERSION)}
    assert user_text(body) == "Request: on a beach"
    sent = np.asarray(user_image(body), dtype=np.int16)
    assert sent.shape == (64, 64, 3)
    assert np.abs(sent - np.asarray(reference, dtype=np.int16)).mean() < 8  # JPEG quality 90


def test_timeouts_errors_and_unusable_replies_fail_open(chat):
    enhancer = enhancer_for(chat)
    reference = random_image(64, 64, seed=3)
    chat.fault(("sleep", 3 * TIMEOUT_S), ("status", 500), ("status", 401), ("reply", "  "))
    try:
        outcomes = []
        for prompt in ("slow", "error", "refused", "empty"):
            started = time.monotonic()
            outcomes.append((asyncio.run(enhancer.enhance(reference, prompt)), time.monotonic() - started))
        recovered = asyncio.run(enhancer.enhance(reference, "slow"))
    finally:
        enhancer.close()
    notices = [enhancement.notice for enhancement, _ in outcomes]
    assert all(enhancement.prompt is None and enhancement.outcome == "failed" for enhancement, _ in outcomes)
    assert notices == [
        "enhance_prompt: no answer within 1 s; the prompt was used as given",
        "enhance_prompt: the enhancement model is unavailable; the prompt was used as given",
        "enhance_prompt: the enhancement model is unavailable; the prompt was used as given",
        "enhance_prompt: the enhancement model's reply was unusable; the prompt was used as given",
    ]
    assert outcomes[0][1] < 2 * TIMEOUT_S
    assert chat.count() == 5  # one call each: nothing is retried on the request's time
    assert (recovered.prompt, recovered.outcome) in ((caption("slow"), "enhanced"), (caption("slow"), "cached"))


def test_memory_cache_is_bounded_and_expires(monkeypatch):
    cache = MemoryCache(max_entries=2, ttl_s=10)
    for key in "abc":
        cache.put(key, key.upper())
    assert [cache.get(key) for key in "abc"] == [None, "B", "C"]
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + 11)
    assert cache.get("b") is None


def test_settings_refuse_incomplete_configuration():
    with pytest.raises(ValidationError, match="DSD_ENHANCE_BASE_URL needs DSD_ENHANCE_MODEL"):
        Settings(enhance_base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValidationError, match="DSD_ENHANCE_DEFAULT enhances every prompt"):
        Settings(enhance_default=True)


def test_request_for_enhancement_without_a_model_gets_a_notice():
    runtime = Runtime(Settings(profile="tiny", size=64))
    submission = asyncio.run(runtime.submit(GenerateParams(prompt="a toy", enhance_prompt=True, steps=2),
                                            REFERENCE))
    submission.cancel()
    assert submission.enhanced_prompt is None
    assert submission.notices == ["enhance_prompt: this server has no enhancement model configured "
                                  "(DSD_ENHANCE_BASE_URL); the prompt was used as given", unmarked(64)]
    assert submission.jobs[0].request.prompt == "a toy"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """One real service enhancing by default, with its cache in a real Redis, and the scripted VLM."""
    chat = CaptionServer()
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    server = start_service(tmp_path_factory.mktemp("service"), redis_url=redis_server.url, enhance_base_url=chat.url,
                           enhance_model="test-vlm", enhance_default="true", enhance_timeout_s=str(TIMEOUT_S))
    try:
        wait_ready(server)
        yield server, chat, redis_server.client()
    finally:
        code = server.stop()
        redis_server.stop()
        chat.close()
    assert code == 0, server.log_tail()


def post(server, **overrides) -> dict:
    payload = dict(image=base64.b64encode(REFERENCE).decode(), prompt="a toy on a beach", steps=2, size=64, seed=5,
                   exact=True)
    response = httpx.post(f"{server.url}/generate", json={**payload, **overrides}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def pixels(document: dict | pb.GenerateResponse) -> np.ndarray:
    data = document.images[0] if isinstance(document, pb.GenerateResponse) else base64.b64decode(document["images"][0])
    return np.asarray(Image.open(io.BytesIO(data)))


def enhancements(server, outcome: str) -> float:
    return server.metric("dsd_prompt_enhancements_total", outcome=outcome)


def test_rest_enhanced_prompt_is_generated_from_returned_and_cached(service):
    server, chat, store = service
    calls, before = chat.count(), {outcome: enhancements(server, outcome) for outcome in ("enhanced", "cached")}
    enhanced = post(server, prompt="a toy on a beach")
    assert enhanced["enhanced_prompt"] == caption("a toy on a beach")
    assert not any(notice.startswith("enhance_prompt") for notice in enhanced["notices"])
    direct = post(server, prompt=caption("a toy on a beach"), enhance_prompt=False)
    assert direct["enhanced_prompt"] is None
    assert np.array_equal(pixels(enhanced), pixels(direct))
    plain = post(server, prompt="a toy on a beach", enhance_prompt=False)
    assert not np.array_equal(pixels(enhanced), pixels(plain))

    again = post(server, prompt="a toy on a beach")
    assert again["enhanced_prompt"] == enhanced["enhanced_prompt"]
    assert np.array_equal(pixels(again), pixels(enhanced))
    assert chat.count() == calls + 1
    assert store.keys(f"{KEY_PREFIX}*") and all(key.decode().startswith(f"{KEY_PREFIX}{PROMPT_VERSION}:")
                                                 for key in store.keys(f"{KEY_PREFIX}*"))
    assert enhancements(server, "enhanced") == before["enhanced"] + 1
    assert enhancements(server, "cached") == before["cached"] + 1


def test_rest_request_off_overrides_the_server_default(service):
    server, chat, _ = service
    calls = chat.count()
    document = post(server, prompt="a toy in the snow", enhance_prompt=False)
    assert document["enhanced_prompt"] is None and document["notices"] == [unmarked(64)]
    assert chat.count() == calls


def test_rest_failures_and_over_window_replies_fall_back_to_the_prompt(service):
    server, chat, _ = service
    plain = pixels(post(server, prompt="a toy in a forest", enhance_prompt=False))
    before = {outcome: enhancements(server, outcome) for outcome in ("failed", "too_long")}
    chat.fault(("status", 500), ("sleep", 3 * TIMEOUT_S), ("reply", OVER_WINDOW))
    failed = post(server, prompt="a toy in a forest")
    slow = post(server, prompt="a toy in a forest")
    too_long = post(server, prompt="a toy in a forest")
    assert failed["notices"] == ["enhance_prompt: the enhancement model is unavailable; the prompt was used as given",
                                 unmarked(64)]
    assert slow["notices"] == ["enhance_prompt: no answer within 1 s; the prompt was used as given", unmarked(64)]
    notice, size_notice = too_long["notices"]
    assert size_notice == unmarked(64)
    assert notice.startswith("enhanced_prompt: is ") and notice.endswith(
        "T5 tokens long; the limit is 512 tokens; the prompt was used as given")
    for document in (failed, slow, too_long):
        assert document["enhanced_prompt"] is None
        assert np.array_equal(pixels(document), plain)
    assert enhancements(server, "failed") == before["failed"] + 2
    assert enhancements(server, "too_long") == before["too_long"] + 1


def test_rest_cut_off_and_over_long_replies_fall_back_and_cut_off_ones_are_not_kept(service):
    server, chat, _ = service
    before = enhancements(server, "too_long")
    chat.fault(("truncated", caption("a toy in a cave")), ("reply", OVER_CHARS))
    cut = post(server, prompt="a toy in a cave")
    over = post(server, prompt="a toy in a desert")
    assert cut["enhanced_prompt"] is None and cut["notices"] == [
        "enhance_prompt: the enhancement model's reply was cut off at 512 tokens; the prompt was used as given",
        unmarked(64)]
    assert over["enhanced_prompt"] is None and over["notices"] == [
        f"enhanced_prompt: has {len(OVER_CHARS)} characters; the limit is 2000; the prompt was used as given",
        unmarked(64)]
    assert np.array_equal(pixels(cut), pixels(post(server, prompt="a toy in a cave", enhance_prompt=False)))
    assert np.array_equal(pixels(over), pixels(post(server, prompt="a toy in a desert", enhance_prompt=False)))
    assert enhancements(server, "too_long") == before + 2
    calls = chat.count()
    again = post(server, prompt="a toy in a cave")
    assert again["enhanced_prompt"] == caption("a toy in a cave") and chat.count() == calls + 1


def test_grpc_enhance_prompt_and_enhanced_prompt(service):
    server, chat, _ = service
    with grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}") as channel:
        stub = dsd_pb2_grpc.DSDServiceStub(channel)

        def generate(**fields) -> pb.GenerateResponse:
            return stub.Generate(pb.GenerateRequest(image=REFERENCE, steps=2, size=64, seed=5, exact=True, **fields),
                                 timeout=120)

        enhanced = generate(prompt="a toy on a boat", enhance_prompt=True)
        direct = generate(prompt=caption("a toy on a boat"), enhance_prompt=False)
        default = generate(prompt="a toy on a boat")
        chat.fault(("status", 503))
        failed = generate(prompt="a toy on a train")
    assert enhanced.enhanced_prompt == default.enhanced_prompt == caption("a toy on a boat")
    assert direct.enhanced_prompt == "" and not any(notice.startswith("enhance") for notice in direct.notices)
    assert np.array_equal(pixels(enhanced), pixels(direct)) and np.array_equal(pixels(enhanced), pixels(default))
    assert failed.enhanced_prompt == ""
    assert list(failed.notices) == ["enhance_prompt: the enhancement model is unavailable; the prompt was used as given",
                                    unmarked(64)]
