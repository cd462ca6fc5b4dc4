"""Speed features on the tiny profile: the block-by-block forward, the per-row step cache, bucket padding, attention
backend fallback, per-adapter folding, fp8 refusal and compilation (CPU inductor)."""

import logging

import pytest
import torch

from dsd_model import DSDPipeline, GenerationRequest
from dsd_model.loading import load_pipeline
from dsd_model.serving.acceleration import Denoiser, RowBuckets, compile_blocks, quantize_fp8, set_attention_backend
from dsd_model.serving.step_cache import EVALUATIONS_KEY, StepCache, blocks_per_row, flux_forward
from dsd_model.settings import Settings
from dsd_model.tiny import build_tiny_components, tiny_lora_state_dict
from helpers import random_image

FLOAT32_TOLERANCE = 1e-5
"""float32 on the [0, 1] image range: different batch shapes and kernels reorder sums (about 1e-7 per op)."""


def transformer_inputs(transformer, rows: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    tokens, text = 32, 8
    return dict(
        hidden_states=torch.randn(rows, tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(rows, text, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(rows, config.pooled_projection_dim, generator=generator),
        timestep=torch.rand(rows, generator=generator),
        img_ids=torch.randn(tokens, 3, generator=generator),
        txt_ids=torch.zeros(text, 3),
        guidance=torch.full((rows,), 3.5),
    )


def requests(steps=(3, 4), cfg=(False, True)):
    return [
        GenerationRequest(image=random_image(seed=i), prompt=f"toy {i}", num_inference_steps=n, size=64, seed=i,
                          image_guidance_scale=2.0 if c else 1.0)
        for i, (n, c) in enumerate(zip(steps, cfg))
    ]


def denoise(pipe, states) -> list[torch.Tensor]:
    while not all(s.done for s in states):
        pipe.step([s for s in states if not s.done])
    return [s.latents for s in states]


def test_block_by_block_forward_equals_the_stock_forward(tiny_pipe):
    inputs = transformer_inputs(tiny_pipe.transformer, rows=3)
    stock = tiny_pipe.transformer(**inputs, return_dict=False)[0]
    ours = flux_forward(tiny_pipe.transformer, **inputs)
    assert (ours - stock).abs().max() < FLOAT32_TOLERANCE


def test_step_cache_at_threshold_zero_reproduces_uncached_results(fresh_pipe):
    plain = denoise(fresh_pipe, fresh_pipe.prepare(requests()))
    fresh_pipe.denoiser = Denoiser(fresh_pipe.transformer, cache=StepCache(0.0))
    states = fresh_pipe.prepare(requests())
    cached = denoise(fresh_pipe, states)
    for a, b in zip(plain, cached):
        assert (a - b).abs().max() < FLOAT32_TOLERANCE
    blocks = blocks_per_row(fresh_pipe.transformer)
    # 3 steps of 1 row; 4 steps with true CFG from step 2: 1 + 1 + 3 + 3 rows
    assert [s.extras[EVALUATIONS_KEY] for s in states] == [3 * blocks, 8 * blocks]


def test_step_cache_decides_per_row_as_if_each_request_ran_alone(fresh_pipe):
    """A threshold between the tiny model's step-to-step changes (0.2-0.36) skips some rows and not others."""
    fresh_pipe.denoiser = Denoiser(fresh_pipe.transformer, cache=StepCache(0.3))
    work = requests(steps=(12, 9, 6), cfg=(False, True, False))
    together = fresh_pipe.prepare(work)
    together_latents = denoise(fresh_pipe, together)
    for request, batched, latents in zip(work, together, together_latents):
        alone = fresh_pipe.prepare([request])
        alone_latents = denoise(fresh_pipe, alone)[0]
        assert alone[0].extras[EVALUATIONS_KEY] == batched.extras[EVALUATIONS_KEY]
        assert (alone_latents - latents).abs().max() < FLOAT32_TOLERANCE
    full = blocks_per_row(fresh_pipe.transformer) * (12 + 1 + 1 + 3 * 7 + 6)
    assert sum(s.extras[EVALUATIONS_KEY] for s in together) < full


def test_step_cache_keeps_each_rows_adapter_when_only_some_rows_run_the_remaining_blocks(fresh_pipe):
    """Rows of three adapters (and the base model) in one forward under the step cache: the rows that run the
    remaining blocks are a subset, and each keeps its adapter; every request equals itself alone."""
    for seed, name in enumerate(("identity", "structure", "sketch"), start=1):
        fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=seed), name)
    fresh_pipe.denoiser = Denoiser(fresh_pipe.transformer, buckets=RowBuckets([8]), cache=StepCache(0.3))
    work = requests(steps=(12, 9, 6, 8), cfg=(False, True, False, False))
    for request, adapter in zip(work, ("identity", "structure", "sketch", None)):
        request.adapter = adapter
    together = fresh_pipe.prepare(work)
    together_latents = denoise(fresh_pipe, together)
    for request, batched, latents in zip(work, together, together_latents):
        alone = fresh_pipe.prepare([request])
        alone_latents = denoise(fresh_pipe, alone)[0]
        assert alone[0].extras[EVALUATIONS_KEY] == batched.extras[EVALUATIONS_KEY], request.adapter
        assert (alone_latents - latents).abs().max() < FLOAT32_TOLERANCE, request.adapter
    full = blocks_per_row(fresh_pipe.transformer) * (12 + 1 + 1 + 3 * 7 + 6 + 8)
    assert sum(s.extras[EVALUATIONS_KEY] for s in together) < full  # some rows were skipped


def test_bucket_padding_leaves_real_rows_unchanged(fresh_pipe):
    plain = denoise(fresh_pipe, fresh_pipe.prepare(requests()))
    buckets = RowBuckets([1, 2, 8])
    assert [buckets.size_for(n) for n in (1, 2, 3, 8, 9, 17)] == [1, 2, 8, 8, 16, 24]
    fresh_pipe.denoiser = Denoiser(fresh_pipe.transformer, buckets=buckets)
    padded = denoise(fresh_pipe, fresh_pipe.prepare(requests()))
    for a, b in zip(plain, padded):
        assert (a - b).abs().max() < FLOAT32_TOLERANCE


def test_padding_with_the_step_cache_keeps_per_row_decisions(fresh_pipe):
    fresh_pipe.denoiser = Denoiser(fresh_pipe.transformer, cache=StepCache(0.3))
    unpadded = fresh_pipe.prepare(requests(steps=(12, 9)))
    expected = denoise(fresh_pipe, unpadded)
    fresh_pipe.denoiser = Denoiser(fresh_pipe.transformer, buckets=RowBuckets([8]), cache=StepCache(0.3))
    padded = fresh_pipe.prepare(requests(steps=(12, 9)))
    for a, b in zip(expected, denoise(fresh_pipe, padded)):
        assert (a - b).abs().max() < FLOAT32_TOLERANCE
    assert [s.extras[EVALUATIONS_KEY] for s in padded] == [s.extras[EVALUATIONS_KEY] for s in unpadded]


def test_missing_attention_backend_falls_back_to_sdpa_with_a_log_line(fresh_pipe, caplog):
    inputs = transformer_inputs(fresh_pipe.transformer, rows=2)
    before = fresh_pipe.transformer(**inputs, return_dict=False)[0]
    with caplog.at_level(logging.WARNING, logger="dsd_model.serving.acceleration"):
        assert set_attention_backend(fresh_pipe.transformer, "flash") == "native"
    assert "attention backend 'flash' is unavailable" in caplog.text and "native SDPA" in caplog.text
    after = fresh_pipe.transformer(**inputs, return_dict=False)[0]
    assert (after - before).abs().max() == 0
    with pytest.raises(ValueError, match="flash_hub"):
        set_attention_backend(fresh_pipe.transformer, "flash_hub")


def test_fp8_refuses_on_cpu_naming_the_setting(fresh_pipe):
    with pytest.raises(ValueError, match="DSD_QUANTIZATION.*compute capability 8.9.*cpu"):
        quantize_fp8(fresh_pipe.transformer)
    with pytest.raises(ValueError, match="DSD_QUANTIZATION"):
        load_pipeline(Settings(profile="tiny", device="cpu", quantization="fp8"))


def test_adapters_folded_per_activation_match_unfused_adapters():
    def pipe_with_adapters():
        pipe = DSDPipeline(**build_tiny_components())
        for seed, name in enumerate(("identity", "structure"), start=1):
            pipe.load_adapter(tiny_lora_state_dict(pipe.transformer, seed=seed), name)
        return pipe

    unfused, folded = pipe_with_adapters(), pipe_with_adapters()
    folded.adapters.fold_on_activate()
    inputs = transformer_inputs(unfused.transformer, rows=2)
    # switch back and forth: each fold starts again from the kept base weights
    for name in ("identity", "structure", None, "identity", "structure"):
        unfused.set_adapter(name)
        folded.set_adapter(name)
        expected = unfused.transformer(**inputs, return_dict=False)[0]
        assert (folded.transformer(**inputs, return_dict=False)[0] - expected).abs().max() < 1e-4


def test_settings_install_the_step_cache_and_validate():
    pipe = load_pipeline(Settings(profile="tiny", device="cpu", step_cache_threshold=0.1))
    assert pipe.denoiser.cache.threshold == 0.1 and pipe.denoiser.buckets is None
    assert load_pipeline(Settings(profile="tiny", device="cpu")).denoiser is None
    with pytest.raises(ValueError, match="compile_row_buckets"):
        Settings(compile_row_buckets=[0, 2])
    with pytest.raises(ValueError, match="per_adapter"):
        Settings(lora_fusion="per_adapter", quantization="fp8")


@pytest.mark.slow
def test_compiled_blocks_follow_eager_on_cpu(fresh_pipe):
    """Inductor on CPU (C++ kernels): fused elementwise work reorders float32 sums."""
    requests_ = requests(steps=(2, 3), cfg=(False, True))
    eager = denoise(fresh_pipe, fresh_pipe.prepare(requests_))
    torch._dynamo.reset()
    compile_blocks(fresh_pipe.transformer, "default", shapes=8)
    fresh_pipe.denoiser = Denoiser(fresh_pipe.transformer, buckets=RowBuckets([1, 4]))
    compiled = denoise(fresh_pipe, fresh_pipe.prepare(requests_))
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max() < 1e-4
