"""What each kind of component provides: base classes with the contract in their docstrings and the defaults.

A component is registered by name (`registry.py`) and picked by the config (`fusion=`, `head=`, `gate_type=`,
`context_layer=`, `*_pooling=`, `*_layers=`); the model and every consumer (trainer, pipeline, streaming, CLI, model
card) ask the component, never its name. Subclassing these bases is the easy way to get the defaults; any class with
the same methods works.

Every component may check its own settings in `validate_config(config)` (raise `ValueError` naming the setting),
which `MisterEConfig` calls when it is built, so that a bad setting fails at once, not at the first batch.
"""

import torch
from torch import nn

from .outputs import FusionOutput, ModalityFeatures


class Component:
    """Settings checks shared by every kind."""

    @classmethod
    def validate_config(cls, config) -> None:
        """Raise `ValueError` naming any setting of `config` this component cannot work with (default: none)."""


class Fusion(nn.Module, Component):
    """Turns the modalities' representations into expert outputs and gate weights.

    Built as `Fusion(config, num_outputs, context_dims)` (`context_dims`: each modality of the model -> the size of
    its context representation). `forward(features: dict[str, ModalityFeatures], utterance_mask, state=None)`
    returns a `FusionOutput`; `state` is a dict kept across the utterances of a streamed conversation, for fusions
    that look across utterances. Extra losses go in `FusionOutput.aux_losses` under names the fusion declares in
    `loss_terms(config)` with their default weights (`config.loss_weights` overrides them by name).
    """

    @staticmethod
    def expert_names(config) -> list[str]:
        """The experts' names, in the order of `FusionOutput.expert_outputs` (gate weights, plots and metrics use them)."""
        raise NotImplementedError

    @classmethod
    def loss_terms(cls, config) -> dict[str, float]:
        """The extra loss terms this fusion returns, with their default weights."""
        return {}

    def forward(self, features: dict[str, ModalityFeatures], utterance_mask: torch.Tensor,
                state: dict | None = None) -> FusionOutput:
        raise NotImplementedError


class Gate(nn.Module, Component):
    """Weighs the experts of each utterance: built as `Gate(config, num_experts, num_outputs)`;
    `forward(expert_outputs (B, U, E, K), expert_mask (B, U, E)) -> weights (B, U, E)`, non-negative, summing to 1 over
    the available experts of each real utterance and exactly 0 for the others."""


class ContextLayer(nn.Module, Component):
    """Runs over a conversation's utterances (one per modality): built as `ContextLayer(input_size, config)`, with
    `output_size`; `forward(inputs (B, U, input_size), mask (B, U)) -> (B, U, output_size)`, zero at padding; and, for
    streaming, `step(inputs (B, input_size), state) -> (outputs (B, output_size), state)` over one new utterance
    (equal to `forward` over the conversation so far)."""


class Head(nn.Module, Component):
    """Mixes the experts' outputs with the gate weights, scores them, and says what they mean.

    Built as `Head(config)`, with `num_outputs` (what each expert outputs per utterance). It provides:

    - `mix(expert_outputs, gate_weights) -> logits (B, U, C)` and `losses(logits, fusion_output, labels,
      utterance_mask) -> {name: unweighted term}` with the terms and default weights declared in `loss_terms(config)`;
    - `check_labels(labels, utterance_mask)`; `target`: `"classes"` (one class id per utterance, a `labels` column) or
      `"values"` (one number per dimension, from the data's `label_columns`);
    - decoding: `decode(logits (U, C), gate_weights, id2label, expert_names) -> [per-utterance dict]` for the
      pipeline, streaming and CLI, and `flatten(predictions, label_ids)` for the trainer (class methods, like the
      scoring ones, so that they work from the registry without a model);
    - scoring: `metrics(predicted, true, label_names, **metric_extras(dataset, scores, label_names)) -> dict`
      (a `confusion_matrix` among them gets plotted), `metric_names(label_names)`, `headline_metric` (what
      model selection and the model card lead with) and `greater_is_better`, `card_metrics(label_names)` and
      `percent` (shown x100 in cards);
    - `per_output_gates`: whether a fusion may route each output dimension separately (independent values).
    """

    target = "classes"
    per_output_gates = False
    headline_metric = "accuracy"
    greater_is_better = True
    percent = True

    @classmethod
    def loss_terms(cls, config) -> dict[str, float]:
        return {}

    @staticmethod
    def decode_gates(gate_weights: torch.Tensor, expert_names: list[str]) -> dict:
        """One utterance's gate weights `(E,)` (or `(E, outputs)` when routed per output) by expert name."""
        return dict(zip(expert_names, gate_weights.float().cpu().tolist()))

    @classmethod
    def card_metrics(cls, label_names: list[str]) -> list[str]:
        return [cls.headline_metric]

    @classmethod
    def metric_extras(cls, dataset, scores, label_names: list[str]) -> dict:
        """Extra inputs of `metrics` taken from the evaluated split's columns (default: none)."""
        return {}


__all__ = ["Component", "Fusion", "Gate", "ContextLayer", "Head"]
