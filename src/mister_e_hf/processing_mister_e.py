"""Processor of MiSTER-E: turns conversations of `{"audio", "sampling_rate", "text"}` utterances into model inputs."""

import math
import os
import shutil
from pathlib import Path

import numpy as np
from transformers import AutoFeatureExtractor, AutoTokenizer, BatchFeature
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import PROCESSOR_NAME, cached_file, logging

from .atomic import atomic_directory_update
from .errors import ConversationInputError


try:  # optional: only needed to read audio files given by path
    import soundfile
except ImportError:  # pragma: no cover
    soundfile = None

try:  # optional: only needed when audio must be resampled
    from scipy.signal import resample_poly
except ImportError:  # pragma: no cover
    resample_poly = None


logger = logging.get_logger(__name__)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) of a 1-D signal from `orig_sr` to `target_sr` Hz."""
    if orig_sr == target_sr:
        return audio
    if resample_poly is None:
        raise ImportError(f"Resampling {orig_sr} Hz audio to {target_sr} Hz needs scipy: `pip install scipy`.")
    divisor = math.gcd(int(orig_sr), int(target_sr))
    return resample_poly(audio, int(target_sr) // divisor, int(orig_sr) // divisor).astype(np.float32)


def read_audio(audio, sampling_rate=None, conversation: int | None = None, utterance: int | None = None):
    """`(samples, sampling_rate)` of an utterance's audio: a 1-D array with its rate, or a file path (decoded with
    soundfile, mixed down to mono). Raises `ConversationInputError` naming the conversation and utterance."""
    b, u = conversation, utterance
    if isinstance(audio, (str, os.PathLike)):
        if soundfile is None:
            raise ImportError("Reading audio files needs soundfile: `pip install soundfile`.")
        path = audio
        if not os.path.isfile(path):
            raise ConversationInputError(f"audio file {str(path)!r} not found", b, u)
        try:
            audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
        except Exception as error:
            raise ConversationInputError(f"cannot decode audio file {str(path)!r}: {error}", b, u) from None
        audio = audio.mean(axis=1)  # files may be stereo: mix down to mono
        if sampling_rate is not None and sampling_rate != file_rate:
            raise ConversationInputError(
                f"`sampling_rate`={sampling_rate} disagrees with the file's {file_rate} Hz.", b, u
            )
        sampling_rate = file_rate
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ConversationInputError(f"audio must be 1-D (mono samples), got shape {audio.shape}.", b, u)
    if not np.issubdtype(audio.dtype, np.number) or audio.size == 0:
        raise ConversationInputError(f"audio must be a non-empty numeric array, got dtype {audio.dtype}.", b, u)
    if not np.isfinite(audio).all():
        raise ConversationInputError("audio holds NaN or infinite samples.", b, u)
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.integer, np.floating)):
        raise ConversationInputError(f"audio needs its `sampling_rate` in Hz, got {sampling_rate!r}.", b, u)
    if not sampling_rate > 0 or not float(sampling_rate).is_integer():
        raise ConversationInputError(f"`sampling_rate` must be a positive whole number of Hz, got {sampling_rate}.", b, u)
    return audio.astype(np.float32), int(sampling_rate)


def read_image(image, conversation: int | None = None, utterance: int | None = None):
    """An utterance's frame as given (a PIL image or an `(H, W, C)` array), or opened from a path with PIL."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ConversationInputError(f"image file {str(image)!r} not found", conversation, utterance)
        from PIL import Image

        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except Exception as error:
            raise ConversationInputError(f"cannot decode image file {str(image)!r}: {error}", conversation,
                                         utterance) from None
    if isinstance(image, np.ndarray) and (image.ndim != 3 or not np.isfinite(image).all()):
        raise ConversationInputError(f"an image array must be (height, width, channels) and finite, got shape "
                                     f"{image.shape}", conversation, utterance)
    return image


MODALITY_KEYS = {"speech": "audio", "text": "text", "visual": "image"}
"""The utterance key each modality reads."""


