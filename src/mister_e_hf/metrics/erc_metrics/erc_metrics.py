"""ERC metrics: the scores reported for Emotion Recognition in Conversations, as an offline `evaluate` module.

Load it from its folder (no network needed)::

    import evaluate
    metric = evaluate.load("path/to/mister_e_hf/metrics/erc_metrics")
    metric.compute(predictions=[0, 1, 2], references=[0, 1, 1], label_names=["neutral", "joy", "anger"])

or through `mister_e_hf.metrics.load_erc_metric()`.

One call gives accuracy, weighted F1 (the headline number on IEMOCAP and MELD), macro F1, per-class F1 and the
confusion matrix; for CMU-MOSI / MOSEI style continuous sentiment it also gives the binary accuracy / F1 in both
the "has-0" and "non-0" conventions, the mean absolute error and the Pearson correlation.

This file is copied by `evaluate.load` into the Hugging Face modules cache and imported from there, so it must only
import installed libraries (no relative imports). Bad input raises `mister_e_hf.errors.MisterEError` (a `ValueError`)
when the package is installed, a plain `ValueError` otherwise. Predictions and references are checked before
`evaluate` stores them as int64, which would silently truncate a probability 0.9 to class 0.
"""

import math
import warnings

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


try:  # indented, so that `evaluate` does not list the package as a dependency to check: the script also works alone
    from mister_e_hf.errors import MisterEError as _Error
except ImportError:
    _Error = ValueError

MAX_INFERRED_CLASSES = 1000
"""Without `label_names` the classes are `range(max id + 1)`; a larger id is refused (give `label_names`)."""


_DESCRIPTION = """
Metrics for Emotion Recognition in Conversations (ERC): classification scores over utterance-level emotion labels,
plus, optionally, the regression / binary scores used for continuous sentiment (CMU-MOSI, CMU-MOSEI).

Classification (always):
    accuracy     = (TP over all classes) / N
    weighted_f1  = sum_c support_c / N * F1_c   (scikit-learn `average="weighted"`)
    macro_f1     = mean_c F1_c                  (scikit-learn `average="macro"`)
    f1_<name>    = per-class F1, for every class in `label_names`, including classes absent from the data
    confusion_matrix = rows are true classes, columns predicted classes, over all label ids
All F1 scores use `zero_division=0`.

Continuous sentiment (when `scores` and `predicted_scores` are given):
    binary_accuracy_has0 / binary_f1_has0: positive means score >= 0, for truth and prediction, on all items;
    binary_accuracy_non0 / binary_f1_non0: only items whose true score is != 0, positive means score > 0;
    mae: mean absolute error between predicted and true scores;
    pearson: Pearson correlation between predicted and true scores (0.0 if either side is constant).
The binary F1 scores are weighted F1 over the two classes, as in the MOSI literature.
"""


_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids (integers, or floats that are whole numbers; not
        probabilities or scores: take their argmax).
    references (`list` of `int`): true class ids, likewise (drop padding such as -100 first).
    label_names (`list` of `str`, *optional*): names of the classes, index = class id. Defaults to
        `["0", "1", ..., str(K - 1)]` with `K = max(max(predictions), max(references)) + 1`, at most 1000. Every
        class id must be in `range(len(label_names))`.
    scores (`list` of `float`, *optional*): true continuous sentiment scores (e.g. CMU-MOSI in [-3, 3]), one per
        prediction. Requires `predicted_scores`.
    predicted_scores (`list` of `float`, *optional*): predicted continuous scores, same length as `scores`.

Returns:
    A flat `dict`:
    accuracy (`float`), weighted_f1 (`float`), macro_f1 (`float`): in [0, 1].
    f1_<label name> (`float`): per-class F1, one entry per label name.
    confusion_matrix (`list` of `list` of `int`): `[true][predicted]` counts, `len(label_names)` square.
    With `scores` and `predicted_scores` also: binary_accuracy_has0, binary_f1_has0, binary_accuracy_non0,
    binary_f1_non0 (`float`; NaN for the non-0 pair when every true score is 0), mae (`float`), pearson (`float`).

