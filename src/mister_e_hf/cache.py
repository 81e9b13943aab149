"""Embedding cache: with frozen backbones, each utterance's speech and text embeddings are computed once.

The cache is a folder of *entries*, one per modality and extraction setting: the backbone (its name and a digest
of its weights, so a fine-tuned or other revision never hits a stale entry), the pooling, the layers kept and the
processor settings. An entry is a `datasets` Arrow dataset, in shards, of `(key, embedding)` rows where `key` is a
digest of the utterance's content: its text, or the bytes of its audio (or image) file. Splits, folds and runs share
utterances: only utterances not yet in the entry are extracted (then appended as a new shard), so a second run with
the same backbones and data extracts nothing, even when the corpus was copied, moved or restored since (new paths
and modification times, same bytes); a file whose bytes changed is extracted again.

Nothing untrusted is ever used. Each shard carries `integrity.json`, the size and digest of each of its files,
written before the shard appears under its final name; reading an entry checks every shard against it and checks
that its embeddings are finite and of one shape. A shard that fails (a flipped byte, a truncated or missing file, an
unreadable record, NaN or infinity) is logged with its path and the reason, moved aside within the entry as
`corrupt-shard-*` (kept for inspection, never read again), and its utterances are extracted again. Non-finite
embeddings are refused when extracted, with the utterance (its file or text, split, conversation id and turn) named;
so is any input the processor or the backbone refuses.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm
from transformers.utils import logging

from . import distributed
from .atomic import atomic_write_json
from .backbones import INPUT_NAMES
from .errors import CacheError, ConversationInputError, MisterEError
from .modalities import MODALITY_TABLE


logger = logging.get_logger(__name__)

CACHE_FORMAT = 3
"""Bump when the way embeddings are computed or stored changes, so that old entries are not reused (they are left
alone, and their utterances extracted once more into a new entry; delete old entry folders to reclaim the space).
3: shards carry `integrity.json` (entries of format 2 had none)."""

DEFAULT_CACHE_DIR = Path(os.environ.get("MISTER_E_CACHE", Path.home() / ".cache" / "mister_e_hf" / "embeddings"))

INTEGRITY_FILE = "integrity.json"
"""Per shard: `{"format", "rows", "files": {name: {"bytes", "blake2b"}}}` of the shard's other files."""

SET_ASIDE_PREFIX = "corrupt-"
"""Untrusted shards are renamed `corrupt-shard-*` in their entry: kept for inspection, never globbed as shards."""


