"""Embedding cache: with frozen backbones, each utterance's speech and text embeddings are computed once.

The cache is a folder of *entries*, one per modality and extraction setting: the backbone (its name and a digest
of its weights, so a fine-tuned or other revision never hits a stale entry), the pooling, the layers kept and the
processor settings. An entry is a `datasets` Arrow dataset, in shards, of `(key, embedding)` rows where `key` is a
digest of the utterance's content: its text, or the bytes of its audio (or image) file. Splits, folds and runs share
utterances: only utterances not yet in the entry are extracted (then appended as a new shard), so a second run with
the same backbones and data extracts nothing, even when the corpus was copied, moved or restored since (new paths
and modification times, same bytes); a file whose bytes changed is extracted again.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from .backbones import INPUT_NAMES


CACHE_FORMAT = 2
"""Bump when the way embeddings are computed changes, so that old entries are not reused."""

DEFAULT_CACHE_DIR = Path(os.environ.get("MISTER_E_CACHE", Path.home() / ".cache" / "mister_e_hf" / "embeddings"))


def _digest(value) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """Digest of a module's parameters and buffers (names, shapes, dtypes, values)."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


SOURCES = {"speech": ("audio", "audio"), "text": ("texts", "text"), "visual": ("images", "image")}
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


def _processor_settings(processor, modality: str) -> dict:
    if modality == "speech":
        return processor.feature_extractor.to_dict()
    if modality == "visual":
        return processor.image_processor.to_dict()
    return {"tokenizer": type(processor.tokenizer).__name__, "vocab": len(processor.tokenizer),
            "name": processor.tokenizer.name_or_path, "max_text_length": processor.max_text_length}


def extraction_settings(model, processor, modality: str, weights: str | None = None) -> dict:
    """Everything a modality's embeddings depend on besides the utterance itself."""
    config = model.config
    return {
        "format": CACHE_FORMAT,
        "modality": modality,
        "backbone": getattr(config, f"{modality}_backbone_name_or_path"),
        "backbone_type": config.backbone_config(modality).model_type,
        "weights": weights or weights_digest(getattr(model, f"{modality}_backbone")),
        "pooling": model.poolings[modality],
        "layers": config.embed_layers(modality),
        "processor": _processor_settings(processor, modality),
    }


@dataclass
class CacheStats:
    """What `add_cached_embeddings` did: utterances read from the cache, utterances extracted, seconds extracting."""

    cached_utterances: int = 0
    utterances_embedded: int = 0
    extraction_seconds: float = 0.0


class EmbeddingCache:
    """A folder of cache entries, `<modality>-<settings digest>/` with `settings.json` and `shard-*/` datasets."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR

    def entry(self, settings: dict) -> Path:
        # the backbone's name or path is only a label: its weights digest identifies it, so the same weights
        # loaded from another folder, a symlink or a Hub id share the entry
        identity = {key: value for key, value in settings.items() if key != "backbone"}
        path = self.cache_dir / f"{settings['modality']}-{_digest(identity)}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "settings.json").write_text(json.dumps(settings, indent=2, default=str) + "\n")
        return path

    @staticmethod
    def read(entry: Path) -> tuple[dict[str, int], Dataset | None]:
        """(key -> row, all rows) of an entry's shards."""
        shards = [load_from_disk(str(p)) for p in sorted(entry.glob("shard-*")) if (p / "dataset_info.json").exists()]
        if not shards:
            return {}, None
        table = concatenate_datasets(shards)
        return {key: row for row, key in enumerate(table["key"])}, table

    @staticmethod
    def append(entry: Path, keys: list[str], vectors: list[np.ndarray]) -> None:
        vector_type = Value("float32")
        for _ in vectors[0].shape:
            vector_type = List(vector_type)
        shard = Dataset.from_dict({"key": keys, "embedding": vectors},
                                  features=Features({"key": Value("string"), "embedding": vector_type}))
        name = f"shard-{time.time_ns()}-{os.getpid()}"
        shard.save_to_disk(str(entry / f".{name}"))
        os.replace(entry / f".{name}", entry / name)  # readers never see half-written shards


