"""The identity score of an output against its reference, as the service returns it and `dsd eval` records it.

A reference with a face is scored by the face scorer (`faces.py`): the distance and cosine of the two 128-d face
descriptors, and whether the distance is under the threshold. An output without a face is `no_face`, never a 0.
A reference without a face (or a server without the `[faces]` extra) is scored by the subject encoder
(`subjects.py`), when one is configured. Every score names the scorer that made it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Literal

from PIL import Image

from .faces import FACES_EXTRA, SCORER as FACE_SCORER, Face, FaceEmbedder, FacesUnavailable, cosine, distance
from .subjects import SubjectEmbedder, tiny_subject_embedder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdentityScore:
    """How well one image keeps the reference's subject."""

    scorer: str
    """What made the score: `dlib-resnet-v1` (faces), `dino:<dir>` / `clip-i:<dir>` (subjects), or
    `tiny-random-dino` (the tiny profile's random encoder: the number means nothing)."""
    status: Literal["ok", "no_face"]
    """`no_face`: the face scorer found no face in the reference or the image (`note` says which); no number."""
    similarity: float | None = None
    """Cosine of the two embeddings (1: the same)."""
    distance: float | None = None
    """Faces: Euclidean distance of the 128-d descriptors (0: the same face; under `threshold`: the same person)."""
    threshold: float | None = None
    match: bool | None = None
    """Faces: `distance < threshold`."""
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def rank(self) -> float:
        """Higher is better: the negated face distance, or the subject similarity; `no_face` ranks last."""
        if self.status != "ok":
            return -math.inf
        return -self.distance if self.distance is not None else self.similarity


def face_score(reference: Face | None, image: Face | None, threshold: float) -> IdentityScore:
    """The face score of an image against a reference, from their largest faces (None: no face found)."""
    if reference is None or image is None:
        where = "the reference" if reference is None else "the image"
        return IdentityScore(FACE_SCORER, "no_face", threshold=threshold, note=f"no face in {where}")
    notes = [f"{face.count} faces in {where}; the largest was scored"
             for face, where in ((reference, "the reference"), (image, "the image")) if face.count > 1]
    gap = distance(reference, image)
    return IdentityScore(FACE_SCORER, "ok", similarity=cosine(reference, image), distance=gap, threshold=threshold,
                         match=gap < threshold, note="; ".join(notes) or None)


class IdentityScorer:
    """The face scorer and the subject encoder of one server (either may be missing). Not thread-safe: the runtime
    calls it from one scoring thread."""

    def __init__(self, faces: FaceEmbedder | None, subjects: SubjectEmbedder | None, threshold: float):
        self.faces, self.subjects, self.threshold = faces, subjects, threshold

    @property
    def available(self) -> bool:
        return self.faces is not None or self.subjects is not None

    def unavailable_reason(self) -> str:
        return (f"this server cannot score identity: {FACES_EXTRA}, and no subject encoder is configured "
                "(DSD_IDENTITY_ENCODER_PATH)")

    def notices(self) -> list[str]:
        """What a response with identity scores should say about the scorers missing here."""
        if self.faces is None and self.subjects is not None:
            return [f"identity: {FACES_EXTRA}; every image was scored by {self.subjects.name}"]
        return []

    def score(self, reference: Image.Image, images: list[Image.Image]) -> list[IdentityScore]:
        """One score per image, in order."""
        reference_face = self.faces.face(reference) if self.faces is not None else None
        if reference_face is not None:
            return [face_score(reference_face, self.faces.face(image), self.threshold) for image in images]
        if self.subjects is None:
            return [IdentityScore(FACE_SCORER, "no_face", threshold=self.threshold,
                                  note="no face in the reference, and this server has no subject encoder "
                                  "(DSD_IDENTITY_ENCODER_PATH)")] * len(images)
        note = "no face in the reference; scored as a subject" if self.faces is not None else None
        return [IdentityScore(self.subjects.name, "ok", similarity=value, note=note)
                for value in self.subjects.similarities(reference, images)]


def open_identity_scorer(settings, profile: str) -> IdentityScorer:
    """The scorers this server has: dlib's when the `[faces]` extra is installed; the subject encoder at
    `settings.identity_encoder_path`, or on the tiny profile its random encoder."""
    try:
        faces = FaceEmbedder()
    except FacesUnavailable:
        faces = None
    if settings.identity_encoder_path is not None:
        subjects = SubjectEmbedder(settings.identity_encoder_path, settings.resolved_device())
    elif profile == "tiny":
        subjects = tiny_subject_embedder()
    else:
        subjects = None
    logger.log(logging.INFO if faces is not None else logging.WARNING, "identity scores: faces %s, subjects %s",
               FACE_SCORER if faces is not None else f"OFF ({FACES_EXTRA})",
               subjects.name if subjects is not None else "OFF (DSD_IDENTITY_ENCODER_PATH unset)")
    return IdentityScorer(faces, subjects, settings.identity_face_threshold)