Raises:
    ValueError (`mister_e_hf.errors.MisterEError`): a prediction or reference is not a whole number (a probability,
        NaN, a string) or the input is not one id per item, predictions and references differ in length, the input
        is empty, a class id is outside `label_names` (or, without them, negative or 1000 and above), `scores` is
        given without `predicted_scores` (or the other way round), the scores differ in length from each other or
        from the predictions, or a score is not finite.

Examples:

    >>> metric = evaluate.load("path/to/erc_metrics")
    >>> results = metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], label_names=["neutral", "joy"])
    >>> round(results["accuracy"], 4), results["confusion_matrix"]
    (0.6667, [[1, 1], [0, 1]])
    >>> round(results["f1_neutral"], 4), round(results["f1_joy"], 4)
    (0.6667, 0.6667)

    >>> results = metric.compute(
    ...     predictions=[1, 0, 1], references=[1, 0, 0],
    ...     scores=[1.2, -0.8, 0.0], predicted_scores=[0.9, -1.1, 0.4],
    ... )
    >>> results["binary_accuracy_has0"], results["binary_accuracy_non0"]
    (1.0, 1.0)
"""


_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
@inproceedings{zadeh2016mosi,
  title={{MOSI}: Multimodal Corpus of Sentiment Intensity and Subjectivity Analysis in Online Opinion Videos},
  author={Zadeh, Amir and Zellers, Rowan and Pincus, Eli and Morency, Louis-Philippe},
  journal={IEEE Intelligent Systems},
  volume={31},
  number={6},
  pages={82--88},
  year={2016}
}
"""


