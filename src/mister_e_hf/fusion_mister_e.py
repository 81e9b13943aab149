"""The MiSTER-E fusion: speech-only, text-only and cross-modal experts weighed by a learned gate."""

import torch
from torch import nn

from .components import Fusion
from .errors import MisterEError
from .gates import ExpertGate, MeanGate  # noqa: F401  (the built-in gates register themselves)
from .outputs import FusionOutput, ModalityFeatures
from .registry import GATES, register_fusion


def causal_attention_mask(length: int, device: torch.device) -> torch.Tensor:
    """`(length, length)` bool mask, True above the diagonal: position i may not attend to j > i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


class CoAttentionBlock(nn.Module):
    """Cross-attention both ways between the two modalities' utterance sequences, then self-attention in each.

    Every sub-layer is residual with post-LayerNorm. Attention runs over the utterances of a conversation; padding
    utterances are never attended to, and in causal mode an utterance attends only to itself and earlier ones.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attentions = nn.ModuleDict(
            {
                name: nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
                for name in ("speech_from_text", "text_from_speech", "speech_self", "text_self")
            }
        )
        self.norms = nn.ModuleDict({name: nn.LayerNorm(dim) for name in self.attentions})
        self.dropout = nn.Dropout(dropout)

    def _attend(self, name, query, key, padding_mask, attn_mask):
        attended, _ = self.attentions[name](
            query, key, key, key_padding_mask=padding_mask, attn_mask=attn_mask, need_weights=False
        )
        return self.norms[name](query + self.dropout(attended))

    def forward(self, speech, text, padding_mask, attn_mask=None):
        """`speech`, `text`: `(B, U, D)`; `padding_mask`: `(B, U)` True at padding; `attn_mask`: `(U, U)` or None."""
        speech, text = (
            self._attend("speech_from_text", speech, text, padding_mask, attn_mask),
            self._attend("text_from_speech", text, speech, padding_mask, attn_mask),
        )
        speech = self._attend("speech_self", speech, speech, padding_mask, attn_mask)
        text = self._attend("text_self", text, text, padding_mask, attn_mask)
        return speech, text

    def step(self, speech, text, cache: dict | None):
        """Causal mode, one new utterance `(B, 1, D)` per modality, attending to the cached earlier ones; returns the
        block's outputs for it and the cache extended with it (this block's inputs and cross-attended states)."""
        cache = cache or {}

        def extend(name, new):
            cache[name] = new if name not in cache else torch.cat([cache[name], new], dim=1)
            return cache[name]

        speech_keys, text_keys = extend("speech", speech), extend("text", text)
        speech = self._attend("speech_from_text", speech, text_keys, None, None)
        text = self._attend("text_from_speech", text, speech_keys, None, None)
        speech = self._attend("speech_self", speech, extend("speech_crossed", speech), None, None)
        text = self._attend("text_self", text, extend("text_crossed", text), None, None)
        return speech, text, cache


class CrossModalExpert(nn.Module):
    """Co-attention over the two modalities' projected utterance embeddings, then a classifier on both streams.

    Returns the expert's logits `(B, U, outputs)` and the two attended streams `(B, U, D)`, which are the paired
    speech/text representations of the contrastive loss.
    """

    def __init__(self, config, num_outputs: int):
        super().__init__()
        dim = config.projection_dim
        self.causal = not config.context_bidirectional
        self.blocks = nn.ModuleList(
            CoAttentionBlock(dim, config.cross_attention_heads, config.dropout)
            for _ in range(config.cross_attention_layers)
        )
        self.classifier = nn.Sequential(
            nn.LayerNorm(2 * dim),
            nn.Linear(2 * dim, config.expert_hidden_size),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.expert_hidden_size, num_outputs),
        )

    def forward(self, speech: torch.Tensor, text: torch.Tensor, utterance_mask: torch.Tensor):
        attn_mask = causal_attention_mask(speech.shape[1], speech.device) if self.causal else None
        for block in self.blocks:
            speech, text = block(speech, text, ~utterance_mask, attn_mask)
        return self.classifier(torch.cat([speech, text], dim=-1)), speech, text

    def step(self, speech: torch.Tensor, text: torch.Tensor, caches: list | None):
        """Causal mode, one new utterance `(B, 1, D)` per modality: `forward`'s outputs for it, and per-block caches."""
        if not self.causal:
            raise MisterEError("Step-by-step inference needs a causal model (`context_bidirectional=False`).")
        caches = caches or [None] * len(self.blocks)
        for i, block in enumerate(self.blocks):
            speech, text, caches[i] = block.step(speech, text, caches[i])
        return self.classifier(torch.cat([speech, text], dim=-1)), speech, text, caches


