"""What every corpus loader shares: the conversation schema, validation with clear errors, and the skip report.

A loader reads a corpus as its owners distribute it into *utterance records* (plain dicts with `conversation_id`,
`turn`, `text`, `audio`, `label` and metadata) and hands them to `build_split`, which groups them into one row per
conversation (turns in order) and checks them. Problems raise `CorpusError` naming the file, conversation or label;
with `skip_invalid=True` the offending utterances are left out instead and counted, with the reason, in a
`DataReport`, which `run_erc.py` writes next to the model. Nothing is dropped silently.
"""

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, List, Value

from ..errors import CorpusError


UNLABELLED = -1
"""Label id of an utterance kept for context but not scored (e.g. IEMOCAP's `xxx`); the collator turns it into -100."""

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".mp4", ".opus")




@dataclass
class DataReport:
    """What a loader left out or changed, by split and reason, so that nothing is dropped silently."""

    skipped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    notes: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, split: str, reason: str, example: str) -> None:
        self.skipped[split][reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(example)

    def note(self, message: str) -> None:
        self.notes.append(message)

    @property
    def num_skipped(self) -> int:
        return sum(sum(c.values()) for c in self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "skipped_utterances": self.num_skipped,
            "skipped_by_split": {split: dict(reasons) for split, reasons in self.skipped.items()},
            "examples": dict(self.examples),
            "notes": self.notes,
        }

    def summary(self) -> str:
        lines = [f"{self.num_skipped} utterances skipped"] if self.num_skipped else ["no utterance skipped"]
        for split, reasons in self.skipped.items():
            lines += [f"  {split}: {n} x {reason}" for reason, n in reasons.items()]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def require_file(path: Path, layout: str) -> Path:
    """`path` if it exists, else a `CorpusError` naming it and the layout the loader expects."""
    if not path.exists():
        raise CorpusError(f"Missing {path}. Expected layout:\n{layout}")
    return path


def check_audio(path: str) -> str | None:
    """None when `path` is a readable audio file, else the reason (header check only: cheap)."""
    import soundfile

    if not os.path.isfile(path):
        return "audio file not found"
    try:
        info = soundfile.info(path)
    except Exception as error:  # soundfile raises its own error types, and RuntimeError
        return f"audio cannot be decoded ({type(error).__name__}: {str(error).strip()[:120]})"
    if info.frames == 0:
        return "audio file is empty"
    return None


def conversation_features(label_names: list[str], metadata: dict[str, Value]) -> Features:
    """Schema of a conversation row: ids, texts, audio and image paths (None where absent), labels and metadata,
    per turn."""
    return Features(
        {
            "conversation_id": Value("string"),
            "turns": List(Value("int32")),
            "texts": List(Value("string")),
            "audio": List(Value("string")),
            "images": List(Value("string")),
            "labels": List(ClassLabel(names=list(label_names))),
            **{name: List(value) for name, value in metadata.items()},
            "num_turns": Value("int32"),
        }
    )


def build_split(
    records: list[dict],
    split: str,
    label_names: list[str],
    report: DataReport,
    metadata: dict[str, Value] | None = None,
    skip_invalid: bool = False,
    missing_turns: str = "error",
    source: str = "",
    check_audio_files: bool = True,
) -> Dataset:
    """Groups utterance records into conversations and validates them.

    Args:
        records: dicts with `conversation_id`, `turn` (int), `text` (str or None), `audio` (path or None), optionally
            `image` (path of one frame of the utterance, or None),
            `label` (a name from `label_names`, or None for an unlabelled utterance) and the `metadata` keys.
        split: split name, for messages and the report.
        label_names: the label set, in id order.
        report: where skipped utterances are counted.
        metadata: extra per-turn columns and their `datasets` types (speaker, sentiment, valence, ...).
        skip_invalid: leave out utterances with an unknown label, an unreadable audio file or a duplicated turn,
            counting them in `report`, instead of raising.
        missing_turns: `"error"` raises on gaps in a conversation's turn numbers; `"allow"` keeps the turns in order
            (for corpora whose official release has gaps, e.g. MELD) and notes how many conversations have them.
        source: the file the records come from, for messages.
        check_audio_files: check that each audio file exists and its header decodes.
    """
    metadata = metadata or {}
    allowed = set(label_names)
    by_conversation: dict[str, dict[int, dict]] = {}
    where = f" in {source}" if source else ""
    for record in records:
        conversation_id, turn = str(record["conversation_id"]), int(record["turn"])
        turns = by_conversation.setdefault(conversation_id, {})
        problem = None
        label = record.get("label")
        if turn in turns:
            problem = ("duplicated turn", f"conversation {conversation_id!r} has turn {turn} twice{where}")
        elif label is not None and label not in allowed:
            problem = ("unknown label", f"unknown label {label!r} in conversation {conversation_id!r}, turn {turn}"
                       f"{where}; allowed: {sorted(allowed)}")
        elif record.get("audio") is not None and check_audio_files and (reason := check_audio(record["audio"])):
            problem = (reason, f"{reason}: {record['audio']} (conversation {conversation_id!r}, turn {turn}){where}")
        elif record.get("image") is not None and not os.path.isfile(record["image"]):
            problem = ("image file not found", f"image file not found: {record['image']} (conversation "
                                               f"{conversation_id!r}, turn {turn}){where}")
        if problem is not None:
            if not skip_invalid:
                raise CorpusError(problem[1] + " (pass skip_invalid=True / --skip_invalid to leave such utterances out)")
            report.skip(split, problem[0], problem[1])
            continue
        turns[turn] = record

    rows, gapped = [], 0
    for conversation_id, turns in by_conversation.items():
        if not turns:
            continue
        order = sorted(turns)
        if order != list(range(order[0], order[0] + len(order))):
            if missing_turns == "error":
                missing = sorted(set(range(order[0], order[-1] + 1)) - set(order))
                raise CorpusError(f"conversation {conversation_id!r}{where} is missing turns {missing}")
            gapped += 1
        utterances = [turns[t] for t in order]
        rows.append(
            {
                "conversation_id": conversation_id,
                "turns": order,
                "texts": [u.get("text") for u in utterances],
                "audio": [u.get("audio") for u in utterances],
                "images": [u.get("image") for u in utterances],
                "labels": [label_names.index(u["label"]) if u.get("label") is not None else UNLABELLED
                           for u in utterances],
                **{name: [u.get(name) for u in utterances] for name in metadata},
                "num_turns": len(utterances),
            }
        )
    if gapped:
        report.note(f"{split}: {gapped} conversations have gaps in their turn numbers in the source; turns kept in order")
    if not rows:
        raise CorpusError(f"No conversations in split {split!r}{where}.")
    return Dataset.from_list(rows, features=conversation_features(label_names, metadata))


def find_audio(folder: Path, stem: str) -> str | None:
    """The first file `folder/stem.<audio suffix>` that exists, or None."""
    for suffix in AUDIO_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.exists():
            return str(candidate)
    return None


__all__ = [
    "UNLABELLED",
    "CorpusError",
    "DataReport",
    "build_split",
    "check_audio",
    "conversation_features",
    "find_audio",
    "require_file",
]
