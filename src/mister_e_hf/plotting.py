"""Plots users of ERC models expect: confusion matrices and the experts' gate weights.

Each figure is a `matplotlib.figure.Figure` drawn on its own Agg canvas, so plotting never touches the user's
matplotlib backend nor pyplot's figure list. It is written to a temporary file beside its destination and moved into
place (`atomic.atomic_output`), so a kill never leaves a torn image. Inputs are checked first: a shape that does not
match the names, a non-finite or out-of-range value, or nothing to draw is a `MisterEError` saying what is wrong. A
split without any labelled utterance gives an explicit "no labelled utterance" figure, not an empty or invented one.
"""

import os
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .atomic import atomic_output
from .errors import MisterEError


TOLERANCE = 1e-4
"""How far outside [0, 1] a gate weight may lie (rounding) before it is refused."""


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _format(path) -> str:
    """The image format of `path`'s suffix (matplotlib's default when it has none), or a `MisterEError` listing the
    formats matplotlib writes."""
    suffix = Path(path).suffix.lstrip(".").lower() or matplotlib.rcParams["savefig.format"]
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if suffix not in supported:
        raise MisterEError(f"{path}: cannot write a {suffix!r} image; use one of {', '.join(sorted(supported))}.")
    return suffix


def _save(figure: Figure, path, image_format: str) -> None:
    """`figure.savefig(path)` through a temporary file of the same suffix."""
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=120, format=image_format)


def _names(names, what: str) -> list[str]:
    if isinstance(names, (str, bytes)) or names is None:
        raise MisterEError(f"`{what}` must be a list of names, got {names!r}.")
    names = [str(name) for name in names]
    if not names:
        raise MisterEError(f"`{what}` is empty: nothing to plot.")
    return names


def _array(values, what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise MisterEError(f"`{what}` must be numbers in a regular array, got {str(values)[:80]}.") from None
    bad = ~np.isfinite(array)
    if bad.any():
        raise MisterEError(f"`{what}` holds {int(bad.sum())} non-finite value(s) (NaN or infinity), the first at "
                           f"{tuple(int(i) for i in np.argwhere(bad)[0])}.")
    return array


def _gates(gates, expert_names: list[str], what: str = "gates") -> np.ndarray:
    """`gates` as a `(N, E)` array of weights in [0, 1], E = `len(expert_names)`."""
    gates = _array(gates, what)
    if gates.ndim != 2 or gates.shape[1] != len(expert_names):
        raise MisterEError(f"`{what}` must be (utterances, experts) = (N, {len(expert_names)}) for the experts "
                           f"{expert_names}, got shape {gates.shape}.")
    if gates.size and (gates.min() < -TOLERANCE or gates.max() > 1 + TOLERANCE):
        raise MisterEError(f"`{what}` must be weights in [0, 1], got values in [{gates.min():.4g}, {gates.max():.4g}].")
    return gates


def _no_data(ax, title: str, message: str) -> None:
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)


def plot_confusion_matrix(matrix, label_names, path: str | os.PathLike, title: str = "Confusion matrix") -> None:
    """Row-normalised confusion matrix (rows = true class) with the counts written in each cell.

    Args:
        matrix: `(K, K)` non-negative counts, `[true][predicted]`.
        label_names: the K class names, in id order.
        path: the image file; its suffix gives the format.
        title: the figure's title; a matrix of zeros (no labelled utterance) says so below it.
    """
    label_names = _names(label_names, "label_names")
    image_format = _format(path)
    matrix = _array(matrix, "matrix")
    k = len(label_names)
    if matrix.shape != (k, k):
        raise MisterEError(f"`matrix` must be ({k}, {k}) for the {k} label names {label_names}, got shape "
                           f"{matrix.shape}.")
    if (matrix < 0).any() or (matrix != np.round(matrix)).any():
        raise MisterEError("`matrix` must hold counts (non-negative whole numbers).")
    normalised = matrix / np.clip(matrix.sum(1, keepdims=True), 1, None)
    size = max(4.0, 0.7 * k + 2)
    figure = _figure(size + 1, size)
    ax = figure.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), label_names, rotation=45, ha="right")
    ax.set_yticks(range(k), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title if matrix.sum() else f"{title}\n(no labelled utterance)")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center",
                    color="white" if normalised[i, j] > 0.5 else "black", fontsize=8)
    figure.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    figure.tight_layout()
    _save(figure, path, image_format)


def plot_gate_weights_by_class(gates, true_ids, label_names, expert_names, path, title="Mean gate weight by class"):
    """Mean gate weight of each expert over the utterances of each true class (grouped bars). A class without any
    utterance gets no bars and is marked "no utterance" (not a mean of 0); with no utterance at all the figure says so.

    Args:
        gates: `(N, E)` gate weights of N labelled utterances over the E experts.
        true_ids: `(N,)` their true class ids, in `range(len(label_names))`.
        label_names: the class names, in id order.
        expert_names: the E expert names.
        path: the image file; its suffix gives the format.
    """
    label_names = _names(label_names, "label_names")
    expert_names = _names(expert_names, "expert_names")
    image_format = _format(path)
    gates = _gates(gates, expert_names)
    true_ids = _array(true_ids, "true_ids")
    if true_ids.shape != (len(gates),):
        raise MisterEError(f"`true_ids` must hold one class id per utterance of `gates` ({len(gates)}), got shape "
                           f"{true_ids.shape}.")
    outside = (true_ids < 0) | (true_ids >= len(label_names)) | (true_ids != np.round(true_ids))
    if outside.any():
        raise MisterEError(f"`true_ids` must be class ids in range(0, {len(label_names)}) for {label_names}, got "
                           f"{true_ids[outside][:5].tolist()}.")
    figure = _figure(max(5.0, 0.9 * len(label_names) + 2), 3.6)
    ax = figure.subplots()
    if not len(gates):
        _no_data(ax, title, "no labelled utterance")
        _save(figure, path, image_format)
        return
    width = 0.8 / len(expert_names)
    counts = np.array([(true_ids == c).sum() for c in range(len(label_names))])
    for e, name in enumerate(expert_names):
        means = [gates[true_ids == c, e].mean() if counts[c] else np.nan for c in range(len(label_names))]
        ax.bar(np.arange(len(label_names)) + (e - (len(expert_names) - 1) / 2) * width, means, width, label=name)
    for c in np.flatnonzero(counts == 0):
        ax.text(c, 0.02, "no utterance", ha="center", va="bottom", fontsize=8, color="grey")
    ax.set_xticks(range(len(label_names)), label_names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("gate weight")
    ax.set_title(title)
    ax.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path, image_format)


