"""The DSD pipeline against the official inference facts (DESIGN.md section 1), on the tiny profile."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from dsd_model import DSDPipeline, GenerationRequest, InputError
from dsd_model.images import center_crop_resize, condition_canvas, to_tensor
from dsd_model.pipeline import latent_image_ids, pack_latents, unpack_latents
from helpers import random_image

BATCH_TOLERANCE = 2e-5
"""The reproducibility contract's bound (docs/serving.md, "Reproducibility"): a row computed inside a batch differs
from the same row computed alone only by float rounding of batched kernels. On the tiny profile's float32 images in
[0, 1] benchmarks/batch_invariance.py measures at most 1.7e-6 over 142 rows in 40 random batches; the bound leaves
room for other CPUs' kernels."""
BATCH_LEVELS = 1
"""The same bound on 8-bit images: a difference far below one level (1/255) can still flip one rounding."""


def request(image, **overrides):
    values = dict(prompt="a toy on a beach", num_inference_steps=3, size=64, seed=7)
    values.update(overrides)
    return GenerationRequest(image=image, **values)


def test_canvas_is_reference_then_black(reference):
    canvas = condition_canvas(reference, 64)
    assert canvas.shape == (1, 3, 64, 128)
    assert torch.equal(canvas[..., 64:], torch.full((1, 3, 64, 64), -1.0))
    expected = to_tensor(center_crop_resize(reference, 64))
    assert torch.equal(canvas[..., :64], expected)
    assert canvas.min() >= -1 and canvas.max() <= 1


def test_center_crop_takes_the_middle_square():
    image = random_image(width=120, height=80, seed=3)
    cropped = center_crop_resize(image, 80)
    assert np.array_equal(np.asarray(cropped), np.asarray(image)[:, 20:100])


def test_pack_unpack_and_ids():
    latents = torch.randn(2, 4, 8, 16)
    packed = pack_latents(latents)
    assert packed.shape == (2, 32, 16)
    assert torch.equal(unpack_latents(packed, 8, 16), latents)
    # token (row 1, col 2) holds the 2x2 patch at latent rows 2-3, cols 4-5, channel-major
    assert torch.equal(packed[0, 1 * 8 + 2], latents[0, :, 2:4, 4:6].reshape(-1))
    ids = latent_image_ids(8, 16, "cpu", torch.float32)
    assert ids.shape == (32, 3)
    assert ids[:, 0].abs().sum() == 0
    assert ids[9].tolist() == [0.0, 1.0, 1.0]


def test_schedule_is_the_official_shifted_linspace(tiny_pipe):
    steps, tokens = 28, 2048  # the official 512 x 1024 canvas
    timesteps, sigmas = tiny_pipe.schedule(steps, tokens)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    base = np.linspace(1.0, 1 / steps, steps)
    expected = math.e**mu / (math.e**mu + (1 / base - 1))
    assert np.allclose(sigmas[:-1].numpy(), expected, atol=1e-6)
    assert sigmas[-1] == 0
    assert torch.allclose(timesteps, sigmas[:-1] * 1000)


def test_prepare_draws_noise_then_condition_sample(tiny_pipe, reference):
    state = tiny_pipe.prepare([request(reference)])[0]
    generator = torch.Generator().manual_seed(7)
    noise = randn_tensor((1, 4, 8, 16), generator=generator)
    assert torch.equal(state.latents, pack_latents(noise))
    posterior = tiny_pipe.vae.encode(condition_canvas(reference, 64)).latent_dist
    sample = posterior.sample(generator)
    vae = tiny_pipe.vae.config
    assert torch.allclose(state.condition, pack_latents((sample - vae.shift_factor) * vae.scaling_factor), atol=1e-6)
    # noise covers the whole canvas: 64 x 128 pixels = 4 x 8 tokens
    assert state.latents.shape == (1, 32, 16)
    assert state.prompt_embeds.shape[1] == tiny_pipe.max_sequence_length


