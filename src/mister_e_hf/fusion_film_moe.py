"""FiLM-modulated lightweight mixture of experts (after MSF-SER, arXiv 2510.05749), as a MiSTER-E fusion.

The acoustic representation of each utterance (its speech context) goes to `num_film_experts` small experts; the
text representation (with the visual one, when the model has it) produces each expert's FiLM scale and shift,
`e_k = W_k relu((1 + gamma_k(t)) * a + beta_k(t))`. A router reads both and weighs the experts per utterance and, with
a regression head, separately for every output dimension (valence, arousal, dominance), so each dimension can rely on
different experts. Without audio the experts still run on the text-made shift alone (the acoustic part is zero);
without text the modulation is the identity.
"""

import torch
from torch import nn

from .components import Fusion
from .outputs import FusionOutput, ModalityFeatures
from .registry import HEADS, register_fusion


@register_fusion("film-moe")
class FiLMMoEFusion(Fusion):
    def __init__(self, config, num_outputs: int, context_dims: dict[str, int]):
        super().__init__()
        dim, experts = config.expert_hidden_size, config.num_film_experts
        self.num_experts, self.dim = experts, dim
        self.routes = num_outputs if HEADS[config.head].per_output_gates else 1  # one router per dimension
        self.acoustic = nn.Linear(context_dims["speech"], dim) if "speech" in context_dims else None
        self.conditioning = [m for m in context_dims if m != "speech"]
        conditioning_dim = sum(context_dims[m] for m in self.conditioning)
        self.film = nn.Linear(conditioning_dim, 2 * experts * dim) if self.conditioning else None
        self.dropout = nn.Dropout(config.dropout)
        self.experts = nn.ModuleList(nn.Linear(dim, num_outputs) for _ in range(experts))
        self.router = nn.Sequential(
            nn.Linear(dim + conditioning_dim, config.gate_hidden_size), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.gate_hidden_size, experts * self.routes),
        )
        self.temperature = config.gate_temperature

    @staticmethod
    def expert_names(config) -> list[str]:
        return [f"film-{k + 1}" for k in range(config.num_film_experts)]

    @classmethod
    def validate_config(cls, config) -> None:
        for name in ("num_film_experts", "expert_hidden_size", "gate_hidden_size"):
            if getattr(config, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(config, name)}.")

    def forward(self, features: dict[str, ModalityFeatures], utterance_mask: torch.Tensor,
                state: dict | None = None) -> FusionOutput:
        batch, turns = utterance_mask.shape
        reference = next(iter(features.values())).context
        if self.acoustic is not None:
            acoustic = self.acoustic(features["speech"].context) * features["speech"].mask.unsqueeze(-1)
        else:
            acoustic = reference.new_zeros(batch, turns, self.dim)
        if self.film is not None:
            condition = torch.cat([features[m].context * features[m].mask.unsqueeze(-1) for m in self.conditioning], -1)
            scale, shift = self.film(condition).view(batch, turns, self.num_experts, 2, self.dim).unbind(-2)
        else:
            condition = reference.new_zeros(batch, turns, 0)
            scale = shift = acoustic.new_zeros(batch, turns, self.num_experts, self.dim)
        modulated = torch.relu((1 + scale) * acoustic.unsqueeze(2) + shift)  # (B, U, K, dim)
        expert_outputs = torch.stack([expert(self.dropout(modulated[:, :, k])) for k, expert in
                                      enumerate(self.experts)], dim=2)
        available = torch.stack([f.mask for f in features.values()]).any(0) & utterance_mask
        expert_mask = available.unsqueeze(-1).expand(batch, turns, self.num_experts)
        scores = self.router(torch.cat([acoustic, condition], -1)).view(batch, turns, self.num_experts, self.routes)
        weights = (scores / self.temperature).softmax(2) * available[..., None, None]
        return FusionOutput(
            expert_outputs=expert_outputs,
            expert_mask=expert_mask,
            gate_weights=weights[..., 0] if self.routes == 1 else weights,
        )


__all__ = ["FiLMMoEFusion"]
