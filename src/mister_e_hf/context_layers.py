"""Context layers: how each modality's utterance representations see the rest of the conversation
(`MisterEConfig.context_layer`)."""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .components import ContextLayer
from .errors import MisterEError
from .registry import CONTEXT_LAYERS, register_context_layer


@register_context_layer("conv-gru")
class ConversationContext(ContextLayer):
    """The convolutional + recurrent context layer over a conversation's utterances (one per modality).

    Parallel 1-D convolutions over the utterance axis (one per kernel size, outputs summed, ReLU), then a GRU, plus
    a linear skip connection from the input. Padding utterances are zeroed before the convolutions (so a
    conversation sees the same zero padding alone or in a batch) and skipped by the GRU (packed sequences). In causal
    mode the convolutions look only backwards and the GRU is unidirectional.

    Input `(B, U, input_size)` and mask `(B, U)`; output `(B, U, output_size)`, zero at padding.
    """

    def __init__(self, input_size: int, config):
        super().__init__()
        hidden = config.context_hidden_size
        self.causal = not config.context_bidirectional
        self.kernel_sizes = list(config.context_kernel_sizes)
        self.convs = nn.ModuleList(nn.Conv1d(input_size, hidden, k) for k in self.kernel_sizes)
        self.gru = nn.GRU(
            hidden,
            hidden,
            num_layers=config.context_num_layers,
            batch_first=True,
            bidirectional=config.context_bidirectional,
            dropout=config.dropout if config.context_num_layers > 1 else 0.0,
        )
        self.output_size = hidden * (2 if config.context_bidirectional else 1)
        self.skip = nn.Linear(input_size, self.output_size)
        self.dropout = nn.Dropout(config.dropout)

    @classmethod
    def validate_config(cls, config) -> None:
        for name in ("context_hidden_size", "context_num_layers"):
            if getattr(config, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(config, name)}.")
        kernels = config.context_kernel_sizes
        if not kernels or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in kernels):
            raise ValueError(f"`context_kernel_sizes` must be positive integers, got {kernels}.")

    def _padding(self, kernel_size: int) -> tuple[int, int]:
        return (kernel_size - 1, 0) if self.causal else ((kernel_size - 1) // 2, kernel_size // 2)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        inputs = inputs * mask.unsqueeze(-1)
        channels = inputs.transpose(1, 2)
        convolved = sum(
            conv(nn.functional.pad(channels, self._padding(k))) for conv, k in zip(self.convs, self.kernel_sizes)
        )
        hidden = self.dropout(torch.relu(convolved)).transpose(1, 2)
        lengths = mask.sum(1).cpu()
        packed = pack_padded_sequence(hidden, lengths, batch_first=True, enforce_sorted=False)
        recurrent, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=inputs.shape[1])
        return (recurrent + self.skip(inputs)) * mask.unsqueeze(-1)

    def step(self, inputs: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        """Causal mode, one new utterance: `(B, input_size)` -> `(B, output_size)`, carrying `state` (the last inputs
        the convolutions still see, and the GRU's hidden state). Equals `forward` over the conversation so far."""
        if not self.causal:
            raise MisterEError("Step-by-step context needs a causal model (`context_bidirectional=False`).")
        if state is None:
            state = {"inputs": inputs.new_zeros(inputs.shape[0], max(self.kernel_sizes) - 1, inputs.shape[-1]),
                     "gru": None}
        recent = torch.cat([state["inputs"], inputs.unsqueeze(1)], dim=1)  # (B, largest kernel, input_size)
        channels = recent.transpose(1, 2)
        convolved = sum(conv(channels[..., channels.shape[-1] - k:]) for conv, k in zip(self.convs, self.kernel_sizes))
        hidden = self.dropout(torch.relu(convolved)).transpose(1, 2)  # (B, 1, hidden)
        recurrent, gru_state = self.gru(hidden, state["gru"])
        return recurrent[:, 0] + self.skip(inputs), {"inputs": recent[:, 1:], "gru": gru_state}


@register_context_layer("none")
class NoContext(ContextLayer):
    """No context layer: each utterance's representation is its own projection (the "no context" ablation)."""

    def __init__(self, input_size: int, config):
        super().__init__()
        self.output_size = input_size

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return inputs * mask.unsqueeze(-1)

    def step(self, inputs: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        return inputs, {}


__all__ = ["ConversationContext", "NoContext", "CONTEXT_LAYERS"]
