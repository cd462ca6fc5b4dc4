"""The serving engine on the tiny profile: step-level batching, admission, cancellation, deadlines, drain."""

import threading
import time

import numpy as np
import pytest
import torch

from dsd_model import DSDPipeline, GenerationRequest, InputError
from dsd_model.serving.engine import (
    DeadlineExceeded, Draining, Engine, EngineConfig, InternalError, QueueFull, RequestCancelled,
)
from dsd_model.tiny import tiny_lora_state_dict
from helpers import random_image
from test_engine_stress import STAGES, FaultyPipeline
from test_pipeline import BATCH_TOLERANCE


def wait_for(job, kind: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for event in job.history:
            if event.kind == kind:
                return event
        time.sleep(0.002)
    raise AssertionError(f"{job.request_id} had no {kind!r} event within {timeout} s: {job.history}")


class Hold:
    """A gate for `GatedPipeline`: closed, the next step waits (and `waiting` is set) until it opens again."""

    def __init__(self):
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()

    def close(self):
        self._open.clear()

    def open(self):
        self._open.set()

    def wait_cleared(self):
        if not self._open.is_set():
            self.waiting.set()
        self._open.wait()
        self.waiting.clear()


class GatedPipeline(DSDPipeline):
    """The real pipeline whose steps wait while its `hold` is closed, so a test can queue requests behind a running
    batch and release it when they are prepared (instead of guessing how long a step takes on a loaded machine)."""

    hold: Hold

    def step(self, states):
        self.hold.wait_cleared()
        super().step(states)


def wait_until(condition, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.002)


@pytest.fixture
def adapted_pipe(fresh_pipe):
    fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=1), "identity")
    fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=2), "structure")
    return fresh_pipe


@pytest.fixture
def engine(adapted_pipe):
    engines = []

    def make(**config):
        engine = Engine(adapted_pipe, EngineConfig(**config))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.drain(timeout=10)


def req(seed: int, **overrides) -> GenerationRequest:
    values = dict(image=random_image(seed=seed), prompt=f"a toy number {seed}", num_inference_steps=4, size=64,
                  seed=seed, adapter="identity")
    values.update(overrides)
    return GenerationRequest(**values)


def solo(pipe, request: GenerationRequest) -> torch.Tensor:
    return pipe(
        request.image, request.prompt, num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale, image_guidance_scale=request.image_guidance_scale,
        text_guidance_scale=request.text_guidance_scale, size=request.size, seed=request.seed,
        adapter=request.adapter, output_type="pt",
    ).images


def as_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def test_staggered_requests_share_steps_and_equal_solo_results(engine, adapted_pipe):
    eng = engine(max_batch_rows=12)
    requests = [
        req(1, num_inference_steps=40),
        req(2, num_inference_steps=3, image_guidance_scale=2.0, text_guidance_scale=1.5),
        req(3, num_inference_steps=5, guidance_scale=5.0),
        req(4, num_inference_steps=4, image_guidance_scale=1.5),
    ]
    first = eng.submit(requests[0])
    wait_for(first, "step")
    later = [eng.submit(r) for r in requests[1:]]
    results = [job.future.result(timeout=60) for job in [first, *later]]
    # the later requests joined the running batch: the first finished after they started
    assert first.finished > max(job.started for job in later)
    for request, result in zip(requests, results):
        assert result.seed == request.seed
        difference = (as_tensor(result.image) - solo(adapted_pipe, request)).abs().max()
        assert difference <= BATCH_TOLERANCE + 1 / 255, request.seed  # + one 8-bit rounding level of the PNG path


def test_events_are_ordered_and_complete(engine):
    eng = engine()
    job = eng.submit(req(5, num_inference_steps=3))
    job.future.result(timeout=30)
    kinds = [(e.kind, e.step) for e in job.history]
    assert kinds == [("queued", 0), ("started", 0), ("step", 1), ("step", 2), ("step", 3), ("done", 3)]
    assert job.history[0].position == 1


def test_queue_full_rejects_at_once_with_retry_hint(engine):
    eng = engine(max_batch_rows=3, max_queue=1)
    running = eng.submit(req(1, num_inference_steps=100, image_guidance_scale=2.0))
    wait_for(running, "started")
    waiting = eng.submit(req(2, num_inference_steps=2, image_guidance_scale=2.0))
    start = time.monotonic()
    with pytest.raises(QueueFull) as info:
        eng.submit(req(3))
    assert time.monotonic() - start < 0.5
    assert info.value.retry_after >= 1
    running.cancel()
    assert waiting.future.result(timeout=30).seed == 2


def test_cancel_frees_the_slot_at_the_next_step(engine):
    eng = engine(max_batch_rows=3)
    job = eng.submit(req(1, num_inference_steps=100))
    wait_for(job, "step")
    job.cancel()
    with pytest.raises(RequestCancelled):
        job.future.result(timeout=10)
    wait_until(lambda: eng.running == 0)
    assert job.history[-1].kind == "failed"
    assert max(e.step for e in job.history) < 100


def test_deadline_cancels_and_frees_the_slot(engine):
    eng = engine()
    job = eng.submit(req(1, num_inference_steps=100, size=512, image_guidance_scale=2.0),
                   deadline=time.monotonic() + 0.2)  # many seconds of work on any CPU
    with pytest.raises(DeadlineExceeded, match="passed its deadline at step"):
        job.future.result(timeout=10)
    wait_until(lambda: eng.running == 0)
    assert eng.submit(req(2, num_inference_steps=2)).future.result(timeout=10).seed == 2


