"""The exported adapter is in the layout `dsd_model.adapters` loads, means W + B @ A, and changes generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_helpers import SIZE, build_training_pipe, write_dataset

from dsd_model.adapters import EMBEDDER_KEYS, LORA_KEY
from dsd_model.tiny import is_attention_projection
from dsd_model.training import TrainConfig, train
from dsd_model.training.checkpoint import list_checkpoints
from dsd_model.training.dataset import PairDataset
from dsd_model.training.lora import trainable_adapter
from dsd_model.training.objective import flow_matching_inputs, predict_velocity

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A short run with alpha = 2 x rank, so folding alpha/r into B is visible."""
    root = tmp_path_factory.mktemp("export")
    config = TrainConfig(
        dataset=write_dataset(root / "dataset"), output_dir=root / "run", size=SIZE, rank=RANK, lora_alpha=ALPHA,
        batch_size=2, learning_rate=5e-2, max_steps=4, gradient_checkpointing=False,
    )
    result = train(config, build_training_pipe())
    return config, result


def test_layout_is_the_official_one_plus_the_embedder(trained_run):
    config, result = trained_run
    state = load_file(str(result.adapter_path))
    base = build_training_pipe().transformer
    modules = dict(base.named_modules())

    lora_modules = {LORA_KEY.match(k)["module"] for k in state if k not in EMBEDDER_KEYS}
    expected = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear) and is_attention_projection(n)}
    assert lora_modules == expected
    assert set(state) == {f"transformer.{m}.lora_{x}.weight" for m in expected for x in "AB"} | set(EMBEDDER_KEYS)
    for name in expected:
        layer = modules[name]
        assert state[f"transformer.{name}.lora_A.weight"].shape == (RANK, layer.in_features)
        assert state[f"transformer.{name}.lora_B.weight"].shape == (layer.out_features, RANK)
    assert state["transformer.x_embedder.weight"].shape == base.x_embedder.weight.shape
    assert state["transformer.x_embedder.bias"].shape == base.x_embedder.bias.shape
    assert result.adapter_path.stat().st_mode & 0o444 == 0o444, "the serving process must be able to read it"


def test_alpha_over_rank_is_folded_into_b(trained_run):
    config, result = trained_run
    state = load_file(str(result.adapter_path))
    raw = load_file(str(list_checkpoints(config.output_dir)[-1] / "trainable.safetensors"))
    name = "transformer_blocks.0.attn.to_q"
    a, b = raw[f"{name}.lora_A.dsd_training.weight"], raw[f"{name}.lora_B.dsd_training.weight"]
    assert b.abs().max() > 0
    assert torch.equal(state[f"transformer.{name}.lora_A.weight"], a)
    assert torch.equal(state[f"transformer.{name}.lora_B.weight"], b * (ALPHA / RANK))


def test_loaded_adapter_predicts_what_the_trained_model_predicts(trained_run):
    config, result = trained_run
    pipe = build_training_pipe()
    batch = PairDataset(config.dataset, SIZE).batch([0, 1])
    inputs = flow_matching_inputs(pipe, batch, config, torch.Generator().manual_seed(0))
    with trainable_adapter(pipe.transformer, config, torch.float32) as params, torch.no_grad():
        raw = load_file(str(list_checkpoints(config.output_dir)[-1] / "trainable.safetensors"))
        for name, param in params.items():
            param.copy_(raw[name])
        expected = predict_velocity(pipe.transformer, inputs)

    pipe.load_adapter(result.adapter_path, "structure")
    pipe.set_adapter("structure")
    with torch.no_grad():
        loaded = predict_velocity(pipe.transformer, inputs)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)


def test_only_the_condition_columns_of_the_embedder_are_trained(trained_run):
    _, result = trained_run
    state = load_file(str(result.adapter_path))
    base = build_training_pipe().transformer.x_embedder
    noise_columns = base.in_features // 2
    weight = state["transformer.x_embedder.weight"]
    assert torch.equal(weight[:, :noise_columns], base.weight[:, :noise_columns])
    assert not torch.equal(weight[:, noise_columns:], base.weight[:, noise_columns:])
    assert not torch.equal(state["transformer.x_embedder.bias"], base.bias)


def test_adapter_loads_into_the_pipeline_and_changes_its_output(trained_run):
    config, result = trained_run
    pipe = build_training_pipe()
    image = Image.open(config.dataset / "images/0_ref.png").convert("RGB")
    call = dict(image=image, prompt="the same object, moved", num_inference_steps=2, size=SIZE, seed=7,
                output_type="np")
    before = pipe(**call).images

    pipe.load_adapter(result.adapter_path, "structure")
    with_adapter = pipe(**call, adapter="structure").images
    without = pipe(**call).images

    assert np.abs(with_adapter - before).mean() > 1e-3
    np.testing.assert_array_equal(without, before)
