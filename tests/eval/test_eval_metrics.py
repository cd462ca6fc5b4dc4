"""Known answers of the embedding scores, the copy-paste check and the statistics."""

import numpy as np
import pytest
import torch
from helpers import random_image
from PIL import Image, ImageOps
from transformers import AutoTokenizer, CLIPModel, Dinov2Model

from dsd_model.errors import WeightsError
from dsd_model.eval import embeddings, stats

TOLERANCE = 1e-5
"""float32 cosines of unit vectors: a few ulps of rounding."""


@pytest.fixture(scope="module")
def encoders(encoders_dir):
    return embeddings.Encoders(*encoders_dir, "cpu")


def test_identical_images_score_one(encoders):
    image = random_image(64, 64, seed=3)
    scores = encoders.score([image, image], [image.copy(), image.copy()], ["a teapot", "a fox"])
    assert scores["dino"] == pytest.approx([1.0, 1.0], abs=TOLERANCE)
    assert scores["clip_i"] == pytest.approx([1.0, 1.0], abs=TOLERANCE)


def test_dino_is_the_cosine_of_the_cls_embeddings(encoders, encoders_dir):
    reference, image = random_image(64, 64, seed=1), random_image(48, 64, seed=2)
    model = Dinov2Model.from_pretrained(encoders_dir[0]).eval()
    with torch.no_grad():
        cls = [model(pixel_values=encoders.dino_processor(images=[i], return_tensors="pt")["pixel_values"])
               .last_hidden_state[0, 0].numpy().astype(np.float64) for i in (reference, image)]
    expected = cls[0] @ cls[1] / (np.linalg.norm(cls[0]) * np.linalg.norm(cls[1]))
    assert encoders.score([reference], [image], ["x"])["dino"][0] == pytest.approx(expected, abs=TOLERANCE)
    assert abs(expected) < 0.999, "the random encoder must tell these two images apart for the check to mean anything"


def test_clip_scores_are_cosines_of_the_projected_embeddings(encoders, encoders_dir):
    reference, image, prompt = random_image(64, 64, seed=4), random_image(64, 64, seed=5), "a red teapot"
    model = CLIPModel.from_pretrained(encoders_dir[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(encoders_dir[1])
    with torch.no_grad():
        pixels = encoders.clip_processor(images=[reference, image], return_tensors="pt")["pixel_values"]
        ref_emb, img_emb = model.get_image_features(pixel_values=pixels).pooler_output.double().numpy()
        text_emb = model.get_text_features(**tokenizer([prompt], return_tensors="pt")).pooler_output[0].double()
    cosine = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    scores = encoders.score([reference], [image], [prompt])
    assert scores["clip_i"][0] == pytest.approx(cosine(ref_emb, img_emb), abs=TOLERANCE)
    assert scores["clip_t"][0] == pytest.approx(cosine(text_emb.numpy(), img_emb), abs=TOLERANCE)


def test_copy_paste_flags_the_reference_itself_and_not_a_new_image(encoders):
    reference = random_image(64, 64, seed=6)
    other = ImageOps.invert(reference)
    dino = encoders.score([reference, reference], [reference, other], ["", ""])["dino"]
    flagged, reason = embeddings.copy_paste_verdict(dino[0], embeddings.pixel_difference(reference, reference),
                                                    0.999, 0.02)
    assert flagged and "copy of the reference" in reason and "pixel difference 0.0000" in reason
    flagged, reason = embeddings.copy_paste_verdict(dino[1], embeddings.pixel_difference(reference, other), 0.999,
                                                    0.02)
    assert not flagged, reason


def test_pixel_difference_known_values():
    black, white = Image.new("RGB", (80, 80), "black"), Image.new("RGB", (80, 80), "white")
    assert embeddings.pixel_difference(black, black) == 0.0
    assert embeddings.pixel_difference(black, white) == pytest.approx(1.0)
    flagged, reason = embeddings.copy_paste_verdict(None, 0.5, 0.95, 0.02)
    assert not flagged and reason == "pixel difference 0.5000 > 0.02"


def test_encoders_load_only_from_existing_local_directories(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        embeddings.Encoders(tmp_path / "missing", None, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="cannot load Dinov2Model"):
        embeddings.Encoders(tmp_path / "empty", None, "cpu")


def test_bootstrap_interval_and_paired_test():
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, 200)
    estimate = stats.bootstrap_mean(values)
    assert estimate.low < values.mean() < estimate.high and estimate.n == 200
    assert estimate.high - estimate.low == pytest.approx(2 * 1.96 * values.std() / np.sqrt(200), rel=0.15)
    assert stats.bootstrap_mean([0.5]) == stats.Estimate(0.5, 0.5, 0.5, 1)

    better = values + 0.05 + rng.normal(0, 0.01, 200)
    comparison = stats.paired_comparison(values, better)
    assert comparison.difference == pytest.approx(0.05, abs=0.005)
    assert comparison.low > 0 and comparison.p_value < 0.01
    same = stats.paired_comparison(values, values)
    assert same.difference == 0 and same.p_value == 1.0


def test_cp_pf_is_the_product_of_the_means():
    cp, pf = [0.25, 0.75, 1.0], [1.0, 0.5, 0.5]
    estimate = stats.bootstrap_product(cp, pf)
    assert estimate.mean == pytest.approx(np.mean(cp) * np.mean(pf))
    assert estimate.low <= estimate.mean <= estimate.high
