"""A seeded storm over the real engine on the tiny profile: concurrent requests with random cancels, deadlines and
injected faults. Whatever happens to one request, every other request completes with the image it gets alone."""

import random
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.serving.engine import DeadlineExceeded, Engine, EngineConfig, InternalError, Job, RequestCancelled
from dsd_model.tiny import build_tiny_components
from helpers import random_image
from test_pipeline import BATCH_LEVELS

STAGES = ("prepare", "step", "finish")


class FaultyPipeline(DSDPipeline):
    """The real pipeline, whose stage functions raise for the prompts in `faults[stage]` (an injected fault of
    those requests only: a broken reference, a failing forward, a failing decode). Set `faults` after building."""

    faults: dict[str, set[str]]

    def _raise_for(self, stage: str, requests) -> None:
        broken = [r.prompt for r in requests if r.prompt in self.faults[stage]]
        if broken:
            raise RuntimeError(f"injected {stage} fault for {broken}")

    def prepare(self, requests, condition_parameters=None, adapters=None):
        self._raise_for("prepare", requests)
        return super().prepare(requests, condition_parameters, adapters)

    def step(self, states):
        self._raise_for("step", [state.request for state in states])
        super().step(states)

    def finish(self, state):
        self._raise_for("finish", [state.request])
        return super().finish(state)


def until(condition, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.0005)
    return True


def last_step_running(job: Job) -> bool:
    state = job.state
    return state is not None and state.step_index == state.num_steps - 1


def decoding(job: Job) -> bool:
    return job.state is not None and job.state.done


CANCEL_MOMENTS = {
    "queued": lambda job: True,
    "last step": last_step_running,
    "decode": decoding,
}


@pytest.mark.parametrize("seed", [0, 1])
def test_one_requests_fate_never_touches_another(seed):
    rng = random.Random(seed)
    pipe = FaultyPipeline(**build_tiny_components())
    pipe.set_progress_bar_config(disable=True)
    pipe.faults = {stage: set() for stage in STAGES}
    images = [random_image(seed=i) for i in range(3)]
    requests, plans = [], []
    for i in range(40):
        requests.append(GenerationRequest(
            image=rng.choice(images), prompt=f"toy {i}", num_inference_steps=rng.randint(2, 4), size=64, seed=i,
            image_guidance_scale=rng.choice([1.0, 1.0, 2.0]), exact=rng.random() < 0.2,
        ))
        roll = rng.random()
        if roll < 0.09:
            plan = ("fault", rng.choice(STAGES))
            pipe.faults[plan[1]].add(f"toy {i}")
        elif roll < 0.3:
            plan = ("cancel", rng.choice(list(CANCEL_MOMENTS)), rng.random() < 0.5)  # via the job or its future
        elif roll < 0.4:
            plan = ("deadline", rng.uniform(0.0, 0.4))
        else:
            plan = ("none",)
        plans.append(plan)
    alone = {i: np.asarray(pipe.finish(run_alone(pipe, r)), dtype=int)
             for i, (r, plan) in enumerate(zip(requests, plans)) if plan[0] != "fault"}

    engine = Engine(pipe, EngineConfig(max_batch_rows=8, max_queue=100, prepare_ahead=4))
    engine.start(warmup=False)
    jobs = []
    for request, plan in zip(requests, plans):
        deadline = time.monotonic() + plan[1] if plan[0] == "deadline" else None
        jobs.append(engine.submit(request, deadline=deadline, request_id=request.prompt))
        time.sleep(rng.uniform(0, 0.01))

    def cancel(job: Job, moment: str, via_future: bool) -> None:
        if until(lambda: CANCEL_MOMENTS[moment](job) or job.future.done()):
            job.future.cancel() if via_future else job.cancel()

    chaos = [threading.Thread(target=cancel, args=(job, *plan[1:])) for job, plan in zip(jobs, plans)
             if plan[0] == "cancel"]
    for thread in chaos:
        thread.start()
    for thread in chaos:
        thread.join()
    assert until(lambda: all(job.future.done() for job in jobs)), [j.request_id for j in jobs if not j.future.done()]

    for i, (job, plan) in enumerate(zip(jobs, plans)):
        future = job.future
        if plan[0] == "fault":
            assert isinstance(future.exception(), InternalError), (plan, future.exception())
            continue
        if future.cancelled() or future.exception() is not None:  # only a cancel or a deadline may end it early
            error = None if future.cancelled() else future.exception()
            allowed = {"cancel": (type(None), RequestCancelled), "deadline": (DeadlineExceeded,)}.get(plan[0], ())
            assert isinstance(error, allowed), (job.request_id, plan, error)
            continue
        levels = np.abs(np.asarray(future.result().image, dtype=int) - alone[i])
        assert levels.max() <= (0 if job.request.exact else BATCH_LEVELS), (job.request_id, plan)
    assert until(lambda: engine.queue_depth == 0 and engine.running == 0, timeout=5)
    assert REGISTRY.get_sample_value("dsd_queue_depth") == 0
    assert engine.drain(timeout=10)


def run_alone(pipe: DSDPipeline, request: GenerationRequest):
    state = pipe.prepare([request])[0]
    while not state.done:
        pipe.step([state])
    return state
