"""FSDP for training: the frozen base sharded over the processes, the trainable parameters gathered whole for
checkpoints and the adapter file.

Sharding is FSDP2 (`torch.distributed.fsdp.fully_shard`): each FLUX block is one unit, the root (embedders, norms,
output projection) another. A process keeps 1/N of the rows of every parameter; a unit's parameters are
all-gathered for its forward and backward, and its gradients reduce-scattered (averaged), so each process updates
its rows of the LoRA and the embedder with the same gradient DDP would give it.

The state functions work for every strategy (one process, DDP, FSDP): every process calls them, since gathering a
sharded tensor is a collective, and state is keyed by parameter name, so a checkpoint resumes under any of them.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

BLOCKS = (FluxTransformerBlock, FluxSingleTransformerBlock)
"""The FSDP units below the root; `deploy/accelerate/fsdp.yaml` names the same classes."""


def shard(transformer: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    """Shard the transformer in place over the default process group, one unit per block plus the root.

    `compute_dtype` (mixed precision): the gathered parameters are cast to it for forward and backward, while the
    trainable ones stay float32 in their shards and gradients are averaged in float32, as autocast does under DDP.
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for module in transformer.modules():
        if isinstance(module, BLOCKS):
            fully_shard(module, mp_policy=policy)
    fully_shard(transformer, mp_policy=policy)


def held_values(model: torch.nn.Module) -> tuple[int, int]:
    """Parameter values this process holds, and the model's total."""
    params = list(model.parameters())
    held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    return held, sum(p.numel() for p in params)


def full_tensors(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Each parameter whole, on the CPU (a sharded one gathered from all processes)."""
    return {
        name: (param.full_tensor() if isinstance(param, DTensor) else param).detach().cpu().contiguous()
        for name, param in params.items()
    }


def load_full_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors, by parameter name, into the model's (possibly sharded) parameters."""
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, whole tensors on the CPU (complete in the main process)."""
    offload = torch.distributed.is_initialized()  # rank-0-only CPU offload needs a process group
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=offload))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what `full_optimizer_state` returned, each process keeping the rows of its shard."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
