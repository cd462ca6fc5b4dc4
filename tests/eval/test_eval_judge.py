"""The VLM judge against a scripted OpenAI-compatible server on loopback: scores parsed, malformed replies retried
and then recorded as failures (never as 0), 429 and timeouts retried."""

import json

import pytest
from data.conftest import ChatServer

from dsd_model.data.chat import ChatError
from dsd_model.data.manifest import Manifest
from dsd_model.errors import InputError
from dsd_model.eval.benchmark import read_benchmark
from dsd_model.eval.judge import instructions
from dsd_model.eval.report import build_report
from dsd_model.eval.run import SCORES_FILE, score_images
from dsd_model.eval.settings import EvalSettings

IMAGES = 4
JUDGE_SCORES = {"cp": 3, "pf": 2}


class JudgeServer(ChatServer):
    """Answers CP requests with score 3 and PF requests with score 2, after a chain of thought."""

    def answer(self, kind: str, body: dict) -> str:
        text = body["messages"][1]["content"][0]["text"]
        metric = "cp" if "concept preservation" in text else "pf"
        images = sum(part["type"] == "image_url" for part in body["messages"][1]["content"])
        assert images == (2 if metric == "cp" else 1)
        reply = {"score": JUDGE_SCORES[metric], "reason": f"scripted {metric}"}
        return f"1. Features listed.\n2. Checked.\n```json\n{json.dumps(reply)}\n```"


@pytest.fixture
def judge_server():
    server = JudgeServer()
    yield server
    server.close()


@pytest.fixture
def settings(generated_run, judge_server):
    def make(**overrides):
        values = dict(run_dir=generated_run, judge_base_url=judge_server.url, judge_model="judge", concurrency=1,
                      max_retries=2, backoff_s=0.01, request_timeout_s=1.0, max_reply_attempts=2, cache=False)
        return EvalSettings(**{**values, **overrides})

    return make


def scores(run_dir, metric):
    return {r["generation"]: r for r in Manifest(run_dir / SCORES_FILE).records().values() if r["metric"] == metric}


def test_scores_are_parsed_and_normalised(settings, benchmark, judge_server):
    report = score_images(settings(), read_benchmark(benchmark))
    assert (report.done, report.failed) == (2 * IMAGES, 0)
    for metric, raw in JUDGE_SCORES.items():
        records = scores(settings().run_dir, metric)
        assert len(records) == IMAGES
        assert {(r["status"], r["value"], r["raw"], r["reason"], r["prompts"]) for r in records.values()} == {
            ("ok", raw / 4, raw, f"scripted {metric}", "v1")}
    first_cp = judge_server.requests[0][1]["messages"][1]["content"][0]["text"]
    assert 'the category "live"' in first_cp
    assert judge_server.count() == 2 * IMAGES


def test_a_malformed_reply_is_asked_again(settings, benchmark, judge_server):
    judge_server.fault(("reply", "It looks great!"), ("reply", '```json\n{"score": 9}\n```'))
    report = score_images(settings(max_reply_attempts=3), read_benchmark(benchmark))
    assert (report.done, report.failed) == (2 * IMAGES, 0)
    assert judge_server.count() == 2 * IMAGES + 2
    retry = judge_server.requests[2][1]["messages"]
    assert retry[-2]["content"] == '```json\n{"score": 9}\n```'
    assert "must be an integer from 0 to 4, got 9" in retry[-1]["content"]


def test_a_reply_that_stays_malformed_is_a_failure_not_a_zero(settings, benchmark, judge_server, tmp_path):
    judge_server.fault(("reply", "no score here"), ("reply", '{"score": "high"}'))
    report = score_images(settings(), read_benchmark(benchmark))
    assert report.failed == 1
    failed = [r for r in Manifest(settings().run_dir / SCORES_FILE).records().values() if r["status"] == "failed"]
    assert len(failed) == 1 and "value" not in failed[0]
    assert "no usable reply in 2 attempt(s)" in failed[0]["reason"] and "'high'" in failed[0]["reason"]

    built = build_report([settings().run_dir], tmp_path / "report")
    metric = failed[0]["metric"]
    contender = next(iter(built["all"]))
    assert built["all"][contender][metric]["n"] == IMAGES - 1
    assert built["all"][contender][metric]["mean"] == JUDGE_SCORES[metric] / 4
    assert built["failures"][contender] == {metric: 1}


def test_429_and_timeouts_are_retried(settings, benchmark, judge_server):
    judge_server.fault(("status", 429, {"Retry-After": "0"}), ("sleep", 1.5), ("status", 503))
    report = score_images(settings(max_retries=3, request_timeout_s=0.5), read_benchmark(benchmark))
    assert (report.done, report.failed) == (2 * IMAGES, 0)
    assert judge_server.count() == 2 * IMAGES + 3
    assert all(r["status"] == "ok" for r in Manifest(settings().run_dir / SCORES_FILE).records().values())


def test_a_server_that_stays_down_stops_the_run_and_a_rerun_resumes(settings, benchmark, judge_server):
    judge_server.down_after = 3
    with pytest.raises(ChatError, match=r"judge_base_url .*HTTP 503.*gave up after 3 attempt\(s\)"):
        score_images(settings(), read_benchmark(benchmark))
    kept = len(scores(settings().run_dir, "cp")) + len(scores(settings().run_dir, "pf"))
    assert kept == 3
    judge_server.down_after = None
    before = judge_server.count()
    report = score_images(settings(), read_benchmark(benchmark))
    assert report.done == 2 * IMAGES - 3 and judge_server.count() - before == 2 * IMAGES - 3


def test_instructions_are_versioned_files(settings, benchmark, judge_server):
    assert "0 - the subject is absent" in instructions("cp", "v1")
    assert "{prompt}" in instructions("pf", "v1")
    with pytest.raises(InputError, match="judge_prompts: no instructions cp_v9.txt"):
        score_images(settings(judge_prompts="v9"), read_benchmark(benchmark))
    assert judge_server.count() == 0
