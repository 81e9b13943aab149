"""Poolings that turn a backbone's frames or tokens into one vector per utterance, ignoring padding.

Each takes `hidden_states` of shape `(N, T, D)` and a boolean `mask` of shape `(N, T)` (True = real frame/token;
every row has at least one) and returns `(N, D)`. Register your own with `mister_e_hf.register_pooling("name")`.
"""

import torch

from .registry import POOLINGS, register_pooling


@register_pooling("mean")
def mean_pool(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over the real positions."""
    weights = mask.to(hidden_states.dtype).unsqueeze(-1)
    real = hidden_states.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding never counts, even if it overflowed
    return real.sum(1) / weights.sum(1).clamp_min(1.0)


@register_pooling("max")
def max_pool(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the real positions."""
    return hidden_states.masked_fill(~mask.unsqueeze(-1), torch.finfo(hidden_states.dtype).min).amax(1)


@register_pooling("first")
def first_pool(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first real position (the [CLS] token of BERT-style encoders)."""
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), mask.int().argmax(1)]


@register_pooling("last")
def last_pool(hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real position (what a decoder-only LM has read the whole utterance at), left or right padding."""
    length = mask.shape[1]
    last = length - 1 - mask.int().flip(1).argmax(1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


__all__ = ["POOLINGS", "mean_pool", "max_pool", "first_pool", "last_pool"]