def _digest(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """Digest of a module's parameters and buffers (names, shapes, dtypes, values)."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too
    return hasher.hexdigest()


SOURCES = {name: (modality.column, modality.key) for name, modality in MODALITY_TABLE.items()}
"""Per modality: the dataset column (one value per turn) and the utterance key its embeddings are computed from."""


def file_digest(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Digest of a file's bytes (read in `chunk_size` pieces): the same recording anywhere has the same digest."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            hasher.update(chunk)
    return hasher.hexdigest()


def utterance_key(modality: str, value: str) -> str:
    """Content key of one utterance for one modality: its text, or the bytes of its audio or image file (not its
    path or modification time, so copies and restored corpora hit the cache)."""
    if modality == "text":
        return _digest(["text", value])
    return _digest([modality, file_digest(value)])


def describe_utterance(modality: str, value: str) -> str:
    """How messages name an utterance: its audio or image file, or its text (shortened)."""
    if modality == "text":
        return f"text {value if len(value) <= 60 else value[:57] + '...'!r}"
    return f"{SOURCES[modality][1]} file {str(value)!r}"


def _processor_settings(processor, modality: str) -> dict:
    """What the processor does to an utterance before the backbone sees it (the settings that change embeddings)."""
    if modality == "speech":
        truncated = getattr(processor, "max_audio_seconds", None) if getattr(processor, "truncate_long_audio", False) \
            else None
        return {**processor.feature_extractor.to_dict(), "truncate_audio_to_seconds": truncated}
    if modality == "visual":
        return processor.image_processor.to_dict()
    limit = getattr(processor, "text_limit", processor.max_text_length)
    return {"tokenizer": type(processor.tokenizer).__name__, "vocab": len(processor.tokenizer),
            "name": processor.tokenizer.name_or_path, "max_text_length": limit}


def extraction_settings(model, processor, modality: str, weights: str | None = None) -> dict:
    """Everything a modality's embeddings depend on besides the utterance itself."""
    config = model.config
    settings = {
        "format": CACHE_FORMAT,
        "modality": modality,
        "backbone": getattr(config, f"{modality}_backbone_name_or_path"),
        "backbone_type": config.backbone_config(modality).model_type,
        "weights": weights or weights_digest(getattr(model, f"{modality}_backbone")),
        "pooling": model.poolings[modality],
        "layers": config.embed_layers(modality),
        "processor": _processor_settings(processor, modality),
    }
    options = {name: value for name, value in model.encoder_options(modality).items() if value}
    if options:  # only when set, so that the entries of default settings keep their keys
        settings["encoder"] = options
    return settings


@dataclass
class CacheStats:
    """What `add_cached_embeddings` did: utterances read from the cache, utterances extracted, seconds extracting,
    and untrusted shards moved aside (their utterances were extracted again)."""

    cached_utterances: int = 0
    utterances_embedded: int = 0
    extraction_seconds: float = 0.0
    shards_set_aside: int = 0


def _shard_files(shard: Path) -> dict[str, Path]:
    """The files of a shard folder (relative POSIX name -> path), its integrity record excepted."""
    return {p.relative_to(shard).as_posix(): p for p in sorted(shard.rglob("*"))
            if p.is_file() and p.name != INTEGRITY_FILE}


def _is_list(arrow_type) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _check_embeddings(shard: Dataset, shape: tuple[int, ...] | None, chunk: int = 1 << 22) -> None:
    """Raises `CacheError` unless every row of `shard`'s `embedding` column is a finite float array, all of one
    shape (`shape`, when given). Reads the memory-mapped Arrow buffers `chunk` values at a time, copying nothing."""
    if shard.column_names != ["key", "embedding"]:
        raise CacheError(f"it has columns {shard.column_names}, not ['key', 'embedding']")
    shapes = set()
    for array in shard.data.table.column("embedding").chunks:
        if not len(array):
            continue
        dims = []
        while _is_list(array.type):  # one nesting level per dimension: (rows, [layers,] dim)
            lengths = pc.unique(pc.list_value_length(array))
            if array.null_count or len(lengths) != 1:
                raise CacheError("its embeddings are missing for some rows, or differ in shape")
            dims.append(lengths[0].as_py())
            array = array.flatten()
        shapes.add(tuple(dims))
        if not pa.types.is_floating(array.type):
            raise CacheError(f"its embeddings are {array.type}, not floats")
        values = array.to_numpy(zero_copy_only=False)  # float nulls become NaN, refused below
        for start in range(0, len(values), chunk):
            if not np.isfinite(values[start : start + chunk]).all():
                raise CacheError(f"it holds {int((~np.isfinite(values)).sum())} non-finite embedding values "
                                 "(NaN or infinity)")
    if len(shapes) > 1:
        raise CacheError(f"its embeddings differ in shape: {sorted(shapes)}")
    if shape is not None and shapes and shapes != {tuple(shape)}:
        raise CacheError(f"its embeddings have shape {shapes.pop()}, this entry's have {tuple(shape)}")


class EmbeddingCache:
    """A folder of cache entries, `<modality>-<settings digest>/` with `settings.json` and `shard-*/` datasets, each
    shard with its `integrity.json`. Shards found untrusted are moved aside as `corrupt-shard-*/`.

    A shard verified once by this object is not hashed again while its files keep their size, modification time and
    inode (the splits of one run read the same entry several times)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
        self.set_aside: list[Path] = []
        self._verified: dict[Path, tuple] = {}

    def entry(self, settings: dict) -> Path:
        # the backbone's name or path is only a label: its weights digest identifies it, so the same weights
        # loaded from another folder, a symlink or a Hub id share the entry
        identity = {key: value for key, value in settings.items() if key != "backbone"}
        path = self.cache_dir / f"{settings['modality']}-{_digest(identity)}"
        path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(settings, indent=2, default=str) + "\n"
        try:
            unchanged = (path / "settings.json").read_text() == text
        except (OSError, UnicodeDecodeError):
            unchanged = False
        if not unchanged:  # informative only (the folder's name is the key), but never torn
            atomic_write_json(path / "settings.json", settings, default=str)
        return path

    def read(self, entry: Path, shape: tuple[int, ...] | None = None) -> tuple[dict[str, int], Dataset | None]:
        """(key -> row, all rows) of an entry's trusted shards. Every shard is checked (`integrity.json`, then that
        it loads, has the recorded rows, and holds finite embeddings of one shape, `shape` when given); one that
        fails is logged with its path and the reason and moved aside, so its utterances are simply missing."""
        shards = []
        for path in sorted(Path(entry).glob("shard-*")):
            try:
                shards.append(self._load_trusted(path, shape))
            except CacheError as error:
                self._move_aside(path, str(error))
        if not shards:
            return {}, None
        table = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
        return {key: row for row, key in enumerate(table["key"])}, table

    def _load_trusted(self, shard: Path, shape: tuple[int, ...] | None) -> Dataset:
        """The shard's dataset, or `CacheError` saying why it cannot be trusted."""
        try:
            record = json.loads((shard / INTEGRITY_FILE).read_text())
            expected, rows = record["files"], int(record["rows"])
            sizes = {name: int(item["bytes"]) for name, item in expected.items()}
            digests = {name: str(item["blake2b"]) for name, item in expected.items()}
        except FileNotFoundError:
            raise CacheError(f"it has no {INTEGRITY_FILE} (an interrupted write, or an older toolkit)") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CacheError(f"its {INTEGRITY_FILE} is unreadable ({type(error).__name__}: {error})") from None
        files = _shard_files(shard)  # every file must be one written with the shard, and none may be missing
        if set(files) != set(expected):
            raise CacheError(f"its files are not those written with it (missing: {sorted(set(expected) - set(files))}"
                             f", unexpected: {sorted(set(files) - set(expected))})")
        stats = {name: path.stat() for name, path in files.items()}
        signature = tuple((name, s.st_size, s.st_mtime_ns, s.st_ino) for name, s in sorted(stats.items()))
        verified = self._verified.get(shard) == signature
        if not verified:
            for name, path in files.items():
                if stats[name].st_size != sizes[name]:
                    raise CacheError(f"{name} has {stats[name].st_size} bytes, {sizes[name]} were written "
                                     "(truncated?)")
                if file_digest(path) != digests[name]:
                    raise CacheError(f"{name} does not match its digest: its bytes changed after it was written")
        try:
            dataset = load_from_disk(str(shard))
        except Exception as error:  # whatever the reason (a truncated or undecodable file), it cannot be used
            raise CacheError(f"it cannot be loaded ({type(error).__name__}: {error})") from None
        if len(dataset) != rows:
            raise CacheError(f"it has {len(dataset)} rows, {rows} were written")
        if not verified:
            _check_embeddings(dataset, shape)
            self._verified[shard] = signature
        return dataset

    def _move_aside(self, shard: Path, reason: str) -> None:
        target = shard.with_name(SET_ASIDE_PREFIX + shard.name)
        if target.exists():
            target = shard.with_name(f"{SET_ASIDE_PREFIX}{shard.name}-{time.time_ns()}")
        try:
            os.replace(shard, target)
            moved = f"Moved it aside to {target} (kept for inspection; delete it when done)"
        except FileNotFoundError:
            moved = "Another process moved it aside"
        except OSError as error:  # e.g. a read-only cache: it is still never used
            moved = f"Could not move it aside ({error.strerror or error}); it is skipped"
        self.set_aside.append(shard)
        logger.warning(f"Embedding cache shard {shard} cannot be trusted: {reason}. {moved}; its utterances count as "
                       "not cached (extracted again unless another shard holds them).")

    @staticmethod
    def append(entry: Path, keys: list[str], vectors: list[np.ndarray]) -> None:
        """Writes `(key, vector)` rows as a new shard with its `integrity.json`, under a hidden name first, so readers
        never see a half-written shard. Refuses (`CacheError`) vectors that are non-finite or differ in shape."""
        shapes = {np.shape(vector) for vector in vectors}
        if len(keys) != len(vectors) or not keys or len(shapes) != 1:
            raise CacheError(f"A cache shard needs one vector per key, all of one shape; got {len(keys)} keys and "
                             f"{len(vectors)} vectors of shapes {sorted(shapes)}.")
        array = np.asarray(vectors, dtype=np.float32)
        finite = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        if not finite.all():
            raise CacheError(f"Refusing to cache {int((~finite).sum())} non-finite embeddings (NaN or infinity), e.g. "
                             f"key {keys[int(np.argmin(finite))]}; nothing was written.")
        vector_type = Value("float32")
        for _ in array.shape[1:]:
            vector_type = List(vector_type)
        shard = Dataset.from_dict({"key": keys, "embedding": list(array)},
                                  features=Features({"key": Value("string"), "embedding": vector_type}))
        name = f"shard-{time.time_ns()}-{os.getpid()}"
        staging = entry / f".{name}"
        shard.save_to_disk(str(staging))
        files = {file: {"bytes": path.stat().st_size, "blake2b": file_digest(path)}
                 for file, path in _shard_files(staging).items()}
        atomic_write_json(staging / INTEGRITY_FILE, {"format": CACHE_FORMAT, "rows": len(keys), "files": files})
        os.replace(staging, entry / name)  # readers never see half-written shards


