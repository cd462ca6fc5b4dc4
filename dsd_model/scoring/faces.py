"""Face identity from dlib's packaged models (the `[faces]` extra: `dlib-bin` and `face-recognition-models`).

    detect   dlib's HOG frontal-face detector (faces from about 40 px with one upsampling)
    align    the 5-point landmark model, which crops and aligns the face to 150 x 150
    embed    the ResNet face-recognition model: a 128-d descriptor (99.38 % on LFW); two photographs of one person
             lie within 0.6 of each other (Euclidean), dlib's own decision threshold

The model files ship inside `face-recognition-models`; nothing is downloaded. The models run on the CPU.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SCORER = "dlib-resnet-v1"
FACES_EXTRA = ("the face scorer needs the `[faces]` extra (pip install 'dsd-serve[faces]': dlib-bin and "
               "face-recognition-models)")
DLIB_THRESHOLD = 0.6
"""dlib's decision threshold on the 128-d distance: 99.38 % of LFW pairs are on the right side of it."""
UPSAMPLE = 1
"""Detector upsamplings: one finds faces from about 40 px, as small as a face in a 512 px half-body portrait."""


class FacesUnavailable(RuntimeError):
    """The `[faces]` extra is not installed."""


@dataclass(frozen=True)
class Face:
    """The largest face of an image and how many faces the detector found."""

    descriptor: np.ndarray
    count: int
    box: tuple[int, int, int, int]
    """left, top, right, bottom in pixels."""


def model_dir() -> Path:
    """The folder of `face-recognition-models`' model files, found without importing the package (its
    `__init__` imports `pkg_resources`, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FacesUnavailable(FACES_EXTRA)
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceEmbedder:
    """Detects the largest face of an image and embeds it. Not thread-safe: one caller at a time."""

    def __init__(self):
        try:
            import dlib
        except ImportError as exc:
            raise FacesUnavailable(FACES_EXTRA) from exc
        models = model_dir()
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.recognition = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def face(self, image: Image.Image) -> Face | None:
        """The largest face's descriptor, or None when the detector finds no face."""
        pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        boxes = list(self.detector(pixels, UPSAMPLE))
        if not boxes:
            return None
        box = max(boxes, key=lambda b: b.width() * b.height())
        shape = self.landmarks(pixels, box)
        descriptor = np.asarray(self.recognition.compute_face_descriptor(pixels, shape), dtype=np.float64)
        return Face(descriptor, len(boxes), (box.left(), box.top(), box.right(), box.bottom()))


def distance(a: Face, b: Face) -> float:
    """Euclidean distance of the two descriptors: under 0.6 is the same person by dlib's threshold."""
    return float(np.linalg.norm(a.descriptor - b.descriptor))


def cosine(a: Face, b: Face) -> float:
    """Cosine of the two descriptors, the ID similarity of the face-identity literature (1: the same face)."""
    return float(a.descriptor @ b.descriptor / (np.linalg.norm(a.descriptor) * np.linalg.norm(b.descriptor)))
