"""MiSTER-E (Mixture of Speech-Text Experts for Recognition of Emotions, arXiv 2602.23300) as a transformers model.

Data flow for a batch of B conversations padded to U utterances:

    speech backbone -> pooled (B, U, Ds) --+-> projection (B, U, P) -> context layer (B, U, H) --+
    text backbone   -> pooled (B, U, Dt) --+-> projection (B, U, P) -> context layer (B, U, H) --+-> fusion
                                                                                                    (experts + gate)
    -> expert logits (B, U, E, C), gate weights (B, U, E) -> head -> mixture log-probabilities (B, U, C) [+ losses]

No speaker identity enters anywhere.
"""

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import get_relative_import_files

from .atomic import atomic_directory_update
from .backbones import ENCODERS, INPUT_NAMES, build_backbone, load_backbone, load_backbone_config
from .backbones import is_whisper_encoder, resolve_text_pooling
from .configuration_mister_e import MisterEConfig
from .distributed import gather_for_loss
from .context_layers import ConversationContext, NoContext  # noqa: F401  (built-ins register themselves)
from .errors import ConversationInputError, MisterEError
from .fusions import FUSIONS
from .heads import HEADS, RegressionHead
from .layer_combiners import LAYER_COMBINERS, LayerWeighting
from .modalities import MODALITIES, MODALITY_TABLE
from .outputs import ConversationState, MisterEOutput, ModalityFeatures, to_float32
from .processing_mister_e import check_backbone_path, receptive_field, text_positions
from .registry import CONTEXT_LAYERS


CODE_FILES = ("modeling_mister_e.py", "processing_mister_e.py")
"""Files that `save_pretrained` copies (with their relative imports) so a checkpoint loads with remote code."""

BACKBONE_INPUTS = {name: modality.backbone_inputs for name, modality in MODALITY_TABLE.items()}
"""What a backbone of each modality reads (its `main_input_name`)."""

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
"""What a saved MiSTER-E folder holds its weights in (one file, or shards with an index)."""

WEIGHT_FILES = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")
"""Weight files an earlier save may have left that a new save replaces (a checkpoint is one set of weights)."""

AUTO_MAP = {
    "AutoConfig": "configuration_mister_e.MisterEConfig",
    "AutoModel": "modeling_mister_e.MisterEModel",
    "AutoProcessor": "processing_mister_e.MisterEProcessor",
}


