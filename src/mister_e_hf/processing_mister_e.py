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
from .errors import ConversationInputError, MisterEError
from .modalities import MODALITY_TABLE


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


MIN_SAMPLING_RATE, MAX_SAMPLING_RATE = 4_000, 384_000
"""Plausible sampling rates in Hz: below 4 kHz no speech band survives; above 384 kHz no audio format goes."""

MAX_FLOAT_PEAK = 16.0
"""Float samples are expected in [-1, 1] (what soundfile, librosa and datasets give; a z-normalised signal stays
within about +-10). A peak above 16 (24 dB over full scale) is no recording but integer PCM stored as floats (any
audible int16 recording peaks in the hundreds or more), refused rather than fed to the backbone unscaled."""


def is_blank(value) -> bool:
    """The one rule for absent inputs: a missing value (None) or a string that is empty or whitespace only. An
    utterance whose `text`, `audio` or `image` is blank does not have that modality."""
    return value is None or (isinstance(value, str) and not value.strip())


def wav_truncation(path: str | os.PathLike) -> str | None:
    """Why a RIFF/WAVE file is truncated (its `data` chunk declares more bytes than the file holds), or None.
    libsndfile decodes such a file silently up to where it ends; other formats fail to decode instead."""
    try:
        with open(path, "rb") as f:
            header = f.read(12)
            if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
                return None  # not a plain RIFF WAVE (RF64, W64, other formats): nothing to check here
            size = os.fstat(f.fileno()).st_size
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return "the file ends before its `data` chunk"
                name, length = chunk[:4], int.from_bytes(chunk[4:], "little")
                if name == b"data":
                    if length == 0xFFFFFFFF:  # a stream that never wrote its length
                        return None
                    available = size - f.tell()
                    if available < length:
                        return (f"its data chunk declares {length} bytes but the file holds {available} "
                                f"({100 * available / max(length, 1):.0f}%): the file is truncated")
                    return None
                f.seek(length + (length & 1), os.SEEK_CUR)  # chunks are padded to an even size
    except OSError:
        return None  # unreadable files are reported when decoded


def _as_float_samples(audio: np.ndarray) -> np.ndarray:
    """Samples as float32 in [-1, 1]: floats as they are, integer PCM scaled as soundfile does (int16 / 2**15,
    int32 / 2**31, int8 / 2**7, uint8 (x - 128) / 2**7). Raises `ValueError` for other types."""
    if audio.dtype == np.uint8:
        return (audio.astype(np.float32) - 128.0) / 128.0
    if audio.dtype in (np.int8, np.int16, np.int32):
        return (audio.astype(np.float64) / float(2 ** (8 * audio.dtype.itemsize - 1))).astype(np.float32)
    if np.issubdtype(audio.dtype, np.floating):
        return audio.astype(np.float32)
    if np.issubdtype(audio.dtype, np.complexfloating):
        raise ValueError(f"audio samples are complex ({audio.dtype}); give real samples")
    if np.issubdtype(audio.dtype, np.integer):
        raise ValueError(f"audio samples are {audio.dtype}, which is not a PCM sample format; give float samples in "
                         "[-1, 1] or int8/int16/int32/uint8 PCM")
    raise ValueError(f"audio must be an array of numbers, got dtype {audio.dtype}")


