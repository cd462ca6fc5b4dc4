import argparse
import json
import socket

import pytest

from dsd_model.data.cli import _settings, add_data_commands
from dsd_model.data.settings import DataSettings
from dsd_model.errors import InputError


def dsd_data(*argv: str) -> argparse.Namespace:
    """Parse `dsd data ...` the way the main `dsd` command nests these commands."""
    parser = argparse.ArgumentParser(prog="dsd")
    data = parser.add_subparsers(dest="command", required=True).add_parser("data")
    add_data_commands(data.add_subparsers(dest="data_command", required=True))
    return parser.parse_args(["data", *argv])


def run(*argv: str) -> None:
    args = dsd_data(*argv)
    args.handler(args)


def test_run_makes_a_dataset_from_the_command_line(tmp_path, chat_server, captions_file, capsys):
    work = tmp_path / "work"
    grid_flags = ["--work-dir", str(work), "--width", "64", "--height", "64", "--num-inference-steps", "2"]
    chat_flags = ["--vlm-base-url", chat_server.url, "--vlm-model", "test-vlm", "--concurrency", "1"]
    prompt_flags = ["--captions", str(captions_file), "--limit", "2", "--prompt-backend", "template"]
    run("run", *prompt_flags, *grid_flags, *chat_flags)
    out = capsys.readouterr().out
    assert "prompts: 2 done (0 failed), 0 already done before" in out
    assert "grids: 2 done" in out and "curate: 2 done" in out
    summary = json.loads(out[out.index("{") :])
    assert summary["curation"] == {"accepted": 2, "rejected": 0, "failed": 0}
    assert summary["per_panel"]["panels"] == {"kept": 7, "dropped": 1}
    assert summary["pairs"] == 12 + 6
    assert (work / "dataset" / "pairs.jsonl").is_file() and (work / "contact_sheet.png").is_file()

    run("grids", *grid_flags)
    assert "grids: 0 done (0 failed), 2 already done before" in capsys.readouterr().out


def test_run_completes_offline_without_any_chat_server(tmp_path, captions_file, capsys):
    work = tmp_path / "work"
    flags = ["--work-dir", str(work), "--width", "64", "--height", "64", "--num-inference-steps", "2"]
    run("run", "--captions", str(captions_file), "--limit", "2", "--prompt-backend", "template", *flags)
    out = capsys.readouterr().out
    assert "curate: 2 done (0 failed)" in out
    summary = json.loads(out[out.index("{") :])
    verdicts = [json.loads(line) for line in (work / "curation.jsonl").read_text().splitlines()]
    assert {v["judge"] for v in verdicts} == {"embedding:pixel-statistics"}
    assert summary["pairs"] == summary["per_panel"]["pairs"]["kept"]
    assert sum(summary["curation"].values()) == 2


def test_run_makes_relighting_pairs_offline(tmp_path, captions_file, capsys):
    work = tmp_path / "work"
    flags = ["--work-dir", str(work), "--width", "64", "--height", "64", "--num-inference-steps", "2"]
    run("run", "--captions", str(captions_file), "--limit", "2", "--prompt-backend", "template", "--recipe",
        "relight", "--structure-min-agreement", "0", *flags)
    out = capsys.readouterr().out
    assert "structure: 2 done (0 failed)" in out
    summary = json.loads(out[out.index("{") :])
    assert (summary["recipe"], summary["items"], summary["pairs"]) == ("relight", {"kept": 2, "dropped": 0}, 4)
    assert not (work / "grids.jsonl").exists()


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("DSD_DATA_LAYOUT", "1x2")
    monkeypatch.setenv("DSD_DATA_WIDTH", "512")
    settings = _settings(dsd_data("run", "--captions", "c.txt", "--width", "256", "--no-cache"))
    assert (settings.layout, settings.width, settings.height, settings.cache) == ("1x2", 256, 1024, False)
    assert DataSettings().layout == "1x2"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["grids", "--layout", "2by2"], "layout: '2by2' is not COLUMNSxROWS"),
        (["grids", "--width", "100"], "width: must be a multiple of 16 (got 100)"),
        (["grids", "--layout", "3x1", "--width", "64"], "layout: a 64x1024 grid does not divide into 3x1 panels"),
        (["prompts", "--captions", "missing.txt"], "captions: file 'missing.txt' does not exist"),
        (["curate", "--work-dir", "."], "work_dir: '.' has no rendered grids"),
        (["grids", "--teachers", "a=0"], "teachers: entry 'a=0' is not PATH or PATH=WEIGHT with a weight > 0"),
        (["grids", "--teachers", "a", "--teacher-dir", "b"], "teachers: give teachers or teacher_dir, not both"),
    ],
)
def test_bad_input_is_refused_naming_the_field(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as info:
        run(*argv)
    assert message in str(info.value)


def test_unreachable_server_exits_with_the_setting_named(tmp_path, captions_file):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with pytest.raises(SystemExit) as info:
        run(
            "prompts",
            "--captions",
            str(captions_file),
            "--work-dir",
            str(tmp_path),
            "--llm-base-url",
            url,
            "--llm-model",
            "m",
            "--max-retries",
            "0",
        )
    assert str(info.value).startswith(f"error: llm_base_url '{url}/chat/completions': is unreachable")