class MisterEProcessor(ProcessorMixin):
    r"""
    Holds the speech backbone's feature extractor, the text backbone's tokenizer and the visual backbone's image
    processor (each may be `None`: a model need not have every modality) and turns a batch of conversations into
    everything [`MisterEModel`] needs:

    ```python
    inputs = processor(
        conversations=[[{"audio": waveform, "sampling_rate": 16000, "text": "Hi there."}, ...], ...],
        return_tensors="pt",
    )
    outputs = model(**inputs)
    ```

    Each utterance is a dict with `text` (required when there is a tokenizer) and optionally `audio` (a 1-D array, or
    a path to an audio file) with its `sampling_rate`, and `image` (one frame: a PIL image, an `(H, W, C)` array or a
    path) for a visual backbone. An utterance without audio (or image) is marked in `speech_mask` (`visual_mask`) and
    the model's experts that need that modality are masked for it. Audio is resampled to the feature extractor's
    rate; frames, tokens, utterances and conversations are padded, with masks.

    Args:
        feature_extractor: the speech backbone's feature extractor, or `None`.
        tokenizer: the text backbone's tokenizer, or `None`.
        image_processor: the visual backbone's image processor, or `None`.
        max_text_length: truncate each utterance's text to this many tokens (`None`: no truncation).
        text_views: the utterance keys read as text views (default `["text"]`; e.g. `["text", "emphasis",
            "description"]` for a model with multi-granularity text). A view given as a list of words is joined.
    """

    attributes = ["feature_extractor", "tokenizer", "image_processor"]

    def __init__(self, feature_extractor=None, tokenizer=None, image_processor=None,
                 max_text_length: int | None = 256, text_views: list[str] | None = None, **kwargs):
        # ProcessorMixin.__init__ requires every sub-processor; a MiSTER-E model may lack a modality, so this
        # processor accepts None for any and checks the types itself.
        self.chat_template = None
        if feature_extractor is not None and not isinstance(feature_extractor, SequenceFeatureExtractor):
            raise TypeError(f"`feature_extractor` must be an audio feature extractor, got {type(feature_extractor).__name__}.")
        if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"`tokenizer` must be a tokenizer, got {type(tokenizer).__name__}.")
        if image_processor is not None and not callable(image_processor):
            raise TypeError(f"`image_processor` must be an image processor, got {type(image_processor).__name__}.")
        if feature_extractor is None and tokenizer is None and image_processor is None:
            raise ValueError("A MisterEProcessor needs a feature extractor, a tokenizer or an image processor.")
        if tokenizer is not None and tokenizer.pad_token is None:
            # decoder-only LMs often ship without a padding token; padding positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_length = max_text_length
        self.text_views = list(text_views) if text_views else ["text"]
        if self.text_views[0] != "text":
            raise ValueError(f"`text_views` must start with 'text' (the transcript), got {self.text_views}.")

    @classmethod
    def from_backbones(
        cls, speech_model_name_or_path: str | None = None, text_model_name_or_path: str | None = None,
        visual_model_name_or_path: str | None = None, **kwargs
    ) -> "MisterEProcessor":
        """The processor matching [`MisterEModel.from_backbones`] (same Hub ids or folders)."""
        from transformers import AutoImageProcessor

        feature_extractor = (
            AutoFeatureExtractor.from_pretrained(speech_model_name_or_path) if speech_model_name_or_path else None
        )
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path) if text_model_name_or_path else None
        image_processor = (
            AutoImageProcessor.from_pretrained(visual_model_name_or_path) if visual_model_name_or_path else None
        )
        return cls(feature_extractor=feature_extractor, tokenizer=tokenizer, image_processor=image_processor, **kwargs)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this processor prepares inputs for."""
        present = {"speech": self.feature_extractor, "text": self.tokenizer, "visual": self.image_processor}
        return tuple(m for m, part in present.items() if part is not None)

    # ------------------------------------------------------------------------------------------- save and load
    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Writes `processor_config.json` (with the feature extractor, image processor and an `auto_map`), the
        tokenizer files, and this file's code, so that `AutoProcessor.from_pretrained(..., trust_remote_code=True)`
        works anywhere. Each file is written under a temporary name and moved into place (a kill leaves the folder as
        it was). With `push_to_hub=True` the same files are then uploaded to `repo_id` (default: the folder's
        name)."""
        here = Path(__file__)
        self.auto_map = {"AutoProcessor": f"{here.stem}.{type(self).__name__}"}
        with atomic_directory_update(save_directory, last=(PROCESSOR_NAME,)) as staging:
            for source in [here, *map(Path, get_relative_import_files(here))]:
                shutil.copyfile(source, staging / source.name)
            if self.tokenizer is not None:
                self.tokenizer._set_processor_class(type(self).__name__)
                self.tokenizer.save_pretrained(staging)
            self.to_json_file(os.path.join(staging, PROCESSOR_NAME))
        output_file = os.path.join(save_directory, PROCESSOR_NAME)
        if push_to_hub:
            hub_options = ("commit_message", "commit_description", "private", "token", "revision", "create_pr")
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, **{k: v for k, v in kwargs.items() if k in hub_options})
        return [output_file]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """Loads the feature extractor, tokenizer and image processor where the saved processor has them."""
        from transformers import AutoImageProcessor

        processor_dict = processor_dict or {}
        kwargs.pop("_from_auto", None)
        feature_extractor = image_processor = None
        if processor_dict.get("feature_extractor") is not None:
            feature_extractor = AutoFeatureExtractor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if processor_dict.get("image_processor") is not None:
            image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder") if k in kwargs}
        has_tokenizer = cached_file(
            pretrained_model_name_or_path, TOKENIZER_CONFIG_FILE, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False, **hub_kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs) if has_tokenizer else None
        return [feature_extractor, tokenizer, image_processor]

    # ------------------------------------------------------------------------------------------------- inputs
    @property
    def model_input_names(self) -> list[str]:
        names = ["utterance_mask"]
        if self.feature_extractor is not None:
            names += [self.feature_extractor.model_input_names[0], "speech_attention_mask", "speech_mask"]
        if self.tokenizer is not None:
            names += ["input_ids", "text_attention_mask", "text_mask"]
            names += ["text_view_mask"] if len(self.text_views) > 1 else []
        if self.image_processor is not None:
            names += ["pixel_values", "visual_mask"]
        return names

    def _load_audio(self, utterance: dict, b: int, u: int) -> np.ndarray:
        audio, sampling_rate = read_audio(utterance["audio"], utterance.get("sampling_rate"), b, u)
        return resample(audio, sampling_rate, self.feature_extractor.sampling_rate)

    def _check_conversations(self, conversations, modalities: tuple[str, ...]) -> None:
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ConversationInputError("`conversations` must be a non-empty list of conversations.")
        if isinstance(conversations[0], dict):
            raise ConversationInputError("`conversations` must be a list of conversations (lists of utterance dicts).")
        for b, conversation in enumerate(conversations):
            if not isinstance(conversation, (list, tuple)):
                raise ConversationInputError(f"must be a list of utterances, got {type(conversation).__name__}.", b)
            if not conversation:
                raise ConversationInputError("the conversation is empty.", b)
            for u, utterance in enumerate(conversation):
                if not isinstance(utterance, dict):
                    raise ConversationInputError(f"an utterance must be a dict, got {type(utterance).__name__}.", b, u)
                text = utterance.get("text")
                if "text" in modalities and not isinstance(text, str):
                    raise ConversationInputError(
                        f"no text (got {text!r}); this model has a text backbone and needs a transcript for every "
                        "utterance (the pipeline can transcribe audio with `asr_model=`).", b, u
                    )
                if not any(utterance.get(MODALITY_KEYS[m]) is not None for m in modalities):
                    wanted = " or ".join(MODALITY_KEYS[m] for m in modalities)
                    raise ConversationInputError(f"no {wanted}; this model needs at least one of them.", b, u)

    def __call__(self, conversations=None, return_tensors: str | None = "pt", modalities=None,
                 **kwargs) -> BatchFeature:
        """Pads a batch of conversations into model inputs.

        Returns a [`BatchFeature`] with `utterance_mask` `(B, U)` and, per modality the processor has:
        speech: `input_values` `(B, U, samples)` or `input_features` `(B, U, mels, frames)`,
        `speech_attention_mask` and `speech_mask` `(B, U)`; text: `input_ids`, `text_attention_mask` `(B, U, tokens)`
        and `text_mask` `(B, U)`; visual: `pixel_values` `(B, U, channels, height, width)` and `visual_mask`.
        `modalities` limits the work to some of the processor's modalities (e.g. `["speech"]`).
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}; pass `conversations=[[utterance, ...], ...]`.")
        modalities = self.modalities if modalities is None else tuple(m for m in self.modalities if m in modalities)
        self._check_conversations(conversations, modalities)
        batch, turns = len(conversations), max(len(c) for c in conversations)
        utterance_mask = np.zeros((batch, turns), dtype=np.int64)
        for b, conversation in enumerate(conversations):
            utterance_mask[b, : len(conversation)] = 1
        data = {"utterance_mask": utterance_mask}
        for modality in modalities:
            data.update(getattr(self, f"_{modality}_inputs")(conversations, batch, turns))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _present(self, conversations, key: str):
        """(positions (b, u), values) of the utterances that have `key`."""
        items = [((b, u), utterance[key]) for b, conversation in enumerate(conversations)
                 for u, utterance in enumerate(conversation) if utterance.get(key) is not None]
        return [p for p, _ in items], [v for _, v in items]

    @staticmethod
    def _scatter(positions, values: np.ndarray, batch: int, turns: int, dtype) -> np.ndarray:
        """`(N, ...)` per-utterance arrays into a zero-padded `(batch, turns, ...)` array."""
        padded = np.zeros((batch, turns, *values.shape[1:]), dtype=dtype)
        if positions:
            rows, cols = np.array(positions).T
            padded[rows, cols] = values
        return padded

    def _speech_inputs(self, conversations, batch: int, turns: int) -> dict[str, np.ndarray]:
        positions, _ = self._present(conversations, "audio")
        waveforms = [self._load_audio(conversations[b][u], b, u) for b, u in positions]
        speech_mask = self._scatter(positions, np.ones(len(positions)), batch, turns, np.int64)
        if not waveforms:
            return {"speech_mask": speech_mask}
        input_name = self.feature_extractor.model_input_names[0]
        options = {"padding": True} if input_name == "input_values" else {}
        limit = getattr(self.feature_extractor, "n_samples", None)
        if limit is not None and max(len(w) for w in waveforms) > limit:
            logger.warning(f"Some utterances are longer than the feature extractor's {limit} samples and are truncated.")
        features = self.feature_extractor(
            waveforms, sampling_rate=self.feature_extractor.sampling_rate, return_attention_mask=True,
            return_tensors="np", **options,
        )
        return {
            input_name: self._scatter(positions, np.asarray(features[input_name]), batch, turns, np.float32),
            "speech_attention_mask": self._scatter(positions, np.asarray(features["attention_mask"]), batch, turns,
                                                   np.int64),
            "speech_mask": speech_mask,
        }

    def _text_inputs(self, conversations, batch: int, turns: int) -> dict[str, np.ndarray]:
        positions, _ = self._present(conversations, "text")
        views = [[self._view(conversations[b][u], view) for b, u in positions] for view in self.text_views]
        flat = [text for view in views for text in view if text is not None]
        encoded = self.tokenizer(
            flat,
            padding=True,
            truncation=self.max_text_length is not None,
            max_length=self.max_text_length,
            padding_side="right",
            return_attention_mask=True,
            return_tensors="np",
        )
        length = encoded["input_ids"].shape[1]
        ids = np.full((len(positions), len(views), length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention = np.zeros((len(positions), len(views), length), dtype=np.int64)
        row = 0
        for v, view in enumerate(views):
            for i, text in enumerate(view):
                if text is not None:
                    ids[i, v], attention[i, v] = encoded["input_ids"][row], encoded["attention_mask"][row]
                    row += 1
        if len(views) == 1:
            ids, attention = ids[:, 0], attention[:, 0]
        input_ids = self._scatter(positions, ids, batch, turns, np.int64)
        attention = self._scatter(positions, attention, batch, turns, np.int64)
        input_ids[attention == 0] = self.tokenizer.pad_token_id
        result = {"input_ids": input_ids, "text_attention_mask": attention,
                  "text_mask": self._scatter(positions, np.ones(len(positions)), batch, turns, np.int64)}
        if len(views) > 1:
            result["text_view_mask"] = attention.any(-1).astype(np.int64)
        return result

    @staticmethod
    def _view(utterance: dict, view: str) -> str | None:
        value = utterance.get(view)
        if isinstance(value, (list, tuple)):  # e.g. the emphasised words
            value = " ".join(str(word) for word in value)
        return value if isinstance(value, str) and value.strip() else None

    def _visual_inputs(self, conversations, batch: int, turns: int) -> dict[str, np.ndarray]:
        positions, images = self._present(conversations, "image")
        visual_mask = self._scatter(positions, np.ones(len(positions)), batch, turns, np.int64)
        if not images:
            return {"visual_mask": visual_mask}
        frames = [read_image(image, b, u) for (b, u), image in zip(positions, images)]
        pixels = np.asarray(self.image_processor(images=frames, return_tensors="np")["pixel_values"])
        return {"pixel_values": self._scatter(positions, pixels, batch, turns, np.float32), "visual_mask": visual_mask}


__all__ = ["MisterEProcessor", "ConversationInputError", "read_audio", "read_image", "resample"]
