"""`dsd train`: options map onto TrainConfig, a run writes its adapter, bad values exit with the field named."""

from __future__ import annotations

import argparse
import json

import pytest
from safetensors import safe_open

from dsd_model.training.cli import add_train_command


def parse(argv):
    parser = argparse.ArgumentParser(prog="dsd")
    add_train_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_options_cover_every_setting(dataset, tmp_path):
    args = parse([
        "train", str(dataset), "--output-dir", str(tmp_path / "run"), "--rank", "8", "--lora-alpha", "4",
        "--target-modules", "to_q", "attn.to_k", "--no-gradient-checkpointing", "--mixed-precision", "no",
        "--resume-from", "latest",
    ])
    assert args.handler.__name__ == "run_train"
    assert (args.rank, args.lora_alpha, args.target_modules) == ("8", "4", ["to_q", "attn.to_k"])
    assert (args.gradient_checkpointing, args.mixed_precision, args.resume_from) == (False, "no", "latest")
    assert not hasattr(args, "max_steps")


def test_train_command_writes_an_adapter(dataset, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"size": 64, "rank": 2, "max_steps": 5, "gradient_checkpointing": False}))
    output = tmp_path / "run"
    args = parse(["train", str(dataset), "--config", str(settings), "--output-dir", str(output), "--max-steps", "2",
                  "--target-modules", "to_q"])
    args.handler(args)

    assert f"wrote {output / 'adapter.safetensors'} after 2 steps" in capsys.readouterr().out
    with safe_open(str(output / "adapter.safetensors"), framework="pt") as handle:
        assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in handle.keys()
        assert handle.get_slice("transformer.transformer_blocks.0.attn.to_q.lora_A.weight").get_shape()[0] == 2
    assert json.loads((output / "config.json").read_text())["max_steps"] == 2


def test_invalid_value_exits_with_the_field_named(dataset, tmp_path, capsys):
    args = parse(["train", str(dataset), "--output-dir", str(tmp_path / "run"), "--size", "70"])
    with pytest.raises(SystemExit) as info:
        args.handler(args)
    assert info.value.code == 2
    assert "size must be a multiple of 16" in capsys.readouterr().err