@register_fusion("mister-e")
class MisterEFusion(Fusion):
    """The experts and gate of MiSTER-E.

    Experts, in order: one per modality the model holds (a linear classifier on that modality's context
    representation), then, when both speech and text are present, the cross-modal (speech-text co-attention)
    expert. The gate weighs them per utterance.
    """

    def __init__(self, config, num_outputs: int, context_dims: dict[str, int]):
        super().__init__()
        self.modalities = tuple(context_dims)
        self.unimodal = nn.ModuleDict(
            {m: nn.Sequential(nn.Dropout(config.dropout), nn.Linear(d, num_outputs)) for m, d in context_dims.items()}
        )
        crossed = {"speech", "text"} <= set(self.modalities)
        self.cross_modal = CrossModalExpert(config, num_outputs) if crossed else None
        self.gate = GATES[config.gate_type](config, len(self.expert_names(config)), num_outputs)

    @classmethod
    def validate_config(cls, config) -> None:
        for name in ("expert_hidden_size", "cross_attention_heads"):
            if getattr(config, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(config, name)}.")
        if config.cross_attention_layers < 0:
            raise ValueError(f"`cross_attention_layers` must be >= 0, got {config.cross_attention_layers}.")
        if config.projection_dim % config.cross_attention_heads:
            raise ValueError(f"`cross_attention_heads`={config.cross_attention_heads} must divide "
                             f"`projection_dim`={config.projection_dim}.")

    @staticmethod
    def expert_names(config) -> list[str]:
        modalities = list(config.modalities)
        return modalities + (["cross-modal"] if {"speech", "text"} <= set(modalities) else [])

    def forward(
        self, features: dict[str, ModalityFeatures], utterance_mask: torch.Tensor, state: dict | None = None
    ) -> FusionOutput:
        """Experts and gate over whole conversations. With `state` (a dict, empty at the first utterance), the
        features are one new utterance `(B, 1, ...)` of a causal model, and the cross-modal expert attends to the
        earlier utterances cached in `state` (updated in place) instead of recomputing them."""
        outputs = [self.unimodal[m](features[m].context) for m in self.modalities]
        masks = [features[m].mask for m in self.modalities]
        paired = paired_mask = None
        if self.cross_modal is not None:
            speech, text = features["speech"], features["text"]
            if state is None:
                logits, speech_repr, text_repr = self.cross_modal(speech.utterance, text.utterance, utterance_mask)
            else:
                logits, speech_repr, text_repr, state["cross_modal"] = self.cross_modal.step(
                    speech.utterance, text.utterance, state.get("cross_modal"))
            paired_mask = speech.mask & text.mask
            outputs.append(logits)
            masks.append(paired_mask)
            paired = (speech_repr, text_repr)
        expert_outputs = torch.stack(outputs, dim=2)
        expert_mask = torch.stack(masks, dim=2) & utterance_mask.unsqueeze(-1)
        return FusionOutput(
            expert_outputs=expert_outputs,
            expert_mask=expert_mask,
            gate_weights=self.gate(expert_outputs, expert_mask),
            paired=paired,
            paired_mask=paired_mask,
        )


__all__ = ["MisterEFusion", "CrossModalExpert", "CoAttentionBlock"]
