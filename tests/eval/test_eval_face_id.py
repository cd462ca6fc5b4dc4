"""`face_id` in `dsd eval` with dlib's packaged face scorer, on real packaged photographs standing in for generated
images: scores, `no_face` records (never 0), and the copy-paste flag reading a face distance near 0."""

import json

import pytest

from dsd_model.data.manifest import Manifest, save_png
from dsd_model.eval.benchmark import read_benchmark
from dsd_model.eval.report import build_report
from dsd_model.eval.run import GENERATIONS_FILE, RUN_FILE, SCORES_FILE, score_images
from dsd_model.eval.settings import EvalSettings
from photos import astronaut, coffee, half, hopper, jitter

IMAGES = {"copy": lambda: jitter(astronaut()), "other": hopper, "cup": coffee, "small": lambda: half(astronaut())}


@pytest.fixture
def photo_run(tmp_path):
    """A run whose 'generated' images of the astronaut subject are photographs: a colour-jittered copy of the
    reference (a copy by its face distance only), another person, a cup, and the reference at half size (scaled
    back: a copy by its pixels, not by its face distance)."""
    bench = tmp_path / "bench"
    bench.mkdir()
    astronaut().save(bench / "astronaut.png")
    lines = [{"subject": "astronaut", "image": "astronaut.png", "prompt": f"the astronaut, take {i}",
              "category": "human"} for i in range(len(IMAGES))]
    (bench / "benchmark.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    benchmark = read_benchmark(bench / "benchmark.jsonl")
    run = tmp_path / "run"
    manifest = Manifest(run / GENERATIONS_FILE)
    for index, (name, make) in enumerate(IMAGES.items()):
        path = f"images/photos/astronaut/{index}-0.png"
        save_png(make().resize((512, 512)), run / path)
        manifest.append({"id": f"photos/astronaut/{index}/0", "contender": "photos", "subject": "astronaut",
                         "index": index, "seed": 0, "path": path})
    (run / RUN_FILE).write_text(json.dumps({"benchmark": benchmark.to_json(), "contenders": {"photos": "local"},
                                            "generation": {}}), encoding="utf-8")
    return run, benchmark


def test_face_id_scores_no_face_and_the_copy_flag(photo_run, tmp_path):
    run, benchmark = photo_run
    report = score_images(EvalSettings(run_dir=run, face_id=True), benchmark)
    assert (report.done, report.failed) == (2 * len(IMAGES), 0)
    records = Manifest(run / SCORES_FILE).records()
    face = {name: records[f"face_id:photos/astronaut/{i}/0"] for i, name in enumerate(IMAGES)}
    copy = {name: records[f"copy_paste:photos/astronaut/{i}/0"] for i, name in enumerate(IMAGES)}

    assert face["copy"]["status"] == "ok" and face["copy"]["distance"] < 0.15 and face["copy"]["match"] is True
    assert copy["copy"]["value"] == 1.0 and "face distance" in copy["copy"]["reason"]
    assert "pixel difference" not in copy["copy"]["reason"].split(":", 1)[1]

    assert face["other"]["status"] == "ok" and face["other"]["distance"] > 0.6 and face["other"]["match"] is False
    assert face["other"]["value"] < face["copy"]["value"]
    assert copy["other"]["value"] == 0.0

    assert face["small"]["status"] == "ok" and 0.15 < face["small"]["distance"] < 0.6
    assert copy["small"]["value"] == 1.0 and copy["small"]["reason"].startswith("copy of the reference: pixel")

    assert face["cup"] == {**face["cup"], "status": "no_face", "reason": "no face in the image"}
    assert "value" not in face["cup"]

    built = build_report([run], tmp_path / "report")
    assert "face_id" in built["metrics"] and built["no_face"] == {"photos": 1}
    assert built["all"]["photos"]["face_id"]["n"] == 3
    markdown = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "face_id: no face in the reference or the image (not scored, not counted as 0): photos: 1 of 4" in markdown


def test_face_id_off_and_required(photo_run):
    run, benchmark = photo_run
    score_images(EvalSettings(run_dir=run, face_id=False), benchmark)
    assert not [r for r in Manifest(run / SCORES_FILE).records().values() if r["metric"] == "face_id"]
