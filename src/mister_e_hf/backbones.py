"""Backbones: building or loading any transformers encoder, and one pooled vector per utterance.

Speech backbones take raw waveforms (`input_values`: wav2vec2, HuBERT, WavLM, data2vec-audio, ...) or log-mel
features (`input_features`: Whisper's encoder, ...). Text backbones are encoders (BERT, RoBERTa, DeBERTa-v2, MiniLM,
...) or decoder-only LMs (Llama, Qwen2, ...). Visual backbones are vision encoders over one frame per utterance
(ViT, DINOv2, Swin, ConvNeXt, ResNet, ...; the vision tower of CLIP/SigLIP checkpoints). Encoder-decoder checkpoints
contribute their encoder only. `ENCODERS` maps each modality to the function that pools its backbone's outputs.
"""

import torch
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_MAPPING,
)

from .errors import MisterEError
from .modalities import MODALITY_TABLE
from .pooling import POOLINGS


def _encoder_only(model: PreTrainedModel) -> PreTrainedModel:
    return model.get_encoder() if model.config.is_encoder_decoder else model


def _vision_tower(config: PreTrainedConfig, modality: str) -> PreTrainedConfig | None:
    tower = getattr(config, "vision_config", None) if modality == "visual" else None
    return tower if isinstance(tower, PreTrainedConfig) else None


def build_backbone(config: PreTrainedConfig, modality: str = "speech") -> PreTrainedModel:
    """A randomly initialised backbone for `config` (the encoder of encoder-decoders, the vision tower of
    vision-language configs)."""
    return _encoder_only(AutoModel.from_config(_vision_tower(config, modality) or config))


def load_backbone(name_or_path: str, modality: str = "speech", **kwargs) -> PreTrainedModel:
    """A pretrained backbone from a Hub id or a local folder (the encoder of encoder-decoder checkpoints, the vision
    tower of vision-language ones)."""
    tower = _vision_tower(AutoConfig.from_pretrained(name_or_path, **kwargs), modality)
    if tower is not None:
        return MODEL_MAPPING[type(tower)].from_pretrained(name_or_path, config=tower, **kwargs)
    return _encoder_only(AutoModel.from_pretrained(name_or_path, **kwargs))


def load_backbone_config(name_or_path: str, **kwargs) -> PreTrainedConfig:
    return AutoConfig.from_pretrained(name_or_path, **kwargs)


