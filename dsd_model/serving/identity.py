"""The identity step of the request path: after the engine's results, before the outputs are finished.

    results of the engine jobs → score each against the reference (one scoring thread, never the denoising thread)
        → best_of: keep the best `num_images`, best first, and report every candidate's score

A request asks for scores with `identity` (the server's default is DSD_IDENTITY_DEFAULT); `best_of` implies them.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from ..errors import InputError
from ..scoring.identity import IdentityScore, IdentityScorer
from ..settings import Settings
from . import metrics


@dataclass(frozen=True)
class Candidate:
    """One of a best-of request's candidates: its seed regenerates it alone."""

    seed: int
    identity: IdentityScore
    returned: bool

    def to_dict(self) -> dict:
        return {"seed": self.seed, "identity": self.identity.to_dict(), "returned": self.returned}


@dataclass(frozen=True)
class Selection:
    indices: list[int]
    """The results returned, best first under best_of, all in order otherwise."""
    identity: list[IdentityScore]
    """The score of each returned result."""
    candidates: list[Candidate] | None
    """Every candidate of a best-of request, in seed order; None without best_of."""


class IdentityStage:
    """The server's identity scorers and the thread they run on."""

    def __init__(self, settings: Settings, scorer: IdentityScorer):
        self.settings, self.scorer = settings, scorer
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dsd-identity")

    def wanted(self, identity: bool | None, best_of: int | None) -> bool:
        return best_of is not None or (identity if identity is not None else self.settings.identity_default)

    def check(self, identity: bool | None, best_of: int | None, num_images: int) -> None:
        """Refuse with an `InputError` naming the field: best_of beyond its limit or below num_images, or scores
        asked of a server that has no scorer."""
        if best_of is not None:
            if best_of > self.settings.max_best_of:
                raise InputError("best_of", f"{best_of} exceeds the limit of {self.settings.max_best_of}")
            if best_of < num_images:
                raise InputError("best_of", f"{best_of} is fewer than num_images ({num_images}): best_of candidates "
                                 "are generated and the best num_images returned")
        if self.wanted(identity, best_of) and not self.scorer.available:
            raise InputError("best_of" if best_of is not None else "identity", self.scorer.unavailable_reason())

    def candidates(self, num_images: int, best_of: int | None) -> int:
        """Engine requests to submit: one per candidate."""
        return best_of if best_of is not None else num_images

    def notices(self) -> list[str]:
        return self.scorer.notices()

    async def select(self, reference: Image.Image, images: list[Image.Image], seeds: list[int],
                     keep: int | None) -> Selection:
        """Score every image; with `keep` (best_of), return the best `keep` (ties in seed order)."""
        started = time.monotonic()
        scores = await asyncio.get_running_loop().run_in_executor(self._thread, self.scorer.score, reference, images)
        metrics.IDENTITY_DURATION.observe(time.monotonic() - started)
        for score in scores:
            metrics.IDENTITY_SCORES.labels(scorer=score.scorer, status=score.status).inc()
        if keep is None:
            return Selection(list(range(len(images))), scores, None)
        best = sorted(range(len(images)), key=lambda i: scores[i].rank, reverse=True)[:keep]
        candidates = [Candidate(seed, score, i in best) for i, (seed, score) in enumerate(zip(seeds, scores))]
        return Selection(best, [scores[i] for i in best], candidates)

    def close(self) -> None:
        self._thread.shutdown(wait=False)