def _absent(value) -> bool:
    """Blank (empty or whitespace-only) text and missing values mean the utterance lacks the modality."""
    return value is None or (isinstance(value, str) and not value.strip())


def _utterances(dataset: Dataset, column: str) -> list[tuple[int, int, str]]:
    """(row, turn, value) of every utterance of `dataset` whose per-turn `column` has a value."""
    if column not in dataset.column_names:
        return []
    return [(i, t, value) for i, values in enumerate(dataset[column]) for t, value in enumerate(values)
            if not _absent(value)]


def _columns(model, modality: str) -> list[str]:
    """The dataset columns a modality's embeddings come from: one, or one per text view."""
    if modality == "text" and model.text_views is not None:
        return [SOURCES["text"][0] if view == "text" else view for view in model.config.text_views]
    return [SOURCES[modality][0]]


def _length(modality: str, value: str) -> float:
    """What batching sorts by: characters of text, seconds of audio (images all cost the same)."""
    if modality == "text":
        return len(value)
    if modality == "visual":
        return 0.0
    import soundfile

    info = soundfile.info(value)
    return info.frames / info.samplerate if info.samplerate else 0.0


def _embed_batch(model, processor, modality: str, values: list[str]) -> np.ndarray:
    """`(len(values), [layers,] dim)` float32 embeddings of utterance sources, each its own one-utterance
    conversation (so an error's `conversation` is a position in `values`)."""
    key = SOURCES[modality][1]
    inputs = processor(conversations=[[{key: value}] for value in values], modalities=[modality])
    inputs = {k: v.to(model.device) for k, v in inputs.items() if k in INPUT_NAMES[modality]}
    mask = torch.ones(len(values), 1, dtype=torch.bool, device=model.device)
    embeds = model.embed_utterances(modality, mask, **inputs)[:, 0]
    if modality == "text" and model.text_views is not None:
        embeds = embeds[:, 0]  # each text goes in as the transcript view
    return embeds.float().cpu().numpy()


