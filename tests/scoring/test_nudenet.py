"""NudeNet (its packaged ONNX detector) as a backend of the service's input and output checks, on real packaged
photographs: benign ones pass at the default settings; block, blur and consent decisions are forced by the labels and
threshold settings."""

import numpy as np
import pytest
from prometheus_client import REGISTRY

from dsd_model.errors import ContentPolicyError, WeightsError
from dsd_model.serving.safety import NUDENET_UNSAFE, NudeNetCheck, SafetyChecks
from dsd_model.settings import Settings
from photos import astronaut, chelsea, coffee, hopper

PHOTOS = {"astronaut": astronaut, "hopper": hopper, "coffee": coffee, "chelsea": chelsea}


def decisions(check: str, decision: str) -> float:
    return REGISTRY.get_sample_value("dsd_safety_decisions_total", {"check": check, "decision": decision}) or 0.0


@pytest.fixture(scope="module")
def default_check():
    return NudeNetCheck("output", NUDENET_UNSAFE, 0.5)


@pytest.mark.parametrize("name", PHOTOS)
def test_benign_photographs_pass_at_the_defaults(default_check, name):
    assert default_check.flag(PHOTOS[name]()) is None


def test_the_detector_finds_the_faces_it_is_trained_on(default_check):
    detections = default_check.detector.detect(np.asarray(astronaut().convert("RGBA")))
    assert [d["class"] for d in detections if d["score"] >= 0.5] == ["FACE_FEMALE"]


def test_output_block_and_blur_forced_by_labels():
    settings = dict(output_check_backend="nudenet", output_check_labels=["FACE_FEMALE"])
    blocked = SafetyChecks(Settings(**settings))
    before = decisions("output", "block")
    with pytest.raises(ContentPolicyError, match="'FACE_FEMALE'") as caught:
        blocked.check_output(astronaut(), "r")
    assert caught.value.check == "output" and decisions("output", "block") == before + 1
    photo = astronaut()
    blurred = SafetyChecks(Settings(**settings, output_check_action="blur")).check_output(photo, "r")
    detail = lambda image: np.abs(np.diff(np.asarray(image, float), axis=1)).mean()  # noqa: E731
    assert blurred.size == photo.size and detail(blurred) < detail(photo) / 3
    other = coffee()
    assert blocked.check_output(other, "r") is other


def test_the_threshold_decides():
    """NudeNet reports coffee's cup at 0.2-0.5 as BUTTOCKS_EXPOSED: a low threshold blocks it, the default does not."""
    photo = coffee()
    assert SafetyChecks(Settings(output_check_backend="nudenet")).check_output(photo, "r") is photo
    with pytest.raises(ContentPolicyError, match="BUTTOCKS_EXPOSED"):
        SafetyChecks(Settings(output_check_backend="nudenet", output_check_threshold=0.2)).check_output(photo, "r")


def test_input_consent_policy_with_nudenet():
    checks = SafetyChecks(Settings(input_check_backend="nudenet", input_check_labels=["FACE_FEMALE", "FACE_MALE"]))
    with pytest.raises(ContentPolicyError) as caught:
        checks.check_input(hopper(), consent=False, request_id="r")
    assert caught.value.field == "consent"
    checks.check_input(hopper(), consent=True, request_id="r")
    checks.check_input(coffee(), consent=False, request_id="r")


def test_unknown_labels_are_refused_by_name():
    with pytest.raises(WeightsError, match=r"\['nsfw'\] are not NudeNet classes"):
        SafetyChecks(Settings(output_check_backend="nudenet", output_check_labels=["nsfw"]))
