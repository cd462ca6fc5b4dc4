"""Previews of the clean-image estimate: `GenerationRequest.preview_steps`, `DSDPipeline.preview` and the engine's
`partial` events (the partial images of the OpenAI API's streaming)."""

import numpy as np
import pytest
import torch

from dsd_model import GenerationRequest, InputError
from dsd_model.serving.engine import Engine, EngineConfig
from helpers import random_image
from test_engine_stress import STAGES, FaultyPipeline


def request(**overrides) -> GenerationRequest:
    values = dict(image=random_image(seed=3), prompt="a toy on a beach", num_inference_steps=4, size=64, seed=11)
    values.update(overrides)
    return GenerationRequest(**values)


@pytest.mark.parametrize("steps", [(0,), (5,), (2, 1), (2, 2), [1], (1.0,), (True,)])
def test_preview_steps_are_validated(tiny_pipe, steps):
    with pytest.raises(InputError, match="preview_steps") as raised:
        tiny_pipe.prepare([request(preview_steps=steps)])
    assert raised.value.field == "preview_steps"


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_preview_is_the_clean_estimate_of_the_guided_prediction(tiny_pipe, cfg):
    (state,) = tiny_pipe.prepare([request(preview_steps=(1, 3, 4), image_guidance_scale=cfg)])
    kept = {}
    while not state.done:
        before = state.latents.clone()
        sigma, sigma_next = state.sigmas[state.step_index], state.sigmas[state.step_index + 1]
        tiny_pipe.step([state])
        if state.step_index in (1, 3, 4):
            # the Euler step is x' = x + (sigma' - sigma) v, so the velocity it used is recoverable from x and x'
            velocity = (state.latents - before) / (sigma_next - sigma)
            expected = before - sigma * velocity
            torch.testing.assert_close(state.extras["preview"], expected, atol=1e-5, rtol=1e-4)
            kept[state.step_index] = tiny_pipe.preview(state)
            assert "preview" not in state.extras
        else:
            assert "preview" not in state.extras
    assert sorted(kept) == [1, 3, 4] and all(image.size == (64, 64) for image in kept.values())
    # the last sigma is 0, so the estimate after the last step is the final latents: the final image itself
    assert np.array_equal(np.asarray(kept[4]), np.asarray(tiny_pipe.finish(state)))
    assert not np.array_equal(np.asarray(kept[1]), np.asarray(kept[4]))
    with pytest.raises(ValueError, match="no preview"):
        tiny_pipe.preview(state)


def test_previews_leave_the_final_image_unchanged(tiny_pipe):
    plain, previewed = tiny_pipe.prepare([request(image_guidance_scale=2.0),
                                          request(image_guidance_scale=2.0, preview_steps=(1, 2, 3))])
    while not plain.done:
        tiny_pipe.step([plain])
        tiny_pipe.step([previewed])
        if "preview" in previewed.extras:
            tiny_pipe.preview(previewed)
    assert torch.equal(plain.latents, previewed.latents)
    assert np.array_equal(np.asarray(tiny_pipe.finish(plain)), np.asarray(tiny_pipe.finish(previewed)))


@pytest.fixture
def engine(fresh_pipe):
    engine = Engine(fresh_pipe, EngineConfig(max_batch_rows=12))
    engine.start(warmup=False)
    yield engine
    engine.drain(timeout=10)


def test_partial_events_come_in_order_before_done(engine, tiny_pipe):
    jobs = [engine.submit(request(seed=20 + i, num_inference_steps=6, preview_steps=(2, 4, 6)[: i + 1]))
            for i in range(3)]
    plain = engine.submit(request(seed=20, num_inference_steps=6))
    results = [job.future.result(timeout=60) for job in jobs + [plain]]
    for i, job in enumerate(jobs):
        kinds = [(event.kind, event.step) for event in job.history if event.kind in ("partial", "done")]
        assert kinds == [("partial", step) for step in (2, 4, 6)[: i + 1]] + [("done", 6)]
        partials = [event for event in job.history if event.kind == "partial"]
        assert all(event.total == 6 and event.image.size == (64, 64) for event in partials)
        step_events = [event.at for event in job.history if event.kind == "step"]
        assert partials[0].at >= step_events[1]  # decoded after its step, never before
    # previews change nothing about the final images (the same seed, with and without them, in one batch)
    assert np.array_equal(np.asarray(results[0].image), np.asarray(results[3].image))
    assert all(event.image is None for event in plain.history)


def test_a_failing_preview_costs_only_that_partial_image(fresh_pipe):
    class FaultyPreviews(FaultyPipeline):
        def preview(self, state):
            self._raise_for("preview", [state.request])
            return super().preview(state)

    pipe = FaultyPreviews(**fresh_pipe.components)
    pipe.faults = {stage: set() for stage in STAGES} | {"preview": {"broken previews"}}
    engine = Engine(pipe, EngineConfig(max_batch_rows=12))
    engine.start(warmup=False)
    try:
        broken = engine.submit(request(prompt="broken previews", preview_steps=(1, 2)))
        fine = engine.submit(request(preview_steps=(1, 2)))
        assert broken.future.result(timeout=30).seed == 11
        fine.future.result(timeout=30)
        assert [event.kind for event in broken.history if event.kind in ("partial", "done")] == ["done"]
        assert [event.step for event in fine.history if event.kind == "partial"] == [1, 2]
    finally:
        engine.drain(timeout=10)