def _turn_labels(labels, turns: int) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or len(labels) != turns:
        raise MisterEError(f"`labels` must give one label per turn ({turns}), got {labels!r}.")
    return [str(label) for label in labels]


LABELLED_TURNS = 40
"""Up to this many turns, each gets its tick (and label); a longer conversation gets matplotlib's own ticks."""
MAX_TURNS_WIDTH = 24.0
"""The widest a plot of turns gets, in inches (a long conversation's bars get thinner instead)."""


def _turns_width(turns: int, extra: float) -> float:
    return min(max(5.0, 0.45 * turns + extra), MAX_TURNS_WIDTH)


def _stacked_gates(ax, gates: np.ndarray, expert_names: list[str], labels: list[str] | None) -> None:
    turns = np.arange(len(gates))
    bottom = np.zeros(len(gates))
    for e, name in enumerate(expert_names):
        ax.bar(turns, gates[:, e], bottom=bottom, label=name, width=0.8 if len(gates) <= LABELLED_TURNS else 1.0)
        bottom += gates[:, e]
    if len(gates) > LABELLED_TURNS:
        labels = None
    else:
        ax.set_xticks(turns, labels if labels is not None else turns, rotation=45 if labels is not None else 0,
                      ha="right" if labels is not None else "center")
    ax.set_xlabel("turn" + (" (predicted emotion)" if labels is not None else ""))
    ax.set_ylim(0, 1)
    ax.set_ylabel("gate weight")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def gate_weights_along_turns_figure(gates, expert_names, labels=None, title="Experts' weights along the turns",
                                    emotions=None, label_names=None) -> Figure:
    """The figure of `plot_gate_weights_along_turns`; with `emotions` (T `(label, score)` pairs) and `label_names`
    (the model's label set, in order), a timeline of the predicted emotions above it, each point sized by its
    score, the same turns on both x axes."""
    expert_names = _names(expert_names, "expert_names")
    gates = _gates(gates, expert_names)
    if not len(gates):
        raise MisterEError("`gates` has no turn: a conversation to plot has at least one.")
    labels = _turn_labels(labels, len(gates))
    if emotions is None:
        figure = _figure(_turns_width(len(gates), 2.0), 3.4)
        ax = figure.subplots()
        _stacked_gates(ax, gates, expert_names, labels)
        ax.set_title(title)
        figure.tight_layout()
        return figure
    label_names = _names(label_names, "label_names")
    if len(emotions) != len(gates) or any(label not in label_names for label, _ in emotions):
        raise MisterEError(f"`emotions` must give one (label, score) per turn ({len(gates)}) with labels from "
                           f"{label_names}, got {emotions!r}.")
    figure = _figure(_turns_width(len(gates), 2.5), 2.2 + 0.25 * len(label_names) + 3.0)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[1.0 + 0.12 * len(label_names), 1.6])
    turns = np.arange(len(gates))
    ids = [label_names.index(label) for label, _ in emotions]
    scores = np.array([score for _, score in emotions], dtype=float)
    top.plot(turns, ids, color="0.7", zorder=1)
    top.scatter(turns, ids, s=40 + 160 * scores, c=ids, cmap="tab10", vmin=0, vmax=9, zorder=2)
    for turn, (i, score) in enumerate(zip(ids, scores) if len(gates) <= LABELLED_TURNS else []):
        top.annotate(f"{score:.2f}", (turn, i), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    top.set_yticks(range(len(label_names)), label_names)
    top.set_ylim(-0.6, len(label_names) - 0.4)
    top.set_ylabel("emotion")
    top.set_title(title)
    _stacked_gates(bottom, gates, expert_names, labels)
    figure.tight_layout()
    return figure


def plot_gate_weights_along_turns(gates, expert_names, path, labels=None, title="Experts' weights along the turns"):
    """Stacked gate weights per turn of one conversation.

    Args:
        gates: `(T, E)` gate weights of the conversation's T turns (at least one) over the E experts.
        expert_names: the E expert names.
        path: the image file; its suffix gives the format.
        labels: T strings for the x axis (e.g. the predicted emotion per turn), or None for the turn numbers.
    """
    image_format = _format(path)
    _save(gate_weights_along_turns_figure(gates, expert_names, labels, title), path, image_format)


__all__ = ["plot_confusion_matrix", "plot_gate_weights_by_class", "plot_gate_weights_along_turns",
           "gate_weights_along_turns_figure"]
