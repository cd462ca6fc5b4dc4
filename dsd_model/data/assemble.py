"""Stage 4, `pairs`: accepted grids → the paired dataset, plus a summary and a contact sheet for a person to check.

Every ordered pair of distinct panels that curation kept (both panels consistent) is one (reference, target,
caption) pair; the caption is the judge's description of the target panel.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

from ..errors import InputError
from .curate import CURATION_FILE
from .grids import GRIDS_FILE
from .layout import parse_layout, split_grid
from .manifest import Manifest, save_png, write_json
from .pairs import Pair, write_pairs
from .prompts import PROMPTS_FILE
from .settings import DataSettings

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
SUMMARY_FILE = "summary.json"
CONTACT_SHEET_FILE = "contact_sheet.png"
_SECTIONS = (("accepted", (30, 150, 60)), ("rejected", (200, 40, 40)))
_DRIFTED = (255, 140, 0)
_THUMB, _COLUMNS, _PAD, _LABEL, _HEADER = 160, 6, 8, 14, 22


def build_pairs(settings: DataSettings) -> dict:
    """Cut accepted grids into panels, write the dataset, `summary.json` and `contact_sheet.png`; return the summary."""
    work_dir, dataset_dir = settings.work_dir, settings.resolved_dataset_dir
    grids = Manifest(work_dir / GRIDS_FILE).records()
    verdicts = Manifest(work_dir / CURATION_FILE).records()
    if not verdicts:
        raise InputError("work_dir", f"{str(work_dir)!r} has no curated grids; run `dsd data curate` first")
    accepted = [verdict for verdict in verdicts.values() if verdict["status"] == "accepted"]
    if not accepted:
        logger.warning("no grid was accepted: the dataset in %s is empty", dataset_dir)

    pairs = []
    for verdict in tqdm(accepted, desc="pairs", unit="grid"):
        grid = grids[verdict["id"]]
        layout = parse_layout(grid["layout"])
        names = [f"{IMAGES_DIR}/{grid['id']}_p{i}.png" for i in range(layout.panels)]
        if not all((dataset_dir / name).is_file() for name in names):
            with Image.open(work_dir / grid["path"]) as image:
                panels = split_grid(image.convert("RGB"), layout)
            for name, panel in zip(names, panels, strict=True):
                save_png(panel, dataset_dir / name)
        for pair in verdict["pairs"]:
            if not pair["kept"]:
                continue
            i, j = pair["reference"], pair["target"]
            pairs.append(
                Pair(
                    id=f"{grid['id']}-p{i}-p{j}",
                    reference=names[i],
                    target=names[j],
                    caption=verdict["panels"][j]["description"],
                    subject=verdict["subject"],
                    grid=grid["id"],
                )
            )
    write_pairs(dataset_dir, pairs)
    save_png(contact_sheet(settings, grids, verdicts), work_dir / CONTACT_SHEET_FILE)

    prompt_status = Counter(record["status"] for record in Manifest(work_dir / PROMPTS_FILE).records().values())
    verdict_status = Counter(verdict["status"] for verdict in verdicts.values())
    judged = verdict_status["accepted"] + verdict_status["rejected"]
    summary = {
        "prompts": {status: prompt_status[status] for status in ("ok", "filtered", "failed")},
        "grids": {"rendered": len(grids)},
        "curation": {status: verdict_status[status] for status in ("accepted", "rejected", "failed")},
        "acceptance_rate": round(verdict_status["accepted"] / judged, 4) if judged else None,
        "judge_calls_saved_by_prefilter": sum(v.get("judge", "").startswith("prefilter:") for v in verdicts.values()),
        "per_panel": curation_counts(verdicts.values()),
        "pairs": len(pairs),
        "dataset_dir": str(dataset_dir),
        "contact_sheet": str(work_dir / CONTACT_SHEET_FILE),
    }
    write_json(work_dir / SUMMARY_FILE, summary)
    return summary


def curation_counts(verdicts) -> dict:
    """Kept and dropped grids, panels and pairs of the judged grids under per-panel curation, and what one verdict
    for the whole grid (kept only when every panel is consistent, then all its pairs) would have kept."""
    judged = [verdict for verdict in verdicts if verdict["status"] != "failed"]
    panels = [panel["consistent"] for verdict in judged for panel in verdict["panels"]]
    pairs = [pair["kept"] for verdict in judged for pair in verdict["pairs"]]
    whole = [verdict for verdict in judged if all(panel["consistent"] for panel in verdict["panels"])]
    whole_pairs = sum(len(verdict["pairs"]) for verdict in whole)
    return {
        "grids": {"kept": sum(v["status"] == "accepted" for v in judged),
                  "dropped": sum(v["status"] == "rejected" for v in judged)},
        "panels": {"kept": sum(panels), "dropped": len(panels) - sum(panels)},
        "pairs": {"kept": sum(pairs), "dropped": len(pairs) - sum(pairs)},
        "per_grid_verdict": {
            "grids": {"kept": len(whole), "dropped": len(judged) - len(whole)},
            "pairs": {"kept": whole_pairs, "dropped": len(pairs) - whole_pairs},
        },
    }


def contact_sheet(settings: DataSettings, grids: dict, verdicts: dict) -> Image.Image:
    """Thumbnails of accepted (green) and rejected (red) grids, up to `contact_sheet_limit` each, labelled by id;
    panels judged inconsistent are crossed out in orange."""
    cell_width, cell_height = _THUMB + 2 * _PAD, _THUMB + _LABEL + 2 * _PAD
    sections = []
    for status, colour in _SECTIONS:
        chosen = [verdict for verdict in verdicts.values() if verdict["status"] == status]
        shown = chosen[: settings.contact_sheet_limit]
        sections.append((f"{status}: {len(chosen)} (showing {len(shown)})", colour, shown))
    height = sum(_HEADER + max(1, math.ceil(len(shown) / _COLUMNS)) * cell_height for _, _, shown in sections)
    sheet = Image.new("RGB", (_COLUMNS * cell_width, height), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for title, colour, shown in sections:
        draw.text((_PAD, top + 5), title, fill=colour)
        top += _HEADER
        for index, verdict in enumerate(shown):
            x = (index % _COLUMNS) * cell_width + _PAD
            y = top + (index // _COLUMNS) * cell_height + _PAD
            grid = grids[verdict["id"]]
            with Image.open(settings.work_dir / grid["path"]) as image:
                thumb = ImageOps.contain(image.convert("RGB"), (_THUMB, _THUMB))
            draw.rectangle((x - 3, y - 3, x + thumb.width + 2, y + thumb.height + 2), outline=colour, width=3)
            sheet.paste(thumb, (x, y))
            layout = parse_layout(grid["layout"])
            width, height = thumb.width // layout.columns, thumb.height // layout.rows
            for panel in verdict["panels"]:
                if not panel["consistent"]:
                    left = x + panel["index"] % layout.columns * width
                    upper = y + panel["index"] // layout.columns * height
                    draw.line((left, upper, left + width - 1, upper + height - 1), fill=_DRIFTED, width=2)
                    draw.line((left, upper + height - 1, left + width - 1, upper), fill=_DRIFTED, width=2)
            draw.text((x, y + _THUMB + 2), verdict["id"], fill="black")
        top += max(1, math.ceil(len(shown) / _COLUMNS)) * cell_height
    return sheet
