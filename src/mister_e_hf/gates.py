"""Gates: how the experts of each utterance are weighed (`MisterEConfig.gate_type`)."""

import torch
from torch import nn

from .components import Gate
from .registry import GATES, register_gate


@register_gate("learned")
class ExpertGate(Gate):
    """Per-utterance softmax weights over the experts, computed from the experts' own outputs.

    Unavailable experts (missing modality) get weight exactly 0 and the others renormalise; padding utterances get
    all-zero weights.
    """

    def __init__(self, config, num_experts: int, num_outputs: int):
        super().__init__()
        self.temperature = config.gate_temperature
        self.net = nn.Sequential(
            nn.Linear(num_experts * num_outputs, config.gate_hidden_size),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.gate_hidden_size, num_experts),
        )

    @classmethod
    def validate_config(cls, config) -> None:
        if config.gate_hidden_size <= 0:
            raise ValueError(f"`gate_hidden_size` must be positive, got {config.gate_hidden_size}.")

    def forward(self, expert_outputs: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
        """`(B, U, E, K)` outputs and `(B, U, E)` availability -> `(B, U, E)` weights."""
        inputs = (expert_outputs * expert_mask.unsqueeze(-1)).flatten(-2)
        scores = self.net(inputs) / self.temperature
        scores = scores.masked_fill(~expert_mask, torch.finfo(scores.dtype).min)
        return scores.softmax(-1) * expert_mask


@register_gate("mean")
class MeanGate(Gate):
    """No learned gate: every available expert gets the same weight (the "no gate" ablation)."""

    def __init__(self, config, num_experts: int, num_outputs: int):
        super().__init__()

    def forward(self, expert_outputs: torch.Tensor, expert_mask: torch.Tensor) -> torch.Tensor:
        weights = expert_mask.to(expert_outputs.dtype)
        return weights / weights.sum(-1, keepdim=True).clamp_min(1.0)


__all__ = ["ExpertGate", "MeanGate", "GATES"]