def _utterances(dataset: Dataset, column: str) -> list[tuple[int, int, str]]:
    """(row, turn, value) of every utterance of `dataset` whose per-turn `column` has a value."""
    if column not in dataset.column_names:
        return []
    return [(i, t, value) for i, values in enumerate(dataset[column]) for t, value in enumerate(values)
            if value is not None and value != ""]


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
    return info.frames / info.samplerate


@torch.no_grad()
def extract_embeddings(model, processor, modality: str, utterances: list[str], batch_size: int = 16,
                       desc: str = "") -> list[np.ndarray]:
    """Pooled backbone embeddings of utterances given by their `modality` source (texts, audio or image paths, in
    order), computed in batches of similar length (less padding); each is `(dim,)`, or `(layers, dim)` when the
    model combines the backbone's layers."""
    order = sorted(range(len(utterances)), key=lambda i: _length(modality, utterances[i]))
    key = SOURCES[modality][1]
    was_training = model.training
    model.eval()
    vectors: list[np.ndarray | None] = [None] * len(utterances)
    with tqdm(total=len(order), desc=desc or f"Extracting {modality} embeddings", unit="utt") as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            inputs = processor(conversations=[[{key: utterances[i]}] for i in chunk], modalities=[modality])
            inputs = {k: v.to(model.device) for k, v in inputs.items() if k in INPUT_NAMES[modality]}
            mask = torch.ones(len(chunk), 1, dtype=torch.bool, device=model.device)
            embeds = model.embed_utterances(modality, mask, **inputs)[:, 0]
            if modality == "text" and model.text_views is not None:
                embeds = embeds[:, 0]  # each text goes in as the transcript view
            embeds = embeds.float().cpu().numpy()
            for i, vector in zip(chunk, embeds):
                vectors[i] = vector
            progress.update(len(chunk))
    model.train(was_training)
    return vectors


def cached_embeddings(model, processor, modality: str, dataset: Dataset, cache: "EmbeddingCache",
                      batch_size: int = 16, stats: CacheStats | None = None, desc: str = "",
                      weights: str | None = None) -> Dataset:
    """`<modality>_embeds` (per turn; zeros where absent) and `<modality>_present` (per turn 1/0) columns aligned with
    `dataset`'s rows, read from the cache and extracting only the utterances it lacks."""
    stats = stats if stats is not None else CacheStats()
    entry = cache.entry(extraction_settings(model, processor, modality, weights))
    views = [_utterances(dataset, column) for column in _columns(model, modality)]
    keys = [[utterance_key(modality, value) for _, _, value in view] for view in views]
    index, table = cache.read(entry)
    missing = sorted({k: value for view, view_keys in zip(views, keys) for k, (_, _, value) in zip(view_keys, view)
                      if k not in index}.items())
    if missing:
        start = time.perf_counter()
        vectors = extract_embeddings(model, processor, modality, [u for _, u in missing], batch_size, desc)
        cache.append(entry, [k for k, _ in missing], vectors)
        stats.extraction_seconds += time.perf_counter() - start
        stats.utterances_embedded += len(missing)
        index, table = cache.read(entry)
    total = sum(len(view) for view in views)
    stats.cached_utterances += total - len(missing)

    shape = model.config.embedding_shape(modality)
    per_view = []
    for view, view_keys in zip(views, keys):
        found = table.select([index[k] for k in view_keys]).with_format("numpy")[:]["embedding"] if view_keys else []
        embeds = [[np.zeros(shape, dtype=np.float32)] * n for n in dataset["num_turns"]]
        present = [[0] * n for n in dataset["num_turns"]]
        for (i, t, _), vector in zip(view, found):
            embeds[i][t], present[i][t] = vector, 1
        per_view.append((embeds, present))
    columns = {f"{modality}_embeds": per_view[0][0], f"{modality}_present": per_view[0][1]}
    vector_type = Value("float32")
    for _ in shape:
        vector_type = List(vector_type)
    features = {f"{modality}_embeds": List(vector_type), f"{modality}_present": List(Value("int8"))}
    if len(per_view) > 1:  # text views: (views, [layers,] dim) per turn, and which views exist
        columns[f"{modality}_embeds"] = [[np.stack(turn) for turn in zip(*rows)] for rows in zip(*(e for e, _ in per_view))]
        columns[f"{modality}_view_present"] = [[list(turn) for turn in zip(*rows)] for rows in zip(*(p for _, p in per_view))]
        features[f"{modality}_embeds"] = List(List(vector_type))
        features[f"{modality}_view_present"] = List(List(Value("int8")))
    return Dataset.from_dict(columns, features=Features(features))


