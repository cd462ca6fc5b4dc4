"""Stage 3, `curate`: every panel of every grid is judged against the others; pairs form only between panels that
show the grid's common subject.

Two judges, one verdict format:

- `vlm`: a vision-language model names the common subject, then for each panel writes a caption and decides, with
  its reasoning, whether that panel shows the identical subject. With `prefilter` on, panel similarity
  (`embed.py`) rejects clear failures first, without a VLM call.
- `embedding`: offline; a panel is consistent when it is similar enough to most other panels (`embed.py`). Captions
  are the grid prompt's panel scenes.

A grid is `accepted` when at least two panels are consistent (so it yields pairs), else `rejected`; an item whose
judge gave no usable answer is `failed` and is judged again on the next run.

    {"id": ..., "status": "accepted", "judge": "vlm:<model>", "subject": ..., "reason": ...,
     "panels": [{"index": 0, "description": ..., "consistent": true, "reason": ...}, ...],
     "pairs": [{"reference": 0, "target": 1, "kept": true}, ...]}
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

from ..errors import InputError
from .chat import ChatClient, ChatRejected, MalformedReply, map_unordered
from .embed import Embedder, consistent_panels, load_embedder
from .grids import GRIDS_FILE
from .layout import GridLayout, parse_layout, split_grid
from .manifest import Manifest, StageReport
from .settings import DataSettings

logger = logging.getLogger(__name__)

CURATION_FILE = "curation.jsonl"
_YES, _NO = ("yes", "true"), ("no", "false")


@dataclass(frozen=True)
class PanelVerdict:
    description: str
    consistent: bool
    reason: str
    score: float | None = None
    """Embedding judge: mean similarity to the other panels."""


@dataclass(frozen=True)
class Verdict:
    judge: str
    subject: str
    panels: list[PanelVerdict]
    reason: str = ""

    def record(self, grid_id: str) -> dict:
        """The manifest record: per-panel and per-pair verdicts."""
        consistent = [panel.consistent for panel in self.panels]
        panels = []
        for index, panel in enumerate(self.panels):
            entry = {"index": index, "description": panel.description, "consistent": panel.consistent}
            entry.update({"reason": panel.reason} if panel.reason else {})
            entry.update({"score": round(panel.score, 4)} if panel.score is not None else {})
            panels.append(entry)
        return {
            "id": grid_id,
            "status": "accepted" if sum(consistent) >= 2 else "rejected",
            "judge": self.judge,
            "subject": self.subject,
            "reason": self.reason,
            "panels": panels,
            "pairs": [
                {"reference": i, "target": j, "kept": consistent[i] and consistent[j]}
                for i, j in itertools.permutations(range(len(consistent)), 2)
            ],
        }


def judge_messages(grid_png: bytes, layout: GridLayout) -> list[dict]:
    names = ", ".join(layout.panel_names())
    instructions = (
        f"This image is a grid of {layout.panels} panels ({layout.describe()}); in reading "
        f"order they are: {names}.\n"
        "Think step by step:\n"
        "1. Name the main subject that most panels have in common.\n"
        "2. For each panel, write one sentence as a caption an image generator could draw from: the subject, its "
        "pose and the setting.\n"
        "3. Judge each panel against the others: does it show the identical subject, the same individual object, "
        "character or person with the same shape, colours, markings and details, not merely the same kind of "
        "thing? Different poses, viewpoints, lighting and backgrounds are fine. Give your reason for each panel.\n"
        "Write your reasoning, then end with a JSON object in a ```json code block:\n"
        f'{{"subject": "<subject>", "panels": [<exactly {layout.panels} objects in reading order, each '
        '{"description": "<caption>", "same_subject": true or false, "reason": "<one sentence>"}>]}'
    )
    data_url = "data:image/png;base64," + base64.b64encode(grid_png).decode("ascii")
    return [
        {"role": "system", "content": "You are a meticulous judge of visual identity across images."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": instructions},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        },
    ]


def parse_verdict(reply: dict, layout: GridLayout, judge: str) -> Verdict:
    subject, panels = reply.get("subject"), reply.get("panels")
    if not isinstance(subject, str) or not subject.strip():
        raise MalformedReply(f'"subject" must be a non-empty string, got {subject!r}')
    if not isinstance(panels, list) or len(panels) != layout.panels:
        raise MalformedReply(f'"panels" must list exactly {layout.panels} objects, got {panels!r}')
    return Verdict(judge, subject.strip(), [_parse_panel(panel, index) for index, panel in enumerate(panels)])


def _parse_panel(panel, index: int) -> PanelVerdict:
    if not isinstance(panel, dict):
        raise MalformedReply(f"panel {index} must be an object with description, same_subject, reason; got {panel!r}")
    description, same = panel.get("description"), panel.get("same_subject")
    if not isinstance(description, str) or not description.strip():
        raise MalformedReply(f'panel {index}: "description" must be a non-empty string, got {description!r}')
    if isinstance(same, str) and same.strip().lower() in _YES + _NO:
        same = same.strip().lower() in _YES
    if not isinstance(same, bool):
        raise MalformedReply(f'panel {index}: "same_subject" must be true or false, got {same!r}')
    return PanelVerdict(description.strip(), same, str(panel.get("reason", "")).strip())


def embedding_verdict(
    embedder: Embedder, panels: list[Image.Image], threshold: float, subject: str, captions: list[str], judge: str
) -> Verdict:
    """Per-panel verdicts from panel similarity; each panel's score is its mean similarity to the others."""
    similarity = embedder.similarity(panels)
    consistent = consistent_panels(similarity, threshold)
    n = len(panels)
    scores = ((similarity.sum(dim=1) - similarity.diagonal()) / (n - 1)).tolist()
    verdicts = [
        PanelVerdict(caption, keep, f"similar to {'most' if keep else 'too few'} other panels (>= {threshold})", score)
        for caption, keep, score in zip(captions, consistent, scores, strict=True)
    ]
    return Verdict(judge, subject, verdicts, f"{embedder.name} similarity, threshold {threshold}")


