"""Clear errors for bad datasets, unusable base models, bad settings and running out of device memory."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from pydantic import ValidationError

from dsd_model.tiny import build_tiny_components, tiny_lora_state_dict
from dsd_model.training import DatasetError, IncompatibleModelError, TrainingOutOfMemoryError, train


def test_missing_dataset(make_config, training_pipe, tmp_path):
    with pytest.raises(DatasetError, match="has no pairs.jsonl"):
        train(make_config(dataset=tmp_path / "nowhere"), training_pipe)


def test_empty_dataset(make_config, training_pipe, dataset):
    (dataset / "pairs.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="is empty"):
        train(make_config(), training_pipe)


def test_malformed_record(make_config, training_pipe, dataset):
    (dataset / "pairs.jsonl").write_text('{"id": "a", "reference": "images/0_ref.png"\n')
    with pytest.raises(DatasetError, match=r"pairs.jsonl:1: not valid JSON"):
        train(make_config(), training_pipe)


def test_missing_image(make_config, training_pipe, dataset):
    (dataset / "images/2_tgt.png").unlink()
    with pytest.raises(DatasetError, match=r"target image 'images/2_tgt.png' does not exist"):
        train(make_config(), training_pipe)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(damage, make_config, training_pipe, dataset):
    path = dataset / "images/1_ref.png"
    data = path.read_bytes()
    path.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"pair 'pair-1': reference 'images/1_ref.png' is not a readable image"):
        train(make_config(), training_pipe)


def test_plain_flux_transformer_is_refused(make_config):
    flux = FluxPipeline(**build_tiny_components(dsd=False))
    with pytest.raises(IncompatibleModelError, match=r"in_channels=16 and out_channels=16.*2 x out_channels"):
        train(make_config(), flux)


def test_pipeline_with_adapters_is_refused(make_config, training_pipe):
    training_pipe.load_adapter(tiny_lora_state_dict(training_pipe.transformer, seed=1), "identity")
    with pytest.raises(IncompatibleModelError, match=r"already carries LoRA adapters \['identity'\]"):
        train(make_config(), training_pipe)


def test_unknown_target_module(make_config, training_pipe):
    with pytest.raises(IncompatibleModelError, match="'to_z' matches no Linear layer"):
        train(make_config(target_modules=["to_z"]), training_pipe)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("size", 70, "multiple of 16"),
        ("text_and_condition_dropout", 1.5, "less than or equal to 1"),
        ("rank", 0, "greater than or equal to 1"),
        ("mixed_precision", "fp8", "'auto', 'no', 'fp16' or 'bf16'"),
        ("target_modules", [], "at least one module"),
        ("lr_warmup_steps", 10, "exceeds max_steps 3"),
    ],
)
def test_invalid_settings(field, value, message, make_config):
    with pytest.raises(ValidationError, match=message):
        make_config(**{field: value})


def test_out_of_memory_is_reported_with_advice(make_config, training_pipe):
    def exhaust(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    training_pipe.transformer.register_forward_pre_hook(exhaust, with_kwargs=True)
    with pytest.raises(TrainingOutOfMemoryError) as info:
        train(make_config(batch_size=2), training_pipe)
    message = str(info.value)
    assert "out of device memory in training step 1" in message
    for advice in ("enable gradient_checkpointing", "batch_size=1 with gradient_accumulation_steps=2",
                   "optimizer='adamw_8bit'", "mixed_precision='bf16'"):
        assert advice in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert not getattr(training_pipe.transformer, "peft_config", None)
