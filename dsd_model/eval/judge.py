"""The VLM judge: concept preservation (CP) and prompt following (PF) on the DreamBench++ 0-4 scale, normalised to
[0, 1] (score / 4), through any OpenAI-compatible chat API.

The instructions are versioned files, `prompts/cp_<version>.txt` and `prompts/pf_<version>.txt`; every score records
the version. A reply without a score in 0..4 is asked again (the judge is told what was wrong) and, after
`max_reply_attempts`, recorded as a failure: never scored 0.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from importlib import resources

from ..data.chat import MalformedReply
from ..errors import InputError

SCALE_MAX = 4
METRICS = ("cp", "pf")


@dataclass(frozen=True)
class JudgeScore:
    value: float
    """The 0-4 score divided by 4."""
    raw: int
    reason: str


def instructions(metric: str, version: str) -> str:
    path = resources.files(__package__) / "prompts" / f"{metric}_{version}.txt"
    if not path.is_file():
        raise InputError("judge_prompts", f"no instructions {metric}_{version}.txt in {__package__}/prompts")
    return path.read_text(encoding="utf-8")


def cp_messages(reference_png: bytes, image_png: bytes, category: str, version: str) -> list[dict]:
    text = instructions("cp", version).replace("{category}", category)
    return _messages(text, [reference_png, image_png])


def pf_messages(image_png: bytes, prompt: str, version: str) -> list[dict]:
    return _messages(instructions("pf", version).replace("{prompt}", prompt), [image_png])


def parse_score(reply: dict) -> JudgeScore:
    score = reply.get("score")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= SCALE_MAX:
        raise MalformedReply(f'"score" must be an integer from 0 to {SCALE_MAX}, got {score!r}')
    return JudgeScore(score / SCALE_MAX, score, str(reply.get("reason", "")).strip())


def image_parts(images: list[bytes]) -> list[dict]:
    """PNG images as parts of a chat message."""
    return [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
            for png in images]


def _messages(text: str, images: list[bytes]) -> list[dict]:
    content = [{"type": "text", "text": text}, *image_parts(images)]
    return [
        {"role": "system", "content": "You are a careful, consistent judge of generated images."},
        {"role": "user", "content": content},
    ]
