"""Configuration of MiSTER-E (Mixture of Speech-Text Experts for Recognition of Emotions, arXiv 2602.23300)."""

from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils.type_validators import interval

from .modalities import MODALITIES
from .registry import CONTEXT_LAYERS, FUSIONS, GATES, HEADS, LAYER_COMBINERS, POOLINGS, load_builtins


MIN_TEMPERATURE = 1e-3
"""The smallest softmax temperature accepted: logits divided by less overflow float32."""



FROZEN_BACKBONE_DEFAULTS = {"speech_layers": "concat", "text_layers": "concat", "standardize_embeddings": True}
"""The settings `examples/run_erc.py` gives a model whose backbones are frozen (trained on cached embeddings), unless
`--config_overrides` sets them: every speech and text layer pooled and concatenated, each feature standardised with
the training set's statistics. Chosen with the field defaults by a protocol that never sees a test split (MELD dev,
EmoDB's training speakers: benchmarks/defaults.py, results/defaults.md). They are not the fields' defaults because
standardisation needs statistics fitted on cached training embeddings, which only frozen backbones have, and
`concat` needs a backbone's layers; from Python: `MisterEModel.from_backbones(..., **FROZEN_BACKBONE_DEFAULTS)`.
With a large backbone (a decoder LM), `weighted` keeps the cache and the projection small: concatenation stores
layers x hidden size floats per utterance."""


NOT_TEXT_VIEWS = frozenset({"audio", "image", "images", "sampling_rate", "labels", "label", "turns", "turn",
                            "conversation_id", "texts", "num_turns", "speaker", "transcribed"})
"""Utterance keys and dataset columns that hold something other than a text view (a view named so would embed audio
paths, label names or speaker identities as text)."""


