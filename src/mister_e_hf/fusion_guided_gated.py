"""Cross-modal guided gated fusion (after Zhao, Ren & Zhou, "cross-modal guided gated feature enhancement",
Scientific Reports 15:30004, 2025), as a MiSTER-E fusion.

For each utterance, from each modality's context representation:

1. *enhancement*: each modality's features are scaled by a gate computed from the other modalities,
   `h'_m = h_m + h_m * sigmoid(W_m mean_{n != m} h_n)`;
2. *guided bimodal fusion*: each pair is fused, and a third modality guides (gates) the fusion,
   `f_ab = sigmoid(G_ab h'_guide) * tanh(V_ab [h'_a; h'_b])`; the guide is the remaining modality when there are
   three, and with two modalities the pair's mean (the other modality guides each side);
3. *joint (tri-modal) representation*: all enhanced and bimodal features together.

The unimodal, bimodal and joint representations each predict (they are the experts the gate weighs). The joint
branch is the teacher of a teacher/student distillation loss on every other branch (`distillation_weight`,
`distillation_temperature`), keeping the representations consistent. All per utterance: the conversational context
comes from the context layers, so the fusion needs no state when streaming.
"""

from itertools import combinations

import torch
from torch import nn

from .components import Fusion
from .gates import ExpertGate, MeanGate  # noqa: F401  (the built-in gates register themselves)
from .outputs import FusionOutput, ModalityFeatures
from .registry import GATES, register_fusion


@register_fusion("guided-gated")
class GuidedGatedFusion(Fusion):
    def __init__(self, config, num_outputs: int, context_dims: dict[str, int]):
        super().__init__()
        self.modalities = tuple(context_dims)
        self.pairs = list(combinations(self.modalities, 2))
        dim = config.expert_hidden_size
        self.inputs = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in context_dims.items()})
        self.enhance = nn.ModuleDict({m: nn.Linear(dim, dim) for m in self.modalities} if len(self.modalities) > 1
                                     else {})
        self.fuse = nn.ModuleDict({self._pair(a, b): nn.Linear(2 * dim, dim) for a, b in self.pairs})
        self.guide = nn.ModuleDict({self._pair(a, b): nn.Linear(dim, dim) for a, b in self.pairs})
        joint_inputs = dim * (len(self.modalities) + len(self.pairs))
        self.joint = nn.Sequential(nn.Linear(joint_inputs, dim), nn.ReLU()) if self.pairs else None
        names = self.expert_names(config)
        self.classifiers = nn.ModuleDict(
            {name: nn.Sequential(nn.Dropout(config.dropout), nn.Linear(dim, num_outputs)) for name in names}
        )
        self.gate = GATES[config.gate_type](config, len(names), num_outputs)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.expert_hidden_size <= 0:
            raise ValueError(f"`expert_hidden_size` must be positive, got {config.expert_hidden_size}.")

    @staticmethod
    def _pair(a: str, b: str) -> str:
        return f"{a}+{b}"

    @staticmethod
    def expert_names(config) -> list[str]:
        modalities = list(config.modalities)
        pairs = [f"{a}+{b}" for a, b in combinations(modalities, 2)]
        return modalities + pairs + (["joint"] if pairs else [])

    def forward(self, features: dict[str, ModalityFeatures], utterance_mask: torch.Tensor,
                state: dict | None = None) -> FusionOutput:
        masks = {m: features[m].mask for m in self.modalities}
        hidden = {m: torch.relu(self.inputs[m](features[m].context)) * masks[m].unsqueeze(-1) for m in self.modalities}

        enhanced = {}
        for m in self.modalities:
            others = [n for n in self.modalities if n != m]
            if not others:
                enhanced[m] = hidden[m]
                continue
            count = torch.stack([masks[n] for n in others]).sum(0).clamp_min(1).unsqueeze(-1)
            context = torch.stack([hidden[n] for n in others]).sum(0) / count
            enhanced[m] = hidden[m] + hidden[m] * torch.sigmoid(self.enhance[m](context))

        representations = dict(enhanced)
        expert_masks = dict(masks)
        for a, b in self.pairs:
            rest = [m for m in self.modalities if m not in (a, b)]
            guide = enhanced[rest[0]] if rest else (enhanced[a] + enhanced[b]) / 2
            name = self._pair(a, b)
            fused = torch.tanh(self.fuse[name](torch.cat([enhanced[a], enhanced[b]], dim=-1)))
            representations[name] = torch.sigmoid(self.guide[name](guide)) * fused
            expert_masks[name] = masks[a] & masks[b]
        if self.joint is not None:
            representations["joint"] = self.joint(torch.cat(list(representations.values()), dim=-1))
            expert_masks["joint"] = torch.stack(list(masks.values())).all(0)

        names = list(self.classifiers)
        expert_outputs = torch.stack([self.classifiers[n](representations[n]) for n in names], dim=2)
        expert_mask = torch.stack([expert_masks[n] for n in names], dim=2) & utterance_mask.unsqueeze(-1)
        distillation = None
        if self.joint is not None:
            teacher_available = expert_mask[..., -1:]
            distillation = (expert_outputs[..., -1, :], expert_outputs[..., :-1, :],
                            expert_mask[..., :-1] & teacher_available)
        return FusionOutput(
            expert_outputs=expert_outputs,
            expert_mask=expert_mask,
            gate_weights=self.gate(expert_outputs, expert_mask),
            distillation=distillation,
        )


__all__ = ["GuidedGatedFusion"]
