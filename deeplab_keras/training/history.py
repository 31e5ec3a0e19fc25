"""The training history: :func:`read_history` of the CSV log, :func:`plot_history` and the
:class:`HistoryPlot` callback that redraws it every epoch."""
import os

import keras

from deeplab_keras.files import atomic_path


def read_history(csv_path):
    """Reads a CSVLogger file, tolerating a truncated last line; keeps the last row per epoch."""
    import csv

    rows = {}
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):  # "NA" (no validation that epoch), truncated line
                    pass
            if "epoch" in parsed:
                rows[int(parsed["epoch"])] = parsed
    return [rows[k] for k in sorted(rows)]


def plot_history(csv_path, png_path, steps_per_epoch=1):
    """Writes a PNG with the loss and mIoU curves (train and validation) of a history CSV. Atomic."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = read_history(csv_path)
    if not rows:
        return None
    steps = [(r["epoch"] + 1) * steps_per_epoch for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "miou", "mIoU")):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            values = [(s, r[prefix + key]) for s, r in zip(steps, rows) if prefix + key in r]
            if values:
                ax.plot(*zip(*values), style, label=(prefix + key).replace("_", " ") or key, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return png_path


class HistoryPlot(keras.callbacks.Callback):
    """Redraws ``png_path`` from the CSV history after every epoch (run it after ``CSVLogger``)."""

    def __init__(self, csv_path, png_path, steps_per_epoch=1):
        super().__init__()
        self.csv_path, self.png_path, self.steps_per_epoch = csv_path, png_path, steps_per_epoch

    def on_epoch_end(self, epoch, logs=None):
        plot_history(self.csv_path, self.png_path, self.steps_per_epoch)
