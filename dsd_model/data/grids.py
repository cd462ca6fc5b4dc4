"""Stage 2, `grids`: the teachers (local diffusers text-to-image pipelines) render every grid prompt, in batches,
with recorded seeds and teachers.

Images go to `grids/<shard>/<grid id>.png` under the work directory, `shard_size` grids per subdirectory. With
`shard` set, a worker renders only its share of the grids and records them in its own manifest shard. With several
teachers (`teachers`), each grid's teacher is drawn from the mix weights by its id; teachers are loaded one at a
time, each rendering all of its grids before the next is loaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING
from tqdm import tqdm

from ..errors import InputError
from ..tiny import build_tiny_components
from .manifest import Manifest, StageReport, save_png
from .prompts import PROMPTS_FILE, check_layout
from .settings import TINY_TEACHER, DataSettings

logger = logging.getLogger(__name__)

GRIDS_FILE = "grids.jsonl"
GRIDS_DIR = "grids"
TINY_TEACHER_NOTICE = (
    "teacher 'tiny': a built-in FLUX pipeline with random weights; its grids are noise-like by design. "
    "Set teacher_dir (DSD_DATA_TEACHER_DIR) or teachers to local pipeline directories to make real data."
)
TEXT_TO_IMAGE_CLASSES = frozenset(
    cls.__name__ for cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values() if "Control" not in cls.__name__
)
"""Pipeline classes a teacher directory may hold: diffusers' text-to-image pipelines (FLUX, SD3, SDXL, ...), less
those that need a control image."""


def pipeline_class(path: Path, field: str = "teachers", allowed: frozenset[str] = TEXT_TO_IMAGE_CLASSES) -> type:
    """The diffusers pipeline class named in `path/model_index.json`, if it is one of `allowed`."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise InputError(field, f"{str(path)!r} is not a diffusers pipeline directory (no model_index.json)")
    name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    if name not in allowed or not hasattr(diffusers, name):
        raise InputError(field, f"{str(path)!r} holds a {name!r}, not one of {', '.join(sorted(allowed))}")
    return getattr(diffusers, name)


def load_teacher(settings: DataSettings, name: str = TINY_TEACHER) -> DiffusionPipeline:
    """A teacher by name: a local pipeline directory (its class read from model_index.json), or `tiny`."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    if name == TINY_TEACHER:
        logger.warning(TINY_TEACHER_NOTICE)
        pipe = FluxPipeline(**build_tiny_components(dsd=False))
    else:
        field = "teacher_dir" if settings.teachers is None else "teachers"
        pipe = pipeline_class(Path(name), field).from_pretrained(name, dtype=dtype, local_files_only=True)
    if pipe.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pick_teacher(mix: list[tuple[str, float]], base_seed: int, grid_id: str) -> str:
    """The teacher of one grid, drawn from the mix weights by a hash of the seed and the grid id."""
    draw = int.from_bytes(hashlib.sha256(f"teacher:{base_seed}:{grid_id}".encode()).digest()[:8], "big") / 2**64
    total = 0.0
    for name, weight in mix:
        total += weight
        if draw < total:
            return name
    return mix[-1][0]


def render(teacher, prompts: list[str], seeds: list[int], settings: DataSettings, **overrides):
    """One batch from any diffusers pipeline: the grid settings each pipeline's `__call__` accepts, seeded per
    image; `overrides` replace or add arguments (a size, a control image)."""
    call = dict(
        prompt=prompts,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        max_sequence_length=settings.max_sequence_length,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
    )
    call.update(overrides)
    accepted = inspect.signature(teacher.__call__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        call = {key: value for key, value in call.items() if key in accepted}
    return teacher(**call).images


def grid_seed(base_seed: int, grid_id: str) -> int:
    """Each grid's seed depends only on the base seed and its id, not on batching or on the order of work."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{grid_id}".encode()).digest()[:7], "big")


def render_grids(settings: DataSettings, teacher=None) -> StageReport:
    """Render every `ok` prompt `grids_per_prompt` times into `grids.jsonl`; `teacher`, when given, renders in place
    of every configured teacher (teachers are loaded only when they have work)."""
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
    worker = settings.resolved_shard

    mix = settings.teacher_mix()
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
                    "panels": prompt["panels"],
                    "layout": str(layout),
                    "width": settings.width,
                    "height": settings.height,
                    "seed": grid_seed(settings.seed, grid_id),
                    "num_inference_steps": settings.num_inference_steps,
                    "guidance_scale": settings.guidance_scale,
                    "teacher": pick_teacher(mix, settings.seed, grid_id),
                    "path": f"{GRIDS_DIR}/{shard}/{grid_id}.png",
                }
            )
    if worker is not None:
        grids = [grid for grid in grids if worker.owns(grid["id"])]
        manifest = worker.manifest(manifest.path)
    todo = [grid for grid in grids if grid["id"] not in done]

    with tqdm(total=len(todo), desc="grids", unit="grid") as bar:
        for name, _ in mix:
            mine = [grid for grid in todo if grid["teacher"] == name]
            if not mine:
                continue
            pipe = teacher if teacher is not None else load_teacher(settings, name)
            for start in range(0, len(mine), settings.batch_size):
                batch = mine[start : start + settings.batch_size]
                images = render(pipe, [g["prompt"] for g in batch], [g["seed"] for g in batch], settings)
                for grid, image in zip(batch, images, strict=True):
                    grid["teacher_class"] = type(pipe).__name__
                    save_png(image, settings.work_dir / grid["path"])
                    manifest.append(grid)
                bar.update(len(batch))
            del pipe
    return StageReport("grids", len(todo), len(grids) - len(todo))
