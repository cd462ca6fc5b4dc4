"""Stage 1, `prompts`: captions → grid prompts asking the teacher for the same subject in every panel.

The LLM backend asks a chat model for the caption's subject and one scene per panel (optionally after asking
whether the caption has a clear subject at all); the template backend does the same offline and deterministically.
Both compose the final prompt with `grid_prompt`, so every grid prompt has the same structure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import InputError
from .chat import ChatClient, ChatRejected, MalformedReply, map_unordered
from .layout import GridLayout
from .manifest import Manifest, StageReport
from .settings import DataSettings

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.jsonl"

TEMPLATE_SCENES = (
    "in a bright photo studio against a plain backdrop",
    "outdoors in a sunny park",
    "on a wooden kitchen table",
    "on a city street at night under neon lights",
    "on a sandy beach at sunset",
    "in a snowy forest",
    "on a bookshelf in a cosy living room",
    "seen from the side in soft window light",
    "seen from above on a picnic blanket",
    "in close-up, filling the frame",
    "on a rock beside a mountain lake",
    "on a rainy street, reflected in a puddle",
)
"""Scenes the template backend places the subject in, a different one per panel."""

SYSTEM_PROMPT = (
    "You write prompts for a text-to-image model that draws one picture divided into a grid of panels, "
    "each panel showing the same subject in a different scene."
)


@dataclass(frozen=True)
class Caption:
    id: str
    text: str


def caption_id(text: str) -> str:
    """A stable id from the caption text, so reruns on an edited caption file keep earlier work."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def read_captions(path: str | Path, field: str = "caption", limit: int | None = None) -> list[Caption]:
    """Captions from a .txt file (one per line) or a .jsonl file (objects with a `field` string); duplicates once."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise InputError("limit", f"must be at least 1, got {limit}")
    if not path.is_file():
        raise InputError("captions", f"file {str(path)!r} does not exist")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise InputError(
            "captions",
            f"{str(path)!r}: expected .txt (one caption per line) or .jsonl (objects with a {field!r} field)",
        )
    captions: dict[str, Caption] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        text = line.strip() if path.suffix.lower() == ".txt" else _jsonl_caption(line, field, f"{path}:{number}")
        captions.setdefault(caption_id(text), Caption(caption_id(text), text))
    if not captions:
        raise InputError("captions", f"{str(path)!r} holds no captions")
    return list(captions.values())[:limit]


def _jsonl_caption(line: str, field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError("captions", f"{where}: not valid JSON ({exc.msg})") from exc
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise InputError("captions", f"{where}: no non-empty string field {field!r}")
    return text.strip()


def grid_prompt(subject: str, panels: list[str], layout: GridLayout) -> str:
    """The teacher's prompt: `A grid of 4 images (2 columns, 2 rows) showing the same <subject> in every panel.
    Top left: <panel 1>. Top right: ...`."""
    lines = [f"A grid of {layout.panels} images ({layout.describe()}) showing the same {subject} in every panel."]
    lines += [
        f"{name.capitalize()}: {text.strip().rstrip('.')}."
        for name, text in zip(layout.panel_names(), panels, strict=True)
    ]
    return " ".join(lines)


def template_content(caption: str, layout: GridLayout) -> tuple[str, list[str]]:
    """Subject and panel scenes without an LLM: the caption is the subject, scenes are drawn by the caption's hash."""
    if layout.panels > len(TEMPLATE_SCENES):
        raise InputError(
            "layout", f"{layout} has {layout.panels} panels; the template backend has {len(TEMPLATE_SCENES)} scenes"
        )
    subject = re.sub(r"^(a|an|the)\s+", "", caption.strip().rstrip(".!"), flags=re.IGNORECASE)
    rng = random.Random(int(caption_id(caption), 16))
    return subject, [f"the {subject} {scene}" for scene in rng.sample(TEMPLATE_SCENES, layout.panels)]


def filter_messages(caption: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": "Does this image caption describe one clear, concrete main subject - a specific object, "
            "character, animal or person - that could be shown again in other pictures? Scenery, text, patterns, "
            "crowds and abstract ideas have no clear subject.\n"
            f"Caption: {json.dumps(caption, ensure_ascii=False)}\n"
            'Reply with only a JSON object: {"clear_subject": true or false, "subject": "<the subject, or empty>", '
            '"reason": "<one sentence>"}',
        },
    ]


def content_messages(caption: str, layout: GridLayout) -> list[dict]:
    names = ", ".join(layout.panel_names())
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {
            "role": "user",
            "content": f"Plan a grid of {layout.panels} images ({layout.describe()}) that all "
            "show the main subject of this caption, identical in every panel.\n"
            f"Caption: {json.dumps(caption, ensure_ascii=False)}\n"
            "Name the subject with the details that make it recognisable (colours, materials, markings), then give "
            f"each panel, in the order {names}, a different scene, pose, viewpoint or activity of that same subject.\n"
            'Reply with only a JSON object: {"subject": "<noun phrase>", "panels": '
            f"[<exactly {layout.panels} strings, one per panel>]}}",
        },
    ]


def parse_filter(reply: dict) -> tuple[bool, str]:
    keep = reply.get("clear_subject")
    if not isinstance(keep, bool):
        raise MalformedReply(f'"clear_subject" must be true or false, got {keep!r}')
    return keep, str(reply.get("reason", ""))


def parse_content(reply: dict, layout: GridLayout) -> tuple[str, list[str]]:
    subject, panels = reply.get("subject"), reply.get("panels")
    if not isinstance(subject, str) or not subject.strip():
        raise MalformedReply(f'"subject" must be a non-empty string, got {subject!r}')
    if not isinstance(panels, list) or len(panels) != layout.panels:
        raise MalformedReply(f'"panels" must be a list of exactly {layout.panels} strings, got {panels!r}')
    if not all(isinstance(p, str) and p.strip() for p in panels):
        raise MalformedReply(f'every entry of "panels" must be a non-empty string, got {panels!r}')
    return subject.strip(), [p.strip() for p in panels]


def check_layout(records, layout: GridLayout, path: Path) -> None:
    """Refuse to mix layouts in one work directory."""
    for record in records:
        if record.get("layout", str(layout)) != str(layout):
            raise InputError(
                "layout",
                f"{str(path)!r} was made for layout {record['layout']}, not {layout}; "
                "use that layout or another work_dir",
            )


def make_prompts(
    settings: DataSettings, captions: str | Path, caption_field: str = "caption", limit: int | None = None
) -> StageReport:
    """Write `prompts.jsonl` in the work directory: one record per caption, status `ok`, `filtered` or `failed`."""
    layout = settings.grid_layout
    backend = settings.resolved_prompt_backend
    if settings.caption_filter and backend != "llm":
        raise InputError("caption_filter", "needs the llm prompt backend (set llm_base_url)")
    items = read_captions(captions, caption_field, limit)
    manifest = Manifest(settings.work_dir / PROMPTS_FILE)
    done = manifest.records()
    check_layout(done.values(), layout, manifest.path)
    todo = [caption for caption in items if done.get(caption.id, {}).get("status", "failed") == "failed"]
    client = ChatClient(settings.endpoint("llm"), settings) if backend == "llm" and todo else None

    def work(caption: Caption) -> dict:
        record = {"id": caption.id, "caption": caption.text}
        if settings.caption_filter:
            keep, reason = client.ask_json(
                filter_messages(caption.text), parse_filter, settings.max_reply_attempts, fresh=caption.id in done
            )
            if not keep:
                return {**record, "status": "filtered", "reason": reason}
        if client is None:
            subject, panels = template_content(caption.text, layout)
        else:
            subject, panels = client.ask_json(
                content_messages(caption.text, layout),
                lambda r: parse_content(r, layout),
                settings.max_reply_attempts,
                fresh=caption.id in done,
            )
        return {
            **record,
            "status": "ok",
            "backend": backend,
            "layout": str(layout),
            "subject": subject,
            "panels": panels,
            "prompt": grid_prompt(subject, panels, layout),
        }

    failed = 0
    with client or contextlib.nullcontext(), tqdm(total=len(todo), desc=f"prompts ({backend})", unit="caption") as bar:
        for caption, future in map_unordered(work, todo, settings.concurrency if client else 1):
            try:
                record = future.result()
            except (MalformedReply, ChatRejected) as exc:
                logger.warning("caption %s failed: %s", caption.id, exc)
                record = {"id": caption.id, "caption": caption.text, "status": "failed", "error": str(exc)}
                failed += 1
            manifest.append(record)
            bar.update()
    return StageReport("prompts", len(todo), len(items) - len(todo), failed)
