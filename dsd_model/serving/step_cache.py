"""Per-row step caching: each row of a batched forward decides on its own whether to skip the transformer's blocks.

The decision follows First-Block Cache (diffusers' `FirstBlockCacheConfig`): every row runs the first double block;
when the residual that block adds has changed by less than `threshold` (relative L1: mean |r - r_prev| / mean
|r_prev|) since the row last ran the whole model, the row reuses the residual its remaining blocks produced then.
diffusers' hook decides for the whole batch; under step-level batching every row is at its own timestep, so here
each row compares against its own history, which lives in the request's `DenoiseState.extras` and leaves with it.
A row's decision therefore does not depend on which other requests share the forward.

`flux_forward` runs `FluxTransformer2DModel` block by block (diffusers 0.42.1's forward without ControlNet,
IP-Adapter and gradient checkpointing, which serving does not use); with no cache it equals the stock forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers import FluxTransformer2DModel

from ..adapters import AdapterRegistry
from . import metrics

CACHE_KEY = "step_cache"
"""`DenoiseState.extras` key of a request's per-row cache entries."""
EVALUATIONS_KEY = "block_evaluations"
"""`DenoiseState.extras` key counting the transformer blocks run for the request (all its rows, all steps)."""

ROW_KINDS = {1: ("v",), 3: ("u", "u_t", "v")}
"""What each of a state's rows is, in `DSDPipeline.step`'s order: `v` = prompt with condition; with true CFG
also `u` = negative prompt without condition and `u_t` = negative prompt with condition. A row's cache entry is
keyed by its kind, so the CFG rows that join at step 2 start without history."""


@dataclass
class RowEntry:
    """What one row remembers from the last step it ran the whole model."""

    first_residual: torch.Tensor
    remainder_residual: torch.Tensor


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Per row: mean |current - previous| / mean |previous| (rows on dim 0), in float32."""
    current, previous = current.float().flatten(1), previous.float().flatten(1)
    return (current - previous).abs().mean(1) / previous.abs().mean(1).clamp_min(1e-12)


def blocks_per_row(transformer: FluxTransformer2DModel) -> int:
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


class StepCache:
    """Per-row First-Block Cache with relative-L1 `threshold`; 0 never skips (every row runs every block)."""

    def __init__(self, threshold: float):
        if not 0 <= threshold <= 1:
            raise ValueError(f"step cache threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def reuse(self, first_residual: torch.Tensor, entries: Sequence[RowEntry | None]) -> list[bool]:
        """For each row, whether it reuses its cached remainder instead of running the remaining blocks."""
        known = [i for i, entry in enumerate(entries) if entry is not None]
        decisions = [False] * len(entries)
        if not known or self.threshold == 0:
            return decisions
        previous = torch.cat([entries[i].first_residual for i in known])
        change = relative_l1(first_residual[known], previous).tolist()
        for i, value in zip(known, change):
            decisions[i] = value < self.threshold
        return decisions


def row_owners(states: Sequence) -> list[tuple[dict, str]]:
    """(state.extras, kind) of every row of a forward over `states`, in `DSDPipeline.step`'s row order."""
    return [(state.extras, kind) for state in states for kind in ROW_KINDS[state.rows]]


def flux_forward(
    transformer: FluxTransformer2DModel,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    timestep: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None,
    cache: StepCache | None = None,
    states: Sequence = (),
    pad: Callable[[torch.Tensor], torch.Tensor] | None = None,
    adapters: AdapterRegistry | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer's prediction for every row, block by block.

    With `cache`, `states` own the first rows (`row_owners`); rows beyond them are padding, which only the first
    block sees. `pad(tensor)` pads the subset of rows that run the remaining blocks to a batch size the compiled
    blocks were built for (see `acceleration.RowBuckets`); its padded rows are dropped again. `adapters` (the
    pipeline's registry) keeps each computed row's adapter when only some rows run the remaining blocks.
    `attention_mask` (rows of several canvas sizes packed in one grid, `pipeline.CanvasPacking`) hides padding tokens;
    the step cache compares whole rows, so it does not take packed rows.
    """
    if cache is not None and attention_mask is not None:
        raise ValueError("the per-row step cache needs one canvas size per forward; do not pack canvas sizes with it")
    kwargs = {"joint_attention_kwargs": {"attention_mask": attention_mask}} if attention_mask is not None else {}
    model = transformer
    hidden = model.x_embedder(hidden_states)
    timestep = timestep.to(hidden.dtype) * 1000
    if guidance is None:
        temb = model.time_text_embed(timestep, pooled_projections)
    else:
        temb = model.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled_projections)
    text = model.context_embedder(encoder_hidden_states)
    rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

    first, *rest = model.transformer_blocks
    text, after_first = first(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary,
                              **kwargs)
    if cache is None:
        return model.proj_out(model.norm_out(_remaining(model, rest, after_first, text, temb, rotary, kwargs), temb))

    owners = row_owners(states)
    entries = [extras.get(CACHE_KEY, {}).get(kind) for extras, kind in owners]
    first_residual = after_first - hidden
    reuse = cache.reuse(first_residual, entries)
    compute = [i for i, reused in enumerate(reuse) if not reused]
    output = after_first.clone()
    if compute:
        index = torch.tensor(compute, device=hidden.device)
        h, t, e = after_first[index], text[index], temb[index]
        if pad is not None:
            h, t, e = pad(h), pad(t), pad(e)
        with adapters.subset(compute) if adapters is not None else nullcontext():
            output[index] = _remaining(model, rest, h, t, e, rotary)[: len(compute)]
    for i, (extras, kind) in enumerate(owners):
        row_cache = extras.setdefault(CACHE_KEY, {})
        if reuse[i]:
            output[i] = after_first[i] + row_cache[kind].remainder_residual[0]
        else:
            remainder = output[i : i + 1] - after_first[i : i + 1]
            row_cache[kind] = RowEntry(first_residual[i : i + 1].clone(), remainder)
    _count(model, owners, reuse)
    return model.proj_out(model.norm_out(output, temb))


def _remaining(model, rest, hidden, text, temb, rotary, kwargs: dict | None = None) -> torch.Tensor:
    """Image tokens after the double blocks `rest` and all single blocks."""
    for block in [*rest, *model.single_transformer_blocks]:
        text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary,
                             **(kwargs or {}))
    return hidden


def _count(model: FluxTransformer2DModel, owners: list[tuple[dict, str]], reuse: list[bool]) -> None:
    full = blocks_per_row(model)
    skipped = 0
    for (extras, _), reused in zip(owners, reuse):
        extras[EVALUATIONS_KEY] = extras.get(EVALUATIONS_KEY, 0) + (1 if reused else full)
        skipped += reused
    metrics.STEP_CACHE_ROWS.labels("reused").inc(skipped)
    metrics.STEP_CACHE_ROWS.labels("computed").inc(len(owners) - skipped)
