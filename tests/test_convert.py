"""Checkpoint conversion (official DSD / plain FLUX / fused, peft-wrapped saves) on tiny real transformers."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors.torch import save_file

from dsd_model.adapters import AdapterRegistry, lora_fingerprint
from dsd_model.convert import (
    INDEX_NAME,
    OFFICIAL_CLASS_NAME,
    WEIGHTS_NAME,
    convert_checkpoint,
    fuse_official,
    load_dsd_transformer,
    read_checkpoint,
    read_fused,
    unwrap_peft,
)
from dsd_model.errors import WeightsError
from dsd_model.tiny import dsd_transformer_config, tiny_lora_state_dict, tiny_transformer_config

CONFIG = tiny_transformer_config()
FUSED_CONFIG = dsd_transformer_config(CONFIG)
PACKED = CONFIG["in_channels"]
TOKENS, TEXT_TOKENS = 4, 3
SMALL_SHARD_BYTES = 20_000
"""Splits the tiny transformer (~150 KB in float32) into several shards."""


def plain_model(config=CONFIG) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**config).eval()


def official_state() -> dict[str, torch.Tensor]:
    """A plain FLUX state dict plus a random, nonzero `c_embedder` (the official DSD layout)."""
    state = plain_model().state_dict()
    hidden = state["x_embedder.weight"].shape[0]
    generator = torch.Generator().manual_seed(1)
    state["c_embedder.weight"] = torch.randn(hidden, PACKED, generator=generator) * 0.2
    state["c_embedder.bias"] = torch.randn(hidden, generator=generator) * 0.2
    return state


def save_source(directory, state, config, name=WEIGHTS_NAME):
    directory.mkdir(parents=True)
    save_file(state, str(directory / name))
    (directory / "config.json").write_text(json.dumps(config))
    return directory / name


def forward(model, hidden_states):
    generator = torch.Generator().manual_seed(2)
    ids = torch.stack(torch.meshgrid(torch.arange(2.0), torch.arange(2.0), indexing="ij"), -1).reshape(TOKENS, 2)
    with torch.no_grad():
        return model(
            hidden_states=hidden_states,
            encoder_hidden_states=torch.randn(1, TEXT_TOKENS, CONFIG["joint_attention_dim"], generator=generator),
            pooled_projections=torch.randn(1, CONFIG["pooled_projection_dim"], generator=generator),
            timestep=torch.tensor([0.6]),
            img_ids=torch.cat([torch.zeros(TOKENS, 1), ids], dim=1),
            txt_ids=torch.zeros(TEXT_TOKENS, 3),
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )[0]


def latents(seed):
    return torch.randn(1, TOKENS, PACKED, generator=torch.Generator().manual_seed(seed))


def assert_equal_states(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


def test_fused_model_equals_the_additive_official_formulation():
    official = official_state()
    fused_state, _ = fuse_official(official, {})
    fused = FluxTransformer2DModel(**FUSED_CONFIG).eval()
    fused.load_state_dict(fused_state, strict=True)

    plain = plain_model()
    plain.load_state_dict({k: v for k, v in official.items() if not k.startswith("c_embedder.")}, strict=True)
    c_embedder = torch.nn.Linear(PACKED, plain.inner_dim)
    c_embedder.load_state_dict({"weight": official["c_embedder.weight"], "bias": official["c_embedder.bias"]})
    x, c = latents(3), latents(4)
    without_condition = forward(plain, x)
    hook = plain.x_embedder.register_forward_hook(lambda module, args, output: output + c_embedder(c))
    expected = forward(plain, x)
    hook.remove()

    with torch.no_grad():
        embedded = fused.x_embedder(torch.cat([x, c], dim=-1))
        torch.testing.assert_close(embedded, plain.x_embedder(x) + c_embedder(c), atol=1e-6, rtol=0)
    torch.testing.assert_close(forward(fused, torch.cat([x, c], dim=-1)), expected, atol=1e-6, rtol=0)
    assert (expected - without_condition).abs().max() > 1e-3


@pytest.mark.parametrize(
    "max_shard_bytes, dtype",
    [(10**9, torch.float32), (SMALL_SHARD_BYTES, torch.bfloat16)],
    ids=["single-float32", "sharded-bfloat16"],
)
def test_official_to_fused_to_official_is_bit_exact(tmp_path, max_shard_bytes, dtype):
    official = {key: value.to(dtype) for key, value in official_state().items()}
    config = dict(CONFIG, _class_name=OFFICIAL_CLASS_NAME)
    source = save_source(tmp_path / "official", official, config, "dsd.safetensors")

    summary = convert_checkpoint(source, tmp_path / "fused", max_shard_bytes=max_shard_bytes)
    assert summary.startswith("official DSD") and "fused DSD transformer" in summary
    shards = sorted(p.name for p in (tmp_path / "fused").glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes == SMALL_SHARD_BYTES)
    assert (tmp_path / "fused" / INDEX_NAME).is_file() == (len(shards) > 1)
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "fused", torch_dtype=dtype)
    assert (loaded.config.in_channels, loaded.config.out_channels) == (2 * PACKED, PACKED)
    assert_equal_states(loaded.state_dict(), fuse_official(official, {})[0])

    convert_checkpoint(tmp_path / "fused", tmp_path / "back", to="official", max_shard_bytes=max_shard_bytes)
    back = read_checkpoint(tmp_path / "back")
    assert_equal_states(back.state, official)
    assert back.config["_class_name"] == OFFICIAL_CLASS_NAME
    assert back.config["in_channels"] == PACKED and "out_channels" not in back.config


def test_fused_to_official_to_fused_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    fused = FluxTransformer2DModel(**FUSED_CONFIG)
    fused.save_pretrained(tmp_path / "fused", max_shard_size="20KB")
    assert (tmp_path / "fused" / INDEX_NAME).is_file()

    convert_checkpoint(tmp_path / "fused" / INDEX_NAME, tmp_path / "official", to="official")
    official = read_checkpoint(tmp_path / "official").state
    assert torch.equal(official["x_embedder.bias"], fused.x_embedder.bias.detach())
    assert torch.equal(official["c_embedder.bias"], torch.zeros(fused.inner_dim))

    convert_checkpoint(tmp_path / "official", tmp_path / "again", max_shard_bytes=SMALL_SHARD_BYTES)
    assert_equal_states(read_checkpoint(tmp_path / "again").state, fused.state_dict())


def test_plain_flux_becomes_fused_with_zero_condition_columns(tmp_path):
    plain = plain_model()
    plain.save_pretrained(tmp_path / "flux")

    fused, folded_lora = load_dsd_transformer(tmp_path / "flux")
    assert folded_lora is None
    assert torch.equal(fused.x_embedder.weight[:, :PACKED], plain.x_embedder.weight)
    assert torch.equal(fused.x_embedder.weight[:, PACKED:], torch.zeros(fused.inner_dim, PACKED))
    x = latents(3)
    expected = forward(plain, x)
    for condition in (torch.zeros_like(x), latents(4)):
        torch.testing.assert_close(forward(fused, torch.cat([x, condition], dim=-1)), expected, atol=1e-6, rtol=0)


def test_config_is_inferred_from_shapes_without_config_json(tmp_path):
    config = dict(CONFIG, attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56))
    save_file(plain_model(config).state_dict(), str(tmp_path / "flux.safetensors"))
    fused = read_fused(tmp_path / "flux.safetensors")
    assert fused.source_kind == "plain"
    assert fused.config == dsd_transformer_config(config)

    save_file(plain_model().state_dict(), str(tmp_path / "tiny.safetensors"))
    with pytest.raises(WeightsError, match="cannot infer axes_dims_rope for 16-channel attention heads"):
        read_fused(tmp_path / "tiny.safetensors")


def peft_wrapped_state() -> tuple[FluxTransformer2DModel, dict[str, torch.Tensor]]:
    """A fused transformer with a random LoRA injected by peft (scale 1), and its peft-wrapped state dict."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**FUSED_CONFIG).eval()
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    return model, {key: value.detach().clone() for key, value in model.state_dict().items()}


