"""Embedding cache: with frozen backbones, each utterance's speech and text embeddings are computed once.

A cache entry holds one modality's pooled embeddings for every utterance of one dataset split, as a `datasets` Arrow
dataset on disk (one row per conversation, in the split's order). Its key is a digest of everything the embeddings
depend on: the backbone (name and a digest of its weights, so a fine-tuned or other revision never hits a stale
entry), the pooling, the processor settings, and the data (conversation ids, texts, audio paths with their file
sizes and modification times). A second run with the same backbones and data reads the entries and extracts nothing.
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)

CACHE_FORMAT = 1
"""Bump when the way embeddings are computed changes, so that old entries are not reused."""

DEFAULT_CACHE_DIR = Path(os.environ.get("MISTER_E_CACHE", Path.home() / ".cache" / "mister_e_hf" / "embeddings"))


def _digest(*parts) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    for part in parts:
        hasher.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def weights_digest(module: torch.nn.Module) -> str:
    """Digest of a module's parameters and buffers (names, shapes, dtypes, values)."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def data_digest(dataset: Dataset, modality: str) -> str:
    """Digest of what a modality's embeddings are computed from: ids and texts, or audio paths and file stats."""
    hasher = hashlib.blake2b(digest_size=16)
    columns = ["conversation_id", "texts"] if modality == "text" else ["conversation_id", "audio"]
    for row in dataset.select_columns(columns):
        hasher.update(json.dumps(row[columns[0]]).encode())
        for value in row[columns[1]]:
            stat = os.stat(value) if modality == "speech" and value is not None and os.path.exists(value) else None
            hasher.update(json.dumps([value, stat.st_size if stat else None, stat.st_mtime_ns if stat else None]).encode())
    return hasher.hexdigest()


def _processor_settings(processor, modality: str) -> dict:
    if modality == "speech":
        return processor.feature_extractor.to_dict()
    return {"tokenizer": type(processor.tokenizer).__name__, "vocab": len(processor.tokenizer),
            "name": processor.tokenizer.name_or_path, "max_text_length": processor.max_text_length}


@dataclass
class CacheStats:
    """What `add_cached_embeddings` did: entries read and written, utterances embedded, seconds spent extracting."""

    hits: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    utterances_embedded: int = 0
    extraction_seconds: float = 0.0


class EmbeddingCache:
    """A folder of cache entries, each `<modality>-<key>/` (an Arrow dataset) with a `key.json` describing it."""

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR

    def key(self, model, processor, modality: str, dataset: Dataset, weights: str | None = None) -> tuple[str, dict]:
        """The entry's key and what it was computed from; `weights` is the backbone's `weights_digest` if known."""
        config = model.config
        description = {
            "format": CACHE_FORMAT,
            "modality": modality,
            "backbone": getattr(config, f"{modality}_backbone_name_or_path"),
            "backbone_type": config.backbone_config(modality).model_type,
            "weights": weights or weights_digest(getattr(model, f"{modality}_backbone")),
            "pooling": config.speech_pooling if modality == "speech" else model.text_pooling,
            "processor": _processor_settings(processor, modality),
            "data": data_digest(dataset, modality),
            "num_conversations": len(dataset),
        }
        return _digest(description), description

    def path(self, modality: str, key: str) -> Path:
        return self.cache_dir / f"{modality}-{key}"

    def embeddings(self, model, processor, modality, dataset, batch_size=16, stats=None, desc="", weights=None) -> Dataset:
        """The cached `(<modality>_embeds, <modality>_present)` columns for `dataset`, extracting them if needed."""
        key, description = self.key(model, processor, modality, dataset, weights)
        path = self.path(modality, key)
        if (path / "key.json").exists():
            if stats is not None:
                stats.hits.append(str(path))
            return load_from_disk(str(path / "data"))
        start = time.perf_counter()
        table = extract_embeddings(model, processor, modality, dataset, batch_size, desc=desc)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        table.save_to_disk(str(tmp / "data"))
        (tmp / "key.json").write_text(json.dumps(description, indent=2, default=str) + "\n")
        if path.exists():  # written meanwhile by a concurrent run with the same key: identical content
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
        if stats is not None:
            stats.misses.append(str(path))
            stats.extraction_seconds += time.perf_counter() - start
            stats.utterances_embedded += sum(sum(row) for row in table[f"{modality}_present"])
        return load_from_disk(str(path / "data"))


