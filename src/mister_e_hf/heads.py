"""Heads: how the experts' outputs are mixed by the gate into a prediction, and how predictions are scored.

A head has no parameters of its own: it tells the fusion how many outputs each expert gives (`num_outputs`), mixes
the experts' outputs with the gate weights (`mix`), checks labels (`check_labels`) and returns the unweighted loss
components (`losses`). `MisterEModel` weights the components with the config and sums them.
"""

import torch
from torch import nn

from .losses import (
    ccc_loss,
    distillation_kl,
    focal_nll_loss,
    supervised_contrastive_loss,
    symmetric_kl_consistency,
)
from .errors import MisterEError
from .outputs import FusionOutput


def _distillation_rows(fusion: FusionOutput, utterance_mask: torch.Tensor):
    """(teacher rows, student rows) `(N, outputs)` for every available student of every real utterance."""
    teacher, students, student_mask = fusion.distillation
    keep = student_mask & utterance_mask.unsqueeze(-1)
    return teacher.unsqueeze(2).expand_as(students)[keep], students[keep]


class ClassificationHead(nn.Module):
    """One emotion class per utterance: the prediction is the gate-weighted mixture of the experts' distributions.

    Losses: `mixture_loss` (focal/cross-entropy of the mixture), `expert_loss` (the same for each available expert,
    averaged), `kl_loss` (symmetric KL between experts, over all real utterances), `supcon_loss` (supervised
    contrastive loss between the fusion's paired speech/text representations) and, for fusions with teacher and
    student branches, `distillation_loss` (temperature-scaled KL from the teacher).
    """

    ignore_index = -100

    def __init__(self, config):
        super().__init__()
        self.num_outputs = config.num_labels
        self.focal_gamma = config.focal_gamma
        self.supcon_temperature = config.supcon_temperature
        self.distillation_temperature = config.distillation_temperature

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


class RegressionHead(nn.Module):
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


HEADS = {"classification": ClassificationHead, "regression": RegressionHead}
"""Registry of heads by the name used in `MisterEConfig.head`."""

__all__ = ["HEADS", "ClassificationHead", "RegressionHead"]