class UtteranceProjection(nn.Module):
    """LayerNorm, linear map to `projection_dim`, dropout: puts every backbone on a common scale and size."""

    def __init__(self, input_size: int, output_size: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(input_size)
        self.linear = nn.Linear(input_size, output_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear(self.norm(embeds)))


class EmbeddingStandardizer(nn.Module):
    """Per-feature standardisation of pooled embeddings `(..., *shape)` with `shape` = `([layers,] dim)`:
    `(x - mean) / std`, with the mean and standard deviation of a training set's embeddings.

    The statistics are buffers (saved with the model), identity until `fit` sets them; `num_fitted` counts the
    embeddings they were fitted on (0: never fitted). Features that never vary keep a scale of 1.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))
        self.register_buffer("num_fitted", torch.zeros((), dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return bool(self.num_fitted > 0)

    RELATIVE_FLOOR = 1e-4
    """A feature whose standard deviation is below this fraction of the typical feature's is treated as constant
    (scale 1): dividing by a near-zero spread would blow tiny differences up by orders of magnitude."""

    @torch.no_grad()
    def fit(self, embeds: torch.Tensor) -> None:
        """Sets the statistics from `(N, *shape)` embeddings (N >= 2)."""
        embeds = torch.as_tensor(embeds)
        shape = tuple(self.mean.shape)
        if tuple(embeds.shape[1:]) != shape or len(embeds) < 2:
            raise MisterEError(f"Fitting embedding statistics needs at least 2 embeddings of shape {shape}, got a tensor "
                             f"of shape {tuple(embeds.shape)}.")
        if not torch.isfinite(embeds).all():
            raise MisterEError(f"Fitting embedding statistics: {int((~torch.isfinite(embeds)).flatten(1).any(1).sum())} "
                               "of the embeddings hold NaN or infinite values.")
        embeds = embeds.to(torch.float64)
        std = embeds.std(0, unbiased=False)
        floor = max(float(std.median()) * self.RELATIVE_FLOOR, 1e-8)
        self.mean.copy_(embeds.mean(0))
        self.std.copy_(torch.where(std > floor, std, torch.ones_like(std)))
        self.num_fitted.fill_(len(embeds))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return (embeds - self.mean.to(embeds.dtype)) / self.std.to(embeds.dtype)


class TextViewGate(nn.Module):
    """The intra-modal gate of multi-granularity text (MSF-SER): per utterance, softmax weights over its text views
    (transcript, emphasised words, description, ...) from each view's embedding; missing views get weight 0.

    `(B, U, views, D)` embeddings and `(B, U, views)` presence -> `(B, U, D)`.
    """

    def __init__(self, dim: int, hidden_size: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))

    def forward(self, views: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        scores = self.score(views).squeeze(-1).masked_fill(~present, torch.finfo(views.dtype).min)
        weights = scores.softmax(-1) * present
        return (weights.unsqueeze(-1) * views).sum(-2)


class ModalityEncoder:
    """One modality's path from utterance embeddings to `ModalityFeatures`, as the architecture draws it:

        embeddings (B, U, [views,] [layers,] D) -> standardise -> combine layers -> fuse text views -> project (P)
        -> context layer over the conversation (H)

    `__call__(embeds, mask, utterance_mask, view_mask=None, state=None)` runs it over whole conversations, or with a
    streaming `state` (the context layer's, for this modality) steps over one new utterance and returns the new
    state. The modules are the model's own (`standardizers`, `layer_combiners`, `text_views`, `projections`,
    `contexts`), referenced, not owned: their parameter names, and so every saved checkpoint, are unchanged."""

    def __init__(self, model: "MisterEModel", modality: str):
        self.modality = modality
        self.standardizer = model.standardizers[modality] if modality in model.standardizers else None
        self.combiner = model.layer_combiners[modality] if modality in model.layer_combiners else None
        self.views = model.text_views if modality == "text" else None
        self.projection, self.context = model.projections[modality], model.contexts[modality]

    def embed(self, embeds: torch.Tensor, mask: torch.Tensor, view_mask=None) -> torch.Tensor:
        """Pooled embeddings -> one `(B, U, D')` vector per utterance (standardised, layers combined, views fused)."""
        if self.standardizer is not None:
            if not self.standardizer.fitted:
                raise MisterEError(
                    f"`standardize_embeddings` is on but the {self.modality} statistics were never fitted: call "
                    "`model.fit_embedding_statistics` on training embeddings (MisterETrainer does it).")
            embeds = self.standardizer(embeds)  # padding is masked after the projection
        if self.combiner is not None:
            embeds = self.combiner(embeds)
        if self.views is not None:
            present = view_mask if view_mask is not None else torch.ones(embeds.shape[:3], dtype=torch.bool,
                                                                          device=embeds.device)
            embeds = self.views(embeds, present.bool() & mask.unsqueeze(-1))
        return embeds

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, utterance_mask: torch.Tensor, view_mask=None,
                 state=None, streaming: bool = False):
        projected = self.projection(embeds).masked_fill(~mask.unsqueeze(-1), 0.0)
        if not streaming:
            return ModalityFeatures(projected, self.context(projected, utterance_mask), mask), None
        step, state = self.context.step(projected[:, 0], state)
        return ModalityFeatures(projected, step.unsqueeze(1), mask), state


HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""The half-precision dtypes a frozen backbone may be loaded in (`backbone_dtype`), by name."""


class MisterEPreTrainedModel(PreTrainedModel):
    config_class = MisterEConfig
    base_model_prefix = "mister_e"
    main_input_name = "utterance_mask"
    supports_gradient_checkpointing = True  # for the backbones (`gradient_checkpointing_enable`)
    _no_split_modules = []

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of MiSTER-E's own layers (what `save_pretrained` records as the model's), whatever the
        precision of frozen backbones (`config.backbone_dtype`)."""
        projections = getattr(self, "projections", None)
        if projections:  # every modality has one: MiSTER-E's first layer
            return next(iter(projections.values())).linear.weight.dtype
        return super().dtype

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Activation (gradient) checkpointing in every trainable backbone (MiSTER-E's own layers are small): their
        activations are recomputed in the backward pass, for memory. A backbone that does not support it is refused
        by name."""
        for backbone in self._trainable_backbones():
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                                     offload=offload)

    def activation_checkpointing_disable(self):
        for backbone in self._trainable_backbones():
            backbone.activation_checkpointing_disable()

    def _trainable_backbones(self) -> list:
        backbones = []
        for modality in self.config.modalities:
            backbone = getattr(self, f"{modality}_backbone", None)
            if backbone is None or getattr(self.config, f"freeze_{modality}_backbone"):
                continue
            if not getattr(backbone, "supports_gradient_checkpointing", False):
                raise MisterEError(f"The {modality} backbone ({type(backbone).__name__}) does not support activation "
                                   "(gradient) checkpointing.")
            backbones.append(backbone)
        return backbones

    @torch.no_grad()
    def _init_weights(self, module):
        """Initialises MiSTER-E's own layers. Backbones are `PreTrainedModel`s and are dispatched to their own
        `_init_weights` by transformers, which skips them entirely when they hold loaded weights."""
        if isinstance(module, LayerWeighting):
            init.zeros_(module.weights)
        elif isinstance(module, RegressionHead):
            init.copy_(module.ccc_weights, torch.tensor(module.weights_from_config))
        elif isinstance(module, nn.GRU):
            for name, param in module.named_parameters():
                if "weight" in name:
                    init.xavier_uniform_(param)
                else:
                    init.zeros_(param)
        else:
            super()._init_weights(module)


