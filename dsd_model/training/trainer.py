"""`train`: a DSD LoRA from a paired dataset, with accelerate, exact resume and an adapter file at the end.

    output_dir/
        config.json            the settings of the run
        loss.csv, loss.png     loss per optimizer step, and its curve
        eval.csv, eval.png     eval-split scores every `eval_every` steps (`dsd_model.eval.training`)
        tensorboard/           the same scalars, when TensorBoard is installed
        checkpoints/step-*/    resumable state (`checkpoint.py`)
        adapter.safetensors    the adapter, loadable with `DSDPipeline.load_adapter(path, name)`
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, is_tensorboard_available, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..adapters import BASE_DIGEST_KEY
from ..eval.training import TrainingEval, plot_eval
from ..pipeline import DSDPipeline
from .checkpoint import checkpoint_to_resume, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .dataset import PairDataset, derive_seed, sample_indices
from .embedding_cache import EmbeddingCache, encoder_identity, model_dir_of
from .errors import TrainingError, TrainingOutOfMemoryError
from .logs import LossLog, plot_loss, read_loss
from .lora import EMBEDDER, check_base_model, save_adapter, trainable_adapter, trainable_parameters, zero_noise_columns
from .objective import flow_matching_inputs, flow_matching_loss
from .sharding import full_tensors, held_values, shard

ADAPTER_FILE = "adapter.safetensors"
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""Forward/backward dtype of a sharded model per mixed precision (unsharded models get it from accelerate's autocast)."""


@dataclass
class TrainResult:
    adapter_path: Path
    output_dir: Path
    steps: int
    losses: list[float]
    """Loss of every optimizer step of the run, resumed parts included."""