def read_audio(audio, sampling_rate=None, conversation: int | None = None, utterance: int | None = None):
    """`(samples, sampling_rate)` of an utterance's audio: a 1-D array with its rate, or a file path (decoded with
    soundfile, mixed down to mono). Samples are float32 in [-1, 1] (integer PCM is scaled as soundfile scales it).
    Raises `ConversationInputError` naming the conversation and utterance, the file, what is wrong and the limit."""
    b, u = conversation, utterance
    source = ""
    if isinstance(audio, (str, os.PathLike)):
        if soundfile is None:
            raise ImportError("Reading audio files needs soundfile: `pip install soundfile`.")
        path = audio
        source = f"audio file {str(path)!r}: "
        if not os.path.isfile(path):
            raise ConversationInputError(f"audio file {str(path)!r} not found", b, u)
        if problem := wav_truncation(path):
            raise ConversationInputError(f"{source}{problem}", b, u)
        try:
            audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
        except Exception as error:
            raise ConversationInputError(f"cannot decode audio file {str(path)!r}: {error}", b, u) from None
        audio = audio.mean(axis=1)  # files may be stereo: mix down to mono
        if sampling_rate is not None and (isinstance(sampling_rate, bool) or not isinstance(
                sampling_rate, (int, float, np.integer, np.floating))):
            raise ConversationInputError(f"{source}`sampling_rate` must be a number of Hz (or left out for a file), "
                                         f"got {_describe(sampling_rate)}.", b, u)
        if sampling_rate is not None and sampling_rate != file_rate:
            raise ConversationInputError(
                f"{source}`sampling_rate`={sampling_rate} disagrees with the file's {file_rate} Hz.", b, u
            )
        sampling_rate = file_rate
    elif not isinstance(audio, (np.ndarray, list, tuple)) and not hasattr(audio, "__array__"):
        raise ConversationInputError(f"audio must be a file path or a 1-D array of samples, got "
                                     f"{type(audio).__name__}.", b, u)
    try:
        audio = np.asarray(audio)
    except (TypeError, ValueError) as error:
        raise ConversationInputError(f"audio is not an array of samples ({error}).", b, u) from None
    if audio.ndim != 1:
        raise ConversationInputError(f"{source}audio must be 1-D (mono samples), got shape {audio.shape}.", b, u)
    if audio.size == 0:
        raise ConversationInputError(f"{source}audio holds no samples.", b, u)
    try:
        audio = _as_float_samples(audio)
    except ValueError as error:
        raise ConversationInputError(f"{source}{error}.", b, u) from None
    if not np.isfinite(audio).all():
        bad = int((~np.isfinite(audio)).sum())
        raise ConversationInputError(f"{source}audio holds {bad} NaN or infinite samples.", b, u)
    peak = float(np.abs(audio).max())
    if peak > MAX_FLOAT_PEAK:
        raise ConversationInputError(
            f"{source}float audio samples must lie in [-1, 1], but these peak at {peak:.4g} (more than "
            f"{MAX_FLOAT_PEAK:g}): integer PCM stored as floats? Give the integer array itself (it is scaled), or "
            "divide by 32768.", b, u)
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, float, np.integer, np.floating)):
        raise ConversationInputError(f"audio needs its `sampling_rate` in Hz, got {sampling_rate!r}.", b, u)
    if not float(sampling_rate).is_integer() or not MIN_SAMPLING_RATE <= sampling_rate <= MAX_SAMPLING_RATE:
        raise ConversationInputError(
            f"{source}`sampling_rate` must be a whole number of Hz in [{MIN_SAMPLING_RATE}, {MAX_SAMPLING_RATE}], "
            f"got {sampling_rate}.", b, u)
    return audio, int(sampling_rate)


def read_image(image, conversation: int | None = None, utterance: int | None = None):
    """An utterance's frame as an RGB PIL image, whatever it was given as: a path (opened with PIL), a PIL image of
    any mode, or an `(H, W, C)` array with 1 (grey), 3 (RGB) or 4 (RGBA: alpha dropped) channels holding 0-255
    integers or floats in [0, 1] (or [0, 255]). One canonical form, so a frame gives the same pixels however it
    came, and the image processor never has to guess the channel layout."""
    from PIL import Image

    b, u = conversation, utterance
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ConversationInputError(f"image file {str(image)!r} not found", b, u)
        try:
            with Image.open(image) as opened:
                return opened.convert("RGB")
        except Exception as error:
            raise ConversationInputError(f"cannot decode image file {str(image)!r}: {error}", b, u) from None
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit and float frames: PIL's RGB clips them
            image = np.asarray(image)
            image = image[..., None] if image.ndim == 2 else image
            if np.issubdtype(image.dtype, np.integer) and image.size and image.max() > 255:
                if image.max() > 65535:
                    raise ConversationInputError(f"a {image.dtype} image with values up to {image.max()} has no "
                                                 "known range; give 8- or 16-bit pixels", b, u)
                image = image.astype(np.float64) / 257.0  # 16-bit to 8-bit, as PIL does for I;16 PNGs it can read
        else:
            return image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise ConversationInputError(f"an image must be a file path, a PIL image or an (H, W, C) array, got "
                                     f"{type(image).__name__}", b, u)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ConversationInputError(f"an image array must be (height, width, channels) with 1, 3 or 4 channels, "
                                     f"got shape {image.shape}", b, u)
    if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ConversationInputError(f"an image array must hold real numbers, got dtype {image.dtype}", b, u)
    if not np.isfinite(image).all():
        raise ConversationInputError("the image array holds NaN or infinite values", b, u)
    low, high = float(image.min()), float(image.max())
    if low < 0 or high > 255:
        raise ConversationInputError(f"image values must lie in [0, 255] (or [0, 1] for floats), got [{low:g}, "
                                     f"{high:g}]", b, u)
    if np.issubdtype(image.dtype, np.floating) and high <= 1.0:
        image = image * 255.0
    pixels = np.rint(image).astype(np.uint8)
    pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels[..., :3]
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def check_backbone_path(path, modality: str) -> None:
    """Refuses a backbone given as a local path (absolute, `./`, `../`, `~`, or with more than one `/`: not a Hub id
    `org/name`) that does not exist, instead of letting the Hub client read it as a malformed repository id."""
    text = os.path.expanduser(str(path))
    local = os.path.isabs(text) or text.startswith(".") or str(path).startswith("~") or text.count("/") > 1 \
        or os.sep != "/" and os.sep in text
    if local and not os.path.exists(text):
        raise MisterEError(f"The {modality} backbone {str(path)!r} is not a folder that exists (nor a Hub id "
                           "`organisation/name`).")


