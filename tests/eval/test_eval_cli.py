"""Bad command lines get one clear line naming the setting, before any work."""

import pytest

from dsd_model.cli import main


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--contender", "a=local", "--contender", "a=local:base"], "contender: 'a' is named twice"),
        (["--contender", "a=ftp://host"], "contender: a: spec 'ftp://host' is none of"),
        (["--contender", "bad name=local"], "contender: name 'bad name' must match"),
        (["--contender", "a"], "contender: 'a' must be NAME=SPEC"),
        (["--contender", "a=local", "--size", "100"], "size: size must be a multiple of 16 in [64, 1024], got 100"),
        (["--contender", "a=local", "--judge-base-url", "http://127.0.0.1:9"], "judge_model: is not set"),
        (["--contender", "a=local:nope", "--size", "64"], "contender: a: adapter 'nope' is not loaded"),
    ],
)
def test_errors_name_the_setting(benchmark, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setenv("DSD_PROFILE", "tiny")
    assert main(["eval", "run", str(benchmark), "--run-dir", str(tmp_path / "run"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_run_directory_refuses_other_settings(benchmark, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSD_PROFILE", "tiny")
    monkeypatch.setenv("DSD_MAX_SEQUENCE_LENGTH", "32")
    common = [str(benchmark), "--run-dir", str(tmp_path / "run"), "--size", "64", "--contender", "a=local:base"]
    assert main(["eval", "run", *common, "--steps", "1"]) == 0
    assert main(["eval", "run", *common, "--steps", "2"]) == 2
    assert "run_dir: " in capsys.readouterr().err
    assert main(["eval", "report", str(tmp_path / "run"), "--confidence", "1.5"]) == 2
    assert "confidence: must be in [0.5, 1), got 1.5" in capsys.readouterr().err
