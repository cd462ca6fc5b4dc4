"""`dsd eval report RUN_DIR...`: tables, comparisons and pictures from one or more evaluation runs.

    out/
        report.md                contenders x metrics (mean, 95% bootstrap interval, n), the same without
                                 copy-paste-flagged images, per category, failures, and paired comparisons
        report.json              the same numbers for machines
        contact_sheets/<subject>.png   the reference, then a row of images per contender
        cp_pf.png                CP against PF, one point per contender (when the judge scored)

Comparisons pair each contender with the first one over the same (subject, prompt index, seed) and test each metric
(`stats.paired_comparison`). Contender names that occur in several runs are prefixed with the run directory's name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..data.manifest import save_png, write_atomic, write_json
from ..images import center_crop_resize, decode_image
from .embeddings import COPY_PASTE
from .judge_prompts import describe
from .run import read_run
from .stats import Estimate, bootstrap_mean, bootstrap_product, paired_comparison

CP_PF = "cp·pf"
METRIC_ORDER = ("cp", "pf", CP_PF, "face_id", "dino", "clip_i", "clip_t")
THUMBNAIL = 128
LABEL_HEIGHT = 16


@dataclass
class Item:
    """One generated image with its scores."""

    contender: str
    subject: str
    category: str
    index: int
    seed: int
    path: Path
    scores: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    no_face: set[str] = field(default_factory=set)
    """Metrics not scored because the reference or the image shows no face."""
    prompts: dict[str, str] = field(default_factory=dict)
    """The judge prompt set of each judge metric (`judge_prompts.PromptSet.description`)."""

    @property
    def key(self) -> tuple[str, int, int]:
        return self.subject, self.index, self.seed

    @property
    def flagged(self) -> bool:
        return self.scores.get(COPY_PASTE, 0.0) >= 0.5


def load_items(run_dirs: list[Path]) -> tuple[list[Item], dict[str, Path], list[str]]:
    """Every scored image of the runs, each subject's reference image, and the contenders in order."""
    runs = [(Path(d), *read_run(Path(d))) for d in run_dirs]
    seen = defaultdict(int)
    for _, run, _, _ in runs:
        for name in run["contenders"]:
            seen[name] += 1
    items, references, contenders = [], {}, []
    for run_dir, run, generations, scores in runs:
        subjects = {s["name"]: s for s in run["benchmark"]["subjects"]}
        references.update({name: Path(s["image"]) for name, s in subjects.items()})
        names = {name: f"{run_dir.name}:{name}" if seen[name] > 1 else name for name in run["contenders"]}
        contenders += [names[name] for name in run["contenders"]]
        by_id = {}
        for g in generations.values():
            by_id[g["id"]] = Item(names[g["contender"]], g["subject"], subjects[g["subject"]]["category"], g["index"],
                                  g["seed"], run_dir / g["path"])
        for record in scores.values():
            item = by_id.get(record["generation"])
            if item is None:
                continue
            if "prompts" in record:
                item.prompts[record["metric"]] = describe(record)
            if record["status"] == "ok":
                item.scores[record["metric"]] = record["value"]
            elif record["status"] == "no_face":
                item.no_face.add(record["metric"])
            else:
                item.failures[record["metric"]] = record["reason"]
        items += by_id.values()
    return items, references, list(dict.fromkeys(contenders))


def metric_values(items: list[Item], metric: str) -> list[float] | tuple[list[float], list[float]]:
    if metric == CP_PF:
        both = [i for i in items if "cp" in i.scores and "pf" in i.scores]
        return [i.scores["cp"] for i in both], [i.scores["pf"] for i in both]
    return [i.scores[metric] for i in items if metric in i.scores]


def estimate(items: list[Item], metric: str, confidence: float) -> Estimate:
    values = metric_values(items, metric)
    if metric == CP_PF:
        return bootstrap_product(*values, confidence=confidence)
    return bootstrap_mean(values, confidence=confidence)


