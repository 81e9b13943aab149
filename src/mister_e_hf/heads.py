"""Heads: how the experts' outputs are mixed by the gate into a prediction, how predictions are scored, and what they
mean (the contract is `components.Head`).

A head has no parameters of its own: it tells the fusion how many outputs each expert gives (`num_outputs`), mixes
the experts' outputs with the gate weights (`mix`), checks labels (`check_labels`) and returns the unweighted loss
terms (`losses`), whose default weights it declares (`loss_terms`); `MisterEModel` weighs and sums them. It also
decodes predictions (labels and scores, or values) and computes its metrics, so that the pipeline, streaming, the
trainer, the CLI and the model card ask the head instead of branching on its name.
"""

import numpy as np
import torch

from .losses import (
    ccc_loss,
    distillation_kl,
    focal_nll_loss,
    supervised_contrastive_loss,
    symmetric_kl_consistency,
)
from .components import Head
from .errors import MisterEError
from .outputs import FusionOutput
from .registry import HEADS, register_head


def _distillation_rows(fusion: FusionOutput, utterance_mask: torch.Tensor):
    """(teacher rows, student rows) `(N, outputs)` for every available student of every real utterance."""
    teacher, students, student_mask = fusion.distillation
    keep = student_mask & utterance_mask.unsqueeze(-1)
    return teacher.unsqueeze(2).expand_as(students)[keep], students[keep]


