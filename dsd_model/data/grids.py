"""Stage 2, `grids`: the teacher (FLUX text-to-image) renders every grid prompt, in batches, with recorded seeds.

Images go to `grids/<shard>/<grid id>.png` under the work directory, `shard_size` grids per shard.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from diffusers import FluxPipeline
from tqdm import tqdm

from ..errors import InputError
from ..tiny import build_tiny_components
from .manifest import Manifest, StageReport, save_png
from .prompts import PROMPTS_FILE, check_layout
from .settings import DataSettings

logger = logging.getLogger(__name__)

GRIDS_FILE = "grids.jsonl"
GRIDS_DIR = "grids"
TINY_TEACHER_NOTICE = (
    "teacher 'tiny': a built-in FLUX pipeline with random weights; its grids are noise-like by design. "
    "Set teacher_dir (DSD_DATA_TEACHER_DIR) to a local FLUX.1-dev directory to make real data."
)


def load_teacher(settings: DataSettings) -> FluxPipeline:
    """The text-to-image teacher: a local FLUX.1-dev directory, or the tiny built-in pipeline when none is set."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    if settings.teacher_dir is None:
        logger.warning(TINY_TEACHER_NOTICE)
        pipe = FluxPipeline(**build_tiny_components(dsd=False))
    else:
        if not (Path(settings.teacher_dir) / "model_index.json").is_file():
            raise InputError(
                "teacher_dir",
                f"{str(settings.teacher_dir)!r} is not a diffusers pipeline directory (no model_index.json); "
                "point it at a local copy of FLUX.1-dev",
            )
        pipe = FluxPipeline.from_pretrained(settings.teacher_dir, torch_dtype=dtype, local_files_only=True)
    if pipe.transformer.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def grid_seed(base_seed: int, grid_id: str) -> int:
    """Each grid's seed depends only on the base seed and its id, not on batching or on the order of work."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{grid_id}".encode()).digest()[:7], "big")


def render_grids(settings: DataSettings, teacher: FluxPipeline | None = None) -> StageReport:
    """Render every `ok` prompt `grids_per_prompt` times into `grids.jsonl`; `teacher` replaces the one `settings`
    describes (loaded only when there is work)."""
    layout = settings.grid_layout
    prompts_manifest = Manifest(settings.work_dir / PROMPTS_FILE)
    prompts = [r for r in prompts_manifest.records().values() if r["status"] == "ok"]
    if not prompts:
        raise InputError(
            "work_dir", f"{str(prompts_manifest.path)!r} has no usable prompts; run `dsd data prompts` first"
        )
    check_layout(prompts, layout, prompts_manifest.path)
    manifest = Manifest(settings.work_dir / GRIDS_FILE)
    done = manifest.records()
    check_layout(done.values(), layout, manifest.path)

    grids = []
    for prompt in prompts:
        for k in range(settings.grids_per_prompt):
            grid_id = f"{prompt['id']}_{k}"
            shard = f"{len(grids) // settings.shard_size:05d}"
            grids.append(
                {
                    "id": grid_id,
                    "prompt_id": prompt["id"],
                    "prompt": prompt["prompt"],
                    "subject": prompt["subject"],
                    "layout": str(layout),
                    "width": settings.width,
                    "height": settings.height,
                    "seed": grid_seed(settings.seed, grid_id),
                    "num_inference_steps": settings.num_inference_steps,
                    "guidance_scale": settings.guidance_scale,
                    "teacher": str(settings.teacher_dir) if settings.teacher_dir else "tiny",
                    "path": f"{GRIDS_DIR}/{shard}/{grid_id}.png",
                }
            )
    todo = [grid for grid in grids if grid["id"] not in done]
    if todo and teacher is None:
        teacher = load_teacher(settings)

    with tqdm(total=len(todo), desc="grids", unit="grid") as bar:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            images = teacher(
                prompt=[grid["prompt"] for grid in batch],
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                max_sequence_length=settings.max_sequence_length,
                generator=[torch.Generator().manual_seed(grid["seed"]) for grid in batch],
            ).images
            for grid, image in zip(batch, images, strict=True):
                save_png(image, settings.work_dir / grid["path"])
                manifest.append(grid)
            bar.update(len(batch))
    return StageReport("grids", len(todo), len(grids) - len(todo))
