"""Tests for `mister_e_hf.metrics`: the offline `evaluate` ERC metric module and the CCC helper.

Expected values are computed independently here: by hand from confusion counts, or with plain numpy formulas.
"""

import configparser
import math
import os
from pathlib import Path

# The metric loads from a local folder; make sure nothing ever reaches for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mister_e_hf.metrics import (  # noqa: E402
    ERC_METRIC_PATH,
    concordance_correlation_coefficient,
    load_erc_metric,
)


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    # In memory: when `_compute` raises, evaluate 0.4.6 neither deletes its arrow cache file nor releases its lock,
    # so the error cases below would leave files behind in a file-backed cache.
    return load_erc_metric(keep_in_memory=True, cache_dir=str(tmp_path_factory.mktemp("metrics_cache")))


# --- loading -----------------------------------------------------------------------------------------------------


def test_metric_folder_and_script_names_match():
    assert isinstance(ERC_METRIC_PATH, Path)
    assert ERC_METRIC_PATH.is_dir()
    assert (ERC_METRIC_PATH / f"{ERC_METRIC_PATH.name}.py").is_file()


def test_load_by_path_gives_the_metric(metric):
    direct = evaluate.load(str(ERC_METRIC_PATH))
    for module in (metric, direct):
        assert isinstance(module, evaluate.Metric)
        assert type(module).__name__ == "ErcMetrics"
        assert module.features["predictions"].dtype == "int64"
        assert module.features["references"].dtype == "int64"
    assert "weighted" in metric.description.lower()
    assert "label_names" in metric.inputs_description
    assert metric.citation.strip()


def test_setup_cfg_ships_the_metric_script():
    parser = configparser.ConfigParser()
    parser.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert "metrics/erc_metrics/*.py" in parser["options.package_data"]["mister_e_hf"].split()


# --- classification ----------------------------------------------------------------------------------------------

# refs:  0 0 0 1 1 2
# preds: 0 0 1 1 2 2
# class 0: TP 2, FP 0, FN 1 -> F1 4/5;  class 1: TP 1, FP 1, FN 1 -> 1/2;  class 2: TP 1, FP 1, FN 0 -> 2/3
REFS = [0, 0, 0, 1, 1, 2]
PREDS = [0, 0, 1, 1, 2, 2]
NAMES = ["neutral", "joy", "anger"]
F1_BY_HAND = {"neutral": 4 / 5, "joy": 1 / 2, "anger": 2 / 3}
SUPPORT = {"neutral": 3, "joy": 2, "anger": 1}
CM_BY_HAND = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_three_class_scores_by_hand(metric):
    results = metric.compute(predictions=PREDS, references=REFS, label_names=NAMES)
    assert F1_BY_HAND == {
        "neutral": f1_from_counts(2, 0, 1),
        "joy": f1_from_counts(1, 1, 1),
        "anger": f1_from_counts(1, 1, 0),
    }
    assert results["accuracy"] == pytest.approx(4 / 6)
    for name in NAMES:
        assert results[f"f1_{name}"] == pytest.approx(F1_BY_HAND[name])
    weighted = sum(SUPPORT[n] * F1_BY_HAND[n] for n in NAMES) / len(REFS)
    assert results["weighted_f1"] == pytest.approx(weighted)
    assert results["macro_f1"] == pytest.approx(sum(F1_BY_HAND.values()) / 3)
    assert results["confusion_matrix"] == CM_BY_HAND
    assert set(results) == {"accuracy", "weighted_f1", "macro_f1", "confusion_matrix"} | {f"f1_{n}" for n in NAMES}


def test_result_types_are_plain_python(metric):
    results = metric.compute(predictions=PREDS, references=REFS, label_names=NAMES)
    for key, value in results.items():
        if key == "confusion_matrix":
            assert all(type(x) is int for row in value for x in row)
        else:
            assert type(value) is float and 0.0 <= value <= 1.0


def test_absent_class_still_reported(metric):
    names = NAMES + ["sadness"]
    results = metric.compute(predictions=PREDS, references=REFS, label_names=names)
    assert results["f1_sadness"] == 0.0
    assert results["confusion_matrix"] == [row + [0] for row in CM_BY_HAND] + [[0, 0, 0, 0]]
    # Support 0: weighted F1 is unchanged, macro F1 averages over four classes.
    assert results["weighted_f1"] == pytest.approx(sum(SUPPORT[n] * F1_BY_HAND[n] for n in NAMES) / 6)
    assert results["macro_f1"] == pytest.approx(sum(F1_BY_HAND.values()) / 4)


