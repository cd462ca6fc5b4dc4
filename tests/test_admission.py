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