@register_head("classification")
class ClassificationHead(Head):
    """One emotion class per utterance: the prediction is the gate-weighted mixture of the experts' distributions.

    Losses: `mixture_loss` (focal/cross-entropy of the mixture), `expert_loss` (the same for each available expert,
    averaged), `kl_loss` (symmetric KL between experts, over all real utterances), `supcon_loss` (supervised
    contrastive loss between the fusion's paired speech/text representations) and, for fusions with teacher and
    student branches, `distillation_loss` (temperature-scaled KL from the teacher).
    """

    ignore_index = -100
    target = "classes"
    headline_metric = "weighted_f1"
    CARD_METRICS = ("weighted_f1", "accuracy", "macro_f1")

    def __init__(self, config):
        super().__init__()
        self.num_outputs = config.num_labels
        self.focal_gamma = config.focal_gamma
        self.supcon_temperature = config.supcon_temperature
        self.distillation_temperature = config.distillation_temperature

    @classmethod
    def loss_terms(cls, config) -> dict[str, float]:
        """The mixture's loss, each expert's, the KL consistency term, the contrastive pair's and distillation's,
        weighted by default as the config's legacy fields say (`loss_weights` overrides any)."""
        return {"mixture_loss": 1.0, "expert_loss": config.expert_loss_weight, "kl_loss": config.kl_weight,
                "supcon_loss": config.supcon_weight, "distillation_loss": config.distillation_weight}

    @classmethod
    def validate_config(cls, config) -> None:
        if config.num_labels < 2:
            raise ValueError(f"A classification head needs at least 2 labels, got num_labels={config.num_labels}.")
        if config.focal_gamma < 0:
            raise ValueError(f"`focal_gamma` must be >= 0, got {config.focal_gamma}.")

    # ------------------------------------------------------------------------------------------- what it means
    @classmethod
    def decode(cls, logits: torch.Tensor, gate_weights: torch.Tensor, id2label: dict, expert_names: list[str]):
        """Per utterance of one conversation (`logits (U, C)` log-probabilities, `gate_weights (U, E)`): `label`,
        `score` (its probability), `scores` (every class's) and the experts' `gate_weights`."""
        probabilities = logits.float().cpu().exp()
        decoded = []
        for p, gates in zip(probabilities, gate_weights):
            best = int(p.argmax())
            decoded.append({"label": id2label[best], "score": float(p[best]),
                            "scores": {id2label[i]: float(v) for i, v in enumerate(p)},
                            "gate_weights": cls.decode_gates(gates, expert_names)})
        return decoded

    @classmethod
    def flatten(cls, predictions, label_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`(logits (B, U, C), gates (B, U, E))` and `(B, U)` labels (-100: none) -> per labelled utterance: predicted
        ids, true ids, class probabilities `(N, C)` and gate weights `(N, E)`."""
        logits, gates = predictions
        mask = label_ids != cls.ignore_index
        probabilities = np.exp(logits[mask])
        return probabilities.argmax(-1), label_ids[mask], probabilities, gates[mask]

    @classmethod
    def metrics(cls, predicted, true, label_names: list[str], **extra) -> dict:
        """Accuracy, weighted / macro F1, per-class F1 and the confusion matrix (the ERC metric module); `extra`
        (e.g. CMU-MOSI's `scores` and `predicted_scores`) goes to it too."""
        from mister_e_hf.metrics import load_erc_metric  # absolute: a checkpoint's copied model code needs no metrics

        return load_erc_metric().compute(predictions=predicted, references=true, label_names=label_names, **extra)

    @classmethod
    def metric_names(cls, label_names: list[str]) -> list[str]:
        return ["accuracy", "weighted_f1", "macro_f1", *(f"f1_{name}" for name in label_names)]

    @classmethod
    def metric_extras(cls, dataset, scores, label_names: list[str]) -> dict:
        """For a split with a per-turn `score` column (CMU-MOSI's sentiment in [-3, 3]): the true scores of the
        labelled utterances and the predicted ones (`predicted_scores`), for the binary (has-0 / non-0) accuracy and
        F1, MAE and Pearson r of the score."""
        if dataset is None or "score" not in getattr(dataset, "column_names", ()):
            return {}
        true = np.array([s for row, labels in zip(dataset["score"], dataset["labels"])
                         for s, label in zip(row, labels) if label != -1], dtype=np.float64)
        return {"scores": true, "predicted_scores": cls.predicted_scores(scores, label_names)}

    @staticmethod
    def predicted_scores(probabilities: np.ndarray, label_names: list[str]) -> np.ndarray:
        """A sentiment score per utterance: the expected class value for numeric labels ('-3'..'3'), else
        P(positive) - P(negative) scaled to [-3, 3] for binary labels."""
        try:
            values = np.array([float(name) for name in label_names])
        except ValueError:
            values = np.array([3.0 if "pos" in name else -3.0 for name in label_names])
        return probabilities @ values

    @classmethod
    def card_metrics(cls, label_names: list[str]) -> list[str]:
        return list(cls.CARD_METRICS)

    def mix(self, expert_outputs: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
        """`(B, U, E, C)` expert logits and `(B, U, E)` weights -> `(B, U, C)` log-probabilities of the mixture."""
        mixture = (gate_weights.unsqueeze(-1) * expert_outputs.softmax(-1)).sum(-2)
        return mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()

    def check_labels(self, labels: torch.Tensor, utterance_mask: torch.Tensor) -> torch.Tensor:
        """Returns the `(B, U)` mask of labelled real utterances; raises on labels outside the label set."""
        if labels.shape != utterance_mask.shape:
            raise MisterEError(
                f"`labels` must have shape (batch, utterances) = {tuple(utterance_mask.shape)}, got {tuple(labels.shape)}."
            )
        if labels.is_floating_point():
            raise MisterEError("Classification `labels` must be integer class ids (padding = -100).")
        labelled = utterance_mask & (labels != self.ignore_index)
        bad = labelled & ((labels < 0) | (labels >= self.num_outputs))
        if bad.any():
            b, u = bad.nonzero()[0].tolist()
            raise MisterEError(
                f"Label {labels[b, u].item()} of conversation {b}, utterance {u} is outside the label set "
                f"[0, {self.num_outputs}) (use -100 for utterances without a label)."
            )
        return labelled

    def losses(
        self, logits: torch.Tensor, fusion: FusionOutput, labels: torch.Tensor, utterance_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        labelled = self.check_labels(labels, utterance_mask)
        targets = labels[labelled]
        expert_log_probs = fusion.expert_outputs.log_softmax(-1)

        expert_labelled = fusion.expert_mask & labelled.unsqueeze(-1)
        expert_targets = labels.unsqueeze(-1).expand_as(expert_labelled)[expert_labelled]
        losses = {
            "mixture_loss": focal_nll_loss(logits[labelled], targets, self.focal_gamma),
            "expert_loss": focal_nll_loss(expert_log_probs[expert_labelled], expert_targets, self.focal_gamma),
            "kl_loss": symmetric_kl_consistency(expert_log_probs[utterance_mask], fusion.expert_mask[utterance_mask]),
        }
        if fusion.paired is not None:
            speech, text = fusion.paired
            paired_mask = labelled & fusion.paired_mask
            losses["supcon_loss"] = supervised_contrastive_loss(
                speech[paired_mask], text[paired_mask], labels[paired_mask], self.supcon_temperature
            )
        if fusion.distillation is not None:
            losses["distillation_loss"] = distillation_kl(*_distillation_rows(fusion, utterance_mask),
                                                          self.distillation_temperature)
        return losses


@register_head("regression")
class RegressionHead(Head):
    """Dimensional emotion (valence / arousal / dominance, any subset, or a sentiment score) per utterance.

    The dimensions are `config.id2label`'s names. The prediction is the gate-weighted sum of the experts' values
    (per dimension when the fusion routes each dimension separately). Losses: `mixture_loss` (weighted mean over
    dimensions of 1 - CCC, `config.ccc_weights`), `expert_loss` (the same for each expert, averaged) and, for fusions
    with teacher and student branches, `distillation_loss` (mean squared error to the teacher). Labels are floats
    `(batch, utterances, dimensions)`, NaN where missing.
    """

    def __init__(self, config):
        super().__init__()
        self.num_outputs = config.num_labels
        weights = config.ccc_weights or [1.0] * self.num_outputs
        if len(weights) != self.num_outputs:
            raise MisterEError(f"`ccc_weights` has {len(weights)} values for {self.num_outputs} dimensions.")
        self.weights_from_config = [float(w) for w in weights]
        # not saved (the config holds them): `MisterEPreTrainedModel._init_weights` refills it after loading, where
        # `from_pretrained` leaves non-persistent buffers uninitialised
        self.register_buffer("ccc_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    target = "values"
    per_output_gates = True
    headline_metric = "ccc_mean"
    percent = False

    @classmethod
    def loss_terms(cls, config) -> dict[str, float]:
        """The mixture's `1 - CCC`, each expert's, and distillation's (no contrastive or KL term)."""
        return {"mixture_loss": 1.0, "expert_loss": config.expert_loss_weight,
                "distillation_loss": config.distillation_weight}

    @classmethod
    def validate_config(cls, config) -> None:
        weights = config.ccc_weights
        if weights is not None and len(weights) != config.num_labels:
            raise ValueError(f"`ccc_weights` has {len(weights)} values for {config.num_labels} dimensions.")

    @classmethod
    def decode(cls, logits: torch.Tensor, gate_weights: torch.Tensor, id2label: dict, expert_names: list[str]):
        """Per utterance of one conversation (`logits (U, D)`): the `values` of each dimension and the experts'
        `gate_weights` (per dimension when the fusion routes each dimension)."""
        values = logits.float().cpu()
        return [{"values": {id2label[i]: float(v) for i, v in enumerate(row)},
                 "gate_weights": cls.decode_gates(gates, expert_names)} for row, gates in zip(values, gate_weights)]

    @classmethod
    def flatten(cls, predictions, label_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`(values (B, U, D), gates)` and `(B, U, D)` float labels (NaN where missing; the Trainer pads batches with
        -100) -> per utterance with any labelled value: predicted values `(N, D)`, true values `(N, D)`, predicted
        values again, and gate weights (averaged over dimensions when the fusion routes each dimension)."""
        logits, gates = predictions
        values = np.where(label_ids == -100, np.nan, label_ids)
        mask = ~np.isnan(values).all(-1)
        gates = gates.mean(-1) if gates.ndim == 4 else gates
        return logits[mask], values[mask], logits[mask], gates[mask]

    @classmethod
    def metrics(cls, predicted, true, label_names: list[str], **extra) -> dict:
        """CCC and MAE per dimension and `ccc_mean`."""
        from mister_e_hf.metrics import regression_metrics  # absolute, as above

        return regression_metrics(predicted, true, label_names)

    @classmethod
    def metric_names(cls, label_names: list[str]) -> list[str]:
        return ["ccc_mean", *(f"ccc_{name}" for name in label_names), *(f"mae_{name}" for name in label_names)]

    @classmethod
    def card_metrics(cls, label_names: list[str]) -> list[str]:
        return ["ccc_mean", *(f"ccc_{name}" for name in label_names)]

    def mix(self, expert_outputs: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
        """`(B, U, E, D)` expert values and `(B, U, E)` or `(B, U, E, D)` weights -> `(B, U, D)` values."""
        weights = gate_weights if gate_weights.dim() == expert_outputs.dim() else gate_weights.unsqueeze(-1)
        return (weights * expert_outputs).sum(-2)

    def check_labels(self, labels: torch.Tensor, utterance_mask: torch.Tensor) -> torch.Tensor:
        """Returns the `(B, U, D)` mask of labelled values of real utterances."""
        expected = (*utterance_mask.shape, self.num_outputs)
        if tuple(labels.shape) != expected:
            raise MisterEError(f"Regression `labels` must have shape (batch, utterances, dimensions) = {expected}, "
                             f"got {tuple(labels.shape)} (NaN marks a missing value).")
        if not labels.is_floating_point():
            raise MisterEError("Regression `labels` must be floats (NaN where missing).")
        return utterance_mask.unsqueeze(-1) & ~labels.isnan()

    def losses(
        self, logits: torch.Tensor, fusion: FusionOutput, labels: torch.Tensor, utterance_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        labelled = self.check_labels(labels, utterance_mask)
        targets = labels.nan_to_num(0.0)
        flat = labelled.any(-1)
        expert_losses = [
            ccc_loss(fusion.expert_outputs[:, :, e][flat], targets[flat],
                     (labelled & fusion.expert_mask[:, :, e, None])[flat], self.ccc_weights)
            for e in range(fusion.expert_outputs.shape[2])
        ]
        losses = {
            "mixture_loss": ccc_loss(logits[flat], targets[flat], labelled[flat], self.ccc_weights),
            "expert_loss": torch.stack(expert_losses).mean(),
        }
        if fusion.distillation is not None:
            teacher, student = _distillation_rows(fusion, utterance_mask)
            losses["distillation_loss"] = (
                ((student - teacher.detach()) ** 2).mean() if len(student) else logits.new_zeros(()))
        return losses



__all__ = ["HEADS", "ClassificationHead", "RegressionHead"]
