"""Known answers of the face identity scorer (dlib's packaged models) on real packaged photographs."""

import pytest
from PIL import ImageOps

from dsd_model.scoring.faces import DLIB_THRESHOLD, SCORER, FaceEmbedder
from dsd_model.scoring.identity import IdentityScorer, face_score
from photos import astronaut, chelsea, coffee, crop, half, hopper, jitter, jpeg


@pytest.fixture(scope="module")
def faces():
    return FaceEmbedder()


@pytest.fixture(scope="module")
def reference(faces):
    return faces.face(astronaut())


def score(faces, reference, image):
    return face_score(reference, faces.face(image), DLIB_THRESHOLD)


@pytest.mark.parametrize("name, transform", [
    ("jpeg q75", jpeg),
    ("50% resize", half),
    ("10% crop", crop),
    ("colour jitter", jitter),
    ("all four", lambda image: jitter(crop(half(jpeg(image))))),
    ("horizontal flip", ImageOps.mirror),
])
def test_the_same_photograph_transformed_matches(faces, reference, name, transform):
    result = score(faces, reference, transform(astronaut()))
    assert result.status == "ok" and result.scorer == SCORER
    assert result.distance < 0.3 < DLIB_THRESHOLD, name
    assert result.match is True and result.similarity > 0.95


def test_different_people_do_not_match(faces, reference):
    result = score(faces, reference, hopper())
    assert result.status == "ok"
    assert result.distance > DLIB_THRESHOLD and result.match is False
    assert result.similarity < score(faces, reference, jpeg(astronaut())).similarity


@pytest.mark.parametrize("photo", [coffee, chelsea])
def test_a_photograph_without_a_face_is_no_face_not_zero(faces, reference, photo):
    result = score(faces, reference, photo())
    assert (result.status, result.distance, result.similarity, result.match) == ("no_face", None, None, None)
    assert result.note == "no face in the image"
    assert result.rank == float("-inf")
    without = face_score(faces.face(photo()), reference, DLIB_THRESHOLD)
    assert (without.status, without.note) == ("no_face", "no face in the reference")


def test_several_faces_score_the_largest_with_a_note(faces, reference):
    assert reference.count == 2
    left, top, right, bottom = reference.box
    assert (right - left) * (bottom - top) > 80 * 80
    result = score(faces, reference, jpeg(astronaut()))
    assert result.note == ("2 faces in the reference; the largest was scored; 2 faces in the image; the largest "
                           "was scored")


def test_the_scorer_falls_back_to_no_face_without_a_subject_encoder(faces):
    scorer = IdentityScorer(faces, None, DLIB_THRESHOLD)
    scores = scorer.score(coffee(), [astronaut(), coffee()])
    assert [s.status for s in scores] == ["no_face", "no_face"]
    assert "no subject encoder" in scores[0].note
    faced = scorer.score(astronaut(), [hopper(), coffee()])
    assert [s.status for s in faced] == ["ok", "no_face"] and faced[0].match is False
