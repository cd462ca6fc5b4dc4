"""Several teachers in one run: local pipeline directories of different classes, mixed by weight."""

import json
from collections import Counter

import pytest
from pydantic import ValidationError
from PIL import Image

from dsd_model.data.grids import GRIDS_FILE, pick_teacher, render_grids
from dsd_model.data.manifest import Manifest
from dsd_model.data.prompts import make_prompts
from dsd_model.data.settings import DataSettings
from dsd_model.errors import InputError


def test_two_teacher_classes_render_one_run(make_settings, captions_file, teacher_dirs):
    flux, sd3 = teacher_dirs
    settings = make_settings(prompt_backend="template", teachers=f"{flux}=1,{sd3}=1", grids_per_prompt=2)
    make_prompts(settings, captions_file)
    assert render_grids(settings).done == 10
    grids = Manifest(settings.work_dir / GRIDS_FILE).records().values()
    assert Counter((g["teacher"], g["teacher_class"]) for g in grids) == {
        (str(flux), "FluxPipeline"): 5,
        (str(sd3), "StableDiffusion3Pipeline"): 5,
    }
    for grid in grids:
        assert grid["teacher"] == pick_teacher(settings.teacher_mix(), settings.seed, grid["id"])
        with Image.open(settings.work_dir / grid["path"]) as image:
            assert (image.size, image.mode) == ((64, 64), "RGB")
    assert render_grids(settings).skipped == 10


def test_mix_weights_set_the_share_of_each_teacher():
    mix = DataSettings(teachers="/m/flux=3,/m/sd3").teacher_mix()
    assert mix == [("/m/flux", 0.75), ("/m/sd3", 0.25)]
    draws = Counter(pick_teacher(mix, 0, f"grid{i}") for i in range(4000))
    assert abs(draws["/m/flux"] / 4000 - 0.75) < 0.03, draws  # about 4.4 standard deviations


@pytest.mark.parametrize(
    "teachers, message",
    [
        ("/m/flux=0", "entry '/m/flux=0' is not PATH or PATH=WEIGHT with a weight > 0"),
        ("/m/flux=x", "with a weight > 0"),
        ("tiny,tiny", "'tiny' is listed twice"),
    ],
)
def test_bad_teacher_lists_are_refused(teachers, message):
    with pytest.raises(ValidationError, match=message):
        DataSettings(teachers=teachers)


def test_teacher_directory_must_hold_a_text_to_image_pipeline(make_settings, captions_file, tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "model_index.json").write_text(json.dumps({"_class_name": "FluxControlPipeline"}))
    settings = make_settings(prompt_backend="template", teachers=f"{tmp_path / 'vae'},{tmp_path / 'none'}")
    make_prompts(settings, captions_file, limit=1)
    with pytest.raises(InputError, match="teachers: .* holds a 'FluxControlPipeline', not one of .*FluxPipeline"):
        render_grids(settings)
