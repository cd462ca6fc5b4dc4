"""The real-weights path, exercised on tiny weights laid out on disk exactly like FLUX.1-dev plus the DSD release."""

import pytest
from safetensors.torch import save_file

from dsd_model import DSDPipeline, InputError, WeightsError
from dsd_model.convert import convert_checkpoint
from dsd_model.loading import adapter_for_mode, load_pipeline
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


def test_modes_select_adapters_through_the_mapping():
    pipe = load_pipeline(Settings(profile="tiny", mode_adapters={"identity": "structure"}))
    assert pipe.default_adapter == "identity"
    assert adapter_for_mode(pipe, None) == "identity"
    assert adapter_for_mode(pipe, "identity") == "structure"
    assert adapter_for_mode(pipe, "structure") == "structure"
    with pytest.raises(InputError, match="'sketch' is not one of identity, structure"):
        adapter_for_mode(pipe, "sketch")


def test_official_lora_under_another_name_serves_the_default_and_its_mapped_mode(weights):
    root, _ = weights
    lora = root / "pytorch_lora_weights.safetensors"
    plain = load_pipeline(Settings(model_dir=root / "flux", transformer_path=root / "official", adapters={"dsd": lora}))
    assert adapter_for_mode(plain, None) == "dsd"
    with pytest.raises(InputError) as refused:
        adapter_for_mode(plain, "identity")
    assert refused.value.field == "mode"
    expected = "modes served: none; loaded adapters: dsd; omit the mode to use the default adapter 'dsd'"
    assert expected in str(refused.value)

    mapped = load_pipeline(Settings(model_dir=root / "flux", transformer_path=root / "official", adapters={"dsd": lora},
                                    mode_adapters={"identity": "dsd"}))
    assert adapter_for_mode(mapped, "identity") == "dsd" and adapter_for_mode(mapped, None) == "dsd"
    with pytest.raises(InputError, match="'structure' has no adapter loaded on this server; modes served: identity"):
        adapter_for_mode(mapped, "structure")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(mode_adapters={"identity": "dsd"}), "DSD_MODE_ADAPTERS maps mode 'identity' to adapter 'dsd', which is "
                                                  "not loaded; loaded adapters: identity, structure"),
        (dict(mode_adapters={"sketch": "identity"}),
         r"(?s)mode_adapters\.sketch.*Input should be 'identity' or 'structure'"),
        (dict(default_adapter="dsd"), "DSD_DEFAULT_ADAPTER 'dsd' is not loaded"),
    ],
)
def test_adapter_settings_naming_unloaded_adapters_stop_the_start(settings, message):
    with pytest.raises(ValueError, match=message):
        load_pipeline(Settings(profile="tiny", **settings))


def test_real_profile_refuses_a_mode_mapped_to_an_unconfigured_adapter_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"DSD_MODE_ADAPTERS maps \{'identity': 'dsd'\} to adapters that DSD_ADAPTERS "
                                         r"does not configure \(structure\)"):
        Settings(model_dir=tmp_path, adapters={"structure": tmp_path / "s.safetensors"},
                 mode_adapters={"identity": "dsd"})


def test_grpc_tls_half_configurations_are_refused(tmp_path):
    pem = tmp_path / "server.pem"
    with pytest.raises(ValueError, match="DSD_GRPC_TLS_CERT is set without DSD_GRPC_TLS_KEY"):
        Settings(grpc_tls_cert=pem)
    with pytest.raises(ValueError, match="DSD_GRPC_TLS_KEY is set without DSD_GRPC_TLS_CERT"):
        Settings(grpc_tls_key=pem)
    with pytest.raises(ValueError, match="DSD_GRPC_TLS_CLIENT_CA needs DSD_GRPC_TLS_CERT and DSD_GRPC_TLS_KEY"):
        Settings(grpc_tls_client_ca=pem)