def test_first_come_first_served_across_adapters(engine):
    eng = engine(max_batch_rows=12)
    jobs = [eng.submit(req(i, adapter="identity" if i % 2 else "structure", num_inference_steps=2)) for i in range(6)]
    for job in jobs:
        job.future.result(timeout=30)
    # adapters share forwards, so each job starts no later than every job submitted after it
    for earlier, later in zip(jobs, jobs[1:]):
        assert earlier.started <= later.started


def test_a_failing_forward_fails_its_batch_not_the_engine(engine, adapted_pipe):
    eng = engine()
    failures = iter([True])

    def fault(module, args, kwargs):
        if next(failures, False):
            raise RuntimeError("injected device fault")

    handle = adapted_pipe.transformer.register_forward_pre_hook(fault, with_kwargs=True)
    try:
        job = eng.submit(req(1, num_inference_steps=2))
        with pytest.raises(InternalError, match=job.request_id):
            job.future.result(timeout=10)
        assert eng.submit(req(2, num_inference_steps=2)).future.result(timeout=10).seed == 2
    finally:
        handle.remove()


def test_drain_finishes_work_then_refuses(engine):
    eng = engine()
    jobs = [eng.submit(req(i, num_inference_steps=3)) for i in range(3)]
    assert eng.drain(timeout=30)
    assert all(job.future.result(timeout=0).seed == i for i, job in enumerate(jobs))
    assert not eng.ready
    with pytest.raises(Draining):
        eng.submit(req(9))


def test_submit_validates_at_once(engine):
    eng = engine()
    with pytest.raises(InputError, match="num_inference_steps"):
        eng.submit(req(1, num_inference_steps=0))
    with pytest.raises(InputError, match="adapter"):
        eng.submit(req(1, adapter="sketch"))


def test_whole_request_batching_waits_for_an_empty_batch(fresh_pipe):
    hold = Hold()
    pipe = GatedPipeline(**fresh_pipe.components)
    pipe.hold = hold
    pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=1), "identity")
    eng = Engine(pipe, EngineConfig(batching="request", max_batch_rows=12))
    eng.start(warmup=False)
    try:
        hold.close()
        first = eng.submit(req(1, num_inference_steps=8))
        wait_until(lambda: hold.waiting.is_set())  # the first batch is at its first step
        second = eng.submit(req(2, num_inference_steps=2))
        third = eng.submit(req(3, num_inference_steps=5))
        wait_until(lambda: second.state is not None and third.state is not None)
        hold.open()
        for job in (first, second, third):
            job.future.result(timeout=60)
        last_step = [event for event in first.history if event.kind == "step"][-1]
        assert last_step.step == 8 and second.started >= last_step.at  # the first batch's decode may overlap
        # both waited for the empty engine and formed one batch, whose results come back together, after its
        # longest request
        assert second.started == third.started
        assert second.finished >= [event.at for event in third.history if event.kind == "step"][-1]
    finally:
        eng.drain(timeout=30)


def test_exact_request_in_a_busy_engine_equals_it_alone(engine, adapted_pipe):
    eng = engine(max_batch_rows=12)
    exact = req(7, num_inference_steps=4, image_guidance_scale=2.0, exact=True)
    alone = adapted_pipe(exact.image, exact.prompt, num_inference_steps=4, image_guidance_scale=2.0, size=64,
                         seed=7, adapter="identity").images[0]
    busy = [eng.submit(req(i, num_inference_steps=8, image_guidance_scale=1.5 if i % 2 else 1.0)) for i in range(3)]
    wait_for(busy[0], "step")
    job = eng.submit(exact)
    later = [eng.submit(req(i, num_inference_steps=3)) for i in range(3, 5)]
    result = job.future.result(timeout=60)
    for other in busy + later:
        other.future.result(timeout=60)
    assert job.started < max(other.finished for other in busy + later)  # it stepped while others ran
    # its rows ran in forwards of their own, of the same shapes as alone: equal bit for bit
    assert np.array_equal(np.asarray(result.image), np.asarray(alone))


def test_a_failing_decode_fails_that_request_only(fresh_pipe):
    pipe = FaultyPipeline(**fresh_pipe.components)
    pipe.faults = {stage: set() for stage in STAGES} | {"finish": {"a toy number 2"}}
    eng = Engine(pipe, EngineConfig(batching="request", max_batch_rows=12))
    eng.start(warmup=False)
    try:
        jobs = [eng.submit(req(i, num_inference_steps=i + 1, adapter=None)) for i in range(1, 4)]
        assert jobs[0].future.result(timeout=30).seed == 1 and jobs[2].future.result(timeout=30).seed == 3
        with pytest.raises(InternalError, match=jobs[1].request_id):
            jobs[1].future.result(timeout=30)
        wait_until(lambda: eng.running == 0)
        assert eng.submit(req(4, num_inference_steps=2, adapter=None)).future.result(timeout=30).seed == 4
    finally:
        eng.drain(timeout=10)


def test_drain_wakes_when_cancelled_requests_leave(engine):
    eng = engine(max_batch_rows=3)
    running = eng.submit(req(1, num_inference_steps=100, image_guidance_scale=2.0))
    waiting = eng.submit(req(2, num_inference_steps=100))
    wait_for(running, "step")
    running.future.cancel()  # what a waiter's cancellation does (asyncio.wrap_future)
    waiting.cancel()
    started = time.monotonic()
    assert eng.drain()
    assert time.monotonic() - started < 5
    assert running.future.cancelled() and isinstance(waiting.future.exception(), RequestCancelled)
    assert max(e.step for e in running.history) < 100 and eng.running == eng.queue_depth == 0
