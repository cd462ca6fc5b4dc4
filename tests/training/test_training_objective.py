"""The flow-matching inputs: dropout rates, what a dropped condition or prompt looks like, the timestep shift."""

from __future__ import annotations

import pytest
import torch
from training_helpers import SIZE

from dsd_model.images import decode_image
from dsd_model.training.dataset import PairDataset, sample_indices
from dsd_model.training.objective import draw_dropout, flow_matching_inputs, shift_sigmas

TEXT_RATE, BOTH_RATE = 0.2, 0.3
SAMPLES = 20_000
TOLERANCE = 0.015
"""About 4.5 standard deviations of a rate measured over 20,000 samples."""


@pytest.fixture
def pairs(dataset):
    return PairDataset(dataset, SIZE)


def test_dropout_is_one_joint_draw_over_the_three_cfg_passes(make_config):
    config = make_config(text_dropout=TEXT_RATE, text_and_condition_dropout=BOTH_RATE)
    condition, text = draw_dropout(SAMPLES, config, torch.Generator().manual_seed(0))
    observed = {
        "prompt, condition (v)": (~text & ~condition).float().mean().item(),
        "empty, condition (u_t)": (text & ~condition).float().mean().item(),
        "empty, zero condition (u)": (text & condition).float().mean().item(),
    }
    expected = {
        "prompt, condition (v)": 1 - TEXT_RATE - BOTH_RATE,
        "empty, condition (u_t)": TEXT_RATE,
        "empty, zero condition (u)": BOTH_RATE,
    }
    assert all(abs(observed[case] - expected[case]) < TOLERANCE for case in expected), observed
    assert not (condition & ~text).any(), "(prompt, zero condition) serves no inference pass"


@pytest.mark.parametrize(
    ("text_rate", "both_rate", "text_expected", "condition_expected"),
    [(0.0, 0.0, False, False), (1.0, 0.0, True, False), (0.0, 1.0, True, True)],
)
def test_dropout_rates_zero_and_one_are_exact(text_rate, both_rate, text_expected, condition_expected, make_config):
    config = make_config(text_dropout=text_rate, text_and_condition_dropout=both_rate)
    condition, text = draw_dropout(100, config, torch.Generator())
    assert (text.tolist(), condition.tolist()) == ([text_expected] * 100, [condition_expected] * 100)


def test_dropout_rates_must_fit_one_draw(make_config):
    with pytest.raises(ValueError, match="text_dropout 0.6 \\+ text_and_condition_dropout 0.5 exceeds 1"):
        make_config(text_dropout=0.6, text_and_condition_dropout=0.5)


def test_dropped_samples_get_a_zero_condition_and_the_empty_prompt(pairs, make_config, training_pipe):
    config = make_config(text_dropout=0.3, text_and_condition_dropout=0.3)
    empty = training_pipe.encode_prompt([""])[0][0]
    batch = pairs.batch([0, 1, 2, 3] * 2)
    inputs = flow_matching_inputs(training_pipe, batch, config, torch.Generator().manual_seed(2))

    condition, text = draw_dropout(8, config, torch.Generator().manual_seed(2))
    assert torch.equal(inputs.condition_dropped, condition) and torch.equal(inputs.text_dropped, text)
    assert 0 < condition.sum() < text.sum() < 8
    channels = inputs.hidden_states.shape[2] // 2
    for row in range(8):
        assert bool((inputs.hidden_states[row, :, channels:] == 0).all()) == bool(condition[row])
        assert torch.equal(inputs.prompt_embeds[row], empty) == bool(text[row])


def test_same_generator_state_gives_same_inputs(pairs, make_config, training_pipe):
    config = make_config()
    batch = pairs.batch([0, 1])
    first = flow_matching_inputs(training_pipe, batch, config, torch.Generator().manual_seed(3))
    second = flow_matching_inputs(training_pipe, batch, config, torch.Generator().manual_seed(3))
    assert torch.equal(first.hidden_states, second.hidden_states)
    assert torch.equal(first.target, second.target)


def test_inputs_follow_the_rectified_flow_and_the_inference_encoding(pairs, make_config, training_pipe):
    pipe, config = training_pipe, make_config(text_dropout=0.0, text_and_condition_dropout=0.0)
    inputs = flow_matching_inputs(pipe, pairs.batch([0, 1]), config, torch.Generator().manual_seed(5))

    # Redo it by hand in the documented draw order: dropout, timesteps, VAE samples (targets, conditions), noise.
    # The condition parameters come from the inference path, `encode_condition_distribution`.
    generator = torch.Generator().manual_seed(5)
    draw_dropout(2, config, generator)
    t = torch.sigmoid(torch.randn(2, generator=generator))
    references = [decode_image(pairs.directory / p.reference) for p in pairs.pairs[:2]]
    with torch.no_grad():
        target_parameters = pipe.vae.encode(pairs.batch([0, 1]).targets).latent_dist.parameters
    condition_parameters = [pipe.encode_condition_distribution(image, SIZE) for image in references]
    latents = pipe.condition_latents(torch.cat([target_parameters, *condition_parameters]), generator)
    x0, condition = latents.chunk(2)
    noise = torch.randn(x0.shape, generator=generator)
    sigmas = shift_sigmas(t, x0.shape[1], pipe.scheduler.config)

    s = sigmas[:, None, None]
    channels = x0.shape[2]
    torch.testing.assert_close(inputs.sigmas, sigmas)
    torch.testing.assert_close(inputs.hidden_states[..., :channels], (1 - s) * x0 + s * noise, rtol=0, atol=1e-5)
    torch.testing.assert_close(inputs.hidden_states[..., channels:], condition, rtol=0, atol=1e-5)
    torch.testing.assert_close(inputs.target, noise - x0, rtol=0, atol=1e-5)
    assert inputs.guidance.tolist() == [config.guidance] * 2


def test_timestep_shift_is_the_inference_schedule(training_pipe):
    steps, tokens = 28, 1024
    _, sigmas = training_pipe.schedule(steps, tokens)
    t = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
    torch.testing.assert_close(shift_sigmas(t, tokens, training_pipe.scheduler.config), sigmas[:-1].double())


def test_sample_order_visits_every_pair_once_per_epoch():
    order = sample_indices(5, seed=1, start=0, count=15)
    assert [sorted(order[i : i + 5]) for i in (0, 5, 10)] == [list(range(5))] * 3
    assert order[:5] != order[5:10]
    assert sample_indices(5, seed=1, start=7, count=4) == order[7:11]