class MisterEModel(MisterEPreTrainedModel):
    r"""
    MiSTER-E: per-modality utterance embeddings (from backbones or precomputed), a convolutional + recurrent context
    layer per modality, and a fusion of experts weighed by a learned gate (see `MisterEConfig.fusion`).

    Args:
        config ([`MisterEConfig`]): the model configuration.
        speech_backbone (`PreTrainedModel`, *optional*): an already built (e.g. pretrained) speech backbone to use
            instead of building a random one from `config.speech_config`.
        text_backbone (`PreTrainedModel`, *optional*): likewise for the text backbone.
        visual_backbone (`PreTrainedModel`, *optional*): likewise for the visual backbone.
    """

    def __init__(
        self,
        config: MisterEConfig,
        speech_backbone: PreTrainedModel | None = None,
        text_backbone: PreTrainedModel | None = None,
        visual_backbone: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        given = {"speech": speech_backbone, "text": text_backbone, "visual": visual_backbone}
        for modality in MODALITIES:
            backbone = None
            if config.backbone_config(modality) is not None:
                backbone = given[modality]
                if backbone is None:
                    backbone = build_backbone(config.backbone_config(modality), modality)
            elif given[modality] is not None:
                raise MisterEError(f"A {modality} backbone was given but the config has no `{modality}_config`.")
            if backbone is not None and backbone.main_input_name not in BACKBONE_INPUTS[modality]:
                raise MisterEError(
                    f"The {modality} backbone ({backbone.config.model_type}) reads `{backbone.main_input_name}`, not "
                    f"{' or '.join(f'`{n}`' for n in BACKBONE_INPUTS[modality])}: it is not a {modality} encoder "
                    "(backbones given in the wrong order?).")
            setattr(self, f"{modality}_backbone", backbone)
            if backbone is not None and config.embed_layers(modality) and getattr(backbone.config, "layerdrop", 0):
                # LayerDrop skips layers at random in training, and a skipped layer has no hidden state: the layers
                # combined would shift (and their number change). Off for backbones whose layers are combined.
                backbone.config.layerdrop = 0.0
            if backbone is not None and getattr(config, f"freeze_{modality}_backbone"):
                backbone.requires_grad_(False)
                if config.backbone_dtype in HALF_DTYPES:  # frozen weights kept in half precision
                    backbone.to(HALF_DTYPES[config.backbone_dtype])

        if config.speech_trim_padding and self.speech_backbone is not None and not is_whisper_encoder(
                self.speech_backbone):
            raise MisterEError(f"`speech_trim_padding` is for Whisper-family encoders; the speech backbone is a "
                               f"{type(self.speech_backbone).__name__}, which runs on each utterance's length already.")
        self.poolings = {"speech": config.speech_pooling, "visual": config.visual_pooling,
                         "text": resolve_text_pooling(config.text_pooling, config.text_config)}
        self.layer_combiners = nn.ModuleDict(
            {m: LAYER_COMBINERS[getattr(config, f"{m}_layers")](config.embed_layers(m))
             for m in config.modalities if config.embed_layers(m)}
        )
        self.standardizers = nn.ModuleDict(
            {m: EmbeddingStandardizer(config.embedding_shape(m)) for m in config.modalities}
            if config.standardize_embeddings else {}
        )
        self.projections = nn.ModuleDict(
            {m: UtteranceProjection(self._combined_dim(m), config.projection_dim, config.dropout)
             for m in config.modalities}
        )
        self.text_views = (TextViewGate(self._combined_dim("text"), config.gate_hidden_size)
                           if "text" in config.modalities and len(config.text_views) > 1 else None)
        context_class = CONTEXT_LAYERS[config.context_layer]
        self.contexts = nn.ModuleDict({m: context_class(config.projection_dim, config) for m in config.modalities})
        self.encoders = {m: ModalityEncoder(self, m) for m in config.modalities}  # views over the modules above
        self.head = HEADS[config.head](config)
        self.loss_weights = config.loss_term_weights()
        fusion_class = FUSIONS[config.fusion]
        self.expert_names = fusion_class.expert_names(config)
        self.fusion = fusion_class(
            config, self.head.num_outputs, {m: self.contexts[m].output_size for m in config.modalities}
        )
        self.post_init()

    def fit_embedding_statistics(self, modality: str, embeds: torch.Tensor) -> None:
        """Fits the standardisation (`config.standardize_embeddings`) of `modality` on its pooled training embeddings
        `(N, [layers,] dim)`, one row per utterance (as `embed_utterances` or an embedding cache gives them)."""
        if modality not in self.standardizers:
            raise MisterEError(f"This model does not standardise {modality} embeddings (`standardize_embeddings` is "
                             f"off, or it has no {modality} modality).")
        try:
            self.standardizers[modality].fit(torch.as_tensor(embeds, dtype=torch.float32))
        except MisterEError as error:
            raise MisterEError(f"{modality} embeddings: {error}") from None
        except (TypeError, ValueError, RuntimeError) as error:
            raise MisterEError(f"{modality} embeddings must be an (N, {', '.join(map(str, self.config.embedding_shape(modality)))}) "
                               f"array of floats: {error}") from None

    @property
    def embedding_statistics_fitted(self) -> bool:
        """Whether every standardised modality has fitted statistics (True when nothing is standardised)."""
        return all(standardizer.fitted for standardizer in self.standardizers.values())

    def _combined_dim(self, modality: str) -> int:
        """Size of a modality's utterance embedding once its layers (if several) are combined."""
        dim, layers = self.config.embed_dim(modality), self.config.embed_layers(modality)
        return self.layer_combiners[modality].output_dim(dim, layers) if layers else dim

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_backbones(
        cls,
        speech_model_name_or_path: str | None = None,
        text_model_name_or_path: str | None = None,
        visual_model_name_or_path: str | None = None,
        *,
        freeze_speech_backbone: bool = False,
        freeze_text_backbone: bool = False,
        freeze_visual_backbone: bool = False,
        backbone_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "MisterEModel":
        """Builds a MiSTER-E model around pretrained backbones (Hub ids or local folders; any may be None).

        The backbones keep their loaded weights; only MiSTER-E's own layers are initialised. `backbone_kwargs` go to
        each backbone's `from_pretrained` (e.g. `revision`, `dtype`), `config_kwargs` to [`MisterEConfig`]
        (e.g. `id2label`, `projection_dim`). `config_kwargs["backbone_dtype"]` (`"bfloat16"` or `"float16"`) loads the
        frozen backbones in half precision, for extraction (half the memory; the embeddings are cast to float32 for
        MiSTER-E's layers and cached apart from float32 ones). A Whisper-family speech encoder runs on the frames
        that cover each utterance (`speech_trim_padding=True`) unless `speech_trim_padding=False` is given.
        """
        paths = {"speech": speech_model_name_or_path, "text": text_model_name_or_path,
                 "visual": visual_model_name_or_path}
        if not any(paths.values()) and not any(config_kwargs.get(f"{m}_embed_dim") for m in MODALITIES):
            raise MisterEError("Give at least one backbone (speech, text or visual) or an embedding size for "
                             "embeddings mode.")
        backbone_kwargs = dict(backbone_kwargs or {})
        half = HALF_DTYPES.get(config_kwargs.get("backbone_dtype"))
        if half is not None:
            backbone_kwargs["dtype"] = half
        backbones, configs = {}, {}
        for modality, path in paths.items():
            if path is None:
                continue
            check_backbone_path(path, modality)
            backbones[f"{modality}_backbone"] = load_backbone(path, modality, **backbone_kwargs)
            configs[f"{modality}_config"] = load_backbone_config(path, **backbone_kwargs)
            configs[f"{modality}_backbone_name_or_path"] = str(path)
        if "speech_trim_padding" not in config_kwargs and "speech_backbone" in backbones:
            # a new model on a Whisper-family encoder runs it on each utterance's frames (as accurate, ~13x faster)
            config_kwargs["speech_trim_padding"] = is_whisper_encoder(backbones["speech_backbone"])
        config = MisterEConfig(
            **configs,
            freeze_speech_backbone=freeze_speech_backbone,
            freeze_text_backbone=freeze_text_backbone,
            freeze_visual_backbone=freeze_visual_backbone,
            **config_kwargs,
        )
        return cls(config, **backbones)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, safetensors only (pickled `pytorch_model.bin` weights can run code when
        loaded and are refused), and refusing weights that hold NaN or infinite values (a diverged run's model would
        predict nothing but NaN)."""
        if kwargs.get("use_safetensors") is False:
            raise MisterEError("mister_e_hf loads safetensors weights only; `use_safetensors=False` is not supported.")
        folder = Path(str(pretrained_model_name_or_path)) / kwargs.get("subfolder", "")
        if folder.is_dir() and kwargs.get("config") is None:
            try:
                model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
            except FileNotFoundError:
                raise MisterEError(f"{folder}: no config.json; not a saved model folder.") from None
            except (ValueError, UnicodeDecodeError, AttributeError) as error:
                raise MisterEError(f"{folder}/config.json is not a valid JSON object ({error}).") from None
            if model_type != MisterEConfig.model_type:
                raise MisterEError(f"{folder}: not a MiSTER-E model (its config.json has model_type {model_type!r}); "
                                   "use `MisterEModel.from_backbones` to build one around a backbone.")
        if folder.is_dir() and not any((folder / name).is_file() for name in SAFETENSORS_FILES):
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
            found = f"it holds only {', '.join(pickles)} (pickled weights, refused: loading a pickle can run code)" \
                if pickles else "it holds no weights"
            raise MisterEError(f"{folder}: no {SAFETENSORS_FILES[0]}; {found}. mister_e_hf loads safetensors weights "
                               "only: save the model with `save_pretrained` (or convert the weights to safetensors).")
        kwargs["use_safetensors"] = True
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except Exception as error:  # a torn weights file: safetensors' own error type, not an OSError
            if type(error).__module__.split(".")[0] not in ("safetensors", "safetensors_rust"):
                raise
            raise MisterEError(f"{pretrained_model_name_or_path}: its weights cannot be read ({error}); the file is "
                               "truncated or corrupted. Save the model again.") from None
        problems = {what: sorted(info.get(key) or []) for what, key in (
            ("missing (they would be left at random initial values)", "missing_keys"),
            ("not part of this model", "unexpected_keys"), ("of another shape", "mismatched_keys"))}
        problems = {what: keys for what, keys in problems.items() if keys}
        if problems:
            described = "; ".join(f"{len(keys)} weights {what}: {[str(k) for k in keys[:5]]}"
                                  + (" ..." if len(keys) > 5 else "") for what, keys in problems.items())
            raise MisterEError(f"{pretrained_model_name_or_path}: the weights do not match the model its config "
                               f"describes ({described}). The folder is damaged or mixes two models; save it again.")
        model.check_finite(f"{pretrained_model_name_or_path}")
        return (model, info) if wants_info else model

    def check_processor(self, processor) -> None:
        """Raises `MisterEError` unless `processor` prepares what this model reads: a part (feature extractor,
        tokenizer, image processor) for every modality that has a backbone, the speech input the backbone takes
        (`input_values` waveforms or `input_features` with its number of mel bins), and the model's text views in
        its order. Without this, a processor lacking the tokenizer would silently give speech-only predictions."""
        parts = {"speech": "feature extractor", "text": "tokenizer", "visual": "image processor"}
        have = set(getattr(processor, "modalities", ()))
        for modality in self.config.modalities:
            if getattr(self, f"{modality}_backbone") is not None and modality not in have:
                raise MisterEError(f"The processor has no {parts[modality]}, but the model has a {modality} backbone: "
                                   f"its {modality} inputs would be silently missing. Load the processor saved with "
                                   "the model (`AutoProcessor.from_pretrained(folder)`), or build it with "
                                   "`MisterEProcessor.from_backbones` from the same backbones.")
        backbone = self.speech_backbone
        extractor = getattr(processor, "feature_extractor", None)
        if backbone is not None and extractor is not None:
            given = extractor.model_input_names[0]
            if given != backbone.main_input_name:
                raise MisterEError(f"The processor's feature extractor makes `{given}`, but the speech backbone "
                                   f"({backbone.config.model_type}) reads `{backbone.main_input_name}`: they come "
                                   "from different backbones.")
            mels = getattr(backbone.config, "num_mel_bins", None)
            if given == "input_features" and mels is not None and getattr(extractor, "feature_size", mels) != mels:
                raise MisterEError(f"The processor makes {extractor.feature_size} mel bins, the speech backbone "
                                   f"reads {mels}: they come from different backbones.")
        views = list(getattr(processor, "text_views", ["text"]))
        if "text" in self.config.modalities and views != list(self.config.text_views):
            raise MisterEError(f"The processor reads the text views {views}, the model was built for "
                               f"{list(self.config.text_views)} (same names, same order).")

    def check_finite(self, where: str = "the model") -> None:
        """Raises `MisterEError` naming the first parameter or buffer that holds NaN or infinite values."""
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise MisterEError(f"{where}: the weight `{name}` holds NaN or infinite values (the model comes from "
                                   "a diverged or corrupted run); it cannot be used.")

    def train(self, mode: bool = True):
        """Frozen backbones stay in eval mode (no dropout) while the rest trains."""
        super().train(mode)
        for modality in self.config.modalities:
            backbone = getattr(self, f"{modality}_backbone")
            if backbone is not None and getattr(self.config, f"freeze_{modality}_backbone"):
                backbone.eval()
        return self

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs):
        """Saves weights (safetensors), config and the code files, with an `auto_map` for AutoConfig, AutoModel and
        AutoProcessor, so that the folder also loads with `trust_remote_code=True` where this package is absent.

        Every file is written under a temporary name and moved into place (the config last), so a save that is
        killed leaves the folder as it was, never half written. A model holding a NaN or infinite weight is refused:
        nothing that cannot predict is ever saved. With `push_to_hub=True` the model is then uploaded
        to `repo_id` (default: the folder's name)."""
        self.check_finite(f"Refusing to save to {save_directory}")
        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        hub_options = {k: kwargs.pop(k) for k in ("commit_message", "private", "token", "revision", "create_pr")
                       if k in kwargs}
        here = Path(__file__).parent
        self.config.auto_map = dict(AUTO_MAP)
        with atomic_directory_update(save_directory, replaces=WEIGHT_FILES) as staging:
            for name in CODE_FILES:
                for source in [here / name, *map(Path, get_relative_import_files(here / name))]:
                    shutil.copyfile(source, staging / source.name)
            super().save_pretrained(staging, *args, **kwargs)
        if push_to_hub:
            self.push_to_hub(repo_id, **hub_options)

    # ---------------------------------------------------------------------------------------------------- forward
    def _backbone_context(self, modality: str):
        frozen = getattr(self.config, f"freeze_{modality}_backbone")
        return torch.no_grad() if frozen else nullcontext()

    def encoder_options(self, modality: str) -> dict:
        """What the modality's encoder (`backbones.ENCODERS`) takes beyond its inputs, from the config."""
        return {"trim_padding": self.config.speech_trim_padding} if modality == "speech" else {}

    def embed_utterances(self, modality: str, mask: torch.Tensor, **inputs) -> torch.Tensor:
        """Pooled backbone embeddings `(B, U, D)` of the utterances where `mask` `(B, U)` is True (zeros elsewhere);
        `(B, U, L, D)`, every hidden layer pooled, when the modality's layers are combined (`speech_layers`).

        `inputs` are the modality's raw inputs, `(B, U, ...)`: `input_values` or `input_features` with
        `speech_attention_mask`; `input_ids` with `text_attention_mask`; `pixel_values`. This is what embeddings mode
        (`speech_embeds`, `text_embeds`, `visual_embeds`) takes, and what an embedding cache stores.
        """
        backbone = getattr(self, f"{modality}_backbone")
        if backbone is None:
            raise MisterEError(
                f"This model has no {modality} backbone (embeddings mode): pass `{modality}_embeds` instead of raw inputs."
            )
        selected = mask.bool()
        rows = {name: value[selected] for name, value in inputs.items()
                if name in INPUT_NAMES[modality] and value is not None}
        if backbone.dtype != torch.float32:  # a half-precision (or float64) backbone reads its own dtype
            rows = {name: v.to(backbone.dtype) if v.is_floating_point() else v for name, v in rows.items()}
        self._check_backbone_rows(modality, backbone, rows, selected)
        with self._backbone_context(modality):
            pooled = ENCODERS[modality](backbone, rows, self.poolings[modality], self.config.backbone_chunk_size,
                                        self.config.embed_layers(modality) is not None,
                                        **self.encoder_options(modality))
        head_dtype = self.projections[modality].linear.weight.dtype  # a half-precision backbone feeds a float32 head
        embeds = pooled.new_zeros(*mask.shape, *pooled.shape[1:], dtype=head_dtype)
        embeds[selected] = pooled.to(head_dtype)
        return embeds

    @staticmethod
    def _check_backbone_rows(modality: str, backbone, rows: dict, selected: torch.Tensor) -> None:
        """Refuses raw inputs a backbone cannot embed, naming the conversation and utterance (batch positions):
        non-finite values, audio shorter than the speech backbone's receptive field, utterances without tokens, and
        texts longer than the text backbone's position embeddings."""
        positions = selected.nonzero().tolist()

        def refuse(row: int, detail: str):
            raise ConversationInputError(detail, *positions[row])

        for name, value in rows.items():
            if value.is_floating_point() and not (finite := torch.isfinite(value.flatten(1)).all(1)).all():
                refuse(int((~finite).nonzero()[0]), f"`{name}` holds NaN or infinite values.")
        if modality == "speech" and "speech_attention_mask" in rows:
            lengths = rows["speech_attention_mask"].long().sum(-1)
            waveform = "input_values" in rows
            minimum = (receptive_field(backbone.config) or 1) if waveform else 1
            if (short := lengths < minimum).any():
                row = int(short.nonzero()[0])
                unit = "samples" if waveform else "feature frames"
                refuse(row, f"the audio is {int(lengths[row])} {unit} long, shorter than the speech backbone's "
                            f"receptive field of {minimum} {unit}: it cannot be embedded.")
        if modality == "text" and "input_ids" in rows and rows["input_ids"].numel():
            vocabulary = backbone.get_input_embeddings().num_embeddings
            ids = rows["input_ids"].masked_fill(~rows["text_attention_mask"].bool(), 0) \
                if "text_attention_mask" in rows else rows["input_ids"]
            if (bad := ((ids < 0) | (ids >= vocabulary)).flatten(1).any(1)).any():
                row = int(bad.nonzero()[0])
                refuse(row, f"`input_ids` holds token ids outside the text backbone's vocabulary [0, {vocabulary}) "
                            "(a tokenizer of another backbone?).")
        if modality == "text" and "text_attention_mask" in rows:
            lengths = rows["text_attention_mask"].long().sum(-1)
            if lengths.dim() == 1 and (empty := lengths == 0).any():
                refuse(int(empty.nonzero()[0]), "the text has no tokens (`text_attention_mask` is all 0) although "
                                                "`text_mask` marks it present.")
            limit = text_positions(backbone.config)
            if limit is not None and (long := lengths.flatten(1).amax(1) > limit if lengths.dim() > 1
                                      else lengths > limit).any():
                row = int(long.nonzero()[0])
                refuse(row, f"the text has {int(lengths[row].max())} tokens, more than the text backbone's {limit} "
                            f"positions. Give the processor `max_text_length={limit}` (`MisterEProcessor."
                            "from_backbones` sets it), and it truncates longer texts with a warning.")

    def _modality_inputs(self, modality, raw, embeds, mask, utterance_mask):
        """(embeddings `(B, U, [views,] [layers,] D)`, mask `(B, U)`) of one modality, from precomputed embeddings,
        raw inputs, or none."""
        mask = utterance_mask if mask is None else mask.bool() & utterance_mask
        if embeds is not None:
            layers = self.config.embed_layers(modality)
            views = len(self.config.text_views) if modality == "text" and self.text_views is not None else None
            expected = (*utterance_mask.shape, *([views] if views else []), *self.config.embedding_shape(modality))
            if tuple(embeds.shape) != expected:
                names = ("views, " if views else "") + ("layers, " if layers else "")
                raise MisterEError(
                    f"`{modality}_embeds` must have shape (batch, utterances, {names}dim) = "
                    f"{expected}, got {tuple(embeds.shape)}."
                )
            used = mask.view(*mask.shape, *[1] * (embeds.dim() - 2))
            finite = torch.isfinite(embeds).flatten(2).all(-1) | ~mask
            if not finite.all():
                raise ConversationInputError(f"`{modality}_embeds` holds NaN or infinite values.",
                                             *(~finite).nonzero()[0].tolist())
            return torch.where(used, embeds, torch.zeros((), dtype=embeds.dtype, device=embeds.device)), mask
        if any(v is not None for v in raw.values()):
            if not mask.any():
                return None, mask
            return self.embed_utterances(modality, mask, **raw), mask
        return None, torch.zeros_like(utterance_mask)

    def forward(
        self,
        input_values: torch.FloatTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        speech_attention_mask: torch.LongTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        text_attention_mask: torch.LongTensor | None = None,
        speech_embeds: torch.FloatTensor | None = None,
        text_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        visual_embeds: torch.FloatTensor | None = None,
        utterance_mask: torch.LongTensor | None = None,
        speech_mask: torch.LongTensor | None = None,
        text_mask: torch.LongTensor | None = None,
        visual_mask: torch.LongTensor | None = None,
        text_view_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        conversation_state: ConversationState | dict | None = None,
        gather_loss: bool = False,
        return_dict: bool | None = None,
    ) -> MisterEOutput | tuple:
        r"""
        Args:
            input_values (`(batch, utterances, samples)`): raw waveforms, for `input_values` speech backbones.
            input_features (`(batch, utterances, mels, frames)`): log-mel features, for Whisper-style backbones.
            speech_attention_mask (`(batch, utterances, samples or frames)`): 1 over real audio.
            input_ids (`(batch, utterances, tokens)`): right-padded token ids of each utterance's text; with several
                `text_views`, `(batch, utterances, views, tokens)`.
            text_attention_mask (`(batch, utterances, tokens)`): 1 over real tokens.
            pixel_values (`(batch, utterances, channels, height, width)`): one frame per utterance, for a visual
                backbone.
            speech_embeds / text_embeds / visual_embeds (`(batch, utterances, dim)`): precomputed pooled utterance
                embeddings (embeddings mode, or a cache of frozen backbones); used instead of the raw inputs.
            utterance_mask (`(batch, utterances)`): 1 for real utterances, 0 for padding (a prefix per conversation).
                Defaults to all ones.
            text_view_mask (`(batch, utterances, views)`): with several `text_views`, 1 where a view exists (default:
                the views with tokens, or every view for precomputed embeddings).
            speech_mask / text_mask / visual_mask (`(batch, utterances)`): 1 where an utterance has this modality (0 for an
                utterance without audio). Default: every real utterance, when the modality's inputs are given.
            labels (`(batch, utterances)`): class ids, -100 for padding or unlabelled utterances.
            conversation_state (`ConversationState`, *optional*): streaming with a causal model
                (`context_bidirectional=False`): the inputs are one new utterance per conversation (`utterances == 1`),
                and this state (a new `ConversationState()`, or `{}`, at the first utterance, then the one returned as
                `outputs.conversation_state`) carries what the context
                layers and the cross-modal expert keep of the earlier utterances, so none is recomputed. The outputs
                equal those of a forward over the whole conversation so far, at its last utterance.
            gather_loss (`bool`): in a multi-process run, compute the loss over every process's batch (the global
                batch; `distributed.gather_for_loss`), so that training does not depend on the number of processes.
                `MisterETrainer` sets it when it trains in several processes; every process must then call forward
                together. Ignored in a single process.
            return_dict (`bool`, *optional*): False returns `MisterEOutput.to_tuple()` (its set fields, in order).

        Returns:
            [`MisterEOutput`], or a tuple with `return_dict=False`.
        """
        inputs = self._coerce_inputs({
            "input_values": input_values, "input_features": input_features,
            "speech_attention_mask": speech_attention_mask, "input_ids": input_ids,
            "text_attention_mask": text_attention_mask, "speech_embeds": speech_embeds, "text_embeds": text_embeds,
            "pixel_values": pixel_values, "visual_embeds": visual_embeds, "utterance_mask": utterance_mask,
            "speech_mask": speech_mask, "text_mask": text_mask, "visual_mask": visual_mask,
            "text_view_mask": text_view_mask, "labels": labels,
        })
        raw = {modality: {name: inputs[name] for name in names} for modality, names in INPUT_NAMES.items()}
        given_embeds = {m: inputs[f"{m}_embeds"] for m in MODALITIES}
        utterance_mask = self._utterance_mask(inputs["utterance_mask"], raw, given_embeds)
        self._check_shapes(inputs, utterance_mask)
        speech_mask, text_mask, visual_mask = (inputs[f"{m}_mask"] for m in MODALITIES)
        text_view_mask, labels, input_ids = inputs["text_view_mask"], inputs["labels"], inputs["input_ids"]
        text_attention_mask = inputs["text_attention_mask"]
        if conversation_state is not None:
            if self.config.context_bidirectional:
                raise MisterEError("`conversation_state` (streaming) needs a causal model: `context_bidirectional=False`.")
            if utterance_mask.shape[1] != 1 or not utterance_mask.all():
                raise MisterEError("With `conversation_state`, give exactly one new utterance per conversation.")
            conversation_state = ConversationState.from_value(conversation_state)
            conversation_state.turns += 1
        given_masks = {"speech": speech_mask, "text": text_mask, "visual": visual_mask}
        if text_view_mask is None and input_ids is not None and input_ids.dim() == 4:
            text_view_mask = text_attention_mask.bool().any(-1)  # the views that have tokens
        features = self._features(raw, given_embeds, given_masks, utterance_mask, conversation_state, text_view_mask)
        fused = self.fusion(features, utterance_mask,
                            **({} if conversation_state is None else {"state": conversation_state.fusion}))
        logits = self.head.mix(fused.expert_outputs, fused.gate_weights)

        loss, losses = None, None
        if labels is not None:
            loss_inputs = (to_float32(logits), fused.float32(), labels, utterance_mask)  # float32 under mixed precision
            if gather_loss:
                loss_inputs = gather_for_loss(*loss_inputs)
            losses = {**self.head.losses(*loss_inputs), **fused.aux_losses}
            undeclared = sorted(set(losses) - set(self.loss_weights))
            if undeclared:
                raise MisterEError(f"The {self.config.head} head or the {self.config.fusion} fusion returned the loss "
                                   f"terms {undeclared}, which neither declares in `loss_terms(config)` (declared: "
                                   f"{sorted(self.loss_weights)}).")
            loss = sum(self.loss_weights[name] * term for name, term in losses.items())
        output = MisterEOutput(
            loss=loss,
            logits=logits,
            expert_logits=fused.expert_outputs,
            gate_weights=fused.gate_weights,
            expert_mask=fused.expert_mask,
            utterance_mask=utterance_mask,
            losses=losses,
            conversation_state=conversation_state,
        )
        return output if return_dict is not False else output.to_tuple()

    def _features(self, raw, given_embeds, given_masks, utterance_mask, state=None, view_mask=None):
        """Each modality's `ModalityFeatures` through its `ModalityEncoder`, from given embeddings, the backbone's,
        or zeros where the modality is absent; with a streaming `state`, the context layers step over one new
        utterance."""
        for modality in MODALITIES:
            if modality not in self.config.modalities and (given_embeds[modality] is not None or any(
                    v is not None for v in raw[modality].values())):
                raise MisterEError(f"{modality} inputs were given, but this model has no {modality} modality.")
        features = {}
        for modality, encoder in self.encoders.items():
            embeds, mask = self._modality_inputs(modality, raw[modality], given_embeds[modality],
                                                 given_masks[modality], utterance_mask)
            embeds = self._zeros(utterance_mask, self._combined_dim(modality)) if embeds is None \
                else encoder.embed(embeds, mask, view_mask)
            features[modality], context_state = encoder(embeds, mask, utterance_mask, view_mask,
                                                        None if state is None else state.context.get(modality),
                                                        streaming=state is not None)
            if state is not None:
                state.context[modality] = context_state
        present = torch.stack([f.mask for f in features.values()]).any(0)
        if (utterance_mask & ~present).any():
            b, u = (utterance_mask & ~present).nonzero()[0].tolist()
            raise ConversationInputError(f"the utterance has none of the model's modalities {self.config.modalities} "
                                         "(all its modality masks are 0).", b, u)
        return features

    FLOAT_INPUTS = ("input_values", "input_features", "pixel_values", "speech_embeds", "text_embeds", "visual_embeds")
    MASK_INPUTS = ("speech_attention_mask", "text_attention_mask", "utterance_mask", "speech_mask", "text_mask",
                   "visual_mask", "text_view_mask")

    def _coerce_inputs(self, inputs: dict) -> dict:
        """The forward's tensors on the model's device and in the dtypes its layers take: arrays and lists become
        tensors; waveforms, features, pixels and embeddings must be real floats and are cast to the dtype of the
        layers that read them (a bf16/fp16 model takes the processor's float32 outputs); ids and labels must be
        integers (labels of a regression head floats). Anything else is refused with the input named."""
        head_dtype = self.projections[self.config.modalities[0]].linear.weight.dtype
        coerced = {}
        for name, value in inputs.items():
            if value is None:
                coerced[name] = None
                continue
            if not isinstance(value, torch.Tensor):
                try:
                    value = torch.as_tensor(value)
                except (TypeError, ValueError, RuntimeError) as error:
                    raise MisterEError(f"`{name}` must be a tensor (or an array), got {type(value).__name__}: "
                                       f"{error}") from None
            value = value.to(self.device)
            if value.is_complex():
                raise MisterEError(f"`{name}` is complex ({value.dtype}); the model takes real values.")
            if name in self.FLOAT_INPUTS:
                if not value.is_floating_point():
                    raise MisterEError(f"`{name}` must hold floating-point values, got {value.dtype} (the processor "
                                       "makes these inputs; embeddings are float vectors).")
                modality = None if name.endswith("_embeds") else next(
                    m for m, spec in MODALITY_TABLE.items() if name in spec.backbone_inputs)
                backbone = getattr(self, f"{modality}_backbone", None) if modality else None
                target = next(backbone.parameters()).dtype if backbone is not None else head_dtype
                value = value.to(target)
            elif name == "input_ids":
                if value.is_floating_point() or value.dtype == torch.bool:
                    raise MisterEError(f"`input_ids` must be integer token ids, got {value.dtype}.")
                value = value.long()
            elif name == "labels":
                if value.dtype == torch.bool:
                    raise MisterEError("`labels` are booleans; give class ids (integers, -100 for no label) or, for "
                                       "a regression head, float values.")
                if self.head.target == "values":
                    value = value.float() if not value.is_floating_point() else value
                elif not value.is_floating_point():
                    value = value.long()
            elif name in self.MASK_INPUTS and value.is_floating_point() and not ((value == 0) | (value == 1)).all():
                raise MisterEError(f"`{name}` must hold 0/1 (or booleans), got other values.")
            coerced[name] = value
        return coerced

    def _check_shapes(self, inputs: dict, utterance_mask: torch.Tensor) -> None:
        """Every per-utterance input must be laid out `(batch, utterances, ...)` like `utterance_mask`, and each
        attention mask like the input it masks."""
        expected = tuple(utterance_mask.shape)
        for name, value in inputs.items():
            if value is None or name in ("utterance_mask", "labels"):
                continue
            if name in ("speech_mask", "text_mask", "visual_mask") and tuple(value.shape) != expected:
                raise MisterEError(f"`{name}` must have shape (batch, utterances) = {expected}, got "
                                   f"{tuple(value.shape)} (one entry per utterance).")
            if value.dim() < 2 or tuple(value.shape[:2]) != expected:
                raise MisterEError(f"`{name}` must start with (batch, utterances) = {expected}, got shape "
                                   f"{tuple(value.shape)}.")
        if inputs["text_view_mask"] is not None and inputs["text_view_mask"].shape[2:] != (len(self.config.text_views),):
            raise MisterEError(f"`text_view_mask` must have shape (batch, utterances, views) with "
                               f"{len(self.config.text_views)} views, got {tuple(inputs['text_view_mask'].shape)}.")
        pairs = [("input_ids", "text_attention_mask"), ("input_values", "speech_attention_mask")]
        for data, mask in pairs:
            if inputs[data] is not None and inputs[mask] is not None and inputs[data].shape != inputs[mask].shape:
                raise MisterEError(f"`{mask}` must have the shape of `{data}`, {tuple(inputs[data].shape)}; got "
                                   f"{tuple(inputs[mask].shape)}.")
        features, mask = inputs["input_features"], inputs["speech_attention_mask"]
        if features is not None and mask is not None and mask.shape != (*features.shape[:2], features.shape[-1]):
            raise MisterEError(f"`speech_attention_mask` must have shape (batch, utterances, frames) = "
                               f"{(*features.shape[:2], features.shape[-1])} for `input_features`, got "
                               f"{tuple(mask.shape)}.")

    def _zeros(self, utterance_mask: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.zeros(*utterance_mask.shape, dim, device=utterance_mask.device, dtype=self.dtype)

    @staticmethod
    def _utterance_mask(utterance_mask, raw, given_embeds) -> torch.Tensor:
        """Validated `(B, U)` boolean utterance mask: a non-empty prefix of real utterances per conversation."""
        if utterance_mask is None:
            shapes = [v.shape[:2] for v in given_embeds.values() if v is not None]
            shapes += [v.shape[:2] for group in raw.values() for v in group.values() if v is not None]
            if not shapes:
                raise MisterEError("No inputs: give raw speech/text inputs or precomputed `speech_embeds`/`text_embeds`.")
            if len(shapes[0]) < 2:
                raise MisterEError(f"Inputs must be laid out (batch, utterances, ...), got shape {tuple(shapes[0])}.")
            if 0 in shapes[0]:
                raise MisterEError(f"Empty batch: the inputs have shape {tuple(shapes[0])} (batch, utterances).")
            device = next(v for v in [*given_embeds.values(), *(x for g in raw.values() for x in g.values())] if v is not None).device
            return torch.ones(shapes[0], dtype=torch.bool, device=device)
        utterance_mask = utterance_mask.bool()
        if utterance_mask.dim() != 2:
            raise MisterEError(f"`utterance_mask` must be (batch, utterances), got shape {tuple(utterance_mask.shape)}.")
        if 0 in utterance_mask.shape:
            raise MisterEError(f"Empty batch: `utterance_mask` has shape {tuple(utterance_mask.shape)}.")
        lengths = utterance_mask.sum(1)
        if (lengths == 0).any():
            raise ConversationInputError("the conversation has no utterances (its `utterance_mask` row is all 0).",
                                         int((lengths == 0).nonzero()[0]))
        prefix = torch.arange(utterance_mask.shape[1], device=utterance_mask.device) < lengths.unsqueeze(1)
        if (prefix != utterance_mask).any():
            raise MisterEError("`utterance_mask` must mark each conversation's utterances first, then padding.")
        return utterance_mask


__all__ = ["MisterEModel", "MisterEPreTrainedModel", "MisterEOutput", "ConversationContext"]