def receptive_field(config) -> int | None:
    """The fewest input samples a speech backbone's convolutional front end turns into one output frame (e.g. 400
    for wav2vec2, HuBERT, WavLM), from its config's `conv_kernel` / `conv_stride`; None when it has none (Whisper
    reads log-mel frames, whose 25-ms window is the processor's default minimum)."""
    config = getattr(config, "encoder", None) or config
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides or len(kernels) != len(strides):
        return None
    length = 1
    for kernel, stride in zip(reversed(list(kernels)), reversed(list(strides))):
        length = (length - 1) * stride + kernel
    return int(length)


def text_positions(config) -> int | None:
    """How many tokens a text backbone's learned absolute position embeddings hold (RoBERTa-style embeddings reserve
    the first `pad_token_id + 1`); None for rotary or relative positions, which have no hard limit."""
    values = config.to_dict()
    positions = values.get("max_position_embeddings", values.get("n_positions"))
    if not isinstance(positions, int) or values.get("rope_parameters") is not None:
        return None
    if config.model_type.startswith("deberta") and not values.get("position_biased_input", True):
        return None
    if config.model_type in ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet",
                             "data2vec-text", "luke", "ibert"):
        positions -= (values.get("pad_token_id") or 1) + 1
    return positions


def _tokenizer_limit(tokenizer) -> int | None:
    """A tokenizer's `model_max_length`, or None where it holds transformers' "no limit" sentinel."""
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1_000_000 else None


def _describe(value) -> str:
    """A short description of a value for messages: its type, and its text when it is short."""
    text = repr(value)
    return f"{type(value).__name__} {text}" if len(text) <= 40 else type(value).__name__


