"""Checks that need a CUDA device; they are skipped cleanly everywhere else (see conftest.py). With
GPU_TEST_DEVICE=cpu (the GPU check's rehearsal) they run their CPU-runnable halves: the same code on the CPU, with
what `auto` selects on cuda asked for by name."""

import pytest
import torch

from dsd_model import GenerationRequest
from dsd_model.errors import DeviceError
from dsd_model.loading import load_pipeline
from dsd_model.serving.engine import Engine, EngineConfig
from dsd_model.settings import Settings
from helpers import GPU_TEST_DEVICE, random_image

pytestmark = pytest.mark.gpu
DEVICE = GPU_TEST_DEVICE
ON_CUDA = DEVICE == "cuda"


def test_tiny_profile_in_bfloat16_follows_float32_on_cpu():
    reference = random_image()
    kwargs = dict(num_inference_steps=4, size=64, seed=3, output_type="pt", adapter="identity")
    cpu = load_pipeline(Settings(profile="tiny", device="cpu", dtype="float32"))(reference, "a toy", **kwargs).images
    pipe = load_pipeline(Settings(profile="tiny", device=DEVICE, dtype="bfloat16"))
    assert pipe.transformer.device.type == DEVICE and pipe.transformer.dtype == torch.bfloat16
    images = pipe(reference, "a toy", **kwargs).images.float().cpu()
    # bfloat16 keeps 8 mantissa bits: a few percent of the [0, 1] range after 4 steps and a VAE decode
    assert (images - cpu).abs().mean() < 0.05


def test_engine_batches_on_the_device():
    pipe = load_pipeline(Settings(profile="tiny", device=DEVICE))
    engine = Engine(pipe, EngineConfig(max_batch_rows=12))
    engine.start()
    try:
        jobs = [engine.submit(GenerationRequest(image=random_image(seed=i), prompt="a toy", num_inference_steps=3 + i,
                                                size=64, seed=i, adapter="identity")) for i in range(4)]
        assert [job.future.result(timeout=120).seed for job in jobs] == [0, 1, 2, 3]
    finally:
        engine.drain(timeout=30)


def test_compiled_bucketed_folded_path_follows_eager():
    """`auto` on cuda: adapters folded per activation, blocks compiled, rows padded to buckets."""
    reference = random_image()
    kwargs = dict(num_inference_steps=4, size=64, seed=3, output_type="pt", adapter="identity")
    eager = load_pipeline(Settings(profile="tiny", device=DEVICE, compile="off", lora_fusion="unfused"))
    named = {} if ON_CUDA else {"compile": "on", "lora_fusion": "per_adapter"}
    fast = load_pipeline(Settings(profile="tiny", device=DEVICE, compile_sizes=[64], compile_row_buckets=[1, 4], **named))
    assert fast.denoiser is not None and fast.denoiser.buckets.sizes == (1, 4)
    for adapter in ("identity", "structure", "identity"):
        kwargs["adapter"] = adapter
        expected = eager([reference] * 3, "a toy", **kwargs).images.float()
        images = fast([reference] * 3, "a toy", **kwargs).images.float()
        assert (images - expected).abs().mean() < 0.02


def test_fp8_runs_or_refuses_by_compute_capability():
    settings = Settings(profile="tiny", device=DEVICE, quantization="fp8", compile="off")
    if not ON_CUDA or torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(DeviceError, match="DSD_QUANTIZATION"):
            load_pipeline(settings)
        return
    reference = random_image()
    kwargs = dict(num_inference_steps=4, size=64, seed=3, output_type="pt", adapter="identity")
    expected = load_pipeline(Settings(profile="tiny", device=DEVICE, compile="off"))(reference, "a toy", **kwargs)
    images = load_pipeline(settings)(reference, "a toy", **kwargs).images.float()
    # float8 (3 mantissa bits) weights and activations on every block linear of a random tiny model
    assert (images - expected.images.float()).abs().mean() < 0.1


def test_mixed_forwards_never_recompile_the_compiled_blocks():
    """Forwards of several adapters apply their LoRA eagerly beside compiled blocks, whatever the rows' layout."""
    from torch._dynamo.utils import counters

    named = {} if ON_CUDA else {"compile": "on", "lora_fusion": "per_adapter"}
    pipe = load_pipeline(Settings(profile="tiny", device=DEVICE, compile_sizes=[64], compile_row_buckets=[1, 4], **named))
    adapters = ["identity", "structure", "structure", "identity", None, "structure"]
    states = pipe.prepare([GenerationRequest(image=random_image(seed=i), prompt="a toy", num_inference_steps=6,
                                             size=64, seed=i, adapter=adapter) for i, adapter in enumerate(adapters)])
    compiled = counters["stats"]["unique_graphs"]
    for rows in ([0, 1], [0, 3, 1], [1, 2, 0], [4, 0], [5], [0], [1, 2], [0, 1, 2, 4]):
        pipe.step([states[i] for i in rows])
    assert counters["stats"]["unique_graphs"] == compiled
    assert all(torch.isfinite(state.latents).all() for state in states)