@torch.no_grad()
def extract_embeddings(model, processor, modality: str, utterances: list[str], batch_size: int = 16,
                       desc: str = "", locations: list[str] | None = None,
                       refused: dict[int, str] | None = None) -> list[np.ndarray | None]:
    """Pooled backbone embeddings of utterances given by their `modality` source (texts, audio or image paths, in
    order), computed in batches of similar length (less padding); each is `(dim,)`, or `(layers, dim)` when the
    model combines the backbone's layers.

    An utterance the processor or the backbone refuses (`ConversationInputError`) is re-raised as one naming it: its
    file or text and `locations[i]` (where it comes from, e.g. split, conversation id and turn) instead of its
    position in a batch. Non-finite embeddings raise `CacheError` naming the utterance the same way. Given a
    `refused` dict (`skip_invalid`), such an utterance is left out instead: its entry is None and `refused[i]` says
    why; the others of its batch are embedded all the same."""
    if locations is not None and len(locations) != len(utterances):
        raise ValueError(f"`locations` must have one entry per utterance ({len(utterances)}), got {len(locations)}.")

    def where(i: int) -> str:
        what = describe_utterance(modality, utterances[i])
        return f"{what} ({locations[i]})" if locations is not None else what

    def culprit(error: ConversationInputError, chunk: list[int]) -> str:
        if error.conversation is None or not 0 <= error.conversation < len(chunk):
            return f"{modality} embeddings of one of " + "; ".join(where(i) for i in chunk)
        i = chunk[error.conversation]
        if str(utterances[i]) in error.detail:  # the detail names the file already
            return f"{modality} embeddings" + (f" ({locations[i]})" if locations is not None else "")
        return f"{modality} embeddings of {where(i)}"

    def refuse(i: int, error: MisterEError) -> None:
        if refused is None:
            raise error
        refused[i] = str(error)

    lengths = []
    for i, value in enumerate(utterances):
        try:
            lengths.append(_length(modality, value))
        except (OSError, RuntimeError, ValueError) as error:  # soundfile's errors name no conversation
            refuse(i, ConversationInputError(f"cannot read {where(i)}: {type(error).__name__}: {error}"))
            lengths.append(0.0)
    order = sorted(range(len(utterances)), key=lambda i: lengths[i])
    was_training = model.training
    model.eval()
    vectors: list[np.ndarray | None] = [None] * len(utterances)
    try:
        with tqdm(total=len(order), desc=desc or f"Extracting {modality} embeddings", unit="utt") as progress:
            for start in range(0, len(order), batch_size):
                chunk = [i for i in order[start : start + batch_size] if refused is None or i not in refused]
                while chunk:  # under skip_invalid, an utterance refused is taken out and the rest tried again
                    try:
                        embeds = _embed_batch(model, processor, modality, [utterances[i] for i in chunk])
                    except ConversationInputError as error:  # a position in this chunk -> the utterance itself
                        named = error.named(culprit(error, chunk))
                        if refused is None or error.conversation is None or not 0 <= error.conversation < len(chunk):
                            raise named from error
                        refuse(chunk.pop(error.conversation), named)
                        continue
                    except Exception as error:  # not a toolkit error (a bug, a failing backbone): keep it, say where
                        error.add_note(f"While extracting {modality} embeddings of: "
                                       + "; ".join(where(i) for i in chunk[:4])
                                       + (f"; and {len(chunk) - 4} more" if len(chunk) > 4 else ""))
                        raise
                    bad = ~np.isfinite(embeds.reshape(len(chunk), -1)).all(axis=1)
                    for position in np.flatnonzero(bad):
                        refuse(chunk[position], CacheError(
                            f"The {modality} backbone gave non-finite values (NaN or infinity) for "
                            f"{where(chunk[position])}"
                            + (f" and {int(bad.sum()) - 1} other utterances" if bad.sum() > 1 else "")
                            + "; refusing to cache them (nothing was written). Check that input, and the backbone's "
                            "weights and dtype."))
                    for i, vector, ok in zip(chunk, embeds, ~bad):
                        vectors[i] = vector if ok else None
                    break
                progress.update(min(batch_size, len(order) - start))
    finally:
        model.train(was_training)
    return vectors


