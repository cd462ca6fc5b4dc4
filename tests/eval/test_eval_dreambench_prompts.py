"""DreamBench++'s own judge prompts, read from a fabricated folder of the benchmark repository's layout, against a
scripted judge that answers in DreamBench++'s reply format; our `v1` prompts stay the fallback, labelled as not
comparable."""

import hashlib

import pytest
from data.conftest import ChatServer

from dsd_model.data.chat import MalformedReply
from dsd_model.data.manifest import Manifest
from dsd_model.errors import InputError
from dsd_model.eval.benchmark import read_benchmark
from dsd_model.eval.judge_prompts import parse_dreambench_reply, resolve_prompts
from dsd_model.eval.report import build_report
from dsd_model.eval.run import SCORES_FILE, run_eval
from dsd_model.eval.settings import EvalSettings
from helpers import random_image

FILES = {
    "user_prompt_subject_full.txt": "### Task Definition\nCompare the subject of the two images.\nScore: [0-4]",
    "gpt_prompt_subject_full.txt": "Yes, I understand the subject task.",
    "user_prompt_text_full.txt": "### Task Definition\nCompare the image with the text prompt.\nScore: [0-4]",
    "gpt_prompt_text_full.txt": "Yes, I understand the text task.",
}


class DreamBenchJudge(ChatServer):
    """Answers as GPT-4o does under DreamBench++'s prompts: CP `Score: 3`, PF an analysis then `Score: 2`."""

    def answer(self, kind: str, body: dict) -> str:
        messages = body["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        if "subject task" in messages[1]["content"]:
            assert [part["type"] for part in messages[2]["content"]] == ["image_url", "image_url"]
            return "Score: 3"
        assert [part["type"] for part in messages[2]["content"]] == ["text", "image_url"]
        return f"Analysis: the image shows {messages[2]['content'][0]['text']!r} loosely.\nScore: 2"


def write_dreambench(root, with_prompts: bool = True):
    """A DreamBench++-layout benchmark (images/, captions/) with, optionally, the repository's prompt folder."""
    for category, index in (("animal", "0"), ("object", "1")):
        (root / "images" / category).mkdir(parents=True)
        (root / "captions" / category).mkdir(parents=True)
        random_image(64, 64, seed=int(index)).save(root / "images" / category / f"{index}.jpg")
        (root / "captions" / category / f"{index}.txt").write_text(f"thing {index}\na thing on a beach\n",
                                                                   encoding="utf-8")
    if with_prompts:
        prompts = root / "dreambench_plus" / "prompts"
        prompts.mkdir(parents=True)
        for name, text in FILES.items():
            (prompts / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def judge_server():
    server = DreamBenchJudge()
    yield server
    server.close()


def evaluate(tmp_path, bench, judge_server, tiny_local, **overrides):
    settings = EvalSettings(run_dir=tmp_path / "run", size=64, steps=2, judge_base_url=judge_server.url,
                            judge_model="judge", concurrency=1, max_retries=0, max_reply_attempts=2, cache=False,
                            **overrides)
    run_eval(settings, bench, {"dsd": "local:identity"}, load_local=lambda: tiny_local)
    return [r for r in Manifest(settings.run_dir / SCORES_FILE).records().values() if r["metric"] in ("cp", "pf")]


def test_dreambench_prompts_are_detected_read_and_recorded_with_their_digest(tmp_path, judge_server, tiny_local):
    bench = write_dreambench(tmp_path / "bench")
    records = evaluate(tmp_path, bench, judge_server, tiny_local)
    digest = hashlib.sha256()
    for name in ("user_prompt_subject_full.txt", "gpt_prompt_subject_full.txt", "user_prompt_text_full.txt",
                 "gpt_prompt_text_full.txt"):
        digest.update(name.encode() + b"\0" + FILES[name].encode() + b"\0")
    assert len(records) == 4
    assert {(r["metric"], r["raw"], r["value"], r["prompts"], r["prompts_digest"], r["comparable"]) for r in records} \
        == {("cp", 3, 0.75, "dreambench_plus", digest.hexdigest(), True),
            ("pf", 2, 0.5, "dreambench_plus", digest.hexdigest(), True)}
    first = judge_server.requests[0][1]["messages"]
    assert first[0]["content"] in (FILES["user_prompt_subject_full.txt"], FILES["user_prompt_text_full.txt"])
    report = build_report([tmp_path / "run"], tmp_path / "report")
    assert report["judge_prompts"]["dsd"]["cp"] == [
        f"DreamBench++'s own prompts (sha256 {digest.hexdigest()[:12]}): comparable with published DreamBench++ "
        "scores"]
    assert "## Judge prompts" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")


def test_our_prompts_are_the_fallback_and_not_comparable(tmp_path, judge_server, tiny_local):
    bench = write_dreambench(tmp_path / "bench", with_prompts=False)
    prompts = resolve_prompts("auto", read_benchmark(bench).root)
    assert (prompts.name, prompts.comparable) == ("v1", False)
    assert "not comparable with published DreamBench++ scores" in prompts.description


def test_an_explicit_path_and_a_wrong_one(tmp_path):
    bench = write_dreambench(tmp_path / "bench")
    assert resolve_prompts(str(bench), None).comparable
    assert resolve_prompts(str(bench / "dreambench_plus" / "prompts"), None).comparable
    with pytest.raises(InputError, match="judge_prompts: .* holds no DreamBench\\+\\+ prompt files"):
        resolve_prompts(str(tmp_path / "nowhere"), None)
    (bench / "dreambench_plus" / "prompts" / "gpt_prompt_text_full.txt").unlink()
    with pytest.raises(InputError, match="lacks user_prompt_text_full.txt or gpt_prompt_text_full.txt"):
        resolve_prompts(str(bench), None)


@pytest.mark.parametrize("reply, raw", [("Score: 4", 4), ("Analysis: close.\nscore: 0", 0),
                                        ("Score: Excellent 3", 3)])
def test_reply_parsing_as_dreambench_reads_it(reply, raw):
    assert parse_dreambench_reply(reply).raw == raw


@pytest.mark.parametrize("reply, problem", [("It is great.", "found 0"), ("Score: 3\nScore: 4", "found 2"),
                                            ("Score: 7", "must be from 0 to 4, got 7")])
def test_replies_dreambench_would_reject(reply, problem):
    with pytest.raises(MalformedReply, match=problem):
        parse_dreambench_reply(reply)


def test_a_reply_without_one_score_is_asked_anew(tmp_path, judge_server, tiny_local):
    bench = write_dreambench(tmp_path / "bench")
    judge_server.fault(("reply", "Score: 3 or Score: 4"))
    records = evaluate(tmp_path, bench, judge_server, tiny_local)
    assert all(r["status"] == "ok" for r in records) and judge_server.count() == 5