def test_euler_step_equals_the_scheduler(tiny_pipe, reference):
    state = tiny_pipe.prepare([request(reference, num_inference_steps=5)])[0]
    x = state.latents.clone()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    scheduler.timesteps, scheduler.sigmas = state.timesteps, state.sigmas
    velocity = forward(tiny_pipe, x, state.condition, state.prompt_embeds, state.pooled_prompt_embeds, state, 0)
    expected = scheduler.step(velocity, state.timesteps[0], x, return_dict=False)[0]
    tiny_pipe.step([state])
    assert torch.allclose(state.latents, expected, atol=1e-6)
    assert state.step_index == 1


def forward(pipe, x, condition, embeds, pooled, state, index):
    """One transformer pass for one row, written out from the model's inputs."""
    size = state.request.size
    return pipe.transformer(
        hidden_states=torch.cat([x, condition], dim=2),
        timestep=state.timesteps[index].expand(1) / 1000,
        guidance=torch.full((1,), state.request.guidance_scale),
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3),
        img_ids=latent_image_ids(2 * size // 16, 4 * size // 16, "cpu", torch.float32),
        return_dict=False,
    )[0]


def test_true_cfg_equals_three_separate_passes_and_gate(tiny_pipe, reference):
    s_i, s_t = 2.5, 1.7
    state = tiny_pipe.prepare(
        [request(reference, num_inference_steps=4, image_guidance_scale=s_i, text_guidance_scale=s_t,
                 negative_prompt="blurry")]
    )[0]
    plain = tiny_pipe.prepare([request(reference, num_inference_steps=4)])[0]
    # gate: steps 0 and 1 run the conditional pass only, exactly like a request without CFG
    for index in range(2):
        assert state.rows == 1
        tiny_pipe.step([state])
        tiny_pipe.step([plain])
        assert torch.allclose(state.latents, plain.latents, atol=1e-6), index
    assert state.rows == 3
    x, c = state.latents.clone(), state.condition
    with torch.no_grad():
        u = forward(tiny_pipe, x, torch.zeros_like(c), state.negative_prompt_embeds,
                    state.negative_pooled_prompt_embeds, state, 2)
        u_t = forward(tiny_pipe, x, c, state.negative_prompt_embeds, state.negative_pooled_prompt_embeds, state, 2)
        v = forward(tiny_pipe, x, c, state.prompt_embeds, state.pooled_prompt_embeds, state, 2)
    prediction = u + s_i * (u_t - u) + s_t * (v - u_t)
    expected = x + (state.sigmas[3] - state.sigmas[2]) * prediction
    tiny_pipe.step([state])
    assert torch.allclose(state.latents, expected, atol=1e-5)
    assert not torch.allclose(prediction, v, atol=1e-3)


def test_cfg_off_when_image_scale_at_most_one(tiny_pipe, reference):
    base = tiny_pipe(reference, "a toy", num_inference_steps=4, size=64, seed=3, output_type="pt").images
    text_only = tiny_pipe(
        reference, "a toy", num_inference_steps=4, size=64, seed=3, output_type="pt", text_guidance_scale=5.0
    ).images
    assert torch.equal(base, text_only)


def test_same_seed_same_image_other_seed_differs(tiny_pipe, reference):
    a = tiny_pipe(reference, "a toy", num_inference_steps=3, size=64, seed=11).images[0]
    b = tiny_pipe(reference, "a toy", num_inference_steps=3, size=64, seed=11).images[0]
    c = tiny_pipe(reference, "a toy", num_inference_steps=3, size=64, seed=12).images[0]
    assert a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_heterogeneous_batch_equals_single_calls(tiny_pipe):
    images = [random_image(seed=i, width=64 + 16 * i) for i in range(4)]
    prompts = ["a toy", "the same toy in snow", "a toy on a table", "a toy, watercolor"]
    steps = [2, 5, 3, 4]
    guidance = [3.5, 1.0, 5.0, 3.5]
    image_scales = [1.0, 2.0, 1.0, 1.5]
    text_scales = [1.0, 1.5, 3.0, 2.0]
    seeds = [1, 2, 3, 4]
    batched = tiny_pipe(
        images, prompts, num_inference_steps=steps, guidance_scale=guidance, image_guidance_scale=image_scales,
        text_guidance_scale=text_scales, seed=seeds, size=64, output_type="pt",
    )
    assert batched.seeds == seeds
    for i in range(4):
        single = tiny_pipe(
            images[i], prompts[i], num_inference_steps=steps[i], guidance_scale=guidance[i],
            image_guidance_scale=image_scales[i], text_guidance_scale=text_scales[i], seed=seeds[i], size=64,
            output_type="pt",
        ).images
        assert (batched.images[i] - single[0]).abs().max() <= BATCH_TOLERANCE, i