def is_decoder_only(config: PreTrainedConfig) -> bool:
    """True for causal LMs (Llama, Qwen2, GPT-2, ...), False for bidirectional encoders (BERT, RoBERTa, ...)."""
    if config.is_encoder_decoder:
        return False
    model_type = config.model_type
    return bool(getattr(config, "is_decoder", False)) or (
        model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def resolve_text_pooling(name: str, config: PreTrainedConfig | None) -> str:
    """`auto` pools the last real token of decoder-only LMs and averages the tokens of encoders."""
    if name != "auto":
        return name
    return "last" if config is not None and is_decoder_only(config) else "mean"


def _chunks(n: int, size: int | None):
    size = size or max(n, 1)
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _output_mask(backbone: PreTrainedModel, input_lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """`(N, num_frames)` mask of the backbone's output frames that cover real input."""
    if hasattr(backbone, "_get_feat_extract_output_lengths"):
        lengths = backbone._get_feat_extract_output_lengths(input_lengths)
    else:  # assume the frames are spread evenly over the (padded) input
        lengths = input_lengths
    lengths = torch.as_tensor(lengths, device=input_lengths.device).clamp(1, num_frames)
    return torch.arange(num_frames, device=input_lengths.device) < lengths.unsqueeze(1)


def is_padding_sensitive(backbone: PreTrainedModel) -> bool:
    """Backbones whose convolutional front end normalises over time (group norm, e.g. wav2vec2-base, HuBERT-base,
    WavLM-base) change their output when padding is added, and must not be given an attention mask: they run on
    each utterance at its own length."""
    return getattr(backbone.config, "feat_extract_norm", None) == "group"


def _as_sequence(hidden: torch.Tensor) -> torch.Tensor:
    """`(N, T, D)` tokens, or a convolutional feature map `(N, C, H, W)` as `(N, H * W, C)` positions."""
    return hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden


def _pool_layers(outputs, mask: torch.Tensor, pooling: str, all_layers: bool) -> torch.Tensor:
    """Pooled last hidden state `(N, D)`, or every hidden state pooled alike `(N, layers, D)`."""
    if not all_layers:
        return POOLINGS[pooling](_as_sequence(outputs.last_hidden_state), mask)
    hidden = torch.stack([_as_sequence(h) for h in outputs.hidden_states], dim=1)  # (N, layers, T, D)
    n, layers = hidden.shape[:2]
    pooled = POOLINGS[pooling](hidden.flatten(0, 1), mask.repeat_interleave(layers, dim=0))
    return pooled.view(n, layers, -1)


def is_whisper_encoder(backbone: PreTrainedModel) -> bool:
    """A Whisper-family encoder: log-mel `input_features` through two convolutions (the second of stride 2) and
    learned positions over a fixed window (30 s), padded to that window whatever the audio's length."""
    return backbone.main_input_name == "input_features" and all(
        isinstance(getattr(backbone, name, None), torch.nn.Module)
        for name in ("conv1", "conv2", "embed_positions", "layers", "layer_norm"))


def whisper_trimmed_frames(frames: torch.Tensor, window: int) -> torch.Tensor:
    """The mel frames a trimmed Whisper encoder runs on per utterance: those that cover its audio, rounded up to
    even (the second convolution has stride 2), at least 2, at most the window."""
    return (frames + frames % 2).clamp(2, window)


def encode_whisper_trimmed(backbone: PreTrainedModel, input_features: torch.Tensor, frames: torch.Tensor,
                           output_hidden_states: bool = False):
    """A Whisper-family encoder run on the mel frames that cover each utterance (`frames`, real frames per row),
    not on the 30-s window: the convolutions, the first `T/2` learned positions, the layers with the padding of
    shorter rows masked out of attention, the final layer norm. Each row gives what it gives alone (up to float
    rounding), whatever the batch; its output covers `whisper_trimmed_frames(frames) / 2` positions.

    Same modules and weights as the encoder's own forward (no class is patched); its output structure too:
    `last_hidden_state (N, T/2, D)` and, with `output_hidden_states`, the positions-added input and every
    layer's output, the last after the layer norm, as transformers records them."""
    window = input_features.shape[-1]
    mel = whisper_trimmed_frames(frames.to(input_features.device), window)
    width = int(mel.max())
    keep = torch.arange(width, device=input_features.device) < mel.unsqueeze(1)  # (N, width)
    x = input_features[..., :width] * keep.unsqueeze(1)  # beyond a row's end: zeros, as the convolution pads alone
    x = torch.nn.functional.gelu(backbone.conv1(x)) * keep.unsqueeze(1)
    x = torch.nn.functional.gelu(backbone.conv2(x)).permute(0, 2, 1)  # (N, width / 2, D)
    positions = width // 2
    hidden = x + backbone.embed_positions.weight[:positions]
    hidden = torch.nn.functional.dropout(hidden, p=backbone.config.dropout, training=backbone.training)
    real = torch.arange(positions, device=hidden.device) < (mel // 2).unsqueeze(1)
    mask = None
    if not real.all():  # additive mask over keys: a row never attends to another row's extra frames
        mask = torch.zeros(real.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~real, torch.finfo(hidden.dtype).min)[:, None, None, :]
    states = [hidden]
    for layer in backbone.layers:
        hidden = layer(hidden, mask)
        states.append(hidden)
    hidden = backbone.layer_norm(hidden)
    states[-1] = hidden
    return BaseModelOutput(last_hidden_state=hidden, hidden_states=tuple(states) if output_hidden_states else None)


def encode_speech(
    backbone: PreTrainedModel,
    inputs: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    chunk_size: int | None = None,
    all_layers: bool = False,
    trim_padding: bool = False,
) -> torch.Tensor:
    """Pooled speech embeddings of N utterances.

    Args:
        backbone: the speech backbone.
        inputs: `(N, T)` waveforms (`input_values`) or `(N, mels, frames)` features (`input_features`).
        attention_mask: `(N, T)` or `(N, frames)`, 1 over real samples/frames.
        pooling: a name from `POOLINGS`, applied over the output frames that cover real audio only.
        chunk_size: at most this many utterances per backbone call.
        all_layers: pool every hidden layer, not only the last.
        trim_padding: run a Whisper-family encoder on the frames that cover the utterances
            (`encode_whisper_trimmed`), not on its 30-s window.

    Returns:
        `(N, hidden_size)` embeddings, or `(N, layers, hidden_size)` with `all_layers`.
    """
    input_name = backbone.main_input_name
    if trim_padding and not is_whisper_encoder(backbone):
        raise MisterEError(f"`speech_trim_padding` is for Whisper-family encoders; the speech backbone is a "
                           f"{type(backbone).__name__}, which runs on the utterance's own length already.")
    options = {"output_hidden_states": True} if all_layers else {}
    lengths = attention_mask.long().sum(-1)
    if input_name == "input_values":
        inputs = inputs[:, : int(lengths.max())]  # padding beyond the longest utterance is never needed
    if is_padding_sensitive(backbone) and input_name == "input_values":
        groups = [(lengths == value).nonzero().squeeze(1) for value in lengths.unique()]
        calls = [(g[c], int(lengths[g[0]])) for g in groups for c in _chunks(len(g), chunk_size)]
    else:
        calls = [(torch.tensor(list(c), device=inputs.device), None) for c in _chunks(inputs.shape[0], chunk_size)]

    pooled = None
    for index, length in calls:
        if length is not None:  # exact-length group: no padding at all, no mask
            outputs = backbone(**{input_name: inputs[index, :length]}, **options)
        elif trim_padding:
            outputs = encode_whisper_trimmed(backbone, inputs[index], lengths[index], all_layers)
        else:
            mask = attention_mask[index] if input_name == "input_values" else None
            mask = mask[:, : inputs.shape[1]] if mask is not None else None
            outputs = backbone(**{input_name: inputs[index]}, attention_mask=mask, **options)
        frame_mask = _output_mask(backbone, lengths[index], outputs.last_hidden_state.shape[1])
        vectors = _pool_layers(outputs, frame_mask, pooling, all_layers)
        if pooled is None:
            pooled = vectors.new_empty(inputs.shape[0], *vectors.shape[1:])
        pooled[index] = vectors
    return pooled


def encode_text(
    backbone: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    chunk_size: int | None = None,
    all_layers: bool = False,
) -> torch.Tensor:
    """Pooled text embeddings of N utterances.

    Args:
        backbone: the text backbone.
        input_ids: `(N, L)` token ids (right-padded).
        attention_mask: `(N, L)`, 1 over real tokens.
        pooling: a name from `POOLINGS` (`auto` must be resolved first).
        chunk_size: at most this many utterances per backbone call.
        all_layers: pool every hidden layer, not only the last.

    Returns:
        `(N, hidden_size)` embeddings, or `(N, layers, hidden_size)` with `all_layers`.
    """
    used = attention_mask.bool().any(0).nonzero().squeeze(1)
    span = slice(int(used.min()), int(used.max()) + 1) if len(used) else slice(0, 1)
    input_ids, attention_mask = input_ids[:, span], attention_mask[:, span]
    outputs = []
    for index in _chunks(input_ids.shape[0], chunk_size):
        index = slice(index.start, index.stop)
        result = backbone(input_ids=input_ids[index], attention_mask=attention_mask[index],
                          output_hidden_states=all_layers)
        outputs.append(_pool_layers(result, attention_mask[index].bool(), pooling, all_layers))
    return torch.cat(outputs)


def encode_visual(
    backbone: PreTrainedModel,
    pixel_values: torch.Tensor,
    pooling: str,
    chunk_size: int | None = None,
    all_layers: bool = False,
) -> torch.Tensor:
    """Pooled visual embeddings of N frames (one per utterance).

    Args:
        backbone: the vision backbone.
        pixel_values: `(N, channels, height, width)` from the image processor.
        pooling: a name from `POOLINGS`, over the patches (or feature-map positions); `first` is ViT's [CLS].

    Returns:
        `(N, hidden_size)` embeddings, or `(N, layers, hidden_size)` with `all_layers`.
    """
    outputs = []
    for index in _chunks(pixel_values.shape[0], chunk_size):
        result = backbone(pixel_values=pixel_values[index.start : index.stop], output_hidden_states=all_layers)
        positions = _as_sequence(result.last_hidden_state).shape[:2]
        mask = torch.ones(positions, dtype=torch.bool, device=pixel_values.device)  # every patch is real
        outputs.append(_pool_layers(result, mask, pooling, all_layers))
    return torch.cat(outputs)


def _speech(backbone, inputs, pooling, chunk_size, all_layers, trim_padding: bool = False):
    values = inputs.get("input_values", inputs.get("input_features"))
    if inputs.get("speech_attention_mask") is None:
        raise MisterEError("Speech inputs need `speech_attention_mask` (the processor returns it).")
    return encode_speech(backbone, values, inputs["speech_attention_mask"], pooling, chunk_size, all_layers,
                         trim_padding=trim_padding)


def _text(backbone, inputs, pooling, chunk_size, all_layers):
    """Text rows `(N, L)`, or several views per utterance `(N, views, L)`: each present view is encoded on its own
    and absent views (no tokens) give zeros."""
    ids, mask = inputs["input_ids"], inputs.get("text_attention_mask")
    if mask is None:
        raise MisterEError("Text inputs need `text_attention_mask` (the processor returns it).")
    if ids.dim() == 2:
        return encode_text(backbone, ids, mask, pooling, chunk_size, all_layers)
    present = mask.bool().any(-1)  # (N, views)
    pooled = encode_text(backbone, ids[present], mask[present], pooling, chunk_size, all_layers)
    views = pooled.new_zeros(*present.shape, *pooled.shape[1:])
    views[present] = pooled
    return views


def _visual(backbone, inputs, pooling, chunk_size, all_layers):
    return encode_visual(backbone, inputs["pixel_values"], pooling, chunk_size, all_layers)


INPUT_NAMES = {name: modality.inputs for name, modality in MODALITY_TABLE.items()}
"""The raw model inputs of each modality, shaped `(batch, utterances, ...)` (from `modalities.MODALITY_TABLE`)."""

ENCODERS = {"speech": _speech, "text": _text, "visual": _visual}
"""Per modality: `(backbone, inputs (N, ...) by name, pooling, chunk_size, all_layers, **options) -> (N, [layers,]
dim)`; speech takes `trim_padding` (`MisterEConfig.speech_trim_padding`)."""

__all__ = [
    "ENCODERS",
    "INPUT_NAMES",
    "encode_visual",
    "build_backbone",
    "load_backbone",
    "load_backbone_config",
    "is_decoder_only",
    "resolve_text_pooling",
    "is_padding_sensitive",
    "encode_speech",
    "encode_text",
    "encode_whisper_trimmed",
    "is_whisper_encoder",
]
