"""Safety checks: an image classifier on every reference (input) and on every output, each optional.

Both checks have one interface, `flag(image)`, and two backends: `ImageCheck`, a transformers image-classification
model loaded from a local path, and `NudeNetCheck`, NudeNet's ONNX detector, which ships inside the `nudenet` package
(the `[safety]` extra). Each has the labels that flag an image and a score threshold. What a flag does is the
operator's policy:

    input   require_consent: the request must carry `consent: true`; refuse: always refused
    output  block: the images are withheld; blur: the images go out blurred

A refusal raises `ContentPolicyError` naming the check (422 `content_policy` / FAILED_PRECONDITION). Every decision is
counted in `dsd_safety_decisions_total` and logged with the request id; images are never logged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..errors import ContentPolicyError, WeightsError
from ..settings import Settings
from . import metrics

logger = logging.getLogger(__name__)

BLUR_FRACTION = 0.05
"""Gaussian blur radius of a `blur` decision, as a fraction of the image side: 26 px at 512, enough to hide detail."""


class ImageCheck:
    """Flags an image when one of `labels` scores at least `threshold` under the classifier at `model_path`."""

    def __init__(self, name: str, model_path: Path, labels: list[str], threshold: float, device: str):
        from transformers import pipeline

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise WeightsError(f"{name} check model {str(path)!r} is not a local transformers model (no config.json)")
        self.name, self.threshold = name, threshold
        self.classifier = pipeline("image-classification", model=str(path), device=device)
        known = set(self.classifier.model.config.id2label.values())
        unknown = sorted(set(labels) - known)
        if unknown:
            raise WeightsError(f"{name} check labels {unknown} are not labels of {str(path)!r}: {sorted(known)}")
        self.labels = set(labels)

    def flag(self, image: Image.Image) -> tuple[str, float] | None:
        """The highest-scoring flagged label and its score, or None when the image passes."""
        scores = self.classifier(image, top_k=None)
        hits = [(s["label"], s["score"]) for s in scores if s["label"] in self.labels and s["score"] >= self.threshold]
        return max(hits, key=lambda hit: hit[1]) if hits else None


NUDENET_UNSAFE = ["FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED",
                  "ANUS_EXPOSED"]
"""NudeNet's classes that count as unsafe unless the labels setting says otherwise: explicit nudity only, not its
covered, face, feet, belly or armpit classes."""
NUDENET_LABELS = ["FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
                  "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
                  "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
                  "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED"]
"""Every class NudeNet 3.4's detector reports (it reports detections scoring 0.2 or more)."""


class NudeNetCheck:
    """Flags an image when NudeNet detects one of `labels` with a score of at least `threshold`."""

    def __init__(self, name: str, labels: list[str], threshold: float):
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise WeightsError(f"the {name} check's backend `nudenet` needs the `[safety]` extra (pip install "
                               "'dsd-serve[safety]')") from exc
        unknown = sorted(set(labels) - set(NUDENET_LABELS))
        if unknown:
            raise WeightsError(f"{name} check labels {unknown} are not NudeNet classes: {NUDENET_LABELS}")
        self.name, self.labels, self.threshold = name, set(labels), threshold
        self.detector = NudeDetector()

    def flag(self, image: Image.Image) -> tuple[str, float] | None:
        """The highest-scoring flagged detection's class and score, or None when the image passes."""
        detections = self.detector.detect(np.asarray(image.convert("RGBA")))
        hits = [(d["class"], d["score"]) for d in detections if d["class"] in self.labels
                and d["score"] >= self.threshold]
        return max(hits, key=lambda hit: hit[1]) if hits else None


def open_check(name: str, backend: str, model_path: Path | None, labels: list[str] | None, threshold: float,
               device: str, classifier_labels: list[str]) -> ImageCheck | NudeNetCheck | None:
    """The check `backend` names, or None for a classifier without a model; `labels` None: the backend's own."""
    if backend == "nudenet":
        return NudeNetCheck(name, labels if labels is not None else NUDENET_UNSAFE, threshold)
    if model_path is None:
        return None
    return ImageCheck(name, model_path, labels if labels is not None else classifier_labels, threshold, device)


class SafetyChecks:
    """The configured input and output checks with their policies; a check that is not configured passes all."""

    def __init__(self, settings: Settings):
        device = settings.resolved_device()
        self.input = open_check("input", settings.input_check_backend, settings.input_check_model,
                                settings.input_check_labels, settings.input_check_threshold, device, ["face"])
        self.output = open_check("output", settings.output_check_backend, settings.output_check_model,
                                 settings.output_check_labels, settings.output_check_threshold, device, ["nsfw"])
        self.input_policy = settings.input_check_policy
        self.output_action = settings.output_check_action
        off = "OFF (not configured)"
        logger.log(
            logging.INFO if self.input and self.output else logging.WARNING,
            "safety checks: input %s, output %s",
            f"on ({type(self.input).__name__}, {self.input_policy}, labels {sorted(self.input.labels)})"
            if self.input else off,
            f"on ({type(self.output).__name__}, {self.output_action}, labels {sorted(self.output.labels)})"
            if self.output else off,
        )

    def check_input(self, reference: Image.Image, consent: bool, request_id: str) -> None:
        """Raises `ContentPolicyError` when the reference is flagged and the policy refuses it."""
        if self.input is None:
            return
        flag = self.input.flag(reference)
        if flag is None:
            decision = "pass"
        elif self.input_policy == "require_consent" and consent:
            decision = "consented"
        else:
            decision = "block"
        metrics.SAFETY_DECISIONS.labels(check="input", decision=decision).inc()
        _log_decision(request_id, "input", decision, flag)
        if decision != "block":
            return
        label, score = flag
        if self.input_policy == "refuse":
            raise ContentPolicyError("input", f"the reference was classified {label!r} ({score:.2f}); this service "
                                     "does not accept such references", field="image")
        raise ContentPolicyError("input", f"the reference was classified {label!r} ({score:.2f}); send `consent: "
                                 "true` to confirm that the person shown agreed to this use", field="consent")

    def check_output(self, image: Image.Image, request_id: str) -> Image.Image:
        """The image to return (blurred under `blur`); raises `ContentPolicyError` under `block`."""
        if self.output is None:
            return image
        flag = self.output.flag(image)
        decision = "pass" if flag is None else self.output_action
        metrics.SAFETY_DECISIONS.labels(check="output", decision=decision).inc()
        _log_decision(request_id, "output", decision, flag)
        if decision == "pass":
            return image
        if decision == "blur":
            return image.filter(ImageFilter.GaussianBlur(radius=max(1.0, BLUR_FRACTION * max(image.size))))
        label, score = flag
        raise ContentPolicyError("output", f"a generated image was classified {label!r} ({score:.2f}) and withheld")


def _log_decision(request_id: str, check: str, decision: str, flag: tuple[str, float] | None) -> None:
    """Passes at INFO, every flag at WARNING; the label and score, never the image."""
    if flag is None:
        logger.info("request %s: %s check %s", request_id, check, decision)
    else:
        logger.warning("request %s: %s check %s (label %r, score %.3f)", request_id, check, decision, *flag)
