"""Plots users of ERC models expect: confusion matrices and the experts' gate weights. Each is drawn into a temporary
file beside its destination and moved into place (`atomic.atomic_output`), so a kill never leaves a torn image."""

import os
from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import atomic_output  # noqa: E402


def _save(fig, path) -> None:
    """`fig.savefig(path)` through a temporary file of the same suffix; the format is the path's suffix (or
    matplotlib's default when it has none), as `savefig(path)` would choose."""
    suffix = Path(path).suffix.lstrip(".")
    try:
        with atomic_output(path) as temporary:
            fig.savefig(temporary, dpi=120, format=suffix or matplotlib.rcParams["savefig.format"])
    finally:
        plt.close(fig)


def plot_confusion_matrix(matrix, label_names, path: str | os.PathLike, title: str = "Confusion matrix") -> None:
    """Row-normalised confusion matrix (rows = true class) with the counts written in each cell."""
    matrix = np.asarray(matrix, dtype=float)
    normalised = matrix / np.clip(matrix.sum(1, keepdims=True), 1, None)
    size = max(4.0, 0.7 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(label_names)):
        for j in range(len(label_names)):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                    color="white" if normalised[i, j] > 0.5 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    _save(fig, path)


def plot_gate_weights_by_class(gates, true_ids, label_names, expert_names, path, title="Mean gate weight by class"):
    """Mean gate weight of each expert over the utterances of each true class (grouped bars)."""
    gates, true_ids = np.asarray(gates), np.asarray(true_ids)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(label_names) + 2), 3.6))
    width = 0.8 / len(expert_names)
    for e, name in enumerate(expert_names):
        means = [gates[true_ids == c, e].mean() if (true_ids == c).any() else 0.0 for c in range(len(label_names))]
        ax.bar(np.arange(len(label_names)) + (e - (len(expert_names) - 1) / 2) * width, means, width, label=name)
    ax.set_xticks(range(len(label_names)), label_names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("gate weight")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_gate_weights_along_turns(gates, expert_names, path, labels=None, title="Experts' weights along the turns"):
    """Stacked gate weights per turn of one conversation; `labels` (predicted emotion per turn) label the x axis."""
    gates = np.asarray(gates)
    turns = np.arange(len(gates))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(gates) + 2), 3.4))
    bottom = np.zeros(len(gates))
    for e, name in enumerate(expert_names):
        ax.bar(turns, gates[:, e], bottom=bottom, label=name)
        bottom += gates[:, e]
    ax.set_xticks(turns, labels if labels is not None else turns, rotation=45 if labels is not None else 0,
                  ha="right" if labels is not None else "center")
    ax.set_xlabel("turn" + (" (predicted emotion)" if labels is not None else ""))
    ax.set_ylim(0, 1)
    ax.set_ylabel("gate weight")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


__all__ = ["plot_confusion_matrix", "plot_gate_weights_by_class", "plot_gate_weights_along_turns"]
