"""Checkpoints for exact resume.

    <output_dir>/checkpoints/step-0000500/
        trainable.safetensors   every trainable parameter, by name, whole, in its training dtype
        state.pt                step, optimizer (keyed by parameter name), LR scheduler and (fp16) gradient-scaler
                                state
        rng-<process>.pt        each process's global torch RNG state (LoRA dropout draws from it)
        config.json             the settings of the run that wrote it

The data position and the per-batch noise follow from the step (`dataset.sample_indices`, `derive_seed`), so they
need no state of their own. A run may resume with another number of processes and gradient accumulation steps when
the global batch (processes x batch_size x gradient_accumulation_steps) stays the same: it then trains the same
examples with the same draws. LoRA dropout is the exception: its global RNG streams are per process, so a process
without a saved state of its own starts a fresh stream seeded by (seed, step, process).

Parameters and optimizer state are stored whole whatever the strategy: under FSDP every process takes part in
gathering them and the main process writes them; on resume each process keeps its shard (`sharding.py`). So a
checkpoint resumes under another strategy too (FSDP in one process, DDP under FSDP).

A checkpoint is written under a temporary name and renamed when complete, so an interrupted save never looks like a
checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from .config import RESUMABLE_CHANGES, TrainConfig
from .dataset import derive_seed
from .errors import CheckpointError
from .sharding import full_optimizer_state, full_tensors, load_full_optimizer_state, load_full_tensors

PREFIX = "step-"
REDISTRIBUTABLE = frozenset({"gradient_accumulation_steps"})
"""Fields that may change on resume when the global batch stays the same (checked against the saved one)."""


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    directory = checkpoints_dir(output_dir)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and re.fullmatch(PREFIX + r"\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def save_checkpoint(
    accelerator: Accelerator,
    config: TrainConfig,
    step: int,
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> Path:
    """Every process calls this. `model` is the unwrapped model holding `params` and `optimizer`'s parameters."""
    final = checkpoints_dir(config.output_dir) / f"{PREFIX}{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    tensors, optimizer_state = full_tensors(params), full_optimizer_state(model, optimizer)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "trainable.safetensors"))
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        torch.save(
            {"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "scaler": scaler,
             "global_batch": global_batch(config, accelerator.num_processes)},
            tmp / "state.pt",
        )
        (tmp / "config.json").write_text(config.model_dump_json(indent=2))
    accelerator.wait_for_everyone()
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, tmp / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(config.output_dir)[: -config.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def global_batch(config: TrainConfig, processes: int) -> int:
    """Examples per optimizer step over all processes."""
    return processes * config.batch_size * config.gradient_accumulation_steps


def checkpoint_to_resume(config: TrainConfig) -> Path | None:
    """The checkpoint `config.resume_from` names (none for `auto` in a directory without checkpoints), checked to
    exist and to come from a run with the same settings.
    A new run refuses an output directory holding another run's checkpoints, which it would mix with its own."""
    found = list_checkpoints(config.output_dir)
    if config.resume_from is None:
        if found:
            raise CheckpointError(
                f"output_dir {str(config.output_dir)!r} holds checkpoints of an earlier run (newest "
                f"{found[-1].name}); set resume_from='latest' to continue it, or choose another output_dir"
            )
        return None
    if config.resume_from == "auto" and not found:
        return None
    if config.resume_from in ("latest", "auto"):
        if not found:
            raise CheckpointError(
                f"resume_from='latest' but {str(checkpoints_dir(config.output_dir))!r} holds no checkpoint; "
                "unset resume_from to start a new run"
            )
        path = found[-1]
    else:
        path = Path(config.resume_from)
        if not (path / "state.pt").is_file():
            raise CheckpointError(f"resume_from {str(path)!r} is not a checkpoint directory (no state.pt)")
    _check_same_settings(path, config)
    return path


def _check_same_settings(path: Path, config: TrainConfig) -> None:
    try:
        saved = TrainConfig.model_validate_json((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} has no readable config.json: {exc}") from exc
    changed = [
        name for name in TrainConfig.model_fields
        if name not in RESUMABLE_CHANGES | REDISTRIBUTABLE and getattr(saved, name) != getattr(config, name)
    ]
    if changed:
        details = ", ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(config, n)!r}" for n in changed)
        raise CheckpointError(
            f"checkpoint {str(path)!r} was written with other settings ({details}); resume with the same settings "
            "or start a new run"
        )


def load_checkpoint(
    path: Path,
    config: TrainConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
) -> int:
    """Restore a checkpoint into the live (prepared, possibly sharded) training objects; return its step. Every
    process calls this; `model` is the unwrapped model holding `params` and `optimizer`'s parameters."""
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True)
        rng_path = path / f"rng-{accelerator.process_index}.pt"
        rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
    except Exception as exc:  # a damaged file surfaces as one of many error types
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {exc}") from exc
    if set(tensors) != set(params):
        raise CheckpointError(f"checkpoint {str(path)!r} holds other trainable parameters than this model has")
    current = global_batch(config, accelerator.num_processes)
    if state["global_batch"] != current:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained with a global batch of {state['global_batch']} examples per step; "
            f"this run has {current} ({accelerator.num_processes} process(es) x batch_size {config.batch_size} x "
            f"gradient_accumulation_steps {config.gradient_accumulation_steps}): set gradient_accumulation_steps so "
            "the product stays the same"
        )
    load_full_tensors(model, tensors)
    load_full_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    if rng is None:
        torch.manual_seed(derive_seed(config.seed, int(state["step"]), accelerator.process_index))
    else:
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])
