"""Stage `structure`: pairs that share structure and differ in appearance, the training data of `structure` adapters.

For every grid prompt, in three resumable phases:

1. a text-to-image teacher (the same mix as `grids`) renders a source image of the subject at panel size;
2. a structure estimator turns it into a control map: depth from a local transformers depth model (DPT, Depth
   Anything), or Canny edges (OpenCV) when no depth model is set;
3. a structure-conditioned teacher (diffusers' `FluxControlPipeline`: FLUX.1-Depth-dev or FLUX.1-Canny-dev) renders
   two images from that one control map with two appearance prompts (recipe `structure`: material, style and
   colour; recipe `relight`: the same subject under two lightings).

The estimator measures both renderings; their structure agreement (depth: 1 - mean absolute difference of the
normalised depth maps; edges: the F-score of edge pixels matched within one pixel) decides whether the item is
`kept` (agreement >= `structure_min_agreement`) or `dropped`. Each kept item gives two ordered pairs, both naming
the shared control map. Files go to `structure/<shard>/<id>_{source,control,a,b}.png`; the manifest is
`structure.jsonl`; `write_structure_dataset` then writes `<dataset_dir>/pairs.jsonl` and `summary.json`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import FluxControlPipeline
from PIL import Image
from tqdm import tqdm

from ..errors import InputError
from ..tiny import build_tiny_components
from .assemble import IMAGES_DIR, SUMMARY_FILE
from .embed import load_image_model
from .grids import grid_seed, load_teacher, pick_teacher, pipeline_class, render
from .manifest import Manifest, StageReport, save_png, write_json
from .pairs import Pair, write_pairs
from .prompts import PROMPTS_FILE
from .settings import TINY_TEACHER, DataSettings

logger = logging.getLogger(__name__)

STRUCTURE_FILE = "structure.jsonl"
STRUCTURE_DIR = "structure"
TINY_CONTROL_NOTICE = (
    "control teacher 'tiny': a built-in FluxControlPipeline with random weights; its images are noise-like by "
    "design. Set control_teacher_dir to a local FLUX.1-Depth-dev or FLUX.1-Canny-dev directory for real data."
)
APPEARANCES = (
    "made of polished bronze",
    "as a watercolour painting",
    "carved from pale wood",
    "in bright pop-art colours",
    "made of frosted glass",
    "as a charcoal sketch",
    "knitted from red wool",
    "in a neon cyberpunk palette",
)
"""Appearance changes of recipe `structure`: material, style and colour, never shape."""
LIGHTINGS = (
    "lit by warm golden-hour sunlight",
    "under cold blue moonlight",
    "in harsh overhead studio light",
    "lit by flickering candlelight",
    "backlit by a bright window",
    "under green neon light",
)
"""Lighting changes of recipe `relight`: the same geometry and materials under another light."""
CANNY_THRESHOLDS = (100, 200)
"""OpenCV Canny hysteresis thresholds of diffusers' canny-control examples."""


@dataclass
class StructureEstimator:
    """Depth from a local transformers model (`model` set), or Canny edges; maps are float32 in [0, 1]."""

    name: str
    model: torch.nn.Module | None = None
    processor: object | None = None

    @property
    def kind(self) -> str:
        return "depth" if self.model is not None else "canny"

    @torch.no_grad()
    def maps(self, images: list[Image.Image]) -> list[np.ndarray]:
        if self.model is None:
            return [_canny(image) for image in images]
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        depth = self.model(pixel_values=inputs["pixel_values"].to(self.model.device, self.model.dtype)).predicted_depth
        maps = []
        for image, prediction in zip(images, depth.float(), strict=True):
            resized = torch.nn.functional.interpolate(
                prediction[None, None], size=(image.height, image.width), mode="bicubic", align_corners=False
            )[0, 0]
            low, high = resized.min(), resized.max()
            maps.append(((resized - low) / (high - low) if high > low else torch.zeros_like(resized)).cpu().numpy())
        return maps

    def agreement(self, first: np.ndarray, second: np.ndarray) -> float:
        """1 for the same structure. Depth: 1 - mean absolute difference; edges: F-score within one pixel."""
        if self.model is not None:
            return float(1 - np.abs(first - second).mean())
        a, b = first > 0.5, second > 0.5
        if not a.any() and not b.any():
            return 1.0
        kernel = np.ones((3, 3), np.uint8)
        near_a = cv2.dilate(a.astype(np.uint8), kernel).astype(bool)
        near_b = cv2.dilate(b.astype(np.uint8), kernel).astype(bool)
        precision = (a & near_b).sum() / max(a.sum(), 1)
        recall = (b & near_a).sum() / max(b.sum(), 1)
        return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def _canny(image: Image.Image) -> np.ndarray:
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    return (cv2.Canny(grey, *CANNY_THRESHOLDS) / 255).astype(np.float32)


