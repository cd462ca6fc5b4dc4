"""LoRA adapters: the official layout loads exactly, named adapters switch, bad files fail with the key named."""

import pytest
import torch
from safetensors.torch import save_file

from dsd_model import WeightsError
from dsd_model.tiny import tiny_lora_state_dict
from helpers import random_image


def official_lora(transformer, ranks: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    state = {}
    for name, rank in ranks.items():
        layer = modules[name]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.1
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.1
    return state


RANKS = {
    "transformer_blocks.0.attn.to_q": 4,
    "transformer_blocks.0.attn.to_out.0": 2,
    "single_transformer_blocks.0.attn.to_v": 8,
    "single_transformer_blocks.0.proj_out": 3,
}


def test_official_layout_matches_w_plus_ba(fresh_pipe, tmp_path):
    transformer = fresh_pipe.transformer
    modules = dict(transformer.named_modules())
    base = {name: (modules[name].weight.detach().clone(), modules[name].bias.detach().clone()) for name in RANKS}
    state = official_lora(transformer, RANKS)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(state, str(path))
    fresh_pipe.load_adapter(path, "identity")
    fresh_pipe.set_adapter("identity")
    modules = dict(transformer.named_modules())
    x = torch.randn(5, 32)
    for name in RANKS:
        weight, bias = base[name]
        a, b = state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"]
        x = torch.randn(5, weight.shape[1])
        expected = torch.nn.functional.linear(x, weight + b @ a, bias)
        assert torch.allclose(modules[name](x), expected, atol=1e-6), name
    fresh_pipe.set_adapter(None)
    for name in RANKS:
        x = torch.randn(5, base[name][0].shape[1])
        assert torch.allclose(modules[name](x), torch.nn.functional.linear(x, *base[name]), atol=1e-6)


def test_named_adapters_switch_and_change_output(fresh_pipe):
    reference = random_image()
    kwargs = dict(num_inference_steps=2, size=64, seed=4, output_type="pt")
    plain = fresh_pipe(reference, "a toy", **kwargs).images
    fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=1), "identity")
    fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=2), "structure")
    assert fresh_pipe.adapters.names == ["identity", "structure"]
    identity = fresh_pipe(reference, "a toy", adapter="identity", **kwargs).images
    structure = fresh_pipe(reference, "a toy", adapter="structure", **kwargs).images
    assert (identity - plain).abs().max() > 1e-3
    assert (structure - identity).abs().max() > 1e-3
    assert torch.equal(fresh_pipe(reference, "a toy", adapter="identity", **kwargs).images, identity)
    assert torch.equal(fresh_pipe(reference, "a toy", **kwargs).images, plain)


def test_embedder_override_replaces_the_embedder_while_its_adapter_is_active(fresh_pipe):
    transformer = fresh_pipe.transformer
    base = (transformer.x_embedder.weight.detach().clone(), transformer.x_embedder.bias.detach().clone())
    state = official_lora(transformer, {"transformer_blocks.0.attn.to_q": 2})
    state["transformer.x_embedder.weight"] = torch.randn_like(base[0])
    state["transformer.x_embedder.bias"] = torch.randn_like(base[1])
    fresh_pipe.load_adapter(state, "structure")
    x = torch.randn(3, 5, base[0].shape[1])
    fresh_pipe.set_adapter("structure")
    replaced = torch.nn.functional.linear(x, state["transformer.x_embedder.weight"], state["transformer.x_embedder.bias"])
    assert torch.allclose(transformer.x_embedder(x), replaced, atol=1e-6)
    fresh_pipe.set_adapter(None)
    assert torch.equal(transformer.x_embedder(x), torch.nn.functional.linear(x, *base))


def test_fuse_gives_the_same_output(fresh_pipe):
    reference = random_image()
    kwargs = dict(num_inference_steps=2, size=64, seed=4, output_type="pt")
    fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=1), "identity")
    unfused = fresh_pipe(reference, "a toy", adapter="identity", **kwargs).images
    fresh_pipe.adapters.fuse("identity")
    fused = fresh_pipe(reference, "a toy", adapter="identity", **kwargs).images
    assert (fused - unfused).abs().max() < 1e-5
    with pytest.raises(WeightsError, match="fused"):
        fresh_pipe.set_adapter(None)


