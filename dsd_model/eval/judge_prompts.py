"""Which instructions the VLM judge gets, and how its reply is read: DreamBench++'s own, or ours.

- **DreamBench++** (a user's checkout of the benchmark's repository; nothing of it ships here): the files
  `user_prompt_{subject,style,text}_full.txt` and `gpt_prompt_..._full.txt` of its `dreambench_plus/prompts/` folder.
  Messages as its `eval_concept_preservation.py` and `eval_prompt_following.py` build them: the user prompt, the
  model's scripted acknowledgement (the gpt prompt), then the reference and the generated image (CP; `style`
  subjects use the style files) or the text prompt and the generated image (PF). The reply is read as it reads it:
  exactly one `Score: <0-4>`. Scores from these files are comparable with published DreamBench++ tables.
- **Ours** (`prompts/cp_v1.txt`, `pf_v1.txt`): our own wording with a JSON reply; not comparable with those tables.

Every score records the set's name, the digest of its files and whether it is comparable.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.chat import MalformedReply
from ..errors import InputError
from . import judge

DREAMBENCH_PLUS = "dreambench_plus"
SCORE = re.compile(r"(score|Score):\s*[a-zA-Z]*\s*(\d+)")
"""DreamBench++'s own reply pattern; a reply must hold it exactly once."""
KINDS = {"cp": "subject", "cp_style": "style", "pf": "text"}


@dataclass(frozen=True)
class PromptSet:
    name: str
    """`dreambench_plus`, or the version of ours (`v1`)."""
    digest: str
    """sha256 of the files the judge is given."""
    comparable: bool
    """True for DreamBench++'s own files: the scores can stand beside published DreamBench++ numbers."""
    texts: dict[str, str]

    @property
    def description(self) -> str:
        return describe(self.record())

    def record(self) -> dict:
        """What every judge score records about the prompts that produced it."""
        return {"prompts": self.name, "prompts_digest": self.digest, "comparable": self.comparable}

    def cp_messages(self, reference_png: bytes, image_png: bytes, category: str) -> list[dict]:
        if not self.comparable:
            return judge.cp_messages(reference_png, image_png, category, self.name)
        kind = "cp_style" if category == "style" else "cp"
        return self._dialogue(kind, [], [reference_png, image_png])

    def pf_messages(self, image_png: bytes, prompt: str) -> list[dict]:
        if not self.comparable:
            return judge.pf_messages(image_png, prompt, self.name)
        return self._dialogue("pf", [{"type": "text", "text": prompt}], [image_png])

    def ask(self, client, messages: list[dict], attempts: int) -> judge.JudgeScore:
        """The judge's score: ours is asked until its JSON parses; DreamBench++'s is asked anew (as its scripts do)
        until a reply holds one score."""
        if not self.comparable:
            return client.ask_json(messages, judge.parse_score, attempts)
        error = None
        for attempt in range(attempts):
            try:
                return parse_dreambench_reply(client.complete(messages, fresh=attempt > 0))
            except MalformedReply as exc:
                error = exc
        raise MalformedReply(f"no usable reply in {attempts} attempt(s); last problem: {error}")

    def _dialogue(self, kind: str, text: list[dict], images: list[bytes]) -> list[dict]:
        if kind not in self.texts:
            raise InputError("judge_prompts", f"the DreamBench++ prompts have no {_files(kind)} (needed for "
                             f"{'style subjects' if kind == 'cp_style' else kind})")
        user, acknowledgement = self.texts[kind]
        parts = [{"type": "image_url", "image_url": {**part["image_url"], "detail": "high"}}
                 for part in judge.image_parts(images)]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": acknowledgement},
                {"role": "user", "content": text + parts}]


def describe(record: dict) -> str:
    """What a score's prompt set is, from its record (`PromptSet.record`; records before prompt sets name only our
    version)."""
    digest = f" (sha256 {record['prompts_digest'][:12]})" if "prompts_digest" in record else ""
    if record.get("comparable"):
        return f"DreamBench++'s own prompts{digest}: comparable with published DreamBench++ scores"
    return f"this project's prompts {record['prompts']}{digest}: not comparable with published DreamBench++ scores"


def parse_dreambench_reply(reply: str) -> judge.JudgeScore:
    """DreamBench++'s reading of a reply: exactly one `Score: N`, N in 0..4."""
    found = [int(value) for _, value in SCORE.findall(reply)]
    if len(found) != 1:
        raise MalformedReply(f"expected exactly one `Score: <0-{judge.SCALE_MAX}>`, found {len(found)}")
    if not 0 <= found[0] <= judge.SCALE_MAX:
        raise MalformedReply(f"the score must be from 0 to {judge.SCALE_MAX}, got {found[0]}")
    return judge.JudgeScore(found[0] / judge.SCALE_MAX, found[0], reply.strip())


def find_dreambench_prompts(path: Path) -> Path | None:
    """The folder of DreamBench++'s prompt files in `path`: the folder itself, its `prompts/`, or
    `dreambench_plus/prompts/` of a repository checkout."""
    for folder in (path, path / "prompts", path / DREAMBENCH_PLUS / "prompts"):
        if (folder / "user_prompt_subject_full.txt").is_file():
            return folder
    return None


def dreambench_prompts(folder: Path) -> PromptSet:
    texts, digest = {}, hashlib.sha256()
    for kind, stem in KINDS.items():
        user, acknowledgement = (folder / f"{role}_prompt_{stem}_full.txt" for role in ("user", "gpt"))
        if not (user.is_file() and acknowledgement.is_file()):
            if kind == "cp_style":
                continue
            raise InputError("judge_prompts", f"{str(folder)!r} lacks {user.name} or {acknowledgement.name}")
        texts[kind] = tuple(file.read_text(encoding="utf-8").strip() for file in (user, acknowledgement))
        for file in (user, acknowledgement):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return PromptSet(DREAMBENCH_PLUS, digest.hexdigest(), True, texts)


def our_prompts(version: str) -> PromptSet:
    texts = {metric: judge.instructions(metric, version) for metric in judge.METRICS}
    digest = hashlib.sha256("\0".join(texts[m] for m in judge.METRICS).encode()).hexdigest()
    return PromptSet(version, digest, False, {})


def resolve_prompts(choice: str, benchmark_root: Path | None) -> PromptSet:
    """`auto`: DreamBench++'s files when the benchmark folder holds them, else ours `v1`; a path: DreamBench++'s
    files there; anything else: the version of ours."""
    if choice == "auto":
        found = None if benchmark_root is None else find_dreambench_prompts(benchmark_root)
        return dreambench_prompts(found) if found is not None else our_prompts("v1")
    if "/" in choice or Path(choice).is_dir():
        found = find_dreambench_prompts(Path(choice))
        if found is None:
            raise InputError("judge_prompts", f"{choice!r} holds no DreamBench++ prompt files "
                             "(user_prompt_subject_full.txt in it, in prompts/ or in dreambench_plus/prompts/)")
        return dreambench_prompts(found)
    return our_prompts(choice)


def _files(kind: str) -> str:
    return f"user_prompt_{KINDS[kind]}_full.txt / gpt_prompt_{KINDS[kind]}_full.txt"
