"""The eval split of a training run: every `eval_every` optimizer steps, generate one image per (subject, prompt) of
a small fixed benchmark with the adapter being trained, score them with the embedding metrics, and log the means
beside the loss:

    output_dir/
        eval.csv               step, metric, mean, n
        eval.png               each metric's mean against the step
        eval/step-<N>/<subject>-<prompt index>.png   the split's images at step N

The encoders come from the `DSD_EVAL_*` settings (`dino_path`, `clip_path`); the seed and guidance too. The VLM judge
is left to `dsd eval run` on the exported adapter: a judge call per image every few hundred steps costs more than it
tells. Generating draws no randomness from the training's generators, so a run with the split gives the same
weights as one without.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..data.manifest import save_png
from ..errors import InputError
from ..images import center_crop_resize, decode_image
from ..settings import resolve_device
from .benchmark import read_benchmark
from .embeddings import Encoders
from .settings import EvalSettings

FIELDS = ("step", "metric", "mean", "n")
BATCH = 8
"""Images per pipeline call: the split is small, and a batch of 8 fits wherever one training batch fits."""


class TrainingEval:
    def __init__(self, benchmark: Path, output_dir: Path, size: int, steps: int, start_step: int,
                 settings: EvalSettings | None = None):
        self.settings = settings or EvalSettings()
        self.benchmark = read_benchmark(benchmark, self.settings.benchmark_format)
        self.encoders = Encoders(self.settings.dino_path, self.settings.clip_path,
                                 resolve_device(self.settings.device))
        if not self.encoders.metrics:
            raise InputError("eval_every", "the eval split needs an encoder to score with: set DSD_EVAL_DINO_PATH "
                             "and/or DSD_EVAL_CLIP_PATH to local DINOv2 / CLIP directories")
        self.output_dir, self.size, self.steps = output_dir, size, steps
        self.path = output_dir / "eval.csv"
        kept = [row for row in read_eval_log(self.path) if int(row["step"]) <= start_step] if start_step else []
        output_dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def __call__(self, pipe, step: int) -> dict[str, float]:
        """Generate and score the split with `pipe` as it is now; append and return the mean of each metric."""
        cases = self.benchmark.cases
        subjects = [self.benchmark.subjects[case.subject] for case in cases]
        training = pipe.transformer.training
        pipe.transformer.eval()
        try:
            images = []
            for start in range(0, len(cases), BATCH):
                chunk = slice(start, start + BATCH)
                images += pipe([s.image.read_bytes() for s in subjects[chunk]], [c.prompt for c in cases[chunk]],
                               num_inference_steps=self.steps, guidance_scale=self.settings.guidance, size=self.size,
                               seed=self.settings.seed).images
        finally:
            pipe.transformer.train(training)
        for case, image in zip(cases, images, strict=True):
            save_png(image, self.output_dir / "eval" / f"step-{step:06d}" / f"{case.subject}-{case.index}.png")
        references = [center_crop_resize(decode_image(s.image, "eval_benchmark"), self.size) for s in subjects]
        scores = self.encoders.score(references, images, [c.prompt for c in cases])
        means = {metric: sum(values) / len(values) for metric, values in scores.items()}
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writerows(
                {"step": step, "metric": m, "mean": repr(v), "n": len(cases)} for m, v in means.items())
        return means


def read_eval_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def plot_eval(csv_path: Path, png_path: Path) -> Path:
    """Each metric's mean against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_eval_log(csv_path):
        series.setdefault(row["metric"], []).append((int(row["step"]), float(row["mean"])))
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for metric, points in series.items():
        axes.plot(*zip(*points), marker="o", label=metric)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("mean score on the eval split")
    axes.set_title("DSD LoRA training: eval split")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return png_path

