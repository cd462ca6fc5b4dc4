"""Stage 3, `curate`: a vision-language model judges every grid with a chain of thought.

It names the common subject, describes each panel, then decides whether all panels show the identical subject.
Accepted grids become training pairs; the panel descriptions become the target captions.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from dataclasses import asdict, dataclass

from tqdm import tqdm

from ..errors import InputError
from .chat import ChatClient, ChatRejected, MalformedReply, map_unordered
from .grids import GRIDS_FILE
from .layout import GridLayout, parse_layout
from .manifest import Manifest, StageReport
from .settings import DataSettings

logger = logging.getLogger(__name__)

CURATION_FILE = "curation.jsonl"
_YES, _NO = ("yes", "true"), ("no", "false")


@dataclass(frozen=True)
class Verdict:
    subject: str
    panels: list[str]
    identical: bool
    reason: str


def judge_messages(grid_png: bytes, layout: GridLayout) -> list[dict]:
    names = ", ".join(layout.panel_names())
    instructions = (
        f"This image is a grid of {layout.panels} panels ({layout.describe()}); in reading "
        f"order they are: {names}.\n"
        "Think step by step:\n"
        "1. Name the main subject the panels have in common.\n"
        "2. Describe each panel in one sentence, as a caption an image generator could draw from: the subject, "
        "its pose and the setting.\n"
        "3. Decide whether every panel shows the identical subject: the same individual object, character or "
        "person, with the same shape, colours, markings and details, not merely the same kind of thing. "
        "Different poses, viewpoints, lighting and backgrounds are fine.\n"
        "Write your reasoning, then end with a JSON object in a ```json code block:\n"
        f'{{"subject": "<subject>", "panels": [<exactly {layout.panels} descriptions in reading order>], '
        '"identical": true or false, "reason": "<one sentence>"}'
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


def parse_verdict(reply: dict, layout: GridLayout) -> Verdict:
    subject, panels, identical = reply.get("subject"), reply.get("panels"), reply.get("identical")
    if not isinstance(subject, str) or not subject.strip():
        raise MalformedReply(f'"subject" must be a non-empty string, got {subject!r}')
    if not isinstance(panels, list) or len(panels) != layout.panels:
        raise MalformedReply(f'"panels" must list exactly {layout.panels} descriptions, got {panels!r}')
    if not all(isinstance(p, str) and p.strip() for p in panels):
        raise MalformedReply(f'every entry of "panels" must be a non-empty string, got {panels!r}')
    if isinstance(identical, str) and identical.strip().lower() in _YES + _NO:
        identical = identical.strip().lower() in _YES
    if not isinstance(identical, bool):
        raise MalformedReply(f'"identical" must be true or false, got {identical!r}')
    return Verdict(subject.strip(), [p.strip() for p in panels], identical, str(reply.get("reason", "")).strip())


def curate_grids(settings: DataSettings) -> StageReport:
    """Judge every rendered grid into `curation.jsonl`: status `accepted`, `rejected` or `failed`."""
    grids = Manifest(settings.work_dir / GRIDS_FILE).records()
    if not grids:
        raise InputError("work_dir", f"{str(settings.work_dir)!r} has no rendered grids; run `dsd data grids` first")
    manifest = Manifest(settings.work_dir / CURATION_FILE)
    done = manifest.records()
    todo = [grid for grid in grids.values() if grid["id"] not in done]
    client = ChatClient(settings.endpoint("vlm"), settings) if todo else None

    def work(grid: dict) -> Verdict:
        layout = parse_layout(grid["layout"])
        messages = judge_messages((settings.work_dir / grid["path"]).read_bytes(), layout)
        return client.ask_json(messages, lambda r: parse_verdict(r, layout), settings.max_reply_attempts)

    failed = 0
    with client or contextlib.nullcontext(), tqdm(total=len(todo), desc="curate", unit="grid") as bar:
        for grid, future in map_unordered(work, todo, settings.concurrency):
            try:
                verdict = future.result()
                status = "accepted" if verdict.identical else "rejected"
                record = {"id": grid["id"], "status": status, **asdict(verdict)}
            except (MalformedReply, ChatRejected) as exc:
                logger.warning("grid %s failed: %s", grid["id"], exc)
                record = {"id": grid["id"], "status": "failed", "error": str(exc)}
                failed += 1
            manifest.append(record)
            bar.update()
    return StageReport("curate", len(todo), len(grids) - len(todo), failed)