MODALITY_KEYS = {name: modality.key for name, modality in MODALITY_TABLE.items()}
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

    Each utterance is a dict with any of `text`, `audio` (a 1-D array with its `sampling_rate`, or a path to an audio
    file) and `image` (one frame: a PIL image, an `(H, W, C)` array or a path) for a visual backbone. One rule holds
    everywhere: a missing key, `None`, and a blank string (empty or whitespace only) all mean the utterance lacks that
    modality; it is marked in `text_mask` / `speech_mask` / `visual_mask` and the model's experts that need that
    modality are masked for it. An utterance needs at least one of the model's modalities. Audio is scaled to
    [-1, 1] (integer PCM), checked (finite, a plausible sampling rate, at least `min_audio_samples` and at most
    `max_audio_seconds`), and resampled to the feature extractor's rate; text longer than the text backbone's
    positions is truncated with a warning that counts the truncated utterances; frames, tokens, utterances and
    conversations are padded, with masks.

    Args:
        feature_extractor: the speech backbone's feature extractor, or `None`.
        tokenizer: the text backbone's tokenizer, or `None`.
        image_processor: the visual backbone's image processor, or `None`.
        max_text_length: truncate each utterance's text to this many tokens (a warning counts the truncated ones);
            `None`: the text backbone's maximum (the tokenizer's `model_max_length`, which `from_backbones` checks
            against the backbone's position embeddings).
        text_views: the utterance keys read as text views (default `["text"]`; e.g. `["text", "emphasis",
            "description"]` for a model with multi-granularity text). A view given as a list of words is joined.
        min_audio_samples: the shortest audio, in samples at the feature extractor's rate, the speech backbone can
            embed (its receptive field; `from_backbones` computes it); shorter clips are refused. `None`: 25 ms.
        max_audio_seconds: the longest audio accepted, in seconds (`None`: no limit). Longer clips are refused,
            or truncated with a warning when `truncate_long_audio=True`.
        truncate_long_audio: keep the first `max_audio_seconds` of longer clips instead of refusing them.
    """

    DEFAULT_MIN_AUDIO_SECONDS = 0.025
    """The receptive field of the wav2vec2 family's convolutional front end (400 samples at 16 kHz), and of
    Whisper's 25-ms analysis window: the minimum audio when the backbone's own is not known."""

    def __init__(self, feature_extractor=None, tokenizer=None, image_processor=None,
                 max_text_length: int | None = None, text_views: list[str] | None = None,
                 min_audio_samples: int | None = None, max_audio_seconds: float | None = 60.0,
                 truncate_long_audio: bool = False, **kwargs):
        # ProcessorMixin.__init__ requires every sub-processor; a MiSTER-E model may lack a modality, so this
        # processor accepts None for any and checks the types itself.
        if kwargs:
            raise MisterEError(f"MisterEProcessor got unknown arguments {sorted(kwargs)}; it takes feature_extractor, "
                               "tokenizer, image_processor, max_text_length, text_views, min_audio_samples, "
                               "max_audio_seconds and truncate_long_audio.")
        self.chat_template = None
        if feature_extractor is not None and not isinstance(feature_extractor, SequenceFeatureExtractor):
            raise TypeError(f"`feature_extractor` must be an audio feature extractor, got {type(feature_extractor).__name__}.")
        if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"`tokenizer` must be a tokenizer, got {type(tokenizer).__name__}.")
        if image_processor is not None and not callable(image_processor):
            raise TypeError(f"`image_processor` must be an image processor, got {type(image_processor).__name__}.")
        if feature_extractor is None and tokenizer is None and image_processor is None:
            raise ValueError("A MisterEProcessor needs a feature extractor, a tokenizer or an image processor.")
        for name, value in (("max_text_length", max_text_length), ("min_audio_samples", min_audio_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MisterEError(f"`{name}` must be a positive number of tokens/samples or None, got {value!r}.")
        if not isinstance(truncate_long_audio, (bool, np.bool_)):
            raise MisterEError(f"`truncate_long_audio` must be True or False, got {truncate_long_audio!r}.")
        if max_audio_seconds is not None and (isinstance(max_audio_seconds, bool) or
                                              not isinstance(max_audio_seconds, (int, float)) or
                                              not 0 < max_audio_seconds < float("inf")):
            raise MisterEError(f"`max_audio_seconds` must be a positive number of seconds or None, got "
                               f"{max_audio_seconds!r}.")
        if tokenizer is not None and tokenizer.pad_token is None:
            # decoder-only LMs often ship without a padding token; padding positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_text_length = max_text_length
        self.min_audio_samples = min_audio_samples
        self.max_audio_seconds = None if max_audio_seconds is None else float(max_audio_seconds)
        self.truncate_long_audio = bool(truncate_long_audio)
        self.text_views = list(text_views) if text_views else ["text"]
        if self.text_views[0] != "text":
            raise ValueError(f"`text_views` must start with 'text' (the transcript), got {self.text_views}.")

    @classmethod
    def from_backbones(
        cls, speech_model_name_or_path: str | None = None, text_model_name_or_path: str | None = None,
        visual_model_name_or_path: str | None = None, **kwargs
    ) -> "MisterEProcessor":
        """The processor matching [`MisterEModel.from_backbones`] (same Hub ids or folders), with the speech
        backbone's receptive field as `min_audio_samples` and the text backbone's positions bounding
        `max_text_length`."""
        from transformers import AutoConfig, AutoImageProcessor

        feature_extractor = tokenizer = image_processor = None
        for modality, path in (("speech", speech_model_name_or_path), ("text", text_model_name_or_path),
                               ("visual", visual_model_name_or_path)):
            if path:
                check_backbone_path(path, modality)
        if speech_model_name_or_path:
            feature_extractor = AutoFeatureExtractor.from_pretrained(speech_model_name_or_path)
            if kwargs.get("min_audio_samples") is None:
                kwargs["min_audio_samples"] = receptive_field(AutoConfig.from_pretrained(speech_model_name_or_path))
        if text_model_name_or_path:
            tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path)
            positions = text_positions(AutoConfig.from_pretrained(text_model_name_or_path))
            if positions is not None and _tokenizer_limit(tokenizer) is None and isinstance(
                    kwargs.get("max_text_length", positions), int):
                given = kwargs.get("max_text_length")
                kwargs["max_text_length"] = positions if given is None else min(given, positions)
        if visual_model_name_or_path:
            image_processor = AutoImageProcessor.from_pretrained(visual_model_name_or_path)
        return cls(feature_extractor=feature_extractor, tokenizer=tokenizer, image_processor=image_processor, **kwargs)

    @property
    def text_limit(self) -> int | None:
        """The most tokens an utterance's text keeps: `max_text_length`, else the tokenizer's maximum, else None."""
        limits = [n for n in (self.max_text_length, _tokenizer_limit(self.tokenizer)) if n is not None]
        return min(limits) if limits else None

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

    def _load_audio(self, utterance: dict, b: int, u: int) -> tuple[np.ndarray, bool]:
        """An utterance's samples at the feature extractor's rate, checked against the backbone's minimum length and
        `max_audio_seconds`, and whether they were truncated to it."""
        audio, sampling_rate = read_audio(utterance["audio"], utterance.get("sampling_rate"), b, u)
        source = f"audio file {str(utterance['audio'])!r}: " if isinstance(utterance["audio"], (str, os.PathLike)) else ""
        seconds, truncated = len(audio) / sampling_rate, False
        if self.max_audio_seconds is not None and seconds > self.max_audio_seconds:
            if not self.truncate_long_audio:
                raise ConversationInputError(
                    f"{source}audio is {seconds:.1f} s long, over `max_audio_seconds`={self.max_audio_seconds:g} "
                    "(conversational turns last seconds; a clip this long is likely a whole recording). Split it "
                    "into turns, raise the processor's `max_audio_seconds`, or set `truncate_long_audio=True` to keep "
                    "its beginning.", b, u)
            audio, truncated = audio[: int(self.max_audio_seconds * sampling_rate)], True
        target = self.feature_extractor.sampling_rate
        audio = resample(audio, sampling_rate, target)
        minimum = self.min_audio_samples or math.ceil(self.DEFAULT_MIN_AUDIO_SECONDS * target)
        if len(audio) < minimum:
            raise ConversationInputError(
                f"{source}audio is {len(audio)} samples ({1000 * seconds:.1f} ms) at {target} Hz, shorter than the "
                f"speech backbone's receptive field of {minimum} samples ({1000 * minimum / target:.1f} ms): it cannot "
                "be embedded. Leave the audio out (the utterance keeps its text) or pad it.", b, u)
        return audio, truncated

    def _check_conversations(self, conversations, modalities: tuple[str, ...]) -> None:
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise ConversationInputError("`conversations` must be a non-empty list of conversations (lists of "
                                         f"utterance dicts), got {_describe(conversations)}.")
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
                for view in self.text_views:
                    value = utterance.get(view)
                    words = view != "text" and isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value)
                    if not is_blank(value) and not isinstance(value, str) and not words:
                        raise ConversationInputError(f"`{view}` must be a string, got {_describe(value)}.", b, u)
                if not any(not is_blank(utterance.get(MODALITY_KEYS[m])) for m in modalities):
                    wanted = " or ".join(MODALITY_KEYS[m] for m in modalities)
                    raise ConversationInputError(
                        f"no {wanted} (missing or blank; the utterance has {sorted(utterance) or 'no keys'}); this "
                        "model needs at least one of them.", b, u)

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
            raise MisterEError(f"Unexpected arguments {sorted(kwargs)}; pass `conversations=[[utterance, ...], ...]`.")
        if isinstance(modalities, str):
            modalities = [modalities]
        if modalities is not None:
            unknown = sorted(set(modalities) - set(MODALITY_KEYS))
            if unknown:
                raise MisterEError(f"Unknown modalities {unknown}; choose from {list(MODALITY_KEYS)}.")
            modalities = tuple(m for m in self.modalities if m in modalities)
        else:
            modalities = self.modalities
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
        """(positions (b, u), values) of the utterances that have `key` (not missing, None or blank)."""
        items = [((b, u), utterance[key]) for b, conversation in enumerate(conversations)
                 for u, utterance in enumerate(conversation) if not is_blank(utterance.get(key))]
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
        loaded = [self._load_audio(conversations[b][u], b, u) for b, u in positions]
        waveforms = [audio for audio, _ in loaded]
        if truncated := sum(flag for _, flag in loaded):
            logger.warning(f"{truncated} utterance(s) had more than `max_audio_seconds`="
                           f"{self.max_audio_seconds:g} s of audio and were truncated to it (truncate_long_audio=True).")
        speech_mask = self._scatter(positions, np.ones(len(positions)), batch, turns, np.int64)
        if not waveforms:
            return {"speech_mask": speech_mask}
        input_name = self.feature_extractor.model_input_names[0]
        options = {"padding": True} if input_name == "input_values" else {}
        limit = getattr(self.feature_extractor, "n_samples", None)
        if limit is not None and (over := sum(len(w) > limit for w in waveforms)):
            logger.warning(f"{over} utterance(s) are longer than the feature extractor's window of {limit} samples "
                           f"({limit / self.feature_extractor.sampling_rate:g} s) and are truncated to it.")
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

    def _count_truncated(self, texts: list[str], limit: int) -> int:
        """How many of `texts` have more than `limit` tokens (special tokens included). Only texts long enough in
        bytes to possibly exceed it are tokenized again (every token covers at least one byte)."""
        candidates = [t for t in texts if len(t.encode("utf-8")) + 16 > limit]
        if not candidates:
            return 0
        lengths = self.tokenizer(candidates, truncation=False, verbose=False)["input_ids"]
        return sum(len(ids) > limit for ids in lengths)

    def _text_inputs(self, conversations, batch: int, turns: int) -> dict[str, np.ndarray]:
        positions, _ = self._present(conversations, "text")
        views = [[self._view(conversations[b][u], view) for b, u in positions] for view in self.text_views]
        flat = [text for view in views for text in view if text is not None]
        if not flat:  # no utterance of the batch has text
            return {"text_mask": np.zeros((batch, turns), dtype=np.int64)}
        limit = self.text_limit
        if limit is not None and (truncated := self._count_truncated(flat, limit)):
            logger.warning(f"{truncated} utterance text(s) have more tokens than the text backbone's maximum of "
                           f"{limit} and were truncated to it.")
        encoded = self.tokenizer(
            flat,
            padding=True,
            truncation=limit is not None,
            max_length=limit,
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
        text_present = attention.any(-1)  # (B, U), or (B, U, views)
        if len(views) > 1:
            text_present = text_present.any(-1)
        result = {"input_ids": input_ids, "text_attention_mask": attention,
                  "text_mask": text_present.astype(np.int64)}
        if len(views) > 1:
            result["text_view_mask"] = attention.any(-1).astype(np.int64)
        return result

    @staticmethod
    def _view(utterance: dict, view: str) -> str | None:
        value = utterance.get(view)
        if isinstance(value, (list, tuple)):  # e.g. the emphasised words
            value = " ".join(str(word) for word in value)
        return None if is_blank(value) else value

    def _visual_inputs(self, conversations, batch: int, turns: int) -> dict[str, np.ndarray]:
        positions, images = self._present(conversations, "image")
        visual_mask = self._scatter(positions, np.ones(len(positions)), batch, turns, np.int64)
        if not images:
            return {"visual_mask": visual_mask}
        frames = [read_image(image, b, u) for (b, u), image in zip(positions, images)]
        pixels = np.asarray(self.image_processor(images=frames, return_tensors="np")["pixel_values"])
        return {"pixel_values": self._scatter(positions, pixels, batch, turns, np.float32), "visual_mask": visual_mask}


__all__ = ["MisterEProcessor", "ConversationInputError", "is_blank", "read_audio", "read_image", "receptive_field",
           "resample", "text_positions", "wav_truncation"]
