"""Structure-preserving pairs: one control map (Canny edges, or depth from a local model), two renderings with
different appearance or lighting, scored by structure agreement and filtered."""

import json

import cv2
import numpy as np
import pytest
import torch
from diffusers import FluxControlPipeline
from PIL import Image
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

from dsd_model.data.manifest import Manifest
from dsd_model.data.pairs import read_pairs
from dsd_model.data.prompts import make_prompts
from dsd_model.data.structure import (
    APPEARANCES,
    LIGHTINGS,
    STRUCTURE_FILE,
    StructureEstimator,
    make_structure_pairs,
    write_structure_dataset,
)
from dsd_model.errors import InputError
from dsd_model.tiny import build_tiny_components


class RecordingControlTeacher:
    """The tiny FluxControlPipeline, keeping the arguments of every call."""

    def __init__(self):
        self.pipe = FluxControlPipeline(**build_tiny_components(dsd=True))
        self.pipe.set_progress_bar_config(disable=True)
        self.calls = []

    def __call__(self, prompt, control_image, **kwargs):
        self.calls.append((prompt, control_image))
        return self.pipe(prompt=prompt, control_image=control_image, **kwargs)


def records(settings) -> list[dict]:
    return list(Manifest(settings.work_dir / STRUCTURE_FILE).records().values())


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_pairs_share_the_control_map_they_were_rendered_from(make_settings, captions_file, tiny_teacher):
    settings = make_settings(prompt_backend="template", recipe="structure", structure_min_agreement=0.0)
    make_prompts(settings, captions_file, limit=2)
    control_teacher = RecordingControlTeacher()
    assert make_structure_pairs(settings, tiny_teacher, control_teacher).done == 2
    summary = write_structure_dataset(settings)

    items = records(settings)
    assert [r["status"] for r in items] == ["kept", "kept"] and items[0]["control_kind"] == "canny"
    (prompts, controls), = control_teacher.calls
    assert prompts == [p for r in items for p in r["prompts"]]
    for n, item in enumerate(items):
        assert all(any(p.endswith(", " + a) for a in APPEARANCES) for p in item["prompts"])
        source = cv2.cvtColor(pixels(settings.work_dir / item["source"]), cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(source, 100, 200)
        control = pixels(settings.work_dir / item["control"])
        np.testing.assert_array_equal(control[..., 0], edges)
        np.testing.assert_array_equal(np.asarray(controls[2 * n]), control)
        assert controls[2 * n] is controls[2 * n + 1], "both renderings of an item use one control map"

    pairs = read_pairs(settings.resolved_dataset_dir)
    assert len(pairs) == 4
    for pair in pairs:
        item = next(r for r in items if r["id"] == pair.grid)
        twin = next(p for p in pairs if p.reference == pair.target and p.target == pair.reference)
        assert pair.control == twin.control
        np.testing.assert_array_equal(pixels(settings.resolved_dataset_dir / pair.control),
                                      pixels(settings.work_dir / item["control"]))
        assert pair.caption in item["prompts"]
    assert summary["items"] == {"kept": 2, "dropped": 0} and summary["pairs"] == 4
    assert json.loads((settings.work_dir / "summary.json").read_text()) == summary

    again = RecordingControlTeacher()
    assert make_structure_pairs(settings, tiny_teacher, again).skipped == 2 and again.calls == []


@pytest.fixture
def depth_dir(tmp_path):
    """A tiny random DPT depth model and its image processor, saved to a directory."""
    torch.manual_seed(0)
    model = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1], neck_hidden_sizes=[16, 32], fusion_hidden_size=16,
        reassemble_factors=[2, 1], is_hybrid=False, head_in_index=-1,
    ))
    path = tmp_path / "dpt-tiny"
    model.save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(path)
    return path


def test_depth_relighting_items_below_the_agreement_are_dropped(make_settings, captions_file, tiny_teacher,
                                                                 depth_dir, tmp_path):
    control_dir = tmp_path / "flux-depth-tiny"
    RecordingControlTeacher().pipe.save_pretrained(control_dir)
    settings = make_settings(prompt_backend="template", recipe="relight", depth_model_dir=depth_dir,
                             control_teacher_dir=control_dir, structure_min_agreement=1.0)
    make_prompts(settings, captions_file, limit=2)
    make_structure_pairs(settings, tiny_teacher)
    summary = write_structure_dataset(settings)
    items = records(settings)
    assert {r["control_kind"] for r in items} == {"depth"} and {r["estimator"] for r in items} == {f"depth:{depth_dir}"}
    assert all(any(p.endswith(", " + light) for light in LIGHTINGS) for r in items for p in r["prompts"])
    assert all(0 <= r["agreement"] < 1 and r["status"] == "dropped" for r in items)
    control = pixels(settings.work_dir / items[0]["control"])
    assert control.shape == (32, 32, 3) and control.min() == 0 and control.max() == 255
    assert summary["items"] == {"kept": 0, "dropped": 2} and summary["pairs"] == 0


def test_agreement_is_one_for_the_same_structure_and_falls_when_it_moves():
    rng = np.random.default_rng(0)
    depth = rng.random((32, 32)).astype(np.float32)
    assert StructureEstimator("depth", model=torch.nn.Identity()).agreement(depth, depth) == 1.0
    assert StructureEstimator("depth", model=torch.nn.Identity()).agreement(depth, 1 - depth) == pytest.approx(
        1 - np.abs(2 * depth - 1).mean(), abs=1e-6)
    edges = StructureEstimator("canny")
    square = np.zeros((32, 32), np.uint8)
    square[8:24, 8:24] = 255
    outline = edges.maps([Image.fromarray(square).convert("RGB")])[0]
    shifted = edges.maps([Image.fromarray(np.roll(square, 1, axis=1)).convert("RGB")])[0]
    moved = edges.maps([Image.fromarray(np.roll(square, 6, axis=1)).convert("RGB")])[0]
    assert outline.sum() > 0
    assert edges.agreement(outline, outline) == 1.0
    assert edges.agreement(outline, shifted) == 1.0, "one pixel of tolerance"
    assert edges.agreement(outline, moved) < 0.6


def test_control_teacher_must_be_a_flux_control_pipeline(make_settings, captions_file, tiny_teacher, teacher_dirs):
    flux, _ = teacher_dirs
    settings = make_settings(prompt_backend="template", recipe="structure", control_teacher_dir=flux)
    make_prompts(settings, captions_file, limit=1)
    message = "control_teacher_dir: .* holds a 'FluxPipeline', not one of FluxControlPipeline"
    with pytest.raises(InputError, match=message):
        make_structure_pairs(settings, tiny_teacher)
