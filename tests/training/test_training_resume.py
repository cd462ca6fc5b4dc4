"""An interrupted run resumed from its checkpoint ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from dsd_model.training import CheckpointError, train
from dsd_model.training.checkpoint import list_checkpoints

RUN = dict(
    max_steps=6, checkpoint_every=2, keep_checkpoints=2, gradient_accumulation_steps=2, lr_scheduler="linear",
    lr_warmup_steps=2, lora_dropout=0.1, gradient_checkpointing=True,
)
"""Every piece of resumable state in play: accumulation, a moving LR schedule, LoRA dropout's global RNG (also
drawn from when checkpointed blocks are recomputed), and several epochs (6 steps x 2 micro-batches x 2 pairs over
4 pairs)."""


def interrupt_at_forward(transformer: torch.nn.Module, count: int):
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == count:
            raise KeyboardInterrupt

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_resume_after_interrupt_matches_uninterrupted_run(make_config, build_pipe):
    whole = train(make_config("whole", **RUN), build_pipe())

    pipe = build_pipe()
    handle = interrupt_at_forward(pipe.transformer, count=9)  # the first forward of step 5, after checkpoint 4
    with pytest.raises(KeyboardInterrupt):
        train(make_config("interrupted", **RUN), pipe)
    handle.remove()
    interrupted = make_config("interrupted", **RUN).output_dir
    assert [p.name for p in list_checkpoints(interrupted)] == ["step-0000002", "step-0000004"]
    assert len(read_csv(interrupted / "loss.csv")) == 4

    resumed = train(make_config("interrupted", resume_from="latest", **RUN), pipe)

    expected, actual = load_file(str(whole.adapter_path)), load_file(str(resumed.adapter_path))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert read_csv(interrupted / "loss.csv") == read_csv(whole.output_dir / "loss.csv")
    assert [p.name for p in list_checkpoints(interrupted)] == ["step-0000004", "step-0000006"]


def test_resume_refuses_other_settings(make_config, build_pipe):
    train(make_config(max_steps=2, checkpoint_every=1), build_pipe())
    with pytest.raises(CheckpointError, match=r"rank: 4 -> 8"):
        train(make_config(max_steps=4, rank=8, resume_from="latest"), build_pipe())


def test_new_run_refuses_a_directory_with_checkpoints(make_config, build_pipe):
    train(make_config(max_steps=1), build_pipe())
    with pytest.raises(CheckpointError, match="holds checkpoints of an earlier run"):
        train(make_config(max_steps=1), build_pipe())


def test_resume_latest_without_checkpoint(make_config, build_pipe):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        train(make_config(resume_from="latest"), build_pipe())


def test_resume_from_a_directory_that_is_no_checkpoint(make_config, build_pipe, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        train(make_config(resume_from=tmp_path), build_pipe())


def test_resume_auto_starts_a_new_run_then_continues_it(make_config, build_pipe):
    first = train(make_config(max_steps=1, checkpoint_every=1, resume_from="auto"), build_pipe())
    second = train(make_config(max_steps=2, checkpoint_every=1, resume_from="auto"), build_pipe())
    assert second.losses[0] == first.losses[0] and len(second.losses) == 2
    assert [p.name for p in list_checkpoints(second.output_dir)] == ["step-0000001", "step-0000002"]
