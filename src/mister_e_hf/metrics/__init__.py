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

    with population statistics (divide by N). Both inputs are flattened and must have the same number of elements.
    In [-1, 1]: 1 is perfect agreement, 0 none, -1 perfect reversed agreement. When both inputs are the same constant
    the formula is 0 / 0; the result is then 1.0 (perfect agreement).

    If either input is a `torch.Tensor`, the computation runs in torch (float32 or wider, on the tensor's device) and
    returns a 0-dim tensor that keeps the autograd graph, so `1 - ccc` can serve as a loss. Otherwise the inputs are
    converted with numpy (float64) and a Python `float` is returned.
    """
    if isinstance(predictions, torch.Tensor) or isinstance(references, torch.Tensor):
        tensor = predictions if isinstance(predictions, torch.Tensor) else references
        dtype = tensor.dtype if tensor.dtype in (torch.float32, torch.float64) else torch.float32
        p = torch.as_tensor(predictions, dtype=dtype, device=tensor.device).reshape(-1)
        r = torch.as_tensor(references, dtype=dtype, device=tensor.device).reshape(-1)
        _check_sizes(p.numel(), r.numel())
        mean_p, mean_r = p.mean(), r.mean()
        var_p = ((p - mean_p) ** 2).mean()
        var_r = ((r - mean_r) ** 2).mean()
        cov = ((p - mean_p) * (r - mean_r)).mean()
        denominator = var_p + var_r + (mean_p - mean_r) ** 2
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return torch.where(denominator > 0, 2 * cov / safe, torch.ones_like(denominator))

    p = np.asarray(predictions, dtype=np.float64).reshape(-1)
    r = np.asarray(references, dtype=np.float64).reshape(-1)
    _check_sizes(p.size, r.size)
    mean_p, mean_r = p.mean(), r.mean()
    var_p, var_r = p.var(), r.var()
    cov = np.mean((p - mean_p) * (r - mean_r))
    denominator = var_p + var_r + (mean_p - mean_r) ** 2
    if denominator == 0:
        return 1.0
    return float(2 * cov / denominator)


def regression_metrics(predictions, references, names: list[str]) -> dict[str, float]:
    """Per dimension, over its labelled values (NaN references are skipped): `ccc_<name>`, `mae_<name>`, and
    `ccc_mean`, the mean CCC over dimensions (the usual model-selection metric for dimensional emotion)."""
    predictions, references = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    results = {}
    for d, name in enumerate(names):
        keep = ~np.isnan(references[:, d])
        if keep.sum() < 2:
            raise ValueError(f"Fewer than two labelled values for dimension {name!r}: no correlation to compute.")
        results[f"ccc_{name}"] = concordance_correlation_coefficient(predictions[keep, d], references[keep, d])
        results[f"mae_{name}"] = float(np.abs(predictions[keep, d] - references[keep, d]).mean())
    results["ccc_mean"] = float(np.mean([results[f"ccc_{name}"] for name in names]))
    return results


def _check_sizes(num_predictions: int, num_references: int) -> None:
    if num_predictions != num_references:
        raise ValueError(
            f"`predictions` and `references` differ in size: {num_predictions} vs {num_references} elements."
        )
    if num_predictions == 0:
        raise ValueError("`predictions` and `references` are empty.")


__all__ = ["ERC_METRIC_PATH", "load_erc_metric", "concordance_correlation_coefficient", "regression_metrics"]