def test_default_label_names_cover_max_id(metric):
    results = metric.compute(predictions=[0, 2, 0], references=[0, 0, 1])
    assert {k for k in results if k.startswith("f1_")} == {"f1_0", "f1_1", "f1_2"}
    assert results["confusion_matrix"] == [[1, 0, 1], [1, 0, 0], [0, 0, 0]]
    assert results["f1_0"] == pytest.approx(f1_from_counts(1, 1, 1))


def test_perfect_predictions(metric):
    results = metric.compute(predictions=[2, 0, 1, 1], references=[2, 0, 1, 1], label_names=NAMES)
    assert results["accuracy"] == results["weighted_f1"] == results["macro_f1"] == 1.0
    assert results["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


# --- continuous sentiment (CMU-MOSI style) -----------------------------------------------------------------------

# Two true scores are exactly 0 and one prediction is exactly 0, so has-0 and non-0 disagree.
SCORES = [2.0, -1.0, 0.0, 0.0, 1.5, -2.5]
PRED_SCORES = [1.0, 0.0, -0.3, 0.4, -0.2, -1.0]


def test_mosi_binary_has0_vs_non0_by_hand(metric):
    results = metric.compute(
        predictions=[1, 0, 1, 1, 1, 0], references=[1, 0, 1, 1, 1, 0], scores=SCORES, predicted_scores=PRED_SCORES
    )
    # has-0 (>= 0 is positive), all six: truth T F T T T F, prediction T T F T F F -> right on items 0, 3, 5.
    assert results["binary_accuracy_has0"] == pytest.approx(3 / 6)
    pos, neg = f1_from_counts(tp=2, fp=1, fn=2), f1_from_counts(tp=1, fp=2, fn=1)  # supports 4 and 2
    assert results["binary_f1_has0"] == pytest.approx((4 * pos + 2 * neg) / 6)
    assert results["binary_f1_has0"] == pytest.approx(18 / 35)
    # non-0 (> 0 is positive), items 0, 1, 4, 5: truth T F T F, prediction T F F F -> right on 3 of 4.
    assert results["binary_accuracy_non0"] == pytest.approx(3 / 4)
    pos, neg = f1_from_counts(tp=1, fp=0, fn=1), f1_from_counts(tp=2, fp=1, fn=0)  # supports 2 and 2
    assert results["binary_f1_non0"] == pytest.approx((2 * pos + 2 * neg) / 4)
    assert results["binary_f1_non0"] == pytest.approx(11 / 15)
    assert results["binary_accuracy_has0"] != results["binary_accuracy_non0"]
    # The classification part is still there.
    assert results["accuracy"] == 1.0 and results["confusion_matrix"] == [[2, 0], [0, 4]]


def test_mae_and_pearson_against_numpy(metric):
    true, pred = np.array(SCORES), np.array(PRED_SCORES)
    results = metric.compute(
        predictions=[0] * 6, references=[0] * 6, scores=SCORES, predicted_scores=PRED_SCORES
    )
    assert results["mae"] == pytest.approx(np.abs(pred - true).mean())
    tc, pc = true - true.mean(), pred - pred.mean()
    assert results["pearson"] == pytest.approx((tc * pc).sum() / np.sqrt((tc**2).sum() * (pc**2).sum()))
    assert results["pearson"] == pytest.approx(np.corrcoef(pred, true)[0, 1])


def test_pearson_is_zero_for_constant_side(metric):
    results = metric.compute(
        predictions=[0, 0, 0], references=[0, 0, 0], scores=[1.0, -2.0, 0.5], predicted_scores=[0.3, 0.3, 0.3]
    )
    assert results["pearson"] == 0.0
    assert results["mae"] == pytest.approx((0.7 + 2.3 + 0.2) / 3)
    results = metric.compute(
        predictions=[0, 0], references=[0, 0], scores=[1.0, 1.0], predicted_scores=[0.3, 2.0]
    )
    assert results["pearson"] == 0.0


def test_non0_is_nan_when_every_true_score_is_zero(metric):
    results = metric.compute(
        predictions=[0, 0], references=[0, 0], scores=[0.0, 0.0], predicted_scores=[0.5, -0.5]
    )
    assert results["binary_accuracy_has0"] == pytest.approx(0.5)
    assert math.isnan(results["binary_accuracy_non0"]) and math.isnan(results["binary_f1_non0"])


# --- batches -----------------------------------------------------------------------------------------------------


def test_add_batch_then_compute_equals_one_shot(metric, tmp_path):
    one_shot = metric.compute(
        predictions=PREDS, references=REFS, label_names=NAMES, scores=SCORES, predicted_scores=PRED_SCORES
    )
    batched = load_erc_metric(cache_dir=str(tmp_path))  # the default, file-backed cache
    batched.add_batch(predictions=PREDS[:2], references=REFS[:2])
    batched.add_batch(predictions=PREDS[2:5], references=REFS[2:5])
    batched.add(prediction=PREDS[5], reference=REFS[5])
    results = batched.compute(label_names=NAMES, scores=SCORES, predicted_scores=PRED_SCORES)
    assert results == one_shot
    assert not list(tmp_path.rglob("*.arrow"))  # evaluate removed its cache file after a successful compute


# --- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(predictions=[], references=[]), "empty"),
        (dict(predictions=[0, 3], references=[0, 1], label_names=NAMES), "outside"),
        (dict(predictions=[0, 1], references=[0, 5], label_names=NAMES), "outside"),
        (dict(predictions=[0, -1], references=[0, 1], label_names=NAMES), "outside"),
        (dict(predictions=[0, 1], references=[0, 1], scores=[0.5, -1.0]), "predicted_scores"),
        (dict(predictions=[0, 1], references=[0, 1], predicted_scores=[0.5, -1.0]), "scores"),
        (dict(predictions=[0, 1], references=[0, 1], scores=[0.5, -1.0], predicted_scores=[0.5]), "length"),
        (dict(predictions=[0, 1], references=[0, 1], scores=[0.5], predicted_scores=[0.5]), "predictions"),
        (dict(predictions=[0, 1], references=[0, 1], scores=[0.5, np.nan], predicted_scores=[0.5, 1.0]), "finite"),
    ],
)
def test_invalid_inputs_raise(metric, kwargs, match):
    with pytest.raises(ValueError, match=match):
        metric.compute(**kwargs)