def _as_scores(values, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise _Error(f"`{name}` must be numbers, got {str(values)[:80]}.") from None
    if not np.all(np.isfinite(array)):
        raise _Error(f"`{name}` must contain only finite numbers.")
    return array


def _class_ids(values, name: str) -> np.ndarray:
    """`values` as a 1-D int64 array of class ids, or an error: one id per item, each a whole number."""
    try:
        array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    except (TypeError, ValueError):  # ragged nested lists
        raise _Error(f"`{name}` must be one class id per item, got {str(values)[:80]}.") from None
    if array.ndim != 1:
        raise _Error(f"`{name}` must be one class id per item (a 1-D list), got shape {array.shape}; for logits or "
                     "probabilities take their argmax over the classes first.")
    if array.dtype.kind in "iub":
        return array.astype(np.int64)
    if array.dtype.kind != "f":
        first = next((v for v in array.tolist() if not isinstance(v, (int, float))), array[:1].tolist())
        raise _Error(f"`{name}` must be integer class ids, got {type(first).__name__} {first!r}.")
    bad = ~np.isfinite(array) | (array != np.round(array)) | (np.abs(array) > 2**53)
    if bad.any():
        index = int(np.argmax(bad))
        raise _Error(f"`{name}` must be integer class ids, got {array[index].item()!r} at index {index} "
                     f"({int(bad.sum())} such values): class ids are whole numbers, not probabilities, scores or NaN; "
                     "take the argmax over the classes first.")
    return array.astype(np.int64)


def _sentiment_scores(true: np.ndarray, pred: np.ndarray) -> dict:
    results = {}
    # has-0: every item, positive = score >= 0 on both sides.
    true_pos, pred_pos = true >= 0, pred >= 0
    results["binary_accuracy_has0"] = float(accuracy_score(true_pos, pred_pos))
    results["binary_f1_has0"] = float(f1_score(true_pos, pred_pos, average="weighted", zero_division=0))
    # non-0: only items whose true score is not 0, positive = score > 0.
    keep = true != 0
    if keep.any():
        true_pos, pred_pos = true[keep] > 0, pred[keep] > 0
        results["binary_accuracy_non0"] = float(accuracy_score(true_pos, pred_pos))
        results["binary_f1_non0"] = float(f1_score(true_pos, pred_pos, average="weighted", zero_division=0))
    else:
        results["binary_accuracy_non0"] = math.nan
        results["binary_f1_non0"] = math.nan
    results["mae"] = float(np.mean(np.abs(pred - true)))
    if len(true) < 2 or np.all(true == true[0]) or np.all(pred == pred[0]):
        results["pearson"] = 0.0
    else:
        results["pearson"] = float(pearsonr(pred, true)[0])
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ErcMetrics(evaluate.Metric):
    """Accuracy, weighted / macro / per-class F1 and confusion matrix for ERC, plus MOSI-style sentiment scores."""

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """`evaluate`'s `add_batch`, after checking that both are 1-D lists of whole-number class ids (the int64
        features would otherwise truncate 0.9 to 0). `compute(predictions=..., references=...)` comes here too."""
        if predictions is not None:
            predictions = _class_ids(predictions, "predictions")
        if references is not None:
            references = _class_ids(references, "references")
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """`evaluate`'s `add` of one item, after the same check as `add_batch`."""
        if prediction is not None:
            prediction = int(_class_ids([prediction], "prediction")[0])
        if reference is not None:
            reference = int(_class_ids([reference], "reference")[0])
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html",
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.confusion_matrix.html",
            ],
        )

    def _compute(self, predictions, references, label_names=None, scores=None, predicted_scores=None):
        predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
        references = np.asarray(references, dtype=np.int64).reshape(-1)
        if len(predictions) != len(references):
            raise _Error(
                f"`predictions` and `references` differ in length: {len(predictions)} vs {len(references)}."
            )
        if len(predictions) == 0:
            raise _Error("`predictions` and `references` are empty: nothing to score.")

        if label_names is None:
            largest = int(max(predictions.max(), references.max()))
            if largest >= MAX_INFERRED_CLASSES:
                raise _Error(f"Class id {largest} without `label_names`: the classes would be range(0, {largest + 1}); "
                             f"give `label_names` (ids above {MAX_INFERRED_CLASSES - 1} need them).")
            label_names = [str(i) for i in range(max(largest, 0) + 1)]
        else:
            if isinstance(label_names, str):
                raise _Error(f"`label_names` must be a list of names, got the string {label_names!r}.")
            label_names = [str(name) for name in label_names]
            if not label_names:
                raise _Error("`label_names` is empty.")
            if len(set(label_names)) != len(label_names):
                raise _Error(f"`label_names` has duplicates: {label_names}.")
        num_labels = len(label_names)
        for name, ids in (("predictions", predictions), ("references", references)):
            bad = ids[(ids < 0) | (ids >= num_labels)]
            if bad.size:
                shown = sorted(set(bad.tolist()))
                raise _Error(
                    f"`{name}` has label id(s) {shown[:10]}{' ...' if len(shown) > 10 else ''} outside "
                    f"range(0, {num_labels}) given by `label_names` {label_names}"
                    + ("; drop padded or unlabelled items (e.g. -100) first." if (bad < 0).any() else ".")
                )

        labels = list(range(num_labels))
        results = {
            "accuracy": float(accuracy_score(references, predictions)),
            "weighted_f1": float(
                f1_score(references, predictions, labels=labels, average="weighted", zero_division=0)
            ),
            "macro_f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0)),
        }
        per_class = f1_score(references, predictions, labels=labels, average=None, zero_division=0)
        for name, value in zip(label_names, per_class):
            results[f"f1_{name}"] = float(value)
        with warnings.catch_warnings():
            # scikit-learn warns about a 1x1 matrix even when `labels` is given; with one label name it is right.
            warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
            results["confusion_matrix"] = confusion_matrix(references, predictions, labels=labels).tolist()

        if scores is None and predicted_scores is None:
            return results
        if scores is None or predicted_scores is None:
            missing = "predicted_scores" if predicted_scores is None else "scores"
            raise _Error(f"`scores` and `predicted_scores` go together: `{missing}` is missing.")
        true = _as_scores(scores, "scores")
        pred = _as_scores(predicted_scores, "predicted_scores")
        if len(true) != len(pred):
            raise _Error(f"`scores` and `predicted_scores` differ in length: {len(true)} vs {len(pred)}.")
        if len(true) != len(predictions):
            raise _Error(
                f"`scores` has {len(true)} values but there are {len(predictions)} predictions; they must match."
            )
        results.update(_sentiment_scores(true, pred))
        return results