def add_cached_embeddings(
    model, processor, datasets: DatasetDict, cache_dir=None, batch_size: int = 16
) -> tuple[DatasetDict, CacheStats]:
    """Adds `<modality>_embeds` / `<modality>_present` columns to every split, for every modality of the model, from
    the cache or by extracting the missing utterances once. The model's backbones must be frozen."""
    for modality in model.config.modalities:
        if getattr(model, f"{modality}_backbone") is None:
            raise ValueError(f"The model has no {modality} backbone to extract embeddings with.")
        if not getattr(model.config, f"freeze_{modality}_backbone"):
            raise ValueError(f"Caching {modality} embeddings needs a frozen {modality} backbone.")
    cache, stats = EmbeddingCache(cache_dir), CacheStats()
    digests = {m: weights_digest(getattr(model, f"{m}_backbone")) for m in model.config.modalities}
    out = {}
    for split, dataset in datasets.items():
        columns = [
            cached_embeddings(model, processor, m, dataset, cache, batch_size, stats, f"{split}: {m} embeddings",
                              digests[m])
            for m in model.config.modalities
        ]
        out[split] = concatenate_datasets([dataset, *columns], axis=1)
    return DatasetDict(out), stats


def fit_embedding_statistics(model, dataset: Dataset) -> dict[str, int]:
    """Fits the model's embedding standardisation (`config.standardize_embeddings`) on the cached embeddings of
    `dataset` (the training split, as `add_cached_embeddings` returns it): every utterance (and text view) that has
    the modality counts, labelled or not. Returns how many embeddings each modality was fitted on."""
    counts = {}
    for modality, standardizer in model.standardizers.items():
        column, present_column = f"{modality}_embeds", f"{modality}_present"
        if column not in dataset.column_names:
            raise ValueError(
                f"`standardize_embeddings` fits on the training set's cached embeddings, but it has no `{column}` "
                "column: train with frozen backbones on `add_cached_embeddings`'s output, or call "
                "`model.fit_embedding_statistics` with embeddings of your own.")
        view_column = f"{modality}_view_present" if f"{modality}_view_present" in dataset.column_names else None
        shape = tuple(standardizer.mean.shape)
        rows = []
        for row in dataset.with_format("numpy", columns=[column, present_column, *([view_column] if view_column else [])]):
            present = np.asarray(row[present_column], dtype=bool)
            embeds = np.asarray(row[column], dtype=np.float32)[present]
            if view_column:  # (turns, views, ...) -> the views that exist
                embeds = embeds[np.asarray(row[view_column], dtype=bool)[present]]
            rows.append(embeds.reshape(-1, *shape))
        embeds = torch.from_numpy(np.concatenate(rows)) if rows else torch.empty(0, *shape)
        model.fit_embedding_statistics(modality, embeds)
        counts[modality] = len(embeds)
    return counts


__all__ = ["EmbeddingCache", "CacheStats", "add_cached_embeddings", "cached_embeddings", "extract_embeddings",
           "extraction_settings", "file_digest", "fit_embedding_statistics", "utterance_key", "weights_digest"]
