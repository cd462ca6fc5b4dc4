import json

import pytest

from dsd_model.data.chat import ChatError
from dsd_model.data.manifest import Manifest
from dsd_model.data.prompts import PROMPTS_FILE, caption_id, make_prompts, read_captions
from dsd_model.data.settings import DataSettings
from dsd_model.errors import InputError


def records(settings) -> dict:
    return Manifest(settings.work_dir / PROMPTS_FILE).records()


def test_read_captions_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("a fox\n\n  an owl  \na fox\n", encoding="utf-8")
    assert [c.text for c in read_captions(txt)] == ["a fox", "an owl"]
    assert read_captions(txt)[0].id == caption_id("a fox")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"TEXT": "a fox", "url": "x"}\n{"TEXT": "an owl"}\n', encoding="utf-8")
    assert [c.text for c in read_captions(jsonl, field="TEXT", limit=1)] == ["a fox"]


def test_read_captions_errors_name_the_input(tmp_path):
    with pytest.raises(InputError, match="captions: file .*missing.txt' does not exist"):
        read_captions(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="captions: .*empty.txt' holds no captions"):
        read_captions(tmp_path / "empty.txt")
    (tmp_path / "c.csv").write_text("a fox\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"expected \.txt"):
        read_captions(tmp_path / "c.csv")
    (tmp_path / "c.jsonl").write_text('{"caption": "a fox"}\n{"text": "an owl"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"c.jsonl:2: no non-empty string field 'caption'"):
        read_captions(tmp_path / "c.jsonl")
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:1: not valid JSON"):
        read_captions(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="limit: must be at least 1"):
        read_captions(tmp_path / "c.csv", limit=0)


def test_template_backend_is_offline_and_deterministic(tmp_path, captions_file):
    first = DataSettings(work_dir=tmp_path / "a")
    second = DataSettings(work_dir=tmp_path / "b", llm_base_url=None)
    assert make_prompts(first, captions_file).done == 5
    make_prompts(second, captions_file)
    assert (first.work_dir / PROMPTS_FILE).read_text() == (second.work_dir / PROMPTS_FILE).read_text()
    fox = records(first)[caption_id("a red plush fox with a blue scarf")]
    assert (fox["status"], fox["backend"]) == ("ok", "template")
    assert fox["subject"] == "red plush fox with a blue scarf"
    assert len(fox["panels"]) == 4 and len(set(fox["panels"])) == 4
    assert fox["prompt"].startswith("A grid of 4 images (2 columns, 2 rows) showing the same red plush fox with")
    assert "Top left: " + fox["panels"][0] + "." in fox["prompt"]
    assert "Bottom right: " + fox["panels"][3] + "." in fox["prompt"]


def test_llm_backend_with_filter_records_every_outcome(chat_server, make_settings, captions_file):
    settings = make_settings(caption_filter=True, layout="1x2", width=32, height=64)
    report = make_prompts(settings, captions_file)
    assert (report.done, report.skipped, report.failed) == (5, 0, 1)
    by_caption = {r["caption"]: r for r in records(settings).values()}
    assert by_caption["a wide mountain landscape at dusk"]["status"] == "filtered"
    assert by_caption["a glitch in the matrix"]["status"] == "failed"
    assert "no usable reply in 3 attempt(s)" in by_caption["a glitch in the matrix"]["error"]
    owl = by_caption["a ceramic owl figurine"]
    assert owl["status"] == "ok" and owl["backend"] == "llm" and owl["layout"] == "1x2"
    assert owl["prompt"] == (
        "A grid of 2 images (1 column, 2 rows) showing the same ceramic owl figurine in every panel. "
        "Top: the ceramic owl figurine in scene 1. Bottom: the ceramic owl figurine in scene 2."
    )
    assert chat_server.count("filter") == 4 + 3 and chat_server.count("content") == 3

    again = make_prompts(settings, captions_file)
    assert (again.done, again.skipped, again.failed) == (1, 4, 1)
    assert chat_server.count() == 10 + 3, "only the failed caption is asked again"


def test_interrupted_run_resumes_without_asking_twice(chat_server, make_settings, tmp_path):
    captions = tmp_path / "clean.txt"
    captions.write_text("".join(f"a toy robot number {i}\n" for i in range(5)), encoding="utf-8")
    settings = make_settings(concurrency=1, max_retries=1)
    chat_server.down_after = 2
    with pytest.raises(ChatError, match="llm_base_url .*HTTP 503"):
        make_prompts(settings, captions)
    assert len(records(settings)) == 2
    with (settings.work_dir / PROMPTS_FILE).open("a", encoding="utf-8") as handle:
        handle.write('{"id": "torn by a kill -9')

    chat_server.down_after = None
    before = chat_server.count()
    report = make_prompts(settings, captions)
    assert (report.done, report.skipped) == (3, 2)
    assert chat_server.count() - before == 3
    assert len(records(settings)) == 5
    lines = (settings.work_dir / PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(json.loads(line)["status"] == "ok" for line in lines)


def test_stage_settings_are_checked(tmp_path, captions_file):
    with pytest.raises(InputError, match="caption_filter: needs the llm prompt backend"):
        make_prompts(DataSettings(work_dir=tmp_path, caption_filter=True), captions_file)
    with pytest.raises(InputError, match="llm_base_url: is not set"):
        make_prompts(DataSettings(work_dir=tmp_path, prompt_backend="llm"), captions_file)
    with pytest.raises(InputError, match="llm_model: is not set"):
        make_prompts(DataSettings(work_dir=tmp_path, llm_base_url="http://127.0.0.1:9/v1"), captions_file)
    make_prompts(DataSettings(work_dir=tmp_path), captions_file)
    with pytest.raises(InputError, match="layout: .* was made for layout 2x2, not 2x1"):
        make_prompts(DataSettings(work_dir=tmp_path, layout="2x1"), captions_file)
