"""Pictures: loss curves (more to come: patch grids, attention maps, caption sheets)."""

import json
from pathlib import Path

import matplotlib.pyplot as plt


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl log written by the trainer."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str | Path, out_path: str | Path | None = None):
    """Training and validation loss against step; saved to out_path if given. Returns the figure."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", ms=3)
    ax.set(xlabel="step", ylabel="loss (nats per token)", yscale="log", title="Training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if out_path is not None:
        fig.savefig(out_path, dpi=120)
        plt.close(fig)
    return fig