def control_image(structure_map: np.ndarray) -> Image.Image:
    """The map as the 8-bit RGB image control pipelines take (grey in all three channels)."""
    grey = (np.clip(structure_map, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=2))


def load_estimator(settings: DataSettings) -> StructureEstimator:
    """The depth model at `depth_model_dir`, or Canny edges when none is set."""
    if settings.depth_model_dir is None:
        return StructureEstimator("canny")
    from transformers import AutoModelForDepthEstimation

    path = Path(settings.depth_model_dir)
    model, processor = load_image_model(path, AutoModelForDepthEstimation, "depth_model_dir", "DPT or Depth Anything",
                                        settings)
    return StructureEstimator(f"depth:{path}", model, processor)


def load_control_teacher(settings: DataSettings) -> FluxControlPipeline:
    """A local FluxControlPipeline directory, or the tiny built-in one."""
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    if settings.control_teacher_dir is None:
        logger.warning(TINY_CONTROL_NOTICE)
        pipe = FluxControlPipeline(**build_tiny_components(dsd=True))
    else:
        path = settings.control_teacher_dir
        pipe_class = pipeline_class(path, "control_teacher_dir", frozenset({"FluxControlPipeline"}))
        pipe = pipe_class.from_pretrained(path, dtype=dtype, local_files_only=True)
    if pipe.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def appearance_prompts(prompt: dict, recipe: str) -> list[str]:
    """Two prompts for one item: the subject's first scene with two different appearances (or lightings)."""
    choices = LIGHTINGS if recipe == "relight" else APPEARANCES
    rng = random.Random(int(hashlib.sha256(f"{recipe}:{prompt['id']}".encode()).hexdigest()[:16], 16))
    scene = prompt["panels"][0].rstrip(".")
    return [f"{scene}, {change}" for change in rng.sample(choices, 2)]


