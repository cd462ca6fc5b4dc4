"""`Runtime.submit` refuses what the engine would refuse before decoding, and queues only the canvas a reference
feeds (in-process runtime on the tiny profile, engine not started so that submissions stay queued)."""

import asyncio

import pytest
from prometheus_client import REGISTRY

from dsd_model.errors import Draining, QueueFull
from dsd_model.settings import Settings
from dsd_serve.runtime import Runtime
from dsd_serve.schemas import GenerateParams
from helpers import png_bytes, random_image, unmarked


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("dsd_requests_rejected_total", {"reason": reason}) or 0.0


@pytest.fixture(scope="module")
def runtime():
    return Runtime(Settings(profile="tiny", max_queue=1, size=64))


def test_queued_reference_is_the_canvas_and_refusals_come_before_decoding(runtime):
    params = GenerateParams(prompt="a toy", size=80)
    submission = asyncio.run(runtime.submit(params, png_bytes(random_image(300, 200))))
    [job] = submission.jobs
    assert job.request.image.size == (80, 80) and submission.notices == [unmarked(80)]

    before = rejected("queue_full")
    with pytest.raises(QueueFull):  # undecodable bytes: an InputError had the image been decoded first
        asyncio.run(runtime.submit(params, b"not an image"))
    assert rejected("queue_full") == before + 1

    runtime.engine.stop_admitting()
    before = rejected("draining")
    with pytest.raises(Draining):
        asyncio.run(runtime.submit(params, b"not an image"))
    assert rejected("draining") == before + 1


def test_priorities_rank_requests_unless_the_operator_turned_them_off():
    image = png_bytes(random_image(64, 64))
    ranked = Runtime(Settings(profile="tiny", size=64))
    plain = asyncio.run(ranked.submit(GenerateParams(prompt="a toy"), image))
    urgent = asyncio.run(ranked.submit(GenerateParams(prompt="a toy", priority=10), image))
    job_class = asyncio.run(ranked.submit(GenerateParams(prompt="a toy"), image, priority_class="batch"))
    assert urgent.jobs[0].rank < plain.jobs[0].rank < job_class.jobs[0].rank  # engine not started: all still queued
    assert not any("priority" in notice for notice in urgent.notices)

    flat = Runtime(Settings(profile="tiny", size=64, request_priorities=False))
    first = asyncio.run(flat.submit(GenerateParams(prompt="a toy"), image))
    ignored = asyncio.run(flat.submit(GenerateParams(prompt="a toy", priority=10), image))
    assert first.jobs[0].rank < ignored.jobs[0].rank and ignored.jobs[0].priority == 0
    assert "priority: 10 was ignored; this server ranks every request alike (DSD_REQUEST_PRIORITIES=false)" in \
        ignored.notices
