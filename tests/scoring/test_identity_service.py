"""Identity scores and best-of-n through the real service (loopback, tiny profile): REST, gRPC and jobs.

On the tiny profile, references without a face are scored by the random-weight DINOv2 (`tiny-random-dino`); a
reference with a face (the astronaut) is scored by dlib's face scorer, which finds no face in the noise-like outputs.
The server checks references and outputs with NudeNet: its face classes make the input check a real-person check
that needs `consent`, and every output passes its default (nudity) classes.
"""

import base64
import time

import grpc
import httpx
import pytest

from dsd_model.scoring.identity import IdentityScorer
from dsd_model.serving.identity import IdentityStage
from dsd_model.settings import Settings
from dsd_model.errors import InputError
from dsd_serve.grpc_stubs import dsd_pb2 as pb
from dsd_serve.grpc_stubs import dsd_pb2_grpc
from helpers import png_bytes, random_image
from photos import astronaut
from servers import start_service, wait_ready

REFERENCE = png_bytes(random_image(96, 80, seed=1))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_service(tmp_path_factory.mktemp("identity"), max_batch_rows="8", input_check_backend="nudenet",
                           input_check_labels='["FACE_FEMALE", "FACE_MALE"]', output_check_backend="nudenet")
    try:
        wait_ready(server)
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log_tail()


def body(**overrides) -> dict:
    values = dict(image=base64.b64encode(REFERENCE).decode(), prompt="the same toy on a beach", steps=3, size=64,
                  seed=5)
    values.update(overrides)
    return values