def curate_grids(settings: DataSettings) -> StageReport:
    """Judge every rendered grid (and every grid that failed before) into `curation.jsonl`, or with `shard` set, this
    worker's share of them into its manifest shard."""
    grids = Manifest(settings.work_dir / GRIDS_FILE).records()
    if not grids:
        raise InputError("work_dir", f"{str(settings.work_dir)!r} has no rendered grids; run `dsd data grids` first")
    manifest = Manifest(settings.work_dir / CURATION_FILE)
    done = manifest.records()
    worker = settings.resolved_shard
    if worker is not None:
        grids = {grid_id: grid for grid_id, grid in grids.items() if worker.owns(grid_id)}
        manifest = worker.manifest(manifest.path)
    todo = [grid for grid in grids.values() if done.get(grid["id"], {}).get("status", "failed") == "failed"]
    backend = settings.resolved_curate_backend
    client = ChatClient(settings.endpoint("vlm"), settings) if todo and backend == "vlm" else None
    embedder = load_embedder(settings) if todo and (backend == "embedding" or settings.prefilter) else None

    def work(grid: dict) -> Verdict:
        layout = parse_layout(grid["layout"])
        path = settings.work_dir / grid["path"]
        if embedder is not None:
            with Image.open(path) as image:
                panels = split_grid(image.convert("RGB"), layout)
            captions = grid["panels"]
            if client is None:
                return embedding_verdict(
                    embedder, panels, settings.consistency_threshold, grid["subject"], captions,
                    f"embedding:{embedder.name}",
                )
            screened = embedding_verdict(
                embedder, panels, settings.prefilter_threshold, grid["subject"], captions, f"prefilter:{embedder.name}"
            )
            if sum(panel.consistent for panel in screened.panels) < 2:
                return screened
        messages = judge_messages(path.read_bytes(), layout)
        return client.ask_json(
            messages,
            lambda r: parse_verdict(r, layout, f"vlm:{client.endpoint.model}"),
            settings.max_reply_attempts,
            fresh=grid["id"] in done,
        )

    failed = saved = 0
    concurrency = settings.concurrency if client else 1
    with client or contextlib.nullcontext(), tqdm(total=len(todo), desc=f"curate ({backend})", unit="grid") as bar:
        for grid, future in map_unordered(work, todo, concurrency):
            try:
                verdict = future.result()
                record = verdict.record(grid["id"])
                saved += client is not None and verdict.judge.startswith("prefilter:")
            except (MalformedReply, ChatRejected) as exc:
                logger.warning("grid %s failed: %s", grid["id"], exc)
                record = {"id": grid["id"], "status": "failed", "error": str(exc)}
                failed += 1
            manifest.append(record)
            bar.update()
    return StageReport("curate", len(todo), len(grids) - len(todo), failed, saved)
