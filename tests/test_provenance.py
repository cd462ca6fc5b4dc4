"""Provenance and safety in-process: watermark round trips, C2PA manifests on PNG / JPEG / WebP, unsigned mode, the
input and output checks with a tiny seeded classifier, and `dsd verify`."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from dsd_model.cli import main
from dsd_model.errors import ContentPolicyError
from dsd_model.serving.provenance import (
    MAX_MARKED_PIXELS,
    MIN_WATERMARK_SIDE,
    TRAINED_ALGORITHMIC_MEDIA,
    Claim,
    ContentCredentials,
    Watermark,
    provenance_tag,
    read_credentials,
    write_development_chain,
)
from dsd_model.images import ENCODE_OPTIONS, encode_image
from dsd_model.serving.outputs import OutputStage
from dsd_model.serving.safety import SafetyChecks
from dsd_model.settings import Settings
from dsd_model.tiny import write_tiny_classifier
from helpers import unmarked
from servers import ROOT

PICTURE = Image.open(ROOT / "tests" / "assets" / "reference.png").convert("RGB").resize((512, 512))
CLAIM = Claim(request_id="client-chosen", provenance_id="req-42", model="dsd-tiny (random weights)",
              adapter="identity", profile="tiny", prompt="a secret prompt")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    return write_development_chain(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return write_tiny_classifier(tmp_path_factory.mktemp("classifier"), labels=("safe", "nsfw"), seed=0)


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def reopen(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_watermark_round_trip_survives_the_service_jpeg():
    mark = Watermark("dsd-serve")
    marked = mark.embed(PICTURE, "req-42")
    difference = np.abs(np.asarray(marked, float) - np.asarray(PICTURE, float))
    assert difference.mean() < 2.0
    expected = {"present": True, "service_tag_errors": 0, "provenance_tag": provenance_tag("req-42")}
    assert mark.read(reopen(encode_image(marked, "png"))) == expected
    assert ENCODE_OPTIONS["jpeg"]["subsampling"] == 0
    after_jpeg = mark.read(reopen(encode_image(marked, "jpeg")))
    assert after_jpeg["present"] and after_jpeg["provenance_tag"] == provenance_tag("req-42")
    assert not mark.read(PICTURE)["present"]
    assert not Watermark("another-service").read(marked)["present"]


def test_small_outputs_are_said_unmarked_unless_the_operator_turned_marking_off():
    marked = OutputStage(Settings(watermark=True))
    assert marked.notices(MIN_WATERMARK_SIDE - 16) == [unmarked(MIN_WATERMARK_SIDE - 16)]
    assert marked.notices(MIN_WATERMARK_SIDE) == []
    assert OutputStage(Settings(watermark=False)).notices(64) == []


def test_watermark_minimum_size_and_resized_reads():
    mark = Watermark("dsd-serve")
    assert mark.embed(PICTURE.resize((MIN_WATERMARK_SIDE - 16,) * 2), "r") is None
    assert mark.read(PICTURE.resize((MIN_WATERMARK_SIDE, MIN_WATERMARK_SIDE - 16)))["present"] is None
    assert mark.embed(PICTURE.resize((MIN_WATERMARK_SIDE,) * 2), "r") is not None
    halved = mark.embed(PICTURE, "r").resize((256, 256), Image.Resampling.BICUBIC)
    assert mark.read(halved) == {"present": True, "service_tag_errors": 0, "provenance_tag": provenance_tag("r"),
                                 "read_at": 512}


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_c2pa_manifest_validates_with_its_fields(chain, output_format):
    chain_path, key_path, root_path = chain
    credentials = ContentCredentials(Settings(c2pa_cert_chain=chain_path, c2pa_private_key=key_path))
    assert credentials.signing
    data = encode_image(PICTURE, output_format)
    signed = credentials.sign(data, output_format, CLAIM)
    report = read_credentials(signed, root_path)
    assert report["present"] and report["validation_state"] == "Trusted" and report["failures"] == []
    assert report["digital_source_type"] == TRAINED_ALGORITHMIC_MEDIA
    generation = report["generation"]
    assert generation["provenance_id"] == "req-42" and generation["adapter"] == "identity"
    assert "request_id" not in generation and b"client-chosen" not in signed
    assert generation["model"] == "dsd-tiny (random weights)" and generation["service_version"] == "0.1.0"
    assert "prompt" not in generation and b"a secret prompt" not in signed
    assert read_credentials(signed)["validation_state"] == "Valid"
    assert np.array_equal(np.asarray(reopen(signed)), np.asarray(reopen(data)))


def test_c2pa_prompt_only_when_enabled_and_tampering_is_detected(chain):
    chain_path, key_path, root_path = chain
    settings = Settings(c2pa_cert_chain=chain_path, c2pa_private_key=key_path, c2pa_include_prompt=True)
    signed = ContentCredentials(settings).sign(encode_image(PICTURE, "jpeg"), "jpeg", CLAIM)
    assert read_credentials(signed, root_path)["generation"]["prompt"] == "a secret prompt"
    tampered = bytearray(signed)
    tampered[-200] ^= 0x01
    report = read_credentials(bytes(tampered), root_path)
    assert report["validation_state"] == "Invalid" and "assertion.dataHash.mismatch" in report["failures"]


def test_unsigned_mode_is_logged_and_measured(caplog):
    before = metric("dsd_c2pa_manifests_total", result="unsigned")
    with caplog.at_level(logging.WARNING, logger="dsd_model.serving.provenance"):
        credentials = ContentCredentials(Settings())
    assert "C2PA signing is OFF" in caplog.text
    assert metric("dsd_c2pa_signing_enabled") == 0
    data = encode_image(PICTURE, "png")
    assert credentials.sign(data, "png", CLAIM) == data
    assert metric("dsd_c2pa_manifests_total", result="unsigned") == before + 1
    assert read_credentials(data)["present"] is False


def test_signing_needs_both_key_and_chain_that_match(chain, tmp_path):
    chain_path, key_path, root_path = chain
    with pytest.raises(ValueError, match="c2pa_private_key"):
        Settings(c2pa_cert_chain=chain_path)
    with pytest.raises(ValueError, match="self-signed"):
        ContentCredentials(Settings(c2pa_cert_chain=root_path, c2pa_private_key=key_path))
    broken = tmp_path / "broken.key"
    broken.write_text("not a key")
    with pytest.raises(ValueError, match="private key"):
        ContentCredentials(Settings(c2pa_cert_chain=chain_path, c2pa_private_key=broken))


def test_checks_are_off_when_not_configured():
    checks = SafetyChecks(Settings())
    assert checks.input is None and checks.output is None
    assert checks.check_output(PICTURE, "r") is PICTURE
    checks.check_input(PICTURE, consent=False, request_id="r")


def test_output_check_block_blur_and_pass(classifier):
    blocked = SafetyChecks(Settings(output_check_model=classifier, output_check_threshold=0.0))
    before = metric("dsd_safety_decisions_total", check="output", decision="block")
    with pytest.raises(ContentPolicyError, match="'nsfw'") as caught:
        blocked.check_output(PICTURE, "r")
    assert caught.value.check == "output"
    assert metric("dsd_safety_decisions_total", check="output", decision="block") == before + 1
    blurred = SafetyChecks(Settings(output_check_model=classifier, output_check_threshold=0.0,
                                    output_check_action="blur")).check_output(PICTURE, "r")
    assert blurred.size == PICTURE.size
    detail = lambda image: np.abs(np.diff(np.asarray(image, float), axis=1)).mean()  # noqa: E731
    assert detail(blurred) < detail(PICTURE) / 3
    passing = SafetyChecks(Settings(output_check_model=classifier, output_check_threshold=1.0))
    assert passing.check_output(PICTURE, "r") is PICTURE


def test_input_check_consent_policy(classifier):
    settings = dict(input_check_model=classifier, input_check_labels=["nsfw"], input_check_threshold=0.0)
    consent = SafetyChecks(Settings(**settings))
    with pytest.raises(ContentPolicyError) as caught:
        consent.check_input(PICTURE, consent=False, request_id="r")
    assert caught.value.check == "input" and caught.value.field == "consent"
    before = metric("dsd_safety_decisions_total", check="input", decision="consented")
    consent.check_input(PICTURE, consent=True, request_id="r")
    assert metric("dsd_safety_decisions_total", check="input", decision="consented") == before + 1
    refuse = SafetyChecks(Settings(**settings, input_check_policy="refuse"))
    with pytest.raises(ContentPolicyError) as caught:
        refuse.check_input(PICTURE, consent=True, request_id="r")
    assert caught.value.field == "image"


def test_check_labels_must_exist(classifier):
    with pytest.raises(Exception, match="not labels of"):
        SafetyChecks(Settings(output_check_model=classifier, output_check_labels=["porn"]))


def test_dsd_verify_cli(chain, tmp_path, capsys):
    chain_path, key_path, root_path = chain
    marked = Watermark("dsd-serve").embed(PICTURE, "req-42")
    credentials = ContentCredentials(Settings(c2pa_cert_chain=chain_path, c2pa_private_key=key_path))
    path = tmp_path / "out.jpg"
    path.write_bytes(credentials.sign(encode_image(marked, "jpeg"), "jpeg", CLAIM))
    assert main(["verify", str(path), "--trust-anchors", str(root_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["watermark"]["present"] and report["watermark"]["provenance_tag"] == provenance_tag("req-42")
    assert report["c2pa"]["validation_state"] == "Trusted"


def test_dsd_verify_exit_status_says_what_was_found(chain, tmp_path, capsys):
    chain_path, key_path, _ = chain
    credentials = ContentCredentials(Settings(c2pa_cert_chain=chain_path, c2pa_private_key=key_path))
    files = {"marked.png": encode_image(Watermark("dsd-serve").embed(PICTURE, "req-42"), "png"),
             "signed.png": credentials.sign(encode_image(PICTURE, "png"), "png", CLAIM),
             "plain.png": encode_image(PICTURE, "png"), "text.png": b"not an image"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    found = {}
    for name in [*files, "missing.png"]:
        code = main(["verify", str(tmp_path / name)])
        report = json.loads(capsys.readouterr().out or "null")
        found[name] = code, report and (report["watermark"]["present"], report["c2pa"]["present"])
    assert found == {"marked.png": (0, (True, False)), "signed.png": (0, (False, True)),
                     "plain.png": (1, (False, False)), "text.png": (2, None), "missing.png": (2, None)}


def test_images_larger_than_any_output_are_read_at_output_sizes_only():
    mark = Watermark("dsd-serve")
    upscaled = mark.embed(PICTURE, "req-42").resize((1536, 1536), Image.Resampling.BICUBIC)
    assert upscaled.width * upscaled.height > MAX_MARKED_PIXELS
    assert mark.read(upscaled) == {"present": True, "service_tag_errors": 0, "provenance_tag": provenance_tag("req-42"),
                                   "read_at": 512}
    wide = mark.read(upscaled.resize((2048, 1152)))
    assert wide["present"] is None and "larger than any marked output" in wide["reason"]


def test_dsd_generate_marks_its_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSD_PROFILE", "tiny")
    out = tmp_path / "out.png"
    code = main(["generate", "--image", str(ROOT / "tests" / "assets" / "reference.png"), "--prompt", "a toy",
                 "--out", str(out), "--steps", "2", "--size", "256", "--seed", "1"])
    assert code == 0
    provenance_id = capsys.readouterr().out.split("provenance id ")[1].split(")")[0]
    mark = Watermark("dsd-serve").read(Image.open(out))
    assert mark["present"] and mark["provenance_tag"] == provenance_tag(provenance_id)
    assert main(["generate", "--image", str(ROOT / "tests" / "assets" / "reference.png"), "--prompt", "a toy",
                 "--out", str(tmp_path / "out.gif")]) == 2
