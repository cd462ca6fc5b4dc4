"""The benchmark readers on tiny fabricated copies of each layout."""

import json

import pytest
from helpers import random_image

from dsd_model.errors import InputError
from dsd_model.eval.benchmark import Case, read_benchmark

PROMPTS_AND_CLASSES = """Classes

subject_name,class
backpack,backpack
dog2,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token)
]
"""


def test_dreambench(tmp_path):
    dataset = tmp_path / "dreambooth" / "dataset"
    for subject in ("backpack", "dog2"):
        (dataset / subject).mkdir(parents=True)
        for name in ("01.jpg", "00.jpg"):
            random_image(32, 32).save(dataset / subject / name)
    (dataset / "prompts_and_classes.txt").write_text(PROMPTS_AND_CLASSES)

    benchmark = read_benchmark(tmp_path / "dreambooth")
    assert {n: (s.category, s.image.name) for n, s in benchmark.subjects.items()} == {
        "backpack": ("object", "00.jpg"), "dog2": ("live", "00.jpg")}
    assert benchmark.cases == [
        Case("backpack", 0, "a backpack in the jungle"), Case("backpack", 1, "a red backpack"),
        Case("dog2", 0, "a dog wearing a red hat"), Case("dog2", 1, "a dog in a chef outfit"),
        Case("dog2", 2, "a dog in the snow"),
    ]
    assert read_benchmark(dataset, "dreambench") == benchmark


def test_dreambench_plus(tmp_path):
    root = tmp_path / "dreambench_plus"
    for category, index, lines in (("animal", "00", "Corgi\na corgi surfing\na corgi in space"),
                                   ("object", "03", "Red Teapot\na teapot on the moon")):
        (root / "images" / category).mkdir(parents=True, exist_ok=True)
        (root / "captions" / category).mkdir(parents=True, exist_ok=True)
        random_image(32, 32).save(root / "images" / category / f"{index}.jpg")
        (root / "captions" / category / f"{index}.txt").write_text(lines + "\n")

    benchmark = read_benchmark(root)
    assert {n: s.category for n, s in benchmark.subjects.items()} == {
        "animal_00_corgi": "animal", "object_03_red_teapot": "object"}
    assert [c.prompt for c in benchmark.cases] == ["a corgi surfing", "a corgi in space", "a teapot on the moon"]
    assert benchmark.subjects["animal_00_corgi"].image == root / "images" / "animal" / "00.jpg"


def test_jsonl(benchmark):
    loaded = read_benchmark(benchmark)
    assert {n: s.category for n, s in loaded.subjects.items()} == {"fox": "live", "teapot": "object"}
    assert [c.id for c in loaded.cases] == ["fox/0", "fox/1", "teapot/0", "teapot/1"]
    assert loaded.cases[1].prompt == "a fox in the snow"


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"subject": "a", "image": "missing.png", "prompt": "p"}], "reference image .* does not exist"),
        ([{"subject": "a", "prompt": "p"}], "'image' must be a non-empty string"),
        ([{"subject": "a", "image": "a.png", "prompt": "p"}, {"subject": "a", "image": "b.png", "prompt": "q"}],
         "subject 'a' was given another image"),
    ],
)
def test_jsonl_errors_name_the_problem(tmp_path, records, message):
    for name in ("a.png", "b.png"):
        random_image(16, 16).save(tmp_path / name)
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match=message):
        read_benchmark(path)


def test_unknown_layout(tmp_path):
    with pytest.raises(InputError, match="none of the known layouts"):
        read_benchmark(tmp_path)
