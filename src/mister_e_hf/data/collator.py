"""Batches conversation rows into model inputs: raw audio and text through the processor, or cached embeddings."""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConversationInputError, MisterEError
from ..modalities import MODALITIES, MODALITY_TABLE
from .common import UNLABELLED


EMBEDDING_MODALITIES = MODALITIES
PER_TURN_COLUMNS = (*(m.column for m in MODALITY_TABLE.values() if m.column != "texts"), "labels", "turns")
"""Row columns that hold one value per turn (besides `texts`, embeddings and label / text-view columns)."""


@dataclass
class DataCollatorForConversations:
    """Collates rows of a conversation dataset (`texts`, `audio`, optional `images`, `labels`, ...) for
    [`MisterEModel`].

    Rows that carry cached embeddings (`speech_embeds` / `text_embeds` with `speech_present` / `text_present`, as
    written by `cache.add_cached_embeddings`) are batched in embeddings mode, without touching audio or text. Other
    rows go through the processor (audio paths are decoded there). Labels become `(batch, utterances)` ids with -100
    for padding and unlabelled utterances.

    Every row is checked first: each per-turn column must have one value per turn, labels must be class ids, values
    numbers, embeddings finite. Problems, including the processor's, raise errors naming the conversation id and
    turn number (not batch positions).

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
        self._check_rows(rows)
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
                raise MisterEError("Rows without cached embeddings need a processor to collate raw audio and text.")
            views = [v for v in getattr(self.processor, "text_views", ["text"]) if v != "text"]
            absent = [v for v in views if v not in rows[0]]
            if absent:
                raise MisterEError(f"The processor reads the text views {self.processor.text_views}, but the rows "
                                   f"have no column {absent} (they have {sorted(rows[0])}).")
            conversations = [
                [
                    {**{spec.key: (row.get(spec.column) or [None] * len(row["texts"]))[t]
                        for spec in MODALITY_TABLE.values()}, **{v: row[v][t] for v in views}}
                    for t in range(len(row["texts"]))
                ]
                for row in rows
            ]
            try:
                batch = dict(self.processor(conversations=conversations, return_tensors="pt"))
            except ConversationInputError as error:
                if error.conversation is None:
                    raise
                raise error.named(self._where(rows, error.conversation, error.utterance)) from None
        if self.label_columns:
            batch["labels"] = self._values(rows, turns)
        elif self.label_column in rows[0]:
            batch["labels"] = self._labels(rows, turns)
        return batch

    # ------------------------------------------------------------------------------------------------ checks
    @staticmethod
    def _where(rows, b: int, t: int | None = None) -> str:
        """`conversation 'dia3'` (and `, turn 7`: the turn number the corpus gave) of batch position (b, t)."""
        row = rows[b]
        name = f"conversation {row['conversation_id']!r}" if "conversation_id" in row else f"conversation {b} of the batch"
        if t is None:
            return name
        turns = row.get("turns")
        return f"{name}, turn {turns[t] if isinstance(turns, (list, tuple)) and t < len(turns) else t}"

    def _check_rows(self, rows) -> None:
        if not isinstance(rows, (list, tuple)) or not rows:
            raise MisterEError(f"The collator needs a non-empty list of conversation rows, got "
                               f"{'an empty batch' if isinstance(rows, (list, tuple)) else type(rows).__name__}.")
        views = [v for v in getattr(self.processor, "text_views", ["text"]) if v != "text"]
        per_turn = [*PER_TURN_COLUMNS, *views, *(self.label_columns or []), self.label_column]
        for b, row in enumerate(rows):
            if not isinstance(row, dict):
                raise MisterEError(f"Row {b} of the batch is a {type(row).__name__}, not a conversation row (dict).")
            if not isinstance(row.get("texts"), (list, tuple)):
                raise MisterEError(f"{self._where(rows, b)}: the row has no per-turn `texts` list (its columns: "
                                   f"{sorted(row)}); rows come from a mister_e_hf corpus loader.")
            if not row["texts"]:
                raise MisterEError(f"{self._where(rows, b)}: the conversation has no turns.")
            n = len(row["texts"])
            columns = [c for c in row if c in per_turn or c.endswith(("_embeds", "_present"))]
            first = {c for c in rows[0] if c in per_turn or c.endswith(("_embeds", "_present"))}
            if b and set(columns) != first:
                differ = sorted(set(columns) ^ first)
                raise MisterEError(f"{self._where(rows, b)}: the row's per-turn columns differ from the batch's first "
                                   f"row's in {differ}; every row of a batch needs the same columns.")
            for column in columns:
                value = row[column]
                if value is None and column in PER_TURN_COLUMNS[:-2]:  # a modality column the corpus lacks
                    continue
                if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != n:
                    size = len(value) if isinstance(value, (list, tuple, np.ndarray)) else type(value).__name__
                    raise MisterEError(f"{self._where(rows, b)}: `{column}` has {size} entries for the conversation's "
                                       f"{n} turns (`texts`); every per-turn column needs one entry per turn.")

    @staticmethod
    def _stack(rows, column: str, turns: int, dtype) -> torch.Tensor:
        """A per-turn column of arrays, zero-padded to `(batch, turns, ...)`."""
        shape = np.asarray(rows[0][column][0]).shape  # e.g. (dim,), (layers, dim), (views, dim)
        stacked = np.zeros((len(rows), turns, *shape), dtype=dtype)
        for b, row in enumerate(rows):
            values = np.asarray(row[column], dtype=dtype)
            if values.shape[1:] != shape:
                raise MisterEError(f"{DataCollatorForConversations._where(rows, b)}: `{column}` entries have shape "
                                   f"{values.shape[1:]}, but the batch's first row has {shape}.")
            stacked[b, : len(values)] = values
        return torch.from_numpy(stacked)

    def _stack_embeddings(self, rows, modality, turns):
        embeds = self._stack(rows, f"{modality}_embeds", turns, np.float32)
        present = self._stack(rows, f"{modality}_present", turns, np.int64)
        used = present.bool() if present.dim() == 2 else present.bool().any(-1)
        finite = torch.isfinite(embeds).flatten(2).all(-1) | ~used
        if not finite.all():
            b, t = (~finite).nonzero()[0].tolist()
            raise MisterEError(f"{self._where(rows, b, t)}: the cached {modality} embedding holds NaN or infinite "
                               "values.")
        embeds[~used] = 0.0  # what an absent modality's slot holds, whatever the row had there
        return embeds, present

    def _values(self, rows, turns) -> torch.Tensor:
        missing = [c for c in self.label_columns if c not in rows[0]]
        if missing:
            raise MisterEError(f"The dataset has no column {missing[0]!r} for the regression labels; it has "
                               f"{sorted(rows[0])}.")
        values = torch.full((len(rows), turns, len(self.label_columns)), float("nan"))
        for b, row in enumerate(rows):
            for d, column in enumerate(self.label_columns):
                for t, value in enumerate(row[column]):
                    if value is None or (isinstance(value, str) and not value.strip()):
                        continue
                    try:
                        number = float(value)
                    except (TypeError, ValueError):
                        raise MisterEError(f"{self._where(rows, b, t)}: `{column}` value {value!r} is not a number."
                                           ) from None
                    if isinstance(value, bool) or math.isinf(number):
                        raise MisterEError(f"{self._where(rows, b, t)}: `{column}` value {value!r} is not a finite "
                                           "number.")
                    values[b, t, d] = number
        return values

    def _labels(self, rows, turns) -> torch.Tensor:
        labels = torch.full((len(rows), turns), -100, dtype=torch.long)
        for b, row in enumerate(rows):
            ids = []
            for t, value in enumerate(row[self.label_column]):
                integral = isinstance(value, (int, np.integer)) or (
                    isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer())
                if isinstance(value, (bool, np.bool_)) or not integral or not -100 <= value < 2 ** 31:
                    raise MisterEError(f"{self._where(rows, b, t)}: label {value!r} is not a class id (an integer "
                                       f"from 0; {UNLABELLED} or -100 for an unlabelled turn).")
                ids.append(int(value))
            values = torch.tensor(ids, dtype=torch.long)
            labels[b, : len(values)] = values.masked_fill(values == UNLABELLED, -100)
        return labels


__all__ = ["DataCollatorForConversations"]