def generate(server, **overrides) -> dict:
    response = httpx.post(f"{server.url}/generate", json=body(**overrides), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_identity_scores_each_image_and_names_the_scorer(server):
    document = generate(server, identity=True, num_images=2)
    assert len(document["identity"]) == 2 and document["candidates"] is None
    for score in document["identity"]:
        assert score["scorer"] == "tiny-random-dino" and score["status"] == "ok"
        assert -1 <= score["similarity"] <= 1 and score["distance"] is None
        assert score["note"] == "no face in the reference; scored as a subject"
    assert generate(server)["identity"] is None
    assert server.metric("dsd_identity_scores_total", scorer="tiny-random-dino", status="ok") >= 2
    assert server.metric("dsd_identity_duration_seconds_count") >= 1


def test_best_of_returns_the_best_in_the_order_of_the_candidates_generated_alone(server):
    best = generate(server, best_of=4, num_images=2, exact=True)
    candidates = best["candidates"]
    assert [c["seed"] for c in candidates] == [5, 6, 7, 8]
    alone = {}
    for seed in (5, 6, 7, 8):
        single = generate(server, seed=seed, identity=True)
        alone[seed] = (single["identity"][0]["similarity"], single["images"][0])
    ranked = sorted(alone, key=lambda seed: alone[seed][0], reverse=True)
    assert best["seeds"] == ranked[:2]
    assert best["images"] == [alone[seed][1] for seed in ranked[:2]]
    for candidate in candidates:
        # the same image, embedded in a batch of another size: equal up to float rounding
        assert candidate["identity"]["similarity"] == pytest.approx(alone[candidate["seed"]][0], abs=1e-5)
        assert candidate["returned"] == (candidate["seed"] in ranked[:2])
    assert [s["similarity"] for s in best["identity"]] == pytest.approx([alone[seed][0] for seed in ranked[:2]],
                                                                         abs=1e-5)


def test_best_of_shares_forwards_and_stays_within_rounding_of_alone(server):
    """Without `exact`, candidates share forwards with each other: each returned seed regenerates its image alone
    up to float rounding, so its score stays within a small bound."""
    shared = generate(server, best_of=3, seed=40)
    (returned,) = [c for c in shared["candidates"] if c["returned"]]
    alone = generate(server, seed=returned["seed"], identity=True)["identity"][0]["similarity"]
    assert abs(returned["identity"]["similarity"] - alone) < 1e-3
    assert shared["seeds"] == [returned["seed"]]


def test_a_face_reference_is_scored_by_the_face_scorer(server):
    face = dict(image=base64.b64encode(png_bytes(astronaut())).decode(), size=256, steps=2, identity=True)
    refused = httpx.post(f"{server.url}/generate", json=body(**face), timeout=60)
    assert refused.status_code == 422
    assert (refused.json()["error"]["code"], refused.json()["error"]["field"]) == ("content_policy", "consent")
    assert "'FACE_FEMALE'" in refused.json()["error"]["message"]
    document = generate(server, **face, consent=True)
    (score,) = document["identity"]
    assert score["scorer"] == "dlib-resnet-v1"
    assert (score["status"], score["note"], score["similarity"]) == ("no_face", "no face in the image", None)
    assert score["threshold"] == 0.6


@pytest.mark.parametrize("overrides, message", [
    ({"best_of": 9}, "best_of: 9 exceeds the limit of 8"),
    ({"best_of": 2, "num_images": 3}, "best_of: 2 is fewer than num_images (3)"),
    ({"best_of": 0}, "best_of: Input should be greater than or equal to 1"),
    ({"identity": "sometimes"}, "identity: Input should be a valid boolean"),
])
def test_bad_best_of_and_identity_name_the_field(server, overrides, message):
    response = httpx.post(f"{server.url}/generate", json=body(**overrides), timeout=60)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == next(iter(overrides)) and error["message"].startswith(message)


def test_grpc_carries_scores_and_candidates(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}") as channel:
        stub = dsd_pb2_grpc.DSDServiceStub(channel)
        request = pb.GenerateRequest(image=REFERENCE, prompt="the same toy on a beach", steps=3, size=64, seed=5,
                                     best_of=4, num_images=2, exact=True)
        response = stub.Generate(request, timeout=120)
        rest = generate(server, best_of=4, num_images=2, exact=True)
        assert list(response.seeds) == rest["seeds"]
        assert [s.similarity for s in response.identity] == pytest.approx([s["similarity"] for s in rest["identity"]],
                                                                          abs=1e-5)
        assert [(c.seed, c.returned, c.identity.scorer) for c in response.candidates] == [
            (c["seed"], c["returned"], c["identity"]["scorer"]) for c in rest["candidates"]]
        assert not response.identity[0].HasField("distance")
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(pb.GenerateRequest(image=REFERENCE, prompt="x", best_of=9), timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(caught.value.trailing_metadata())["field"] == "best_of"


def test_jobs_store_the_scores(server):
    response = httpx.post(f"{server.url}/v1/jobs", json=body(best_of=3, identity=True), timeout=60)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    end = time.monotonic() + 120
    while (view := httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10).json())["status"] not in (
            "succeeded", "failed", "canceled"):
        assert time.monotonic() < end, view
        time.sleep(0.1)
    assert view["status"] == "succeeded", view
    result = view["result"]
    assert len(result["identity"]) == 1 and len(result["candidates"]) == 3
    assert result["seeds"] == [c["seed"] for c in result["candidates"] if c["returned"]]
    with grpc.insecure_channel(f"127.0.0.1:{server.env['DSD_GRPC_PORT']}") as channel:
        job = dsd_pb2_grpc.DSDServiceStub(channel).GetJob(pb.JobRef(id=job_id), timeout=30)
    assert [c.seed for c in job.result.candidates] == [c["seed"] for c in result["candidates"]]


def test_a_server_without_scorers_refuses_scores_by_field():
    stage = IdentityStage(Settings(), IdentityScorer(None, None, 0.6))
    missing = r"cannot score identity: the face scorer needs the `\[faces\]` extra"
    with pytest.raises(InputError, match=missing) as caught:
        stage.check(True, None, 1)
    assert caught.value.field == "identity"
    with pytest.raises(InputError) as caught:
        stage.check(None, 2, 1)
    assert caught.value.field == "best_of"
    stage.check(None, None, 1)