class _Utterances:
    """The utterances of one split for one modality: per column (one, or one per text view) their `(row, turn,
    value)` and cache keys, and where each comes from (split, conversation id and turn) for messages."""

    def __init__(self, model, modality: str, dataset: Dataset, split: str | None):
        columns = _columns(model, modality)
        absent = [c for c in columns[1:] if c not in dataset.column_names]
        if absent:  # a text view's column: a typo, or a corpus without it, would silently embed nothing
            raise CacheError(f"The model reads the text views {list(model.config.text_views)}, but the "
                             f"{split or 'data'} split has no column {absent} (it has {dataset.column_names}).")
        self.split = split
        self.ids = list(dataset["conversation_id"]) if "conversation_id" in dataset.column_names else None
        self.turns = list(dataset["turns"]) if "turns" in dataset.column_names else None
        self.views = [_utterances(dataset, column) for column in columns]
        self.keys = [[self._key(modality, i, t, value) for i, t, value in view] for view in self.views]

    def location(self, i: int, t: int) -> str:
        parts = [f"split {self.split!r}"] if self.split else []
        parts.append(f"conversation {self.ids[i]!r}" if self.ids is not None else f"row {i}")
        parts.append(f"turn {self.turns[i][t]}" if self.turns is not None else f"utterance {t}")
        return ", ".join(parts)

    def _key(self, modality: str, i: int, t: int, value: str) -> str:
        try:
            return utterance_key(modality, value)
        except OSError as error:
            raise ConversationInputError(f"cannot read {describe_utterance(modality, value)} ({self.location(i, t)}): "
                                         f"{error.strerror or error}") from None

    def missing(self, index: dict) -> list[tuple[str, tuple[str, list[str]]]]:
        """(key, (value, locations of every utterance with it)) of the distinct utterances `index` lacks, by key."""
        first_seen: dict[str, tuple[str, list[str]]] = {}
        for view, view_keys in zip(self.views, self.keys):
            for k, (i, t, value) in zip(view_keys, view):
                if k not in index:
                    first_seen.setdefault(k, (value, []))[1].append(self.location(i, t))
        return sorted(first_seen.items())

    def __len__(self) -> int:
        return sum(len(view) for view in self.views)