def test_given_latents_replace_the_noise(tiny_pipe, reference):
    noise = pack_latents(randn_tensor((1, 4, 8, 16), generator=torch.Generator().manual_seed(5)))
    drawn = tiny_pipe(reference, "a toy", num_inference_steps=2, size=64, seed=5, output_type="pt").images
    given = tiny_pipe(reference, "a toy", num_inference_steps=2, size=64, seed=5, latents=noise, output_type="pt")
    assert torch.equal(drawn, given.images)
    with pytest.raises(InputError, match="latents"):
        tiny_pipe(reference, "a toy", num_inference_steps=2, size=64, latents=torch.zeros(1, 8, 16))


def test_full_canvas_right_half_is_the_output(tiny_pipe, reference):
    kwargs = dict(num_inference_steps=2, size=64, seed=9, output_type="pt")
    half = tiny_pipe(reference, "a toy", **kwargs).images
    full = tiny_pipe(reference, "a toy", full_canvas=True, **kwargs).images
    assert full.shape == (1, 3, 64, 128)
    assert torch.equal(full[..., 64:], half)


def test_callback_and_generator(tiny_pipe, reference):
    calls = []
    result = tiny_pipe(
        [reference, reference], "a toy", num_inference_steps=[2, 3], size=64,
        generator=torch.Generator().manual_seed(0),
        callback_on_step_end=lambda pipe, step, states: calls.append((step, [s.step_index for s in states])),
    )
    assert calls == [(0, [1, 1]), (1, [2, 2]), (2, [2, 3])]
    again = tiny_pipe(reference, "a toy", num_inference_steps=2, size=64, seed=result.seeds[0])
    # the first image shared its forwards with the second: equal to the image alone within the contract's bound
    levels = np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(again.images[0], dtype=int))
    assert levels.max() <= BATCH_LEVELS


def test_prompt_embedding_does_not_depend_on_batch_mates(tiny_pipe):
    alone = tiny_pipe.encode_prompt(["a toy"])
    together = tiny_pipe.encode_prompt(["a toy on a long table in the snow", "a toy", "b"])
    assert torch.equal(together[0][1:2], alone[0]) and torch.equal(together[1][1:2], alone[1])


def test_exact_rows_equal_the_request_alone_in_any_batch(tiny_pipe):
    images = [random_image(seed=i) for i in range(4)]
    kwargs = dict(num_inference_steps=[3, 4, 2, 4], image_guidance_scale=[2.0, 1.0, 1.0, 1.5], seed=[1, 2, 3, 4],
                  size=64, output_type="pt")
    batched = tiny_pipe(images, "a toy", exact=[True, False, False, True], **kwargs)
    for i in (0, 3):
        alone = tiny_pipe(images[i], "a toy", **{k: v[i] if isinstance(v, list) else v for k, v in kwargs.items()})
        # the exact rows ran in forwards of their own, of the same shapes as alone: equal bit for bit
        assert torch.equal(batched.images[i], alone.images[0]), i


def test_save_and_load_offline_round_trip(tiny_pipe, reference, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = DSDPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "text_encoder_2", "transformer"):
        saved, back = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert saved.keys() == back.keys()
        assert all(torch.equal(saved[k], back[k]) for k in saved), name
    assert loaded.tokenizer_2("a Toy, 3!").input_ids == tiny_pipe.tokenizer_2("a Toy, 3!").input_ids
    kwargs = dict(num_inference_steps=2, size=64, seed=1, output_type="pt")
    # bit-equal weights; memory-mapped tensors may take other kernel paths, so outputs agree to float rounding
    difference = tiny_pipe(reference, "a toy", **kwargs).images - loaded(reference, "a toy", **kwargs).images
    assert difference.abs().max() < 1e-5


def test_default_size_is_the_official_512(tiny_pipe, reference):
    state = tiny_pipe.prepare([GenerationRequest(image=reference, prompt="a toy", num_inference_steps=1)])[0]
    assert state.request.size == 512
    assert state.latents.shape[1] == 2048