def _utterance_length(modality: str, text: str | None, audio: str | None) -> float:
    if modality == "text":
        return len(text or "")
    import soundfile

    info = soundfile.info(audio)
    return info.frames / info.samplerate


@torch.no_grad()
def extract_embeddings(model, processor, modality: str, dataset: Dataset, batch_size: int = 16, desc: str = "") -> Dataset:
    """Pooled backbone embeddings of every utterance of `dataset` that has `modality`, batched by similar length.

    Returns a dataset aligned with `dataset`'s rows: `<modality>_embeds` (per turn a vector, zeros where the
    modality is absent) and `<modality>_present` (per turn 1/0).
    """
    source = "texts" if modality == "text" else "audio"
    rows = dataset.select_columns(["texts", "audio"])
    items = [
        (i, t, text, audio)
        for i, row in enumerate(rows)
        for t, (text, audio) in enumerate(zip(row["texts"], row["audio"]))
        if row[source][t] is not None
    ]
    items.sort(key=lambda item: _utterance_length(modality, item[2], item[3]))
    was_training = model.training
    model.eval()
    vectors: dict[tuple[int, int], np.ndarray] = {}
    progress = tqdm(total=len(items), desc=desc or f"Extracting {modality} embeddings", unit="utt")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = processor(conversations=[[{"text": text, "audio": audio}] for _, _, text, audio in chunk])
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        names = ("input_values", "input_features", "speech_attention_mask") if modality == "speech" else (
            "input_ids", "text_attention_mask")
        embeds = model.embed_utterances(modality, torch.ones(len(chunk), 1, dtype=torch.bool, device=model.device),
                                        **{k: inputs[k] for k in names if k in inputs})
        for (i, t, _, _), vector in zip(chunk, embeds[:, 0].float().cpu().numpy()):
            vectors[(i, t)] = vector
        progress.update(len(chunk))
    progress.close()
    model.train(was_training)
    dim = next(iter(vectors.values())).shape[0] if vectors else model.config.embed_dim(modality)
    zeros = np.zeros(dim, dtype=np.float32)
    columns = {f"{modality}_embeds": [], f"{modality}_present": []}
    for i, row in enumerate(rows):
        turns = range(len(row["texts"]))
        columns[f"{modality}_embeds"].append([vectors.get((i, t), zeros) for t in turns])
        columns[f"{modality}_present"].append([int((i, t) in vectors) for t in turns])
    features = Features({f"{modality}_embeds": List(List(Value("float32"))), f"{modality}_present": List(Value("int8"))})
    return Dataset.from_dict(columns, features=features)


def add_cached_embeddings(
    model, processor, datasets: DatasetDict, cache_dir=None, batch_size: int = 16
) -> tuple[DatasetDict, CacheStats]:
    """Adds `<modality>_embeds` / `<modality>_present` columns to every split, for every modality of the model that
    has a backbone, from the cache or by extracting them once. The model must have frozen backbones."""
    cache, stats = EmbeddingCache(cache_dir), CacheStats()
    for modality in model.config.modalities:
        if getattr(model, f"{modality}_backbone") is None:
            raise ValueError(f"The model has no {modality} backbone to extract embeddings with.")
        if not getattr(model.config, f"freeze_{modality}_backbone"):
            raise ValueError(f"Caching {modality} embeddings needs a frozen {modality} backbone.")
    digests = {m: weights_digest(getattr(model, f"{m}_backbone")) for m in model.config.modalities}
    out = {}
    for split, dataset in datasets.items():
        columns = [dataset] + [
            cache.embeddings(model, processor, m, dataset, batch_size, stats, desc=f"{split}: {m} embeddings",
                             weights=digests[m])
            for m in model.config.modalities
        ]
        out[split] = concatenate_datasets(columns, axis=1)
    return DatasetDict(out), stats


__all__ = ["EmbeddingCache", "CacheStats", "add_cached_embeddings", "extract_embeddings", "weights_digest"]