def _extract_missing(model, processor, modality: str, missing, cache: "EmbeddingCache", entry: Path,
                     shape: tuple[int, ...], batch_size: int, desc: str, skip_invalid: bool
                     ) -> tuple[list[str], list[tuple[str, str]]]:
    """Embeds the `missing` utterances (`_Utterances.missing`) and appends them to the cache entry as one shard.
    Returns the keys written and, under `skip_invalid`, the `(key, reason)` of the utterances refused (left out)."""
    locations = [places[0] + (f", and {len(places) - 1} more utterances with the same content" if len(places) > 1
                              else "") for _, (_, places) in missing]
    refused: dict[int, str] | None = {} if skip_invalid else None
    vectors = extract_embeddings(model, processor, modality, [value for _, (value, _) in missing], batch_size,
                                 desc, locations=locations, refused=refused)
    kept = [(k, vector) for (k, _), vector in zip(missing, vectors) if vector is not None]
    if kept and np.shape(kept[0][1]) != shape:
        raise CacheError(f"The {modality} backbone gave embeddings of shape {np.shape(kept[0][1])}, the model "
                         f"expects {shape} (`config.embedding_shape`); nothing was written.")
    if kept:
        cache.append(entry, [k for k, _ in kept], [vector for _, vector in kept])
    return [k for k, _ in kept], [(missing[position][0], reason) for position, reason in (refused or {}).items()]


def _embedding_columns(modality: str, dataset: Dataset, utterances: _Utterances, index: dict, table,
                       shape: tuple[int, ...]) -> Dataset:
    """`<modality>_embeds` / `<modality>_present` (and `<modality>_view_present` for text views) aligned with
    `dataset`'s rows, from the cache rows `index` points to; utterances not in it (refused ones) stay absent."""
    per_view = []
    for view, view_keys in zip(utterances.views, utterances.keys):
        usable = [(place, k) for place, k in zip(view, view_keys) if k in index]
        rows = [index[k] for _, k in usable]
        found = table.select(rows).with_format("numpy")[:]["embedding"] if rows else []
        embeds = [[np.zeros(shape, dtype=np.float32)] * n for n in dataset["num_turns"]]
        present = [[0] * n for n in dataset["num_turns"]]
        for ((i, t, _), _), vector in zip(usable, found):
            embeds[i][t], present[i][t] = vector, 1
        per_view.append((embeds, present))
    columns = {f"{modality}_embeds": per_view[0][0], f"{modality}_present": per_view[0][1]}
    vector_type = Value("float32")
    for _ in shape:
        vector_type = List(vector_type)
    features = {f"{modality}_embeds": List(vector_type), f"{modality}_present": List(Value("int8"))}
    if len(per_view) > 1:  # text views: (views, [layers,] dim) per turn, and which views exist
        columns[f"{modality}_embeds"] = [[np.stack(turn) for turn in zip(*rows)]
                                         for rows in zip(*(e for e, _ in per_view))]
        columns[f"{modality}_view_present"] = [[list(turn) for turn in zip(*rows)]
                                               for rows in zip(*(p for _, p in per_view))]
        features[f"{modality}_embeds"] = List(List(vector_type))
        features[f"{modality}_view_present"] = List(List(Value("int8")))
    return Dataset.from_dict(columns, features=Features(features))


def _read_together(cache: "EmbeddingCache", entry: Path, shape) -> tuple[dict[str, int], Dataset | None]:
    """`cache.read`, in several processes by the main one first (it moves untrusted shards aside), then by the
    others, and none goes on before all have read: every process sees the same shards, so they agree on what is
    missing and share its extraction."""
    if distributed.rank() != 0:
        distributed.barrier()
    result = cache.read(entry, shape)
    if distributed.rank() == 0:
        distributed.barrier()
    distributed.barrier()
    return result


