"""Batches conversation rows into model inputs: raw audio and text through the processor, or cached embeddings."""

from dataclasses import dataclass

import numpy as np
import torch

from .common import UNLABELLED


EMBEDDING_MODALITIES = ("speech", "text", "visual")


@dataclass
class DataCollatorForConversations:
    """Collates rows of a conversation dataset (`texts`, `audio`, optional `images`, `labels`, ...) for
    [`MisterEModel`].

    Rows that carry cached embeddings (`speech_embeds` / `text_embeds` with `speech_present` / `text_present`, as
    written by `cache.add_cached_embeddings`) are batched in embeddings mode, without touching audio or text. Other
    rows go through the processor (audio paths are decoded there). Labels become `(batch, utterances)` ids with -100
    for padding and unlabelled utterances.

    Args:
        processor: a [`MisterEProcessor`]; needed for rows without cached embeddings.
        label_column: the per-turn class label column.
        label_columns: for a regression head, the per-turn numeric columns (e.g. `valence`, `arousal`); labels are
            then `(batch, utterances, dimensions)` floats, NaN for padding and missing values.
    """

    processor: object | None = None
    label_column: str = "labels"
    label_columns: list[str] | None = None

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        turns = max(len(row["texts"]) for row in rows)
        utterance_mask = torch.zeros(len(rows), turns, dtype=torch.long)
        for b, row in enumerate(rows):
            utterance_mask[b, : len(row["texts"])] = 1
        cached = [m for m in EMBEDDING_MODALITIES if f"{m}_embeds" in rows[0]]
        if cached:
            batch = {"utterance_mask": utterance_mask}
            for modality in cached:
                batch[f"{modality}_embeds"], batch[f"{modality}_mask"] = self._stack_embeddings(rows, modality, turns)
            if "text_view_present" in rows[0]:
                batch["text_view_mask"] = self._stack(rows, "text_view_present", turns, np.int64)
        else:
            if self.processor is None:
                raise ValueError("Rows without cached embeddings need a processor to collate raw audio and text.")
            views = [v for v in getattr(self.processor, "text_views", ["text"]) if v != "text"]
            conversations = [
                [
                    {"text": text, "audio": audio, "image": image, **{v: row[v][t] for v in views if v in row}}
                    for t, (text, audio, image) in enumerate(zip(
                        row["texts"], row.get("audio") or [None] * len(row["texts"]),
                        row.get("images") or [None] * len(row["texts"])))
                ]
                for row in rows
            ]
            batch = dict(self.processor(conversations=conversations, return_tensors="pt"))
        if self.label_columns:
            batch["labels"] = self._values(rows, turns)
        elif self.label_column in rows[0]:
            batch["labels"] = self._labels(rows, turns)
        return batch

    @staticmethod
    def _stack(rows, column: str, turns: int, dtype) -> torch.Tensor:
        """A per-turn column of arrays, zero-padded to `(batch, turns, ...)`."""
        shape = np.asarray(rows[0][column][0]).shape  # e.g. (dim,), (layers, dim), (views, dim)
        stacked = np.zeros((len(rows), turns, *shape), dtype=dtype)
        for b, row in enumerate(rows):
            stacked[b, : len(row[column])] = np.asarray(row[column], dtype=dtype)
        return torch.from_numpy(stacked)

    def _stack_embeddings(self, rows, modality, turns):
        return (self._stack(rows, f"{modality}_embeds", turns, np.float32),
                self._stack(rows, f"{modality}_present", turns, np.int64))

    def _values(self, rows, turns) -> torch.Tensor:
        missing = [c for c in self.label_columns if c not in rows[0]]
        if missing:
            raise ValueError(f"The dataset has no column {missing[0]!r} for the regression labels; it has "
                             f"{sorted(rows[0])}.")
        values = torch.full((len(rows), turns, len(self.label_columns)), float("nan"))
        for b, row in enumerate(rows):
            for d, column in enumerate(self.label_columns):
                for t, value in enumerate(row[column]):
                    if value is not None and value != "":
                        values[b, t, d] = float(value)
        return values

    def _labels(self, rows, turns) -> torch.Tensor:
        labels = torch.full((len(rows), turns), -100, dtype=torch.long)
        for b, row in enumerate(rows):
            values = torch.tensor(row[self.label_column], dtype=torch.long)
            labels[b, : len(values)] = values.masked_fill(values == UNLABELLED, -100)
        return labels


__all__ = ["DataCollatorForConversations"]
