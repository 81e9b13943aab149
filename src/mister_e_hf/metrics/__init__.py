"""Evaluation metrics for MiSTER-E.

* `ERC_METRIC_PATH` / `load_erc_metric()`: the offline `evaluate` module in `erc_metrics/` (accuracy, weighted /
  macro / per-class F1, confusion matrix, and MOSI-style binary accuracy / F1, MAE and Pearson for sentiment scores).
  It loads from its folder, so no network access is needed.
* `concordance_correlation_coefficient()`: Lin's CCC, in torch (differentiable) or numpy, for a regression head.
* `regression_metrics()`: CCC and MAE per dimension and their mean CCC, for dimensional emotion.
"""

from pathlib import Path

import evaluate
import numpy as np
import torch

from ..errors import MisterEError
from ..losses import concordance_correlation


ERC_METRIC_PATH = Path(__file__).resolve().parent / "erc_metrics"


def load_erc_metric(**kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` the ERC metric module from its folder in this package; `kwargs` go to `evaluate.load`.

    `evaluate` copies the script into the Hugging Face modules cache (`HF_MODULES_CACHE`, by default
    `~/.cache/huggingface/modules/evaluate_modules/metrics/erc_metrics/<hash of the code>/`) and imports it from there.
    """
    return evaluate.load(str(ERC_METRIC_PATH), **kwargs)


def concordance_correlation_coefficient(predictions, references):
    """Lin's concordance correlation coefficient between `predictions` and `references`.

        CCC = 2 cov(p, r) / (var(p) + var(r) + (mean(p) - mean(r)) ** 2)

    with population statistics (divide by N); computed by `losses.concordance_correlation`, the one implementation
    the regression loss uses too. Both inputs are flattened and must have the same number of elements. In [-1, 1]:
    1 is perfect agreement, 0 none, -1 perfect reversed agreement. When both inputs are the same constant the
    formula is 0 / 0; the result is then 1.0 (perfect agreement). A NaN or infinite value in either input is a
    `MisterEError` (a model predicting NaN must not read as perfect), as is a result that overflows.

    If either input is a `torch.Tensor`, the computation runs in torch (float32 or wider, on the tensor's device) and
    returns a 0-dim tensor that keeps the autograd graph, so `1 - ccc` can serve as a loss. Otherwise the inputs are
    converted to float64 and a Python `float` is returned.
    """
    if isinstance(predictions, torch.Tensor) or isinstance(references, torch.Tensor):
        tensor = predictions if isinstance(predictions, torch.Tensor) else references
        dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
        p = torch.as_tensor(predictions, dtype=dtype, device=tensor.device).reshape(-1)
        r = torch.as_tensor(references, dtype=dtype, device=tensor.device).reshape(-1)
    else:
        p = torch.tensor(_as_float64(predictions, "predictions").reshape(-1))
        r = torch.tensor(_as_float64(references, "references").reshape(-1))
    _check_sizes(p.numel(), r.numel())
    for name, values in (("predictions", p), ("references", r)):
        bad = ~torch.isfinite(values.detach())
        if bad.any():
            raise MisterEError(f"`{name}` holds {int(bad.sum())} non-finite value(s) (NaN or infinity; the first at "
                               f"index {int(bad.nonzero()[0, 0])}): no concordance to compute.")
    value = concordance_correlation(p, r)
    if not torch.isfinite(value.detach()):
        raise MisterEError(f"The concordance correlation overflowed (largest magnitude "
                           f"{float(torch.cat([p, r]).detach().abs().max()):.3g}); rescale the values.")
    return value if isinstance(predictions, torch.Tensor) or isinstance(references, torch.Tensor) else float(value)


def regression_metrics(predictions, references, names: list[str]) -> dict[str, float]:
    """Per dimension, over its labelled values (NaN references are skipped): `ccc_<name>`, `mae_<name>`, and
    `ccc_mean`, the mean CCC over dimensions (the usual model-selection metric for dimensional emotion).

    Args:
        predictions: `(N, D)` predicted values, all finite.
        references: `(N, D)` true values, NaN where a dimension is not labelled.
        names: the D dimension names (distinct strings), in column order.

    Raises:
        MisterEError: the shapes are not `(N, D)` alike with `len(names) == D`, a prediction is not finite, a
            reference is infinite, or a dimension has fewer than two labelled values.
    """
    predictions = _as_float64(predictions, "predictions")
    references = _as_float64(references, "references")
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
        raise MisterEError(f"`names` must be a list of dimension names (non-empty strings), got {names!r}.")
    names = list(names)
    if predictions.ndim != 2 or predictions.shape != references.shape:
        raise MisterEError(f"`predictions` and `references` must both be (utterances, dimensions) arrays of the same "
                           f"shape, got {predictions.shape} and {references.shape}.")
    if len(names) != predictions.shape[1] or len(set(names)) != len(names):
        raise MisterEError(f"`names` {names} must name each of the {predictions.shape[1]} dimensions once.")
    for name, values, allowed in (("predictions", predictions, "finite"), ("references", references, "NaN")):
        bad = ~np.isfinite(values) if allowed == "finite" else np.isinf(values)
        if bad.any():
            row, column = np.argwhere(bad)[0]
            raise MisterEError(f"`{name}` holds {int(bad.sum())} {'non-finite' if allowed == 'finite' else 'infinite'}"
                               f" value(s), the first at utterance {row}, dimension {names[column]!r}"
                               + (" (NaN marks an unlabelled reference only)." if allowed == "finite" else "."))
    results = {}
    for d, name in enumerate(names):
        keep = ~np.isnan(references[:, d])
        if keep.sum() < 2:
            raise MisterEError(f"Fewer than two labelled values for dimension {name!r}: no correlation to compute.")
        results[f"ccc_{name}"] = concordance_correlation_coefficient(predictions[keep, d], references[keep, d])
        results[f"mae_{name}"] = float(np.abs(predictions[keep, d] - references[keep, d]).mean())
    results["ccc_mean"] = float(np.mean([results[f"ccc_{name}"] for name in names]))
    return results


def _as_float64(values, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise MisterEError(f"`{name}` must be numbers, got {type(values).__name__} ({error}).") from None


def _check_sizes(num_predictions: int, num_references: int) -> None:
    if num_predictions != num_references:
        raise MisterEError(
            f"`predictions` and `references` differ in size: {num_predictions} vs {num_references} elements."
        )
    if num_predictions == 0:
        raise MisterEError("`predictions` and `references` are empty.")


__all__ = ["ERC_METRIC_PATH", "load_erc_metric", "concordance_correlation_coefficient", "regression_metrics"]