def test_embedded_lora_is_refused_by_default(tmp_path):
    _, state = peft_wrapped_state()
    assert any(".base_layer." in key for key in state) and any(".lora_A.default." in key for key in state)
    save_source(tmp_path / "wrapped", state, FUSED_CONFIG)
    with pytest.raises(WeightsError, match=r"embeds LoRA tensors .* fold_lora=True \(CLI: dsd convert --fold-lora\)"):
        load_dsd_transformer(tmp_path / "wrapped")


def test_base_layer_names_are_renamed_losslessly(tmp_path):
    _, state = peft_wrapped_state()
    base_only = {key: value for key, value in state.items() if ".lora_" not in key}
    save_source(tmp_path / "wrapped", base_only, FUSED_CONFIG)
    fused, folded_lora = load_dsd_transformer(tmp_path / "wrapped")
    assert folded_lora is None
    expected = {key.replace(".base_layer.", "."): value for key, value in base_only.items()}
    assert_equal_states(fused.state_dict(), expected)


def test_embedded_lora_is_folded_exactly_and_cannot_be_loaded_again(tmp_path):
    model, state = peft_wrapped_state()
    save_source(tmp_path / "wrapped", state, FUSED_CONFIG)
    summary = convert_checkpoint(tmp_path / "wrapped", tmp_path / "folded", fold_lora=True)

    folded, folded_lora = load_dsd_transformer(tmp_path / "folded")
    lora = {}
    for key in state:
        if ".lora_A.default." in key:
            module = key.removesuffix(".lora_A.default.weight")
            a, b = state[key], state[f"{module}.lora_B.default.weight"]
            weight = state[f"{module}.base_layer.weight"]
            expected = (weight.double() + b.double() @ a.double()).to(weight.dtype)
            assert torch.equal(folded.get_submodule(module).weight, expected), module
            lora[f"transformer.{module}.lora_A.weight"] = a
            lora[f"transformer.{module}.lora_B.weight"] = b
    assert len(lora) == 2 * (4 * CONFIG["num_layers"] + 3 * CONFIG["num_single_layers"])  # single blocks: no to_out
    assert folded_lora == lora_fingerprint(lora) and folded_lora in summary
    x = torch.cat([latents(3), latents(4)], dim=-1)
    torch.testing.assert_close(forward(folded, x), forward(model, x), atol=1e-5, rtol=0)

    save_file(lora, str(tmp_path / "lora.safetensors"))
    registry = AdapterRegistry(folded)
    registry.folded_lora = folded_lora
    with pytest.raises(WeightsError, match="already folded into the transformer weights"):
        registry.load(tmp_path / "lora.safetensors", "identity")
    registry.load(tiny_lora_state_dict(folded, seed=5), "other")
    assert registry.names == ["other"]