def check_requirements(config: TrainConfig) -> None:
    """Fail before any model is loaded when a package the settings need is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise TrainingError("training draws loss.png with matplotlib: pip install 'dsd-serve[train]'")
    if config.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise TrainingError("optimizer='adamw_8bit' needs bitsandbytes and a CUDA device: pip install bitsandbytes")


def train(config: TrainConfig, pipe: DSDPipeline | None = None) -> TrainResult:
    """Train a LoRA (and the embedder's condition columns) on `config.dataset` and write `adapter.safetensors`.

    `pipe` is the base model, trained in place and returned to its base state afterwards; by default the tiny
    profile. Resuming (`config.resume_from`) continues a run exactly: the same steps give the same weights.
    """
    # 1. Check settings, dataset and base model before any work
    check_requirements(config)
    if pipe is None:
        from ..tiny import build_tiny_components

        pipe = DSDPipeline(**build_tiny_components())
    check_base_model(pipe)
    dataset = _training_data(config, pipe)
    checkpoint = checkpoint_to_resume(config)

    # 2. Devices, precision and seeds
    precision = config.resolved_mixed_precision("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_dir=config.output_dir,
    )
    set_seed(config.seed)
    pipe.to(accelerator.device)
    base_dtype = pipe.transformer.dtype
    if accelerator.is_main_process:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        (config.output_dir / "config.json").write_text(config.model_dump_json(indent=2))
    accelerator.init_trackers("tensorboard")
    sharded_by_launch = _check_sharding(accelerator, config)
    shard_here = config.fsdp and accelerator.num_processes > 1 and not sharded_by_launch

    # 3. Trainable parameters (sharded under FSDP), optimizer, LR schedule, and the checkpoint to resume from
    trainable_dtype = torch.float32 if precision != "no" else base_dtype
    with trainable_adapter(pipe.transformer, config, trainable_dtype) as params:
        if shard_here:
            shard(pipe.transformer, COMPUTE_DTYPES.get(precision))
            params = trainable_parameters(pipe.transformer)
            held, total = held_values(pipe.transformer)
            accelerator.print(f"FSDP: the main process holds {held:,} of the {total:,} model values")
        optimizer = _optimizer(params, config)
        scheduler = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=config.max_steps,
        )
        if shard_here:
            transformer, prepared = pipe.transformer, accelerator.prepare(optimizer)
        else:  # DDP wraps the model; an FSDP launch config shards it and swaps the optimizer's parameters
            transformer, prepared = accelerator.prepare(pipe.transformer, optimizer)
        params = trainable_parameters(pipe.transformer)
        start = (load_checkpoint(checkpoint, config, accelerator, pipe.transformer, params, optimizer, scheduler)
                 if checkpoint else 0)
        evaluate = _eval_split(config, start) if accelerator.is_main_process else None

        # 4. Training loop
        try:
            _loop(accelerator, pipe, transformer, dataset, config, params, optimizer, prepared, scheduler, start,
                  precision, evaluate)
        except BaseException:
            accelerator.end_training()
            raise
        finally:
            accelerator.unwrap_model(transformer, keep_fp32_wrapper=False)

        # 5. Export the adapter, gathered whole from the processes
        adapter_path = config.output_dir / ADAPTER_FILE
        trained = full_tensors(params)
        if accelerator.is_main_process:
            metadata = {"format": "pt", "rank": str(config.rank), "steps": str(config.max_steps),
                        "size": str(config.size), BASE_DIGEST_KEY: pipe.adapters.base_digest}
            save_adapter(pipe.transformer, trained, adapter_path, base_dtype, metadata)
        accelerator.wait_for_everyone()

    # 6. Loss curve and eval-split scores
    if accelerator.is_main_process:
        plot_loss(config.output_dir / "loss.csv", config.output_dir / "loss.png")
        if evaluate is not None:
            plot_eval(config.output_dir / "eval.csv", config.output_dir / "eval.png")
    losses = [row[1] for row in read_loss(config.output_dir / "loss.csv")]
    accelerator.end_training()  # after the last barrier: it closes the process group
    return TrainResult(adapter_path=adapter_path, output_dir=config.output_dir, steps=config.max_steps, losses=losses)


def _training_data(config: TrainConfig, pipe: DSDPipeline) -> PairDataset | EmbeddingCache:
    """The pairs to encode each step, or their cached encodings, checked against this model's encoders."""
    if config.embedding_cache is None:
        return PairDataset(config.dataset, config.size)
    pair_ids = [pair.id for pair in PairDataset.read(config.dataset)]
    identity = encoder_identity(pipe, config.size, model_dir_of(pipe))
    return EmbeddingCache(config.embedding_cache, identity, pair_ids)


def _check_sharding(accelerator: Accelerator, config: TrainConfig) -> bool:
    """Whether the launch config shards the model (FSDP); refuse what a sharded run cannot do."""
    by_launch = accelerator.distributed_type == DistributedType.FSDP
    if by_launch and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise TrainingError(
            f"the FSDP launch config has fsdp_version {accelerator.state.fsdp_plugin.fsdp_version}; `dsd train` "
            "gathers sharded parameters as FSDP2 holds them: set fsdp_version: 2 (deploy/accelerate/fsdp.yaml)"
        )
    if (by_launch or (config.fsdp and accelerator.num_processes > 1)) and config.eval_every:
        raise TrainingError(
            f"eval_every={config.eval_every}: the eval split runs in the main process on the whole model, which FSDP "
            "shards over the processes; set eval_every 0 and score the exported adapter, or train without FSDP"
        )
    return by_launch


def _optimizer(params: dict[str, torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    embedder = [p for n, p in params.items() if n.startswith(EMBEDDER + ".")]
    lora = [p for n, p in params.items() if not n.startswith(EMBEDDER + ".")]
    groups = [{"params": lora, "weight_decay": config.weight_decay}, {"params": embedder, "weight_decay": 0.0}]
    if config.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=config.learning_rate)
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _eval_split(config: TrainConfig, start: int) -> TrainingEval | None:
    if not config.eval_every:
        return None
    return TrainingEval(config.eval_benchmark, config.output_dir, config.size, config.eval_steps, start)


def _loop(accelerator, pipe, transformer, dataset, config, params, optimizer, prepared, scheduler, start, precision,
          evaluate) -> None:
    """Optimizer steps `start + 1` .. `max_steps`. Micro-batch `m` of process `r` reads stream positions
    `p = (m * processes + r) * batch_size ...` and draws its randomness from a generator seeded by (seed, p). So the
    examples and draws of an optimizer step depend on the global batch only, not on how it is split into processes
    and accumulated micro-batches: 2 processes x 1 micro-batch train as 1 process x 2 micro-batches.
    `prepared` is accelerate's wrapper of `optimizer` (it skips the steps between accumulated micro-batches)."""
    log = LossLog(config.output_dir / "loss.csv", start) if accelerator.is_main_process else None
    processes, process = accelerator.num_processes, accelerator.process_index
    progress = tqdm(total=config.max_steps, initial=start, desc="train", disable=not accelerator.is_local_main_process)
    step = start
    try:
        while step < config.max_steps:
            losses = []
            for micro in range(config.gradient_accumulation_steps):
                index = step * config.gradient_accumulation_steps + micro
                first = (index * processes + process) * config.batch_size
                batch = dataset.batch(sample_indices(len(dataset), config.seed, first, config.batch_size))
                generator = torch.Generator().manual_seed(derive_seed(config.seed, first))
                with accelerator.accumulate(transformer):
                    inputs = flow_matching_inputs(pipe, batch, config, generator)
                    loss = flow_matching_loss(transformer, inputs)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        zero_noise_columns(pipe.transformer)
                        accelerator.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                    prepared.step()
                    prepared.zero_grad()
                losses.append(loss.detach())
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            loss_value = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
            if log is not None:
                log.append(step, loss_value, lr)
            accelerator.log({"loss": loss_value, "lr": lr}, step=step)
            progress.update()
            progress.set_postfix(loss=f"{loss_value:.4f}")
            if evaluate is not None and step % config.eval_every == 0:
                scores = evaluate(pipe, step)
                accelerator.log({f"eval/{metric}": value for metric, value in scores.items()}, step=step)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                save_checkpoint(accelerator, config, step, pipe.transformer, params, optimizer, scheduler)
    except torch.OutOfMemoryError as exc:
        raise TrainingOutOfMemoryError(_memory_advice(config, precision, step + 1)) from exc
    finally:
        progress.close()


def _memory_advice(config: TrainConfig, precision: str, step: int) -> str:
    advice = []
    if not config.gradient_checkpointing:
        advice.append("enable gradient_checkpointing (recomputes activations instead of storing them)")
    if config.batch_size > 1:
        advice.append(
            f"batch_size=1 with gradient_accumulation_steps={config.batch_size * config.gradient_accumulation_steps} "
            "(the same effective batch)"
        )
    if config.rank > 16:
        advice.append(f"a lower rank (now {config.rank}; the released DSD adapter is about rank 128)")
    if config.optimizer == "adamw":
        advice.append("optimizer='adamw_8bit' (bitsandbytes; 8-bit optimizer moments)")
    if precision == "no":
        advice.append("mixed_precision='bf16'")
    advice.append(f"a smaller size (now {config.size}; this changes what the adapter is trained for)")
    return (
        f"out of device memory in training step {step} (rank {config.rank}, batch_size {config.batch_size}, size "
        f"{config.size}, mixed_precision {precision}, gradient_checkpointing {config.gradient_checkpointing}). "
        "To fit, try: " + "; ".join(advice) + "."
    )