def cached_embeddings(model, processor, modality: str, dataset: Dataset, cache: "EmbeddingCache",
                      batch_size: int = 16, stats: CacheStats | None = None, desc: str = "",
                      weights: str | None = None, split: str | None = None, skip_invalid: bool = False,
                      report=None) -> Dataset:
    """`<modality>_embeds` (per turn; zeros where absent) and `<modality>_present` (per turn 1/0) columns aligned with
    `dataset`'s rows, read from the cache and extracting only the utterances it lacks. Errors name the utterance by
    its file or text, `split`, conversation id and turn. With `skip_invalid`, an utterance whose input is refused
    at extraction (NaN samples, too short, unreadable, a non-finite embedding) keeps its other modalities and is
    marked as lacking this one, counted in `report` (a `DataReport`) with the reason."""
    stats = stats if stats is not None else CacheStats()
    entry = cache.entry(extraction_settings(model, processor, modality, weights))
    shape = tuple(model.config.embedding_shape(modality))
    utterances = _Utterances(model, modality, dataset, split)
    set_aside = len(cache.set_aside)
    index, table = _read_together(cache, entry, shape)
    missing = utterances.missing(index)
    if missing:
        # in several processes, each embeds its share (every world_size-th utterance) into its own shard
        mine = missing[distributed.rank()::distributed.world_size()]
        start = time.perf_counter()
        written, refused = _extract_missing(model, processor, modality, mine, cache, entry, shape, batch_size, desc,
                                            skip_invalid) if mine else ([], [])
        stats.extraction_seconds += time.perf_counter() - start
        stats.utterances_embedded += len(mine)
        places = dict(missing)
        for key, reason in (pair for rank_refused in distributed.all_gather_objects(refused) for pair in rank_refused):
            for place in places[key][1]:
                if report is not None:
                    report.skip(split or "data", f"{modality} refused at extraction (the utterance is kept without "
                                                 "it)", f"{place}: {reason}")
            logger.warning(f"skip_invalid: {reason}; kept without its {modality}.")
        distributed.barrier()  # every process's shard is written
        index, table = cache.read(entry, shape)
        lost = [k for k in written if k not in index]
        if lost:  # the shard just written failed its checks (already logged and moved aside)
            raise CacheError(f"The embedding cache entry {entry} did not keep the {len(lost)} embeddings just "
                             "written (see the warning above); check the disk.")
    stats.shards_set_aside += len(cache.set_aside) - set_aside
    stats.cached_utterances += len(utterances) - len(missing)
    return _embedding_columns(modality, dataset, utterances, index, table, shape)


