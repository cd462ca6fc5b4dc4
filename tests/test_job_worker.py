"""The job worker in-process on a real tiny runtime and a real redis-server: it keeps its claim from the moment it
takes a job, and a job that finds no room in the engine goes back to the queue without counting as an attempt."""

import asyncio
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from data.conftest import ChatServer
from dsd_model.settings import Settings
from dsd_serve.job_store import RedisJobStore, caller_of
from dsd_serve.jobs import Jobs, JobSpec
from dsd_serve.runtime import Runtime
from dsd_serve.schemas import GenerateParams
from helpers import png_bytes, random_image, transparent_image

REFERENCE = png_bytes(random_image(96, 80, seed=3))
VISIBILITY_S = 1.5


@pytest.fixture
def chat():
    server = ChatServer()
    server.answer = lambda kind, body: "A red plush fox with a blue scarf sitting in a sunny garden."
    yield server
    server.close()


async def wait_until(condition, timeout: float = 60.0, every: float = 0.05):
    end = time.monotonic() + timeout
    while not (found := await asyncio.to_thread(condition)):
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(every)
    return found


def test_a_claimed_job_keeps_its_claim_while_its_prompt_is_enhanced(fresh_redis, chat):
    chat.fault(("sleep", 3 * VISIBILITY_S))
    config = Settings(profile="tiny", jobs_redis_url=fresh_redis.url, jobs_visibility_timeout_s=VISIBILITY_S,
                      enhance_base_url=chat.url, enhance_model="vlm", enhance_timeout_s=20, max_batch_rows=3)
    runtime = Runtime(config)
    runtime.start()
    jobs = Jobs(config)
    competitor = RedisJobStore(fresh_redis.url, 600, VISIBILITY_S, 1000)

    async def scenario():
        spec = JobSpec(GenerateParams(prompt="the toy", steps=2, size=64, seed=1, enhance_prompt=True))
        job_id, _ = await jobs.submit(runtime, spec, REFERENCE, None, caller_of(None))
        jobs.start_worker(runtime)
        await wait_until(lambda: jobs.store.get(job_id)["state"] == "running")
        taken = []
        while jobs.store.get(job_id)["state"] == "running":
            claim = await asyncio.to_thread(competitor.claim)
            if claim is not None:
                taken.append(claim.job_id)
        return job_id, taken

    try:
        job_id, taken = asyncio.run(scenario())
        view = jobs.store.get(job_id)
    finally:
        jobs.stop(timeout=30)
        runtime.drain()
    assert chat.count() == 1, "the enhancement outlasted the visibility timeout"
    assert taken == [], "another replica reclaimed a job whose replica was alive"
    assert view["state"] == "succeeded" and view["attempts"] == "1"


def test_a_job_without_room_in_the_engine_goes_back_to_the_queue_without_an_attempt(fresh_redis):
    config = Settings(profile="tiny", jobs_redis_url=fresh_redis.url, max_queue=1, max_batch_rows=3,
                      jobs_pull_below=100, jobs_room_wait_s=0.5)
    runtime = Runtime(config)
    runtime.start()
    jobs = Jobs(config)

    async def scenario():
        busy = GenerateParams(prompt="busy", steps=100, size=64, image_guidance=2.0, seed=2)
        blockers = [await runtime.submit(busy, REFERENCE)]
        await wait_until(lambda: runtime.engine.queue_depth == 0)
        blockers.append(await runtime.submit(busy, REFERENCE))
        spec = JobSpec(GenerateParams(prompt="the toy", steps=2, size=64, seed=1))
        job_id, _ = await jobs.submit(runtime, spec, REFERENCE, None, caller_of(None))
        first_entry = jobs.store.get(job_id)["entry"]
        jobs.start_worker(runtime)
        await wait_until(lambda: jobs.store.get(job_id)["entry"] != first_entry)
        for blocker in blockers:
            blocker.cancel()
        await wait_until(lambda: jobs.store.get(job_id)["state"] == "succeeded")
        return job_id

    try:
        view = jobs.store.get(asyncio.run(scenario()))
    finally:
        jobs.stop(timeout=30)
        runtime.drain()
    assert view["state"] == "succeeded" and view["attempts"] == "1"


def test_a_queued_job_keeps_the_canvas_sized_reference_not_the_upload(fresh_redis):
    config = Settings(profile="tiny", jobs_redis_url=fresh_redis.url, max_batch_rows=3)
    runtime = Runtime(config)
    runtime.start()
    jobs = Jobs(config)
    upload = png_bytes(transparent_image(1200, 900))
    params = GenerateParams(prompt="the toy", steps=2, size=64, seed=4, exact=True)

    async def scenario():
        direct = await runtime.submit(params, upload)
        direct_images = (await direct.result()).images
        job_id, _ = await jobs.submit(runtime, JobSpec(params), upload, None, caller_of(None))
        stored = jobs.store.reference(job_id)[1]
        jobs.start_worker(runtime)
        await wait_until(lambda: jobs.store.get(job_id)["state"] == "succeeded")
        return direct, direct_images, stored, jobs.store.get(job_id), jobs.store.image(job_id, 0)

    try:
        direct, direct_images, stored, fields, image = asyncio.run(scenario())
    finally:
        jobs.stop(timeout=30)
        runtime.drain()
    canvas = Image.open(io.BytesIO(stored))
    assert canvas.size == (64, 64) and canvas.mode == "RGB"
    assert len(stored) <= 64 * 64 * 3 + 1024 and 100 * len(stored) < len(upload), (len(stored), len(upload))
    assert json.loads(fields["result"])["notices"] == direct.notices, "what was done to the upload is reported"
    assert any("transparency" in notice for notice in direct.notices)
    assert np.array_equal(pixels(image), pixels(direct_images[0])), "the stored canvas generates what the upload does"


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