def test_length_mismatch_raises(metric):
    with pytest.raises(ValueError):  # caught by evaluate itself before `_compute`
        metric.compute(predictions=[0, 1, 1], references=[0, 1])
    with pytest.raises(ValueError, match="differ in length"):  # and by the module's own check
        metric._compute(predictions=[0, 1, 1], references=[0, 1])


def test_metric_still_usable_after_an_error(metric):
    with pytest.raises(ValueError):
        metric.compute(predictions=[0, 9], references=[0, 1], label_names=NAMES)
    assert metric.compute(predictions=[0, 1], references=[0, 1])["accuracy"] == 1.0


# --- concordance correlation coefficient -------------------------------------------------------------------------


def test_ccc_identical_is_one():
    x = [0.3, -1.2, 2.5, 0.0]
    assert concordance_correlation_coefficient(x, x) == pytest.approx(1.0)
    t = torch.tensor(x)
    assert concordance_correlation_coefficient(t, t).item() == pytest.approx(1.0)
    assert concordance_correlation_coefficient([2.0, 2.0], [2.0, 2.0]) == 1.0  # 0 / 0 -> perfect agreement


def test_ccc_known_value_by_hand():
    # p = 1 2 3, r = 2 4 6: means 2 and 4, var 2/3 and 8/3, cov 4/3
    # CCC = 2 * 4/3 / (2/3 + 8/3 + (2 - 4)^2) = (8/3) / (22/3) = 4/11
    value = concordance_correlation_coefficient(np.array([1.0, 2.0, 3.0]), [2, 4, 6])
    assert type(value) is float
    assert value == pytest.approx(4 / 11)
    # Unlike Pearson, a constant shift lowers CCC: p = r + 1 -> 2 var / (2 var + 1).
    r = np.array([1.0, 2.0, 3.0])
    assert concordance_correlation_coefficient(r + 1, r) == pytest.approx(2 * (2 / 3) / (2 * (2 / 3) + 1))


def test_ccc_anti_correlated_is_negative():
    assert concordance_correlation_coefficient([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert concordance_correlation_coefficient([0.1, 0.5, 0.9, 1.4], [2.0, 1.1, 0.3, -0.4]) < 0


def test_ccc_torch_matches_numpy_and_is_differentiable():
    rng = np.random.default_rng(0)
    p, r = rng.normal(size=(4, 5)), rng.normal(size=20)
    expected = concordance_correlation_coefficient(p, r)
    mean_p, mean_r = p.mean(), r.mean()
    cov = np.mean((p.reshape(-1) - mean_p) * (r - mean_r))
    assert expected == pytest.approx(2 * cov / (p.var() + r.var() + (mean_p - mean_r) ** 2))

    pred = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    value = concordance_correlation_coefficient(pred, torch.tensor(r))
    assert value.dim() == 0 and value.dtype == torch.float64
    assert value.item() == pytest.approx(expected)
    (1 - value).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_ccc_invalid_inputs():
    with pytest.raises(ValueError, match="size"):
        concordance_correlation_coefficient([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="empty"):
        concordance_correlation_coefficient(torch.tensor([]), torch.tensor([]))
