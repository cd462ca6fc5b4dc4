"""The loss record of a run: `loss.csv` (step, loss, lr) and the `loss.png` curve drawn from it.

On resume the rows past the checkpoint's step are dropped, so the file of a resumed run equals that of an
uninterrupted one.
"""

from __future__ import annotations

import csv
from pathlib import Path

FIELDS = ("step", "loss", "lr")


class LossLog:
    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept = [row for row in read_loss(path) if row[0] <= start_step] if start_step else []
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(FIELDS)
            writer.writerows(kept)

    def append(self, step: int, loss: float, lr: float) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow((step, repr(loss), repr(lr)))


def read_loss(path: Path) -> list[tuple[int, float, float]]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(handle)]


def plot_loss(csv_path: Path, png_path: Path) -> Path:
    """Draw the per-step loss and its moving average (a twentieth of the run) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = read_loss(csv_path)
    steps, losses = [r[0] for r in rows], [r[1] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    axes.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    axes.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"moving average ({window} steps)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("flow-matching loss (MSE)")
    axes.set_title("DSD LoRA training")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path)
    plt.close(figure)
    return png_path