def test_lora_scale_and_unsupported_peft_keys():
    _, state = peft_wrapped_state()
    module = "transformer_blocks.0.attn.to_q"
    a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
    weight = state[f"{module}.base_layer.weight"]
    unwrapped, _ = unwrap_peft(state, fold_lora=True, lora_scale=0.5)
    assert torch.equal(unwrapped[f"{module}.weight"], (weight.double() + 0.5 * b.double() @ a.double()).float())

    with pytest.raises(WeightsError, match=r"key '.*to_q.alpha'.*alpha"):
        unwrap_peft({**state, f"{module}.alpha": torch.tensor(4.0)}, fold_lora=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("proj_out.bias"), r"missing key 'proj_out.bias' \(the model needs shape \(16,\)\)"),
        (
            lambda s: s.update({"extra.weight": torch.zeros(3, 5)}),
            r"unexpected key 'extra.weight' with shape \(3, 5\)",
        ),
        (
            lambda s: s.update({"context_embedder.weight": torch.zeros(32, 31)}),
            r"key 'context_embedder.weight' has shape \(32, 31\), the model needs \(32, 32\)",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_key_errors_name_the_key_and_shapes(tmp_path, edit, message):
    state = FluxTransformer2DModel(**FUSED_CONFIG).state_dict()
    edit(state)
    save_source(tmp_path / "fused", state, FUSED_CONFIG)
    with pytest.raises(WeightsError, match=message):
        load_dsd_transformer(tmp_path / "fused")


def test_mis_shaped_c_embedder_is_refused(tmp_path):
    state = official_state()
    state["c_embedder.weight"] = state["c_embedder.weight"][:, :8].clone()
    save_source(tmp_path / "official", state, CONFIG)
    message = r"c_embedder.weight has shape \(32, 8\) but x_embedder.weight has \(32, 16\)"
    with pytest.raises(WeightsError, match=message):
        load_dsd_transformer(tmp_path / "official")


def test_pickle_checkpoints_are_never_opened(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"never read")
    with pytest.raises(WeightsError, match=r"pickle checkpoints \(.bin\) are never opened"):
        convert_checkpoint(tmp_path / "model.bin", tmp_path / "out")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(WeightsError, match=r"holds only pickle weights \(diffusion_pytorch_model.bin\)"):
        load_dsd_transformer(tmp_path / "pickled")
    assert not (tmp_path / "out").exists()