@strict
class MisterEConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MisterEModel`]: a speech, a text and optionally a visual backbone (each optional), a
    projection and a convolutional + recurrent context layer per modality, a fusion (experts + gate) and a head, and the weights of
    the training losses.

    A modality is present when its backbone config is given (`speech_config` / `text_config`, any transformers
    config, saved as a nested dict) or, in *embeddings mode*, when only its embedding size is given
    (`speech_embed_dim` / `text_embed_dim`): the model then takes precomputed utterance embeddings. `None` for both
    means the modality is absent, and the experts that need it are not built.

    Example:

    ```python
    >>> from transformers import BertConfig, Wav2Vec2Config
    >>> from mister_e_hf import MisterEConfig, MisterEModel
    >>> config = MisterEConfig(speech_config=Wav2Vec2Config(), text_config=BertConfig(), num_labels=7)
    >>> model = MisterEModel(config)
    ```
    """

    model_type = "mister-e"
    sub_configs_defaults = {
        "speech_config": SubConfigSpec(config_class=AutoConfig, model_type="wav2vec2", optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
        "visual_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True),
    }

    speech_config: PreTrainedConfig | dict | None = None
    """Config of the speech backbone (any transformers audio encoder; for encoder-decoders, e.g. Whisper, the encoder is used)."""
    text_config: PreTrainedConfig | dict | None = None
    """Config of the text backbone (an encoder such as BERT, or a decoder-only LM such as Llama)."""
    visual_config: PreTrainedConfig | dict | None = None
    """Config of the visual backbone (any transformers vision encoder over one frame per utterance; optional)."""
    speech_embed_dim: int | None = None
    """Size of precomputed speech utterance embeddings (embeddings mode, no speech backbone)."""
    text_embed_dim: int | None = None
    """Size of precomputed text utterance embeddings (embeddings mode, no text backbone)."""
    visual_embed_dim: int | None = None
    """Size of precomputed visual utterance embeddings (embeddings mode, no visual backbone)."""
    speech_backbone_name_or_path: str | None = None
    """Where the speech backbone was loaded from (Hub id or folder), recorded for model cards and caches."""
    text_backbone_name_or_path: str | None = None
    """Where the text backbone was loaded from (Hub id or folder), recorded for model cards and caches."""
    visual_backbone_name_or_path: str | None = None
    """Where the visual backbone was loaded from (Hub id or folder), recorded for model cards and caches."""
    freeze_speech_backbone: bool = False
    """Keep the speech backbone's weights fixed (no gradients, always in eval mode)."""
    freeze_text_backbone: bool = False
    """Keep the text backbone's weights fixed (no gradients, always in eval mode)."""
    freeze_visual_backbone: bool = False
    """Keep the visual backbone's weights fixed (no gradients, always in eval mode)."""

    speech_pooling: str = "mean"
    """How the speech backbone's frames become one vector per utterance: a name from `pooling.POOLINGS`."""
    text_pooling: str = "auto"
    """How the text backbone's tokens become one vector: `auto` = `last` for decoder-only LMs, `mean` otherwise."""
    visual_pooling: str = "mean"
    """How the visual backbone's patches (or feature-map positions) become one vector per utterance."""
    speech_layers: str = "last"
    """Which speech backbone layers make the embedding: `last`, or a name from `layer_combiners.LAYER_COMBINERS`
    over every hidden layer's pooled states (`weighted`: learned softmax weights, as in SUPERB; `concat`)."""
    text_layers: str = "last"
    """Which text backbone layers make the embedding (see `speech_layers`)."""
    visual_layers: str = "last"
    """Which visual backbone layers make the embedding (see `speech_layers`)."""
    speech_embed_layers: int | None = None
    """Embeddings mode with combined layers: how many layers each precomputed speech embedding holds."""
    text_embed_layers: int | None = None
    """Embeddings mode with combined layers: how many layers each precomputed text embedding holds."""
    visual_embed_layers: int | None = None
    """Embeddings mode with combined layers: how many layers each precomputed visual embedding holds."""
    text_views: list[str] = field(default_factory=lambda: ["text"])
    """Text views of each utterance, fused by an intra-modal gate (MSF-SER's multi-granularity text): `text` (the
    transcript) first, then e.g. `emphasis` (the emphasised words) or `description` (an extended description); each
    is read from the utterance key (and dataset column) of that name, and a missing view is masked."""
    standardize_embeddings: bool = False
    """Standardise every feature of each pooled embedding (per layer, before the layers are combined) with the mean
    and standard deviation of the training set's embeddings, as a StandardScaler before a linear probe does. The
    statistics are buffers of the model, fitted once by `MisterEModel.fit_embedding_statistics` (`MisterETrainer`
    does it from the training set's cached embeddings) and saved with it."""
    backbone_chunk_size: int | None = None
    """Run each backbone on at most this many utterances at a time (bounds memory); `None` = all at once."""
    speech_trim_padding: bool = False
    """Run a Whisper-family speech encoder on the mel frames that cover each utterance instead of its fixed 30-s
    window (`backbones.encode_whisper_trimmed`: the same weights, the first positions, shorter rows masked): several
    times less compute for conversational turns, and other embeddings than the padded window gives (saved with the
    model; the cache keys on it). `MisterEModel.from_backbones` (hence run_erc.py) turns it on for a Whisper-family
    encoder unless told otherwise: on EmoDB, with the default recipe, MiSTER-E is as accurate either way (paired
    t-test over 5 folds x 3 seeds, benchmarks/results/whisper_trimming-defaults.md) and extraction is about 13x
    faster; with the weighted-layer recipe of the accuracy table it lost 2.2 points
    (whisper_trimming.md). The field's own default stays False, so configs saved before it existed keep the padded
    window they were trained on."""
    backbone_dtype: str | None = None
    """Precision of the (frozen) backbones' weights: `None` or `"float32"`, or `"bfloat16"` / `"float16"` for half the
    memory in extraction; MiSTER-E's own layers stay float32 and the embeddings are cast to it. Half precision is
    for frozen backbones only (train trainable ones in mixed precision, `bf16=True`)."""

    projection_dim: int = interval(min=1)(default=256)
    """Size of each modality's utterance representation after the input projection."""
    context_layer: str = "conv-gru"
    """The context layer over a conversation's utterances: `conv-gru` (the paper's), or `none` (ablation)."""
    context_kernel_sizes: list[int] = field(default_factory=lambda: [1, 3, 5])
    """Kernel sizes of the parallel 1-D convolutions over a conversation's utterances (their outputs are summed)."""
    context_hidden_size: int = interval(min=1)(default=128)
    """Hidden size of the context GRU, per direction."""
    context_num_layers: int = interval(min=1)(default=2)
    """Number of stacked GRU layers in each context layer."""
    context_bidirectional: bool = True
    """True: each utterance sees the whole conversation. False: causal (past only), for streaming."""
    cross_attention_layers: int = interval(min=0)(default=2)
    """Number of co-attention blocks (cross-attention both ways, then self-attention) in the cross-modal expert."""
    cross_attention_heads: int = interval(min=1)(default=4)
    """Attention heads in the cross-modal expert (must divide `projection_dim`)."""
    expert_hidden_size: int = interval(min=1)(default=256)
    """Hidden size of the cross-modal expert's classifier."""
    gate_hidden_size: int = interval(min=1)(default=16)
    """Hidden size of the gate, which reads the experts' logits."""
    gate_type: str = "learned"
    """How experts are weighed: `learned` (the paper's gate) or `mean` (equal weights; ablation)."""
    gate_temperature: float = interval(min=MIN_TEMPERATURE)(default=2.0)
    """Temperature of the gate's softmax over experts (higher = smoother mixtures)."""
    dropout: float = interval(min=0.0, max=1.0, exclude_max=True)(default=0.4)
    """Dropout in projections, context layers, experts and the gate (0.4: chosen on MELD dev and EmoDB's training
    speakers, benchmarks/results/defaults.md; 0.2 before)."""

    num_film_experts: int = interval(min=1)(default=4)
    """Number of FiLM-modulated acoustic experts of the `film-moe` fusion."""
    fusion: str = "mister-e"
    """How modality representations become expert predictions and gate weights: a name from `fusions.FUSIONS`."""
    head: str = "classification"
    """How expert outputs are mixed and scored: a name from `heads.HEADS`."""

    expert_loss_weight: float = interval(min=0.0)(default=1.0)
    """Weight of each expert's own loss (averaged over the experts), added to the loss of the gated mixture."""
    focal_gamma: float = interval(min=0.0)(default=0.0)
    """Focal-loss exponent for the classification losses; 0 gives plain cross-entropy."""
    supcon_weight: float = interval(min=0.0)(default=0.0)
    """Weight of the supervised contrastive loss between paired speech/text representations. The paper trains with
    it (`supcon_weight=0.5`); it is off by default because on the data the defaults were chosen on
    (benchmarks/results/defaults.md) it cost 2.3 points on EmoDB's training speakers and cannot apply to MELD's text;
    try it where speech and text both carry the emotion (EmoDB's are the same ten sentences in every emotion)."""
    supcon_temperature: float = interval(min=MIN_TEMPERATURE)(default=0.5)
    """Temperature of the supervised contrastive loss."""
    kl_weight: float = interval(min=0.0)(default=0.1)
    """Weight of the symmetric KL consistency term between the experts' distributions."""
    distillation_weight: float = interval(min=0.0)(default=0.5)
    """Weight of the teacher/student distillation loss, for fusions that have one (`guided-gated`)."""
    distillation_temperature: float = interval(min=MIN_TEMPERATURE)(default=2.0)
    """Softmax temperature of the distillation loss (classification heads)."""
    ccc_weights: list[float] | None = None
    """Regression head: weight of each dimension's `1 - CCC` in the loss (default: equal)."""
    loss_weights: dict[str, float] | None = None
    """Weights of loss terms by name, overriding the defaults the head and the fusion declare (`mixture_loss`,
    `expert_loss`, `kl_loss`, `supcon_loss`, `distillation_loss`, or a plug-in fusion's own terms); e.g.
    `{"kl_loss": 0.0}`. The fields `expert_loss_weight`, `supcon_weight`, `kl_weight` and `distillation_weight` are
    the built-in terms' defaults."""

    initializer_range: float = interval(min=0.0)(default=0.02)
    """Standard deviation of the normal initialisation of the fusion's linear layers."""

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this model holds, in canonical order."""
        return tuple(m for m in MODALITIES if self.has_modality(m))

    def has_modality(self, modality: str) -> bool:
        return getattr(self, f"{modality}_config") is not None or getattr(self, f"{modality}_embed_dim") is not None

    def backbone_config(self, modality: str) -> PreTrainedConfig | None:
        return getattr(self, f"{modality}_config")

    def encoder_config(self, modality: str) -> PreTrainedConfig | None:
        """The config of the part of a modality's backbone that is used: the vision tower of a vision-language
        checkpoint (CLIP, SigLIP), otherwise the backbone's own config."""
        backbone = self.backbone_config(modality)
        tower = getattr(backbone, "vision_config", None) if modality == "visual" else None
        return tower if isinstance(tower, PreTrainedConfig) else backbone

    def embed_dim(self, modality: str) -> int:
        """Size of the utterance embedding a modality's backbone (or precomputed embeddings) gives."""
        source = self.encoder_config(modality)
        if source is not None:
            for name in ("hidden_size", "d_model", "dim"):
                if isinstance(getattr(source, name, None), int):
                    return getattr(source, name)
            if isinstance(getattr(source, "hidden_sizes", None), list):  # convolutional vision backbones
                return source.hidden_sizes[-1]
            raise ValueError(f"Cannot tell the hidden size of the {modality} backbone ({source.model_type}).")
        return getattr(self, f"{modality}_embed_dim")

    def embed_layers(self, modality: str) -> int | None:
        """Number of layers in a modality's utterance embedding when its layers are combined, else None (last only)."""
        if getattr(self, f"{modality}_layers") == "last":
            return None
        source = self.encoder_config(modality)
        if source is not None:
            if not isinstance(getattr(source, "num_hidden_layers", None), int):
                raise ValueError(f"The {modality} backbone ({source.model_type}) has no `num_hidden_layers` to "
                                 f"combine; use `{modality}_layers='last'`.")
            return source.num_hidden_layers + 1  # the embedding output, then every layer
        return getattr(self, f"{modality}_embed_layers")

    def embedding_shape(self, modality: str) -> tuple[int, ...]:
        """Shape of one utterance's pooled embedding: `(layers, dim)` when its layers are combined, else `(dim,)`."""
        layers = self.embed_layers(modality)
        return (*([layers] if layers else []), self.embed_dim(modality))

    TRANSFORMERS_KEYWORDS = frozenset({
        "model_type", "num_labels", "name_or_path", "torch_dtype", "output_attentions", "attn_implementation",
        "experts_implementation", "per_layer_config", "rope_scaling", "rope_theta", "transformers_version",
        "auto_map", "architectures", "custom_pipelines",
    })
    """Keywords `PreTrainedConfig` takes besides its fields (bookkeeping of saved configs)."""

    def __post_init__(self, **kwargs):
        """Refuses keywords that are no setting of this config: `PreTrainedConfig` keeps any keyword as an attribute,
        so a misspelt setting (`projection_dimm=16`) would otherwise do nothing, silently."""
        import dataclasses
        import difflib

        from transformers import GenerationConfig

        known = {f.name for f in dataclasses.fields(self)} | self.TRANSFORMERS_KEYWORDS \
            | set(GenerationConfig._get_default_generation_params())
        unknown = sorted(k for k in kwargs if k not in known and not k.startswith("_"))
        if unknown:
            hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
            raise ValueError("Unknown MisterEConfig settings: " + ", ".join(
                f"{k!r}" + (f" (did you mean {hints[k][0]!r}?)" if hints[k] else "") for k in unknown) + ".")
        super().__post_init__(**kwargs)

    def validate_mister_e(self):
        """Checked at construction: settings are finite, the modalities' sizes and layers are consistent, names
        exist in their registries, each chosen component (fusion, head, gate, context layer) accepts the settings
        it reads (its own `validate_config`), and the backbones' execution settings work. Simple bounds are the
        fields' own validators (`interval`)."""
        load_builtins()
        self._check_numbers()
        self._check_modalities()
        self._check_text_views()
        self._check_components()
        self._check_backbone_execution()

    def _check_numbers(self) -> None:
        import math

        for name, value in vars(self).items():  # NaN passes every `< 0` check: refuse non-finite settings first
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value}.")
        if self.ccc_weights is not None and (not self.ccc_weights or any(
                not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0 for w in self.ccc_weights)
                or not sum(self.ccc_weights) > 0):
            raise ValueError(f"`ccc_weights` must be non-negative finite numbers, not all 0, got {self.ccc_weights}.")

    def _check_modalities(self) -> None:
        if not self.modalities:
            raise ValueError(
                "A MiSTER-E model needs at least one modality: give `speech_config`/`text_config`/`visual_config` "
                "(backbones) or `speech_embed_dim`/`text_embed_dim`/`visual_embed_dim` (precomputed embeddings)."
            )
        for modality in MODALITIES:
            backbone, dim = self.backbone_config(modality), getattr(self, f"{modality}_embed_dim")
            if backbone is not None and dim is not None and dim != self.embed_dim(modality):
                raise ValueError(
                    f"`{modality}_embed_dim`={dim} disagrees with the {modality} backbone's hidden size "
                    f"{self.embed_dim(modality)}; leave it unset when a backbone is given."
                )
            for name in (f"{modality}_embed_dim", f"{modality}_embed_layers"):
                if getattr(self, name) is not None and getattr(self, name) < 1:
                    raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
            layers = getattr(self, f"{modality}_layers")
            if layers != "last" and layers not in LAYER_COMBINERS:
                raise ValueError(f"Unknown {modality}_layers {layers!r}; choose 'last' or one of "
                                 f"{list(LAYER_COMBINERS)}.")
            if self.has_modality(modality) and layers != "last" and not self.embed_layers(modality):
                raise ValueError(f"`{modality}_layers={layers!r}` in embeddings mode needs `{modality}_embed_layers`.")

    def _check_text_views(self) -> None:
        if not self.text_views or self.text_views[0] != "text" or len(set(self.text_views)) != len(self.text_views):
            raise ValueError(f"`text_views` must start with 'text' (the transcript) and not repeat, got {self.text_views}.")
        clashing = [v for v in self.text_views[1:] if not isinstance(v, str) or not v.strip() or v in NOT_TEXT_VIEWS
                    or v.endswith(("_embeds", "_present", "_mask"))]
        if clashing:
            raise ValueError(f"`text_views` {clashing} name inputs or columns that are not text (audio, images, "
                             f"labels, speakers, ...; reserved: {sorted(NOT_TEXT_VIEWS)}); a view is a text column "
                             "such as `emphasis` or `description`.")

    def _check_components(self) -> None:
        """Registered names first, then each chosen component's own `validate_config` and the loss weights."""
        for name, registry in (("speech_pooling", POOLINGS), ("visual_pooling", POOLINGS), ("fusion", FUSIONS),
                               ("head", HEADS), ("gate_type", GATES), ("context_layer", CONTEXT_LAYERS)):
            if getattr(self, name) not in registry:
                raise ValueError(f"Unknown {registry.kind} {getattr(self, name)!r} (`{name}`); registered: "
                                 f"{list(registry)}. A component from outside mister_e_hf registers itself when its "
                                 "module is imported: import it before building or loading the model.")
        if self.text_pooling != "auto" and self.text_pooling not in POOLINGS:
            raise ValueError(f"Unknown text_pooling {self.text_pooling!r}; choose 'auto' or one of {list(POOLINGS)}.")
        self.loss_term_weights()  # loss_weights name declared terms, with weights >= 0
        for registry, name in ((FUSIONS, self.fusion), (HEADS, self.head), (GATES, self.gate_type),
                               (CONTEXT_LAYERS, self.context_layer)):
            check = getattr(registry[name], "validate_config", None)
            if check is not None:
                check(self)

    def _check_backbone_execution(self) -> None:
        if self.backbone_chunk_size is not None and self.backbone_chunk_size <= 0:
            raise ValueError(f"`backbone_chunk_size` must be positive, got {self.backbone_chunk_size}.")
        if self.backbone_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"`backbone_dtype` must be None, 'float32', 'bfloat16' or 'float16', got "
                             f"{self.backbone_dtype!r}.")
        trainable = [m for m in MODALITIES if self.backbone_config(m) is not None
                     and not getattr(self, f"freeze_{m}_backbone")]
        if self.backbone_dtype in ("bfloat16", "float16") and trainable:
            raise ValueError(f"`backbone_dtype={self.backbone_dtype}` is for frozen backbones (extraction); the "
                             f"{' and '.join(trainable)} backbone{'s are' if len(trainable) > 1 else ' is'} "
                             "trainable: train in mixed precision (`bf16=True`) instead.")

    def loss_term_weights(self) -> dict[str, float]:
        """The weight of every loss term the head and the fusion declare (their defaults, the legacy weight fields
        among them), with `loss_weights` overriding any by name; a name no component declares is an error."""
        terms = {}
        for registry, name in ((HEADS, self.head), (FUSIONS, self.fusion)):
            declared = getattr(registry[name], "loss_terms", None)
            terms.update(declared(self) if declared is not None else {})
        overrides = self.loss_weights or {}
        if not isinstance(overrides, dict):
            raise ValueError(f"`loss_weights` must be a mapping of loss term names to weights, got {overrides!r}.")
        unknown = sorted(set(overrides) - set(terms))
        if unknown:
            raise ValueError(f"`loss_weights` names {unknown}, which neither the {self.head} head nor the {self.fusion} "
                             f"fusion returns; their loss terms are {sorted(terms)}.")
        weights = {**terms, **overrides}
        bad = {k: w for k, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))
               or not w >= 0 or w == float("inf")}
        if bad:
            raise ValueError(f"Loss weights must be finite numbers >= 0, got {bad}.")
        return {name: float(weight) for name, weight in weights.items()}


__all__ = ["MisterEConfig", "MODALITIES", "FROZEN_BACKBONE_DEFAULTS"]