def make_structure_pairs(settings: DataSettings, teacher=None, control_teacher=None) -> StageReport:
    """Render, measure and filter a structure item per `ok` prompt into `structure.jsonl`.
    `teacher` / `control_teacher`, when given, replace the configured ones (which are loaded only when needed)."""
    prompts = [r for r in Manifest(settings.work_dir / PROMPTS_FILE).records().values() if r["status"] == "ok"]
    if not prompts:
        raise InputError("work_dir", f"{str(settings.work_dir)!r} has no usable prompts; run `dsd data prompts` first")
    width, height = settings.grid_layout.panel_size(settings.width, settings.height)
    recipe = settings.recipe
    manifest = Manifest(settings.work_dir / STRUCTURE_FILE)
    done = manifest.records()
    mix = settings.teacher_mix()
    items = []
    for index, prompt in enumerate(prompts):
        item_id = f"{prompt['id']}_{recipe}"
        stem = f"{STRUCTURE_DIR}/{index // settings.shard_size:05d}/{item_id}"
        items.append({
            "id": item_id, "prompt_id": prompt["id"], "subject": prompt["subject"], "recipe": recipe,
            "source_prompt": prompt["panels"][0], "prompts": appearance_prompts(prompt, recipe),
            "teacher": pick_teacher(mix, settings.seed, item_id), "seed": grid_seed(settings.seed, item_id),
            "width": width, "height": height, "source": f"{stem}_source.png", "control": f"{stem}_control.png",
            "images": [f"{stem}_a.png", f"{stem}_b.png"],
        })
    todo = [item for item in items if item["id"] not in done]

    # 1. Source images, one teacher at a time; an image already on disk is not rendered again
    for name, _ in mix:
        mine = [i for i in todo if i["teacher"] == name and not (settings.work_dir / i["source"]).is_file()]
        if not mine:
            continue
        pipe = teacher if teacher is not None else load_teacher(settings, name)
        for start in tqdm(range(0, len(mine), settings.batch_size), desc=f"structure sources ({name})"):
            batch = mine[start : start + settings.batch_size]
            images = render(pipe, [i["source_prompt"] for i in batch], [i["seed"] for i in batch], settings,
                            width=width, height=height)
            for item, image in zip(batch, images, strict=True):
                save_png(image, settings.work_dir / item["source"])
        del pipe

    # 2. Control maps, and 3. two renderings from each map, measured and filtered
    estimator = load_estimator(settings) if todo else None
    if todo and control_teacher is None:
        control_teacher = load_control_teacher(settings)
    with tqdm(total=len(todo), desc=f"structure ({recipe}, {estimator.kind if estimator else '-'})") as bar:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            sources = [_open(settings.work_dir / item["source"]) for item in batch]
            controls = [control_image(m) for m in estimator.maps(sources)]
            for item, control in zip(batch, controls, strict=True):
                save_png(control, settings.work_dir / item["control"])
            images = render(
                control_teacher,
                [p for item in batch for p in item["prompts"]],
                [item["seed"] + k for item in batch for k in (1, 2)],
                settings,
                width=width,
                height=height,
                guidance_scale=settings.control_guidance_scale,
                control_image=[c for c in controls for _ in (0, 1)],
            )
            maps = estimator.maps(images)
            for n, item in enumerate(batch):
                for path, image in zip(item["images"], images[2 * n : 2 * n + 2], strict=True):
                    save_png(image, settings.work_dir / path)
                agreement = estimator.agreement(maps[2 * n], maps[2 * n + 1])
                keep = agreement >= settings.structure_min_agreement
                manifest.append({
                    **item, "status": "kept" if keep else "dropped", "control_kind": estimator.kind,
                    "estimator": estimator.name, "agreement": round(agreement, 4),
                    "control_teacher": str(settings.control_teacher_dir or TINY_TEACHER),
                })
            bar.update(len(batch))
    return StageReport("structure", len(todo), len(items) - len(todo))


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def write_structure_dataset(settings: DataSettings) -> dict:
    """Both ordered pairs of every kept item, sharing its control map, into the dataset; a summary of the stage."""
    records = list(Manifest(settings.work_dir / STRUCTURE_FILE).records().values())
    dataset_dir = settings.resolved_dataset_dir
    pairs = []
    for record in (r for r in records if r["status"] == "kept"):
        names = {}
        for key, source in (("a", record["images"][0]), ("b", record["images"][1]), ("control", record["control"])):
            names[key] = f"{IMAGES_DIR}/{record['id']}_{key}.png"
            if not (dataset_dir / names[key]).is_file():
                (dataset_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(settings.work_dir / source, dataset_dir / names[key])
        for reference, target, caption in (("a", "b", 1), ("b", "a", 0)):
            pairs.append(Pair(
                id=f"{record['id']}-{reference}-{target}", reference=names[reference], target=names[target],
                caption=record["prompts"][caption], subject=record["subject"], grid=record["id"],
                control=names["control"],
            ))
    write_pairs(dataset_dir, pairs)
    agreements = [r["agreement"] for r in records]
    summary = {
        "recipe": settings.recipe,
        "items": {"kept": sum(r["status"] == "kept" for r in records),
                  "dropped": sum(r["status"] == "dropped" for r in records)},
        "min_agreement": settings.structure_min_agreement,
        "agreement": {"min": min(agreements), "mean": round(sum(agreements) / len(agreements), 4),
                      "max": max(agreements)} if agreements else None,
        "pairs": len(pairs),
        "dataset_dir": str(dataset_dir),
    }
    write_json(settings.work_dir / SUMMARY_FILE, summary)
    return summary
