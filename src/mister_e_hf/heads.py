"""Heads: how the experts' outputs are mixed by the gate into a prediction, and how predictions are scored.

A head has no parameters of its own: it tells the fusion how many outputs each expert gives (`num_outputs`), mixes
the experts' outputs with the gate weights (`mix`), checks labels (`check_labels`) and returns the unweighted loss
components (`losses`). `MisterEModel` weights the components with the config and sums them.
"""

import torch
from torch import nn

from .losses import focal_nll_loss, supervised_contrastive_loss, symmetric_kl_consistency
from .outputs import FusionOutput


class ClassificationHead(nn.Module):
    """One emotion class per utterance: the prediction is the gate-weighted mixture of the experts' distributions.

    Losses: `mixture_loss` (focal/cross-entropy of the mixture), `expert_loss` (the same for each available expert,
    averaged), `kl_loss` (symmetric KL between experts, over all real utterances) and `supcon_loss` (supervised
    contrastive loss between the fusion's paired speech/text representations).
    """

    ignore_index = -100

    def __init__(self, config):
        super().__init__()
        self.num_outputs = config.num_labels
        self.focal_gamma = config.focal_gamma
        self.supcon_temperature = config.supcon_temperature

    def mix(self, expert_outputs: torch.Tensor, gate_weights: torch.Tensor) -> torch.Tensor:
        """`(B, U, E, C)` expert logits and `(B, U, E)` weights -> `(B, U, C)` log-probabilities of the mixture."""
        mixture = (gate_weights.unsqueeze(-1) * expert_outputs.softmax(-1)).sum(-2)
        return mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()

    def check_labels(self, labels: torch.Tensor, utterance_mask: torch.Tensor) -> torch.Tensor:
        """Returns the `(B, U)` mask of labelled real utterances; raises on labels outside the label set."""
        if labels.shape != utterance_mask.shape:
            raise ValueError(
                f"`labels` must have shape (batch, utterances) = {tuple(utterance_mask.shape)}, got {tuple(labels.shape)}."
            )
        if labels.is_floating_point():
            raise ValueError("Classification `labels` must be integer class ids (padding = -100).")
        labelled = utterance_mask & (labels != self.ignore_index)
        bad = labelled & ((labels < 0) | (labels >= self.num_outputs))
        if bad.any():
            b, u = bad.nonzero()[0].tolist()
            raise ValueError(
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
        return losses


HEADS = {"classification": ClassificationHead}
"""Registry of heads by the name used in `MisterEConfig.head`."""

__all__ = ["HEADS", "ClassificationHead"]