@pytest.mark.parametrize("folding", [False, True])
def test_adapters_follow_the_pipeline_to_another_dtype(fresh_pipe, folding):
    reference = random_image()
    kwargs = dict(num_inference_steps=3, size=64, seed=4, output_type="pt")
    fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=1), "identity")
    fresh_pipe.load_adapter(tiny_lora_state_dict(fresh_pipe.transformer, seed=2), "structure")
    if folding:
        fresh_pipe.adapters.fold_on_activate()
    in_float32 = {name: fresh_pipe(reference, "a toy", adapter=name, **kwargs).images for name in ("identity", "structure")}
    for dtype in (torch.bfloat16, torch.float32):  # and back, with weights rounded to bfloat16 on the way
        fresh_pipe.to(dtype=dtype)
        adapters = fresh_pipe.adapters.adapters.values()
        assert {t.dtype for adapter in adapters for pair in adapter.lora.values() for t in pair} == {dtype}
        for name, expected in in_float32.items():
            images = fresh_pipe(reference, "a toy", adapter=name, **kwargs).images.float()
            # bfloat16 keeps 8 mantissa bits: a few percent of the [0, 1] range after 3 steps and a VAE decode
            assert (images - expected).abs().mean() < 0.05, (dtype, name)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.update({"transformer.nope.lora_A.weight": torch.zeros(2, 4), "transformer.nope.lora_B.weight":
                             torch.zeros(4, 2)}), "transformer.nope: no such module"),
        (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 31)}),
         r"to_q.lora_A.weight has shape \(4, 31\), the module needs \(4, 32\)"),
        (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 3)}),
         r"to_q.lora_B.weight has shape \(32, 3\), the module needs \(32, 4\)"),
        (lambda s: s.pop("transformer.transformer_blocks.0.attn.to_q.lora_B.weight"), "lora_B.weight is missing"),
        (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(4.0)}),
         "not in the supported layout"),
        (lambda s: s.update({"unet.down.lora_A.weight": torch.zeros(1)}), "'unet.down.lora_A.weight' is not"),
        (lambda s: s.update({"transformer.norm_out.lora_A.weight": torch.zeros(2, 4),
                             "transformer.norm_out.lora_B.weight": torch.zeros(4, 2)}), "not a Linear layer"),
        (lambda s: s.update({"transformer.x_embedder.weight": torch.zeros(32, 16)}),
         r"x_embedder.weight has shape \(32, 16\), the model needs \(32, 32\)"),
    ],
    ids=["unknown-module", "shape-A", "shape-B", "missing-B", "alpha", "foreign", "not-linear", "embedder-shape"],
)
def test_bad_adapter_names_the_key(fresh_pipe, mutate, message):
    state = official_lora(fresh_pipe.transformer, {"transformer_blocks.0.attn.to_q": 4})
    mutate(state)
    with pytest.raises(WeightsError, match=message):
        fresh_pipe.load_adapter(state, "identity")
    assert fresh_pipe.adapters.names == []


def test_bad_adapter_files_and_names(fresh_pipe, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        fresh_pipe.load_adapter(tmp_path / "missing.safetensors", "identity")
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="pickle formats are never opened"):
        fresh_pipe.load_adapter(pickle, "identity")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        fresh_pipe.load_adapter(broken, "identity")
    state = official_lora(fresh_pipe.transformer, {"transformer_blocks.0.attn.to_q": 4})
    with pytest.raises(WeightsError, match="must match"):
        fresh_pipe.load_adapter(state, "bad name!")
    fresh_pipe.load_adapter(state, "identity")
    with pytest.raises(WeightsError, match="already loaded"):
        fresh_pipe.load_adapter(state, "identity")
    with pytest.raises(WeightsError, match="unknown adapter 'structure'; loaded adapters: \\['identity'\\]"):
        fresh_pipe.set_adapter("structure")
