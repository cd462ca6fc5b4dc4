"""`dsd eval run` → `dsd eval report` on a 2-subject, 2-prompt benchmark: two local adapters and one live service
(REST and gRPC), scored by the tiny encoders and a scripted judge; then a resume after an interruption."""

import base64
import json

import numpy as np
import pytest
from data.conftest import ChatServer
from PIL import Image
from servers import start_service, wait_ready

from dsd_model.cli import main
from dsd_model.data.manifest import Manifest
from dsd_model.eval import run as eval_run
from dsd_model.eval.benchmark import read_benchmark
from dsd_model.eval.contenders import GenerationParams, LocalContender
from dsd_model.eval.report import build_report
from dsd_model.eval.settings import EvalSettings

CASES, SEEDS = 4, 2
PIXEL_TOLERANCE = 2 / 255
"""The service and the local pipeline run the same tiny model at one row per forward; separate processes may round
differently, which can move a pixel by a level or two."""


class ScoringJudge(ChatServer):
    """PF 4 for every image; CP 1 for the `structure` adapter's images (told apart by the image bytes the test
    registers) and 4 for the others."""

    structure_images: set[str] = set()

    def answer(self, kind, body):
        content = body["messages"][1]["content"]
        if "concept preservation" in content[0]["text"]:
            score = 1 if content[2]["image_url"]["url"] in self.structure_images else 4
        else:
            score = 4
        return '```json\n{"score": %d, "reason": "scripted"}\n```' % score


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    server = start_service(tmp_path_factory.mktemp("service"), max_sequence_length="32", device="cpu")
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def test_run_and_report(tmp_path, benchmark, encoders_dir, service, monkeypatch, capsys):
    for name, value in {"PROFILE": "tiny", "DEVICE": "cpu", "MAX_SEQUENCE_LENGTH": "32"}.items():
        monkeypatch.setenv(f"DSD_{name}", value)
    run_dir = tmp_path / "run"
    dino, clip = encoders_dir
    common = [str(benchmark), "--run-dir", str(run_dir), "--steps", "2", "--size", "64", "--images-per-prompt",
              str(SEEDS), "--dino-path", str(dino), "--clip-path", str(clip), "--copy-paste-dino", "0.9999"]
    grpc = f"grpc://127.0.0.1:{service.env['DSD_GRPC_PORT']}"
    assert main(["eval", "run", *common, "--contender", "identity=local:identity", "--contender",
                 "structure=local:structure", "--contender", f"rest={service.url}", "--contender",
                 f"grpc={grpc}"]) == 0
    assert "generate: 32 done (0 failed), 0 already done before" in capsys.readouterr().out

    generations = Manifest(run_dir / eval_run.GENERATIONS_FILE).records()
    assert len(generations) == 4 * CASES * SEEDS
    assert {g["seed"] for g in generations.values()} == {0, 1}
    image = lambda contender, case, seed: np.asarray(  # noqa: E731
        Image.open(run_dir / generations[f"{contender}/{case}/{seed}"]["path"]), dtype=np.float32) / 255
    for case in ("fox/0", "teapot/1"):
        for seed in (0, 1):
            local = image("identity", case, seed)
            assert local.shape == (64, 64, 3)
            assert np.abs(image("rest", case, seed) - local).max() <= PIXEL_TOLERANCE
            assert np.abs(image("grpc", case, seed) - local).max() <= PIXEL_TOLERANCE
            assert np.abs(image("structure", case, seed) - local).max() > 2 * PIXEL_TOLERANCE

    # A judge is added to the finished run: only the judge scores are new
    judge = ScoringJudge()
    try:
        ScoringJudge.structure_images = {
            "data:image/png;base64," + base64.b64encode((run_dir / g["path"]).read_bytes()).decode()
            for g in generations.values() if g["contender"] == "structure"}
        assert main(["eval", "run", *common, "--contender", "identity=local:identity", "--judge-base-url",
                     judge.url, "--judge-model", "judge", "--no-cache"]) == 0
    finally:
        judge.close()
    printed = capsys.readouterr().out
    assert "generate: 0 done (0 failed), 8 already done before" in printed
    assert "score: 64 done (0 failed), 128 already done before" in printed
    assert judge.count() == 2 * 4 * CASES * SEEDS

    out = tmp_path / "report"
    assert main(["eval", "report", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["contenders"] == ["identity", "structure", "rest", "grpc"]
    assert report["metrics"] == ["cp", "pf", "cp·pf", "dino", "clip_i", "clip_t"]
    cells = report["all"]
    assert cells["identity"]["cp"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": CASES * SEEDS}
    assert cells["structure"]["cp"]["mean"] == 0.25 and cells["structure"]["cp·pf"]["mean"] == 0.25
    assert cells["rest"]["dino"]["mean"] == pytest.approx(cells["identity"]["dino"]["mean"], abs=1e-3)
    for contender in report["contenders"]:
        assert 0 < cells[contender]["dino"]["low"] <= cells[contender]["dino"]["mean"] <= cells[contender]["dino"]["high"]
    assert set(report["categories"]) == {"live", "object"}
    assert report["categories"]["live"]["identity"]["cp"]["n"] == CASES * SEEDS // 2
    verdicts = {(c["contender"], c["metric"]): c["verdict"] for c in report["comparisons"]}
    assert verdicts["structure", "cp"].startswith("cp: identity scores higher than structure (Δ -0.7500")
    assert verdicts["rest", "cp"].startswith("cp: no significant difference between rest and identity (Δ +0.0000")
    assert "| identity | 1.000 [1.000, 1.000] (8) |" in printed and verdicts["structure", "cp"] in printed
    assert {p.name for p in (out / "contact_sheets").iterdir()} == {"fox.png", "teapot.png"}
    with Image.open(out / "contact_sheets" / "fox.png") as sheet:
        assert sheet.size == ((1 + CASES // 2 * SEEDS) * 128, 4 * (128 + 16))
    assert (out / "cp_pf.png").stat().st_size > 0 and (out / "report.md").is_file()


class Interrupting(LocalContender):
    """A local contender that counts its generations; its call number `stop_at` raises KeyboardInterrupt, as when
    a person presses Ctrl-C during a run."""

    def __init__(self, pipe, stop_at=None):
        super().__init__("dsd", "local:identity", pipe, GenerationParams(2, 3.5, 64, 60, None))
        self.stop_at, self.calls, self.generated = stop_at, 0, []

    def generate(self, reference, prompt, seeds):
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.calls += 1
        self.generated += [(prompt, seed) for seed in seeds]
        return super().generate(reference, prompt, seeds)


def test_resume_after_interruption_does_no_work_twice(tmp_path, benchmark, encoders_dir, tiny_local):
    settings = EvalSettings(run_dir=tmp_path / "run", size=64, steps=2, images_per_prompt=SEEDS,
                            dino_path=encoders_dir[0], embed_batch_size=3)
    loaded = read_benchmark(benchmark)
    first = Interrupting(tiny_local, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        eval_run.generate_images(settings, loaded, [first])
    assert len(Manifest(settings.run_dir / eval_run.GENERATIONS_FILE).records()) == 3 * SEEDS

    second = Interrupting(tiny_local)
    report = eval_run.generate_images(settings, loaded, [second])
    assert (report.done, report.skipped) == (SEEDS, 3 * SEEDS)
    assert not set(first.generated) & set(second.generated)
    assert len(set(first.generated) | set(second.generated)) == CASES * SEEDS

    scored = eval_run.score_images(settings, loaded)
    assert (scored.done, scored.skipped) == (2 * CASES * SEEDS, 0)
    again = eval_run.score_images(settings, loaded)
    assert (again.done, again.skipped) == (0, 2 * CASES * SEEDS)
    third = Interrupting(tiny_local)
    assert eval_run.generate_images(settings, loaded, [third]).done == 0 and third.calls == 0


def test_two_runs_are_compared_pairwise(tmp_path, benchmark, encoders_dir, tiny_local):
    for run, spec in (("old", "local:structure"), ("new", "local:identity")):
        settings = EvalSettings(run_dir=tmp_path / run, size=64, steps=2, dino_path=encoders_dir[0])
        eval_run.run_eval(settings, benchmark, {"dsd": spec}, load_local=lambda: tiny_local)
    report = build_report([tmp_path / "old", tmp_path / "new"], tmp_path / "report")
    assert report["contenders"] == ["old:dsd", "new:dsd"]
    (comparison,) = report["comparisons"]
    assert (comparison["baseline"], comparison["contender"], comparison["metric"], comparison["n"]) == (
        "old:dsd", "new:dsd", "dino", CASES)
    dino = {c: report["all"][c]["dino"]["mean"] for c in report["contenders"]}
    assert comparison["difference"] == pytest.approx(dino["new:dsd"] - dino["old:dsd"], abs=1e-9)
    assert comparison["verdict"].startswith("dino: ")
