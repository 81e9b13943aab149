"""`MisterETrainer`: `Trainer` with MiSTER-E's losses logged one by one, and predictions that keep the gate weights."""

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from transformers import EvalPrediction, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import logging

from .cache import fit_embedding_statistics
from .outputs import MisterEOutput


logger = logging.get_logger(__name__)

LOSS_COMPONENTS = ("mixture_loss", "expert_loss", "supcon_loss", "kl_loss", "distillation_loss")


class MisterETrainer(Trainer):
    """A `Trainer` for [`MisterEModel`].

    - `compute_loss` takes the model's total loss (the mixture's loss plus the contrastive and KL terms, weighted
      from the config) and records each component, which `log` adds, averaged since the last log, to the training
      logs (`mixture_loss`, `supcon_loss`, ...) and `evaluation_loop` to evaluation metrics (`eval_mixture_loss`).
    - `prediction_step` returns `(logits, gate_weights)` as predictions, so that `compute_metrics` and `predict` see
      the experts' weights beside the mixture.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._components = {"train": defaultdict(list), "eval": defaultdict(list)}

    def train(self, *args, **kwargs):
        """`Trainer.train`, after fitting the model's embedding standardisation (`config.standardize_embeddings`) on
        the training set's cached embeddings if it was never fitted (a resumed run then loads the same values)."""
        if not getattr(self.model, "embedding_statistics_fitted", True) and self.train_dataset is not None:
            counts = fit_embedding_statistics(self.model, self.train_dataset)
            logger.info(f"Embedding standardisation fitted on the training set: {counts}")
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own total loss. The model averages over labelled utterances itself, so `num_items_in_batch`
        is not used (the Trainer divides by the gradient-accumulation steps, as for any model without loss kwargs)."""
        outputs: MisterEOutput = model(**inputs)
        if outputs.loss is None:
            raise ValueError("The batch has no `labels`: MisterETrainer needs them to compute the loss.")
        bucket = self._components["train" if model.training else "eval"]
        for name in LOSS_COMPONENTS:
            value = getattr(outputs, name, None)
            if value is not None:
                bucket[name].append(value.detach())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _pop_components(self, bucket: str, prefix: str = "") -> dict[str, float]:
        values = self._components[bucket]
        logs = {f"{prefix}{name}": round(torch.stack(v).float().mean().item(), 4) for name, v in values.items() if v}
        values.clear()
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            logs.update(self._pop_components("train"))
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._pop_components("eval", prefix=f"{metric_key_prefix}_"))
        return output

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Saves like `Trainer`, but the training arguments as JSON (`training_args.json`) instead of a pickle."""
        super()._save(output_dir, state_dict)
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        (output_dir / TRAINING_ARGS_NAME).unlink(missing_ok=True)
        (output_dir / "training_args.json").write_text(self.args.to_json_string() + "\n")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad():
            if labels is not None:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach()
            else:
                loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        return loss, (outputs.logits.detach(), outputs.gate_weights.detach()), labels


def flatten_predictions(predictions, label_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(logits (B, U, C), gates (B, U, E))` and `(B, U)` labels -> per labelled utterance: predicted ids, true ids,
    class probabilities `(N, C)` and gate weights `(N, E)`.

    Regression (`(B, U, D)` float labels, NaN where missing; the Trainer pads batches with -100): per utterance with
    any labelled value, predicted values `(N, D)`, true values `(N, D)`, predicted values again, and gate weights
    (averaged over dimensions when the fusion routes each dimension)."""
    logits, gates = predictions
    if label_ids.ndim == 3:
        padding = label_ids == -100
        values = np.where(padding, np.nan, label_ids)
        mask = ~np.isnan(values).all(-1)
        gates = gates.mean(-1) if gates.ndim == 4 else gates
        return logits[mask], values[mask], logits[mask], gates[mask]
    mask = label_ids != -100
    probabilities = np.exp(logits[mask])
    return probabilities.argmax(-1), label_ids[mask], probabilities, gates[mask]


def build_compute_metrics(label_names: list[str], expert_names: list[str], metric=None, head: str = "classification"):
    """`compute_metrics` for the Trainer: the ERC metrics (accuracy, weighted/macro F1, per-class F1), or for a
    regression head CCC and MAE per dimension and `ccc_mean`; and the mean gate weight of each expert over the
    labelled utterances (`gate_<expert>`)."""
    from .metrics import load_erc_metric, regression_metrics

    if metric is None and head == "classification":
        metric = load_erc_metric()

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predicted, true, _, gates = flatten_predictions(eval_prediction.predictions, eval_prediction.label_ids)
        if head == "regression":
            results = regression_metrics(predicted, true, label_names)
        else:
            results = metric.compute(predictions=predicted, references=true, label_names=label_names)
            results.pop("confusion_matrix", None)  # a matrix is not a loggable scalar; run_erc saves it separately
        results.update({f"gate_{name}": float(w) for name, w in zip(expert_names, gates.mean(0))})
        return results

    return compute_metrics


__all__ = ["MisterETrainer", "build_compute_metrics", "flatten_predictions", "LOSS_COMPONENTS"]