def build_report(run_dirs: list[Path], out_dir: Path, confidence: float = 0.95) -> dict:
    """Write report.md, report.json, contact sheets and the CP/PF plot; return the report's JSON."""
    items, references, contenders = load_items(run_dirs)
    metrics = [m for m in METRIC_ORDER if any(m in i.scores for i in items)
               or (m == CP_PF and any("cp" in i.scores and "pf" in i.scores for i in items))]
    by_contender = {c: [i for i in items if i.contender == c] for c in contenders}
    categories = sorted({i.category for i in items})

    def table(selected: dict[str, list[Item]]) -> dict:
        return {c: {m: asdict(estimate(rows, m, confidence)) for m in metrics} for c, rows in selected.items()}

    report = {
        "runs": [str(d) for d in run_dirs],
        "confidence": confidence,
        "metrics": metrics,
        "contenders": contenders,
        "all": table(by_contender),
        "unflagged": table({c: [i for i in rows if not i.flagged] for c, rows in by_contender.items()}),
        "flagged": {c: sum(i.flagged for i in rows) for c, rows in by_contender.items()},
        "images": {c: len(rows) for c, rows in by_contender.items()},
        "failures": {c: _failures(rows) for c, rows in by_contender.items()},
        "no_face": {c: sum("face_id" in i.no_face for i in rows) for c, rows in by_contender.items()},
        "judge_prompts": {c: {m: sorted({i.prompts[m] for i in rows if m in i.prompts}) for m in ("cp", "pf")
                              if any(m in i.prompts for i in rows)} for c, rows in by_contender.items()},
        "categories": {cat: table({c: [i for i in rows if i.category == cat] for c, rows in by_contender.items()})
                       for cat in categories},
        "comparisons": _comparisons(by_contender, contenders, metrics, confidence),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    write_atomic(out_dir / "report.md", _markdown(report).encode("utf-8"))
    for subject in sorted({i.subject for i in items}):
        save_png(contact_sheet(references[subject], [i for i in items if i.subject == subject], contenders),
                 out_dir / "contact_sheets" / f"{subject}.png")
    if "cp" in metrics and "pf" in metrics:
        _scatter(report, out_dir / "cp_pf.png")
    return report


def _failures(rows: list[Item]) -> dict[str, int]:
    counts = defaultdict(int)
    for item in rows:
        for metric in item.failures:
            counts[metric] += 1
    return dict(counts)


def _comparisons(by_contender, contenders, metrics, confidence) -> list[dict]:
    if len(contenders) < 2:
        return []
    baseline = {i.key: i for i in by_contender[contenders[0]]}
    results = []
    for other in contenders[1:]:
        for metric in metrics:
            pairs = [(baseline[i.key], i) for i in by_contender[other] if i.key in baseline
                     and _item_value(baseline[i.key], metric) is not None and _item_value(i, metric) is not None]
            test = paired_comparison([_item_value(a, metric) for a, _ in pairs],
                                     [_item_value(b, metric) for _, b in pairs], confidence)
            results.append({"baseline": contenders[0], "contender": other, "metric": metric, **asdict(test),
                            "verdict": _verdict(contenders[0], other, metric, test, 1 - confidence)})
    return results


def _item_value(item: Item, metric: str) -> float | None:
    if metric == CP_PF:
        return item.scores["cp"] * item.scores["pf"] if "cp" in item.scores and "pf" in item.scores else None
    return item.scores.get(metric)


def _verdict(baseline: str, other: str, metric: str, test, alpha: float) -> str:
    if test.n == 0:
        return f"{metric}: no paired images of {other} and {baseline}"
    detail = (f"Δ {test.difference:+.4f} [{test.low:+.4f}, {test.high:+.4f}], p = {test.p_value:.3g}, "
              f"n = {test.n}")
    if test.p_value < alpha:
        better, worse = (other, baseline) if test.difference > 0 else (baseline, other)
        return f"{metric}: {better} scores higher than {worse} ({detail})"
    return f"{metric}: no significant difference between {other} and {baseline} ({detail})"


def _markdown(report: dict) -> str:
    level = f"{report['confidence']:.0%}"
    lines = ["# Evaluation report", "", f"Runs: {', '.join(report['runs'])}", "",
             f"Each cell: mean [{level} bootstrap interval] (n). Scores are in [0, 1]; CP and PF are the judge's "
             "0-4 scores / 4; CP·PF is the product of the means.", "", "## All images", ""]
    lines += _table(report["all"], report["metrics"])
    if any(report["no_face"].values()):
        counts = ", ".join(f"{c}: {n} of {report['images'][c]}" for c, n in report["no_face"].items())
        lines += ["", f"face_id: no face in the reference or the image (not scored, not counted as 0): {counts}."]
    sets = [f"- {c} {m}: {'; '.join(names)}" for c, metrics in report["judge_prompts"].items()
            for m, names in metrics.items()]
    if sets:
        lines += ["", "## Judge prompts", "", "Which instructions produced each judge score:", ""] + sets
    flagged = ", ".join(f"{c}: {n} of {report['images'][c]}" for c, n in report["flagged"].items())
    lines += ["", "## Without copy-paste-flagged images", "", f"Flagged as copies of the reference: {flagged}.", ""]
    lines += _table(report["unflagged"], report["metrics"])
    for category, table in report["categories"].items():
        lines += ["", f"## Category `{category}`", ""] + _table(table, report["metrics"])
    failures = [f"{c}: " + ", ".join(f"{m} {n}" for m, n in counts.items())
                for c, counts in report["failures"].items() if counts]
    lines += ["", "## Failed scores", "", "; ".join(failures) if failures else "None."]
    if report["comparisons"]:
        lines += ["", f"## Paired comparisons (against {report['contenders'][0]})", ""]
        lines += [f"- {c['verdict']}" for c in report["comparisons"]]
    return "\n".join(lines) + "\n"


def _table(table: dict, metrics: list[str]) -> list[str]:
    lines = ["| contender | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for contender, cells in table.items():
        lines.append(f"| {contender} | " + " | ".join(_cell(cells[m]) for m in metrics) + " |")
    return lines


def _cell(e: dict) -> str:
    if not e["n"] or math.isnan(e["mean"]):
        return "–"
    return f"{e['mean']:.3f} [{e['low']:.3f}, {e['high']:.3f}] ({e['n']})"


def contact_sheet(reference: Path, items: list[Item], contenders: list[str]) -> Image.Image:
    """The reference in the first column; each contender's images of the subject in its own row (prompt index,
    then seed order), with the contender's name above its row."""
    rows = [(c, sorted((i for i in items if i.contender == c), key=lambda i: (i.index, i.seed))) for c in contenders]
    rows = [(c, images) for c, images in rows if images]
    columns = 1 + max((len(images) for _, images in rows), default=0)
    row_height = THUMBNAIL + LABEL_HEIGHT
    sheet = Image.new("RGB", (columns * THUMBNAIL, max(1, len(rows)) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    sheet.paste(center_crop_resize(decode_image(reference, "reference"), THUMBNAIL), (0, LABEL_HEIGHT))
    draw.text((2, 2), "reference", fill="black")
    for r, (contender, images) in enumerate(rows):
        top = r * row_height
        draw.text((THUMBNAIL + 2, top + 2), contender, fill="black")
        for c, item in enumerate(images, start=1):
            with Image.open(item.path) as image:
                thumb = image.convert("RGB").resize((THUMBNAIL, THUMBNAIL), Image.BICUBIC)
            sheet.paste(thumb, (c * THUMBNAIL, top + LABEL_HEIGHT))
            if item.flagged:
                draw.rectangle((c * THUMBNAIL, top + LABEL_HEIGHT, (c + 1) * THUMBNAIL - 1, top + row_height - 1),
                               outline="red", width=3)
    return sheet


def _scatter(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    for contender, cells in report["all"].items():
        cp, pf = cells["cp"], cells["pf"]
        if cp["n"] and pf["n"]:
            axes.errorbar(cp["mean"], pf["mean"], xerr=[[cp["mean"] - cp["low"]], [cp["high"] - cp["mean"]]],
                          yerr=[[pf["mean"] - pf["low"]], [pf["high"] - pf["mean"]]], fmt="o", capsize=3,
                          label=contender)
    axes.set_xlabel("CP (concept preservation)")
    axes.set_ylabel("PF (prompt following)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)

