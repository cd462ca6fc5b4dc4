"""The paired dataset: what curation writes and training reads.

A dataset is a directory holding `pairs.jsonl` (one JSON object per line) and the images it names, with paths
relative to the directory:

    {"id": "g000012-p0-p2", "reference": "images/g000012_p0.png", "target": "images/g000012_p2.png",
     "caption": "the same plush fox sitting on a wooden bench", "subject": "plush fox", "grid": "g000012"}

`reference` and `target` are 8-bit RGB PNG panels cut from one accepted grid (or, for structure pairs, two
renderings from one control map); `caption` describes the target. Structure pairs also name the `control` map
(depth or edges) both images were rendered from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

PAIRS_FILE = "pairs.jsonl"
REQUIRED_FIELDS = ("id", "reference", "target", "caption")


@dataclass(frozen=True)
class Pair:
    id: str
    reference: str
    target: str
    caption: str
    subject: str = ""
    grid: str = ""
    control: str = ""


def write_pairs(directory: str | Path, pairs: list[Pair]) -> Path:
    """Write `pairs.jsonl` in `directory` (the image files must already be there)."""
    path = Path(directory) / PAIRS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a line that is not JSON is an error naming file and line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc


def read_pairs(directory: str | Path) -> list[Pair]:
    """Read and check a dataset directory; errors name the file, the line and the problem."""
    directory = Path(directory)
    path = directory / PAIRS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(directory)!r} has no {PAIRS_FILE}")
    pairs = []
    for number, record in read_jsonl(path):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(record.get(f), str)]
        if missing:
            raise ValueError(f"{path}:{number}: missing or non-string fields {missing}")
        for field in ("reference", "target"):
            if not (directory / record[field]).is_file():
                raise ValueError(f"{path}:{number}: {field} image {record[field]!r} does not exist")
        pairs.append(Pair(**{k: record.get(k, "") for k in Pair.__dataclass_fields__}))
    if not pairs:
        raise ValueError(f"dataset {str(directory)!r} is empty: {PAIRS_FILE} has no pairs")
    return pairs


def load_hf_dataset(directory: str | Path):
    """The dataset as a Hugging Face `datasets.Dataset` with decoded `reference` / `target` image columns."""
    import datasets

    directory = Path(directory).resolve()
    records = [asdict(p) for p in read_pairs(directory)]
    for record in records:
        record["reference"] = str(directory / record["reference"])
        record["target"] = str(directory / record["target"])
    dataset = datasets.Dataset.from_list(records)
    return dataset.cast_column("reference", datasets.Image()).cast_column("target", datasets.Image())
