"""Typed outputs passed between the parts of a MiSTER-E model and returned to users."""

import dataclasses
from dataclasses import dataclass, field

import torch
from transformers.utils import ModelOutput


@dataclass
class ModalityFeatures:
    """One modality's representations of every utterance of a batch of conversations.

    Attributes:
        utterance: `(batch, utterances, projection_dim)` projected utterance embeddings, before any context.
        context: `(batch, utterances, context_dim)` after the conversational context layer.
        mask: `(batch, utterances)` bool, True where the utterance exists and has this modality.
    """

    utterance: torch.Tensor
    context: torch.Tensor
    mask: torch.Tensor


def to_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 if it is half precision (bf16 / fp16), else as it is."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


@dataclass
class FusionOutput:
    """What a fusion gives the head.

    Attributes:
        expert_outputs: `(batch, utterances, experts, outputs)` each expert's logits (or values, for regression).
        expert_mask: `(batch, utterances, experts)` bool, True where the expert's modalities are present.
        gate_weights: `(batch, utterances, experts)` non-negative, summing to 1 over the available experts of each real
            utterance and 0 for masked experts and padding utterances.
        paired: optional `(speech, text)` pair of `(batch, utterances, dim)` representations for the contrastive loss.
        paired_mask: `(batch, utterances)` bool, where both members of `paired` are real (required with `paired`).
        distillation: optional `(teacher (batch, utterances, outputs), students (batch, utterances, S, outputs),
            student_mask (batch, utterances, S))`: branches that learn from a teacher branch (the head scores it).
        aux_losses: extra named losses of the fusion, unweighted, under the names its `loss_terms(config)` declares
            (with their default weights; `config.loss_weights` overrides them).
    """

    expert_outputs: torch.Tensor
    expert_mask: torch.Tensor
    gate_weights: torch.Tensor
    paired: tuple[torch.Tensor, torch.Tensor] | None = None
    paired_mask: torch.Tensor | None = None
    distillation: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def float32(self) -> "FusionOutput":
        """The same output with every half-precision (bf16 / fp16) tensor in float32: the losses are computed in it
        under mixed precision (float64 stays float64); `aux_losses` as they are."""
        def cast(value):
            if isinstance(value, torch.Tensor):
                return to_float32(value)
            return tuple(cast(v) for v in value) if isinstance(value, tuple) else value

        return dataclasses.replace(self, **{f.name: cast(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name != "aux_losses"})


@dataclass
class ConversationState:
    """What a streamed conversation keeps between its utterances (like transformers' `Cache` objects): the turns seen
    so far, each modality's context-layer state and the fusion's state. The model extends it in place for each new
    utterance; `copy()` gives an independent one (tensors are shared, never written into), so a failed step can be
    dropped and the conversation resumed from the last good turn.

    Attributes:
        turns: utterances seen so far.
        context: per modality, what its context layer keeps of the past (e.g. the last inputs and the GRU state).
        fusion: what the fusion keeps (e.g. the cross-modal expert's per-block caches).
    """

    turns: int = 0
    context: dict = field(default_factory=dict)
    fusion: dict = field(default_factory=dict)

    def copy(self) -> "ConversationState":
        return ConversationState(self.turns, _copy_structure(self.context), _copy_structure(self.fusion))

    @classmethod
    def from_value(cls, value) -> "ConversationState":
        """A `ConversationState` as given, or from the dict older code passed (`{}` to start)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(turns=value.get("turns", 0), context=value.get("context", {}), fusion=value.get("fusion", {}))
        raise TypeError(f"`conversation_state` must be a ConversationState (or {{}} to start), got "
                        f"{type(value).__name__}.")


def _copy_structure(value):
    """A copy of nested dicts and lists; tensors are shared."""
    if isinstance(value, dict):
        return {key: _copy_structure(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_structure(item) for item in value]
    return value


@dataclass
class MisterEOutput(ModelOutput):
    r"""
    Output of [`MisterEModel`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            Total training loss: the mixture's loss plus the weighted expert, contrastive and consistency terms.
        logits (`torch.FloatTensor` of shape `(batch, utterances, num_labels)`):
            For classification, log-probabilities of the gate-weighted mixture of the experts' distributions
            (`logits.softmax(-1)` is the mixture). For regression, the predicted values.
        expert_logits (`torch.FloatTensor` of shape `(batch, utterances, experts, num_labels)`):
            Each expert's own logits (or values); the experts' names are `model.expert_names`.
        gate_weights (`torch.FloatTensor` of shape `(batch, utterances, experts)`):
            The gate's weight of each expert; sums to 1 over experts for every real utterance, 0 for masked experts.
            Fusions that route each output dimension separately (`film-moe` with a regression head) give
            `(batch, utterances, experts, outputs)`.
        expert_mask (`torch.BoolTensor` of shape `(batch, utterances, experts)`):
            True where an expert could be used (its modalities are present for that utterance).
        utterance_mask (`torch.BoolTensor` of shape `(batch, utterances)`):
            True for real utterances, False for padding.
        losses (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` are given):
            Every unweighted loss term by name, as the head and the fusion return them (`mixture_loss`,
            `expert_loss`, `kl_loss`, `supcon_loss`, `distillation_loss`, a plug-in's own terms); `loss` is their sum
            weighted by `config.loss_term_weights()`.
        conversation_state (`ConversationState`, *optional*):
            Streaming only: the state to pass with the next utterance (see `MisterEModel.forward`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    expert_logits: torch.FloatTensor | None = None
    gate_weights: torch.FloatTensor | None = None
    expert_mask: torch.BoolTensor | None = None
    utterance_mask: torch.BoolTensor | None = None
    losses: dict[str, torch.FloatTensor] | None = None
    conversation_state: ConversationState | None = None


__all__ = ["ModalityFeatures", "FusionOutput", "MisterEOutput", "ConversationState"]