def add_cached_embeddings(
    model, processor, datasets: DatasetDict, cache_dir=None, batch_size: int = 16, skip_invalid: bool = False,
    report=None,
) -> tuple[DatasetDict, CacheStats]:
    """Adds `<modality>_embeds` / `<modality>_present` columns to every split, for every modality of the model, from
    the cache or by extracting the missing utterances once. The model's backbones must be frozen.

    With `skip_invalid`, inputs refused at extraction are left out and counted in `report` (a `DataReport`): the
    utterance keeps its other modalities, and one left with none is dropped from its conversation (a conversation
    left with no utterance is dropped)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MisterEError(f"The extraction batch size must be a positive number of utterances, got {batch_size!r}.")
    model.check_processor(processor)
    for modality in model.config.modalities:
        if getattr(model, f"{modality}_backbone") is None:
            raise MisterEError(f"The model has no {modality} backbone to extract embeddings with.")
        if not getattr(model.config, f"freeze_{modality}_backbone"):
            raise MisterEError(f"Caching {modality} embeddings needs a frozen {modality} backbone.")
    cache, stats = EmbeddingCache(cache_dir), CacheStats()
    digests = {m: weights_digest(getattr(model, f"{m}_backbone")) for m in model.config.modalities}
    out = {}
    for split, dataset in datasets.items():
        columns = [
            cached_embeddings(model, processor, m, dataset, cache, batch_size, stats, f"{split}: {m} embeddings",
                              digests[m], split=split, skip_invalid=skip_invalid, report=report)
            for m in model.config.modalities
        ]
        out[split] = concatenate_datasets([dataset, *columns], axis=1)
        if skip_invalid:
            out[split] = _drop_utterances_without_modality(out[split], model.config.modalities, split, report)
    return DatasetDict(out), stats


def _drop_utterances_without_modality(dataset: Dataset, modalities, split: str, report) -> Dataset:
    """The rows of `dataset` without the turns that have none of `modalities` present (after inputs were refused
    at extraction under `skip_invalid`), each counted in `report`; rows left with no turn are dropped."""
    present = [np.array(dataset[f"{m}_present"], dtype=object) for m in modalities]
    keep = [np.any([np.asarray(p[i], dtype=bool) for p in present], axis=0) for i in range(len(dataset))]
    if all(k.all() for k in keep):
        return dataset
    ids, turns = dataset["conversation_id"], dataset["turns"]
    for i, k in enumerate(keep):
        for t in np.flatnonzero(~k):
            if report is not None:
                report.skip(split, "no usable modality left after extraction",
                            f"conversation {ids[i]!r}, turn {turns[i][t]}")
    per_turn = [c for c in dataset.column_names
                if isinstance(dataset[0][c], list) and len(dataset[0][c]) == dataset[0]["num_turns"]]

    def drop(row, i):
        k = keep[i]
        row = {c: [v for v, keep_it in zip(row[c], k) if keep_it] for c in per_turn}
        row["num_turns"] = int(k.sum())
        return row

    kept = dataset.map(drop, with_indices=True, desc=f"{split}: dropping utterances left without a modality")
    return kept.filter(lambda row: row["num_turns"] > 0)


def fit_embedding_statistics(model, dataset: Dataset) -> dict[str, int]:
    """Fits the model's embedding standardisation (`config.standardize_embeddings`) on the cached embeddings of
    `dataset` (the training split, as `add_cached_embeddings` returns it): every utterance (and text view) that has
    the modality counts, labelled or not. Returns how many embeddings each modality was fitted on. Non-finite
    embeddings are refused (`CacheError` naming the conversation and turn)."""
    counts = {}
    for modality, standardizer in model.standardizers.items():
        column, present_column = f"{modality}_embeds", f"{modality}_present"
        if column not in dataset.column_names or present_column not in dataset.column_names:
            raise CacheError(
                f"`standardize_embeddings` fits on the training set's cached embeddings, but it has no `{column}` "
                f"and `{present_column}` columns: train with frozen backbones on `add_cached_embeddings`'s output, or call "
                "`model.fit_embedding_statistics` with embeddings of your own.")
        view_column = f"{modality}_view_present" if f"{modality}_view_present" in dataset.column_names else None
        shape = tuple(standardizer.mean.shape)
        rows = []
        for i, row in enumerate(dataset.with_format(
                "numpy", columns=[column, present_column, *([view_column] if view_column else [])])):
            present = np.asarray(row[present_column], dtype=bool)
            embeds = np.asarray(row[column], dtype=np.float32)
            bad = present & ~np.isfinite(embeds.reshape(len(embeds), -1)).all(axis=1)
            if bad.any():
                t = int(np.argmax(bad))
                conversation = dataset[i]["conversation_id"] if "conversation_id" in dataset.column_names else i
                turn = dataset[i]["turns"][t] if "turns" in dataset.column_names else t
                raise CacheError(f"Non-finite {modality} embedding (NaN or infinity) in conversation {conversation!r}, "
                                 f"turn {turn}: cannot fit the embedding standardisation on it.")
            embeds = embeds[present]
            if view_column:  # (turns, views, ...) -> the views that exist
                embeds = embeds[np.asarray(row[view_column], dtype=bool)[present]]
            if embeds.size and embeds.shape[-len(shape):] != shape:
                raise CacheError(f"The {modality} embeddings of the training set have shape {embeds.shape[1:]}, the "
                                 f"model standardises {shape}: they were cached for another model setting.")
            rows.append(embeds.reshape(-1, *shape))
        embeds = torch.from_numpy(np.concatenate(rows)) if rows else torch.empty(0, *shape)
        model.fit_embedding_statistics(modality, embeds)
        counts[modality] = len(embeds)
    return counts


__all__ = ["EmbeddingCache", "CacheStats", "add_cached_embeddings", "cached_embeddings", "describe_utterance",
           "extract_embeddings", "extraction_settings", "file_digest", "fit_embedding_statistics", "utterance_key",
           "weights_digest"]
