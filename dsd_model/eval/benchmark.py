"""Benchmarks: subjects (one reference image each, with a category) and the prompts to generate them in.

Three layouts are read; `read_benchmark(path)` tells them apart:

- **JSONL**: a `.jsonl` file of `{"subject", "image", "prompt"}` records, optional `"category"` (default
  `"subject"`); `image` is relative to the file. One record per (subject, prompt); a subject's records name one
  image.
- **DreamBench** (google/dreambooth): `dataset/<subject>/*.jpg` and `dataset/prompts_and_classes.txt`, which lists
  `subject_name,class` lines after `Classes` and two `prompt_list`s of `'a {0} {1} ...'.format(unique_token,
  class_token)` lines after `Object Prompts` and `Live Subject Prompts`. Subjects of class `cat` or `dog` are the
  live ones (category `live`), the rest `object`. The reference is the subject's first image in name order; a
  zero-shot model has no unique token, so `{0} {1}` becomes the class ("a backpack in the jungle").
- **DreamBench++**: `images/<category>/<index>.jpg` and `captions/<category>/<index>.txt`, whose first line names
  the subject and whose other lines are its prompts; categories `animal`, `human`, `object`, `style`.

The path may be the benchmark's root or, for DreamBench, the repository holding `dataset/`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..data.pairs import read_jsonl
from ..errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DREAMBENCH_LIVE_CLASSES = ("cat", "dog")
_DREAMBENCH_PROMPT = re.compile(r"^'(?P<template>.*)'\.format\(unique_token, class_token\),?$")


@dataclass(frozen=True)
class Subject:
    name: str
    category: str
    image: Path


@dataclass(frozen=True)
class Case:
    """One (subject, prompt): `index` numbers the subject's prompts from 0."""

    subject: str
    index: int
    prompt: str

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.index}"


@dataclass(frozen=True)
class Benchmark:
    subjects: dict[str, Subject]
    cases: list[Case]
    root: Path | None = field(default=None, compare=False)
    """The benchmark's folder (a JSONL file's folder), where DreamBench++ prompt files are looked for."""

    def category(self, case: Case) -> str:
        return self.subjects[case.subject].category

    def to_json(self) -> dict:
        return {
            "subjects": [{"name": s.name, "category": s.category, "image": str(s.image.resolve())} for s in self.subjects.values()],
            "cases": [{"subject": c.subject, "index": c.index, "prompt": c.prompt} for c in self.cases],
        }

    @classmethod
    def from_json(cls, value: dict) -> Benchmark:
        subjects = {s["name"]: Subject(s["name"], s["category"], Path(s["image"])) for s in value["subjects"]}
        return cls(subjects, [Case(**c) for c in value["cases"]])


def read_benchmark(
    path: str | Path, layout: Literal["auto", "jsonl", "dreambench", "dreambench_plus"] = "auto"
) -> Benchmark:
    path = Path(path)
    if not path.exists():
        raise InputError("benchmark", f"{str(path)!r} does not exist")
    if layout == "auto":
        layout = _detect(path)
    benchmark = {"jsonl": _read_jsonl, "dreambench": _read_dreambench, "dreambench_plus": _read_dreambench_plus}[
        layout
    ](path)
    if not benchmark.cases:
        raise InputError("benchmark", f"{str(path)!r} ({layout}) has no prompts")
    return replace(benchmark, root=path if path.is_dir() else path.parent)


def _detect(path: Path) -> str:
    if path.is_file() and path.suffix == ".jsonl":
        return "jsonl"
    if (path / "prompts_and_classes.txt").is_file() or (path / "dataset" / "prompts_and_classes.txt").is_file():
        return "dreambench"
    if (path / "images").is_dir() and (path / "captions").is_dir():
        return "dreambench_plus"
    raise InputError(
        "benchmark",
        f"{str(path)!r} is none of the known layouts: a .jsonl file, DreamBench (prompts_and_classes.txt beside the "
        "subject folders) or DreamBench++ (images/ and captions/ folders)",
    )


def _read_jsonl(path: Path) -> Benchmark:
    subjects: dict[str, Subject] = {}
    cases: list[Case] = []
    counts: Counter[str] = Counter()
    for line, record in read_jsonl(path):
        where = f"{path}:{line}"
        for key in ("subject", "image", "prompt"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise InputError("benchmark", f"{where}: {key!r} must be a non-empty string")
        subject = Subject(record["subject"], str(record.get("category", "subject")), path.parent / record["image"])
        known = subjects.setdefault(subject.name, subject)
        if known != subject:
            raise InputError("benchmark", f"{where}: subject {subject.name!r} was given another image or category "
                             f"before ({known.image}, {known.category})")
        cases.append(Case(subject.name, counts[subject.name], record["prompt"].strip()))
        counts[subject.name] += 1
    return Benchmark(_checked_images(subjects), cases)


def _read_dreambench(path: Path) -> Benchmark:
    root = path / "dataset" if (path / "dataset" / "prompts_and_classes.txt").is_file() else path
    lines = [line.strip() for line in (root / "prompts_and_classes.txt").read_text(encoding="utf-8").splitlines()]
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in lines:
        if line in ("Classes", "Object Prompts", "Live Subject Prompts"):
            section = {"Classes": "classes", "Object Prompts": "object", "Live Subject Prompts": "live"}[line]
        elif section == "classes" and "," in line and line != "subject_name,class":
            name, class_name = line.split(",", 1)
            classes[name.strip()] = class_name.strip()
        elif section in prompts and (match := _DREAMBENCH_PROMPT.match(line)):
            prompts[section].append(match["template"])
    if not classes or not prompts["object"] or not prompts["live"]:
        raise InputError("benchmark", f"{root / 'prompts_and_classes.txt'}: expected a Classes list and both the "
                         "Object and Live Subject prompt lists")
    subjects, cases = {}, []
    for name, class_name in classes.items():
        category = "live" if class_name in DREAMBENCH_LIVE_CLASSES else "object"
        images = sorted(p for p in (root / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError("benchmark", f"subject {name!r} has no images in {root / name}")
        subjects[name] = Subject(name, category, images[0])
        for index, template in enumerate(prompts[category]):
            prompt = template.replace("{0} {1}", class_name).replace("{0}", "").replace("{1}", class_name)
            cases.append(Case(name, index, " ".join(prompt.split())))
    return Benchmark(subjects, cases)


def _read_dreambench_plus(path: Path) -> Benchmark:
    subjects, cases = {}, []
    for caption_file in sorted((path / "captions").glob("*/*.txt")):
        category, index = caption_file.parent.name, caption_file.stem
        lines = [line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) < 2:
            raise InputError("benchmark", f"{caption_file}: expected the subject on the first line and prompts after")
        images = [path / "images" / category / f"{index}{suffix}" for suffix in IMAGE_SUFFIXES]
        image = next((p for p in images if p.is_file()), images[0])
        name = f"{category}_{index}_{lines[0].lower().replace(' ', '_')}"
        subjects[name] = Subject(name, category, image)
        cases += [Case(name, i, prompt) for i, prompt in enumerate(lines[1:])]
    return Benchmark(_checked_images(subjects), cases)


def _checked_images(subjects: dict[str, Subject]) -> dict[str, Subject]:
    for subject in subjects.values():
        if not subject.image.is_file():
            raise InputError("benchmark", f"subject {subject.name!r}: reference image {str(subject.image)!r} does "
                             "not exist")
    return subjects
