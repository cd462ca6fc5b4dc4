"""The real-weights path, exercised on tiny weights laid out on disk exactly like FLUX.1-dev plus the DSD release."""

import pytest
from safetensors.torch import save_file

from dsd_model import DSDPipeline, WeightsError
from dsd_model.convert import convert_checkpoint
from dsd_model.loading import load_pipeline
from dsd_model.settings import Settings
from dsd_model.tiny import tiny_lora_state_dict
from helpers import random_image, write_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A FLUX.1-dev-style directory, the DSD transformer in the official layout, and an official LoRA file."""
    root = tmp_path_factory.mktemp("weights")
    components = write_tiny_weights(root)
    fused = components["transformer"]
    convert_checkpoint(root / "fused", root / "official", to="official")
    lora = root / "pytorch_lora_weights.safetensors"
    save_file(tiny_lora_state_dict(fused, seed=3), str(lora))
    return root, components


def test_loads_flux_dir_official_transformer_and_lora(weights):
    root, components = weights
    settings = Settings(model_dir=root / "flux", transformer_path=root / "official", adapters={"identity": root /
                        "pytorch_lora_weights.safetensors"})
    pipe = load_pipeline(settings)
    assert pipe.profile == "real"
    assert pipe.adapters.names == ["identity"] and pipe.default_adapter == "identity"
    assert pipe.transformer.config.in_channels == 32 and pipe.transformer.config.out_channels == 16

    expected = DSDPipeline(**components)
    expected.set_progress_bar_config(disable=True)
    expected.load_adapter(root / "pytorch_lora_weights.safetensors", "identity")
    kwargs = dict(num_inference_steps=2, size=64, seed=1, output_type="pt", adapter="identity")
    image = random_image()
    difference = pipe(image, "a toy", **kwargs).images - expected(image, "a toy", **kwargs).images
    assert difference.abs().max() < 1e-5


def test_fused_adapter_setting(weights):
    root, _ = weights
    settings = Settings(model_dir=root / "flux", transformer_path=root / "fused", fuse_adapters=True,
                        adapters={"identity": root / "pytorch_lora_weights.safetensors"})
    pipe = load_pipeline(settings)
    assert pipe.adapters.fused == "identity"


def test_missing_weights_are_named(weights, tmp_path):
    root, _ = weights
    with pytest.raises(WeightsError, match="no model_index.json"):
        load_pipeline(Settings(model_dir=tmp_path))
    with pytest.raises(WeightsError, match="dsd_transformer.*do not exist"):
        load_pipeline(Settings(model_dir=root / "flux"))
    with pytest.raises(WeightsError, match="missing.safetensors"):
        load_pipeline(Settings(model_dir=root / "flux", transformer_path=root / "official",
                               adapters={"identity": tmp_path / "missing.safetensors"}))


def test_settings_refuse_inconsistent_values():
    with pytest.raises(ValueError, match="multiple of 16"):
        Settings(size=500)
    with pytest.raises(ValueError, match="needs model_dir"):
        Settings(profile="real")
    with pytest.raises(ValueError, match="exactly one adapter"):
        Settings(fuse_adapters=True)
    with pytest.raises(ValueError, match="drain_timeout_s"):
        Settings(max_deadline_s=900, drain_timeout_s=600)
