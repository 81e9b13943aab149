"""How a backbone's pooled hidden layers `(..., layers, dim)` become one utterance embedding.

`MisterEConfig.speech_layers` / `text_layers` name one of these, or `last` (only the last hidden layer is pooled and
none of these is used). A combiner is built as `Combiner(num_layers)`, has a static `output_dim(dim, num_layers)` and
maps `(..., layers, dim)` to `(..., output_dim)`; register your own with `mister_e_hf.register_layer_combiner`.
"""

import torch
from torch import nn

from .registry import LAYER_COMBINERS, register_layer_combiner


@register_layer_combiner("weighted")
class LayerWeighting(nn.Module):
    """A learned softmax-weighted sum over the layers (SUPERB style): `(..., L, D) -> (..., D)`.

    The weights start equal (zeros before the softmax) and learn which depths carry the most emotion.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(num_layers))

    @staticmethod
    def output_dim(dim: int, num_layers: int) -> int:
        return dim

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return (self.weights.softmax(0).unsqueeze(-1) * embeds).sum(-2)


@register_layer_combiner("concat")
class LayerConcatenation(nn.Module):
    """Every layer side by side: `(..., L, D) -> (..., L * D)`; the projection that follows learns a linear map per
    layer, which can mix depths more freely than one weight per layer."""

    def __init__(self, num_layers: int):
        super().__init__()

    @staticmethod
    def output_dim(dim: int, num_layers: int) -> int:
        return dim * num_layers

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds.flatten(-2)



__all__ = ["LAYER_COMBINERS", "LayerWeighting", "LayerConcatenation"]
