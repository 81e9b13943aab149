"""What every corpus loader shares: the conversation schema, validation with clear errors, and the skip report.

A loader reads a corpus as its owners distribute it into *utterance records* (plain dicts with `conversation_id`,
`turn`, `text`, `audio`, `label` and metadata) and hands them to `build_split`, which groups them into one row per
conversation (turns in order; gaps in the turn numbers are allowed and recorded) and checks them. Problems raise
`CorpusError` naming the file, line, conversation or label; with `skip_invalid=True` the offending utterances (or
source rows) are left out instead and counted, with the reason, in a `DataReport`, which `run_erc.py` writes next to
the model. Nothing is dropped silently. `read_csv` and `read_text` are the one way loaders read their text files:
UTF-8 (a byte-order mark ignored), every CSV row with as many fields as the header.
"""

import csv
import io
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, List, Value

from ..atomic import atomic_write_json
from ..errors import CorpusError


UNLABELLED = -1
"""Label id of an utterance kept for context but not scored (e.g. IEMOCAP's `xxx`); the collator turns it into -100."""

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".mp4", ".opus")

MAX_LISTED = 20
"""How many conversations (and, per conversation, missing turn numbers) a report lists; its counts stay exact."""

RESERVED_COLUMNS = ("conversation_id", "turns", "texts", "audio", "images", "labels", "num_turns", "turn", "text",
                    "image", "label", "_line")
"""Names a metadata column cannot take: they are the conversation schema's own columns or an utterance record's keys."""


@dataclass
class DataReport:
    """What a loader left out, changed or found unusual, by split and reason, so that nothing is dropped silently.

    `skipped[split][reason]` counts the utterances (or source rows) left out under `skip_invalid`, with up to five
    messages per reason in `examples`; `turn_gaps[split]` counts the conversations whose turn numbers skip values
    (kept in turn order) and lists up to `MAX_LISTED` of them with their missing turn numbers; `notes` says the rest.
    A split key may be a source file's name when a bad row belongs to no split yet (e.g. EmoDB's `metadata.csv`).
    """

    skipped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    notes: list[str] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    turn_gaps: dict[str, dict] = field(default_factory=dict)

    def skip(self, split: str, reason: str, example: str) -> None:
        self.skipped[split][reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(example)

    def invalid(self, split: str, reason: str, message: str, skip_invalid: bool, what: str = "utterances") -> None:
        """One bad utterance or row: a `CorpusError` with `message` (and how to skip such `what`), or, with
        `skip_invalid`, counted under `split` and `reason` and left out by the caller."""
        if not skip_invalid:
            raise CorpusError(f"{message} (pass skip_invalid=True / --skip_invalid to leave such {what} out)")
        self.skip(split, reason, message)

    def turn_gap(self, split: str, conversation_id: str, missing: list[int], num_missing: int) -> None:
        """Records that `conversation_id` lacks `num_missing` turn numbers between its first and last turn
        (`missing`: the first of them, at most `MAX_LISTED`)."""
        gaps = self.turn_gaps.setdefault(split, {"conversations": 0, "listed": {}})
        gaps["conversations"] += 1
        if len(gaps["listed"]) < MAX_LISTED:
            gaps["listed"][conversation_id] = {"missing_turns": missing[:MAX_LISTED], "num_missing": num_missing}

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
            "turn_gaps": {split: {"conversations": gaps["conversations"], "listed": dict(gaps["listed"])}
                          for split, gaps in self.turn_gaps.items()},
            "notes": self.notes,
        }

    def summary(self) -> str:
        lines = [f"{self.num_skipped} utterances skipped"] if self.num_skipped else ["no utterance skipped"]
        for split, reasons in self.skipped.items():
            lines += [f"  {split}: {n} x {reason}" for reason, n in reasons.items()]
        for split, gaps in self.turn_gaps.items():
            first, detail = next(iter(gaps["listed"].items()))
            shown = detail["missing_turns"][:5] + (["..."] if detail["num_missing"] > 5 else [])
            lines.append(f"  {split}: {gaps['conversations']} conversations have gaps in their turn numbers, kept in "
                         f"turn order (e.g. {first!r} lacks turns {', '.join(map(str, shown))}; "
                         f"{len(gaps['listed'])} listed in data_report.json)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def save(self, path: str | os.PathLike) -> None:
        """Writes `to_dict()` as strict JSON, atomically (a kill leaves the old report or the new one)."""
        atomic_write_json(path, self.to_dict())


def require_file(path: Path, layout: str) -> Path:
    """`path` if it is a file, else a `CorpusError` naming it and the layout the loader expects."""
    if not Path(path).is_file():
        what = "is a folder, not a file" if Path(path).is_dir() else "not found"
        raise CorpusError(f"{path} {what}. Expected layout:\n{layout}")
    return Path(path)


def require_folder(path: Path, layout: str) -> Path:
    """`path` if it is a folder, else a `CorpusError` naming it and the layout the loader expects."""
    if not Path(path).is_dir():
        what = "is a file, not a folder" if Path(path).exists() else "not found"
        raise CorpusError(f"{path} {what}. Expected layout:\n{layout}")
    return Path(path)


def read_text(path: Path, on_invalid=None) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped). Bytes that are not UTF-8 raise a `CorpusError`
    naming the file, line and byte; with `on_invalid` (a callable taking that message) they are replaced by U+FFFD
    instead, and `on_invalid` is told once."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        message = (f"{path}, line {line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                   "save the file as UTF-8")
        if on_invalid is None:
            raise CorpusError(message) from None
        on_invalid(message)
        return raw.decode("utf-8-sig", errors="replace")


def read_csv(
    path: Path,
    required: tuple[str, ...],
    layout: str,
    report: DataReport,
    split: str,
    skip_invalid: bool = False,
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and rows of a CSV file with a header line, each row as `(line, {column: value})`.

    `line` is the physical line where the row starts (a quoted field may span lines). A row with more or fewer fields
    than the header (typically an unquoted comma in a text) is an error naming the file and line, or, with
    `skip_invalid`, counted in `report` under `split` and left out. File-level problems are always errors: not
    UTF-8, broken quoting, no header, duplicated or empty column names, a `required` column missing, no rows. Header
    names are stripped of surrounding spaces; a UTF-8 byte-order mark is ignored; blank lines are skipped.
    """
    text = read_text(require_file(path, layout))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows, previous, skipped = None, [], 0, 0
    try:
        for fields in reader:
            line, previous = previous + 1, reader.line_num
            if not any(field.strip() for field in fields):
                continue  # a blank line, or a row of empty fields: no data
            if header is None:
                header = [name.strip() for name in fields]
                _check_header(path, header, required, layout)
                continue
            if len(fields) != len(header):
                report.invalid(split, "wrong number of fields",
                               f"{path}, line {line}: {len(fields)} fields where the header has {len(header)} "
                               f"({','.join(header)}); a value holding a comma or a double quote must be quoted, "
                               'e.g. "oh, no" (a quote inside it doubled: "say ""hi""")', skip_invalid, what="rows")
                skipped += 1
                continue
            rows.append((line, dict(zip(header, fields))))
    except csv.Error as error:
        raise CorpusError(f"{path}, line {previous + 1}: broken CSV quoting ({error}); a value that starts with a "
                          'double quote must end with one, and a quote inside it is doubled ("")') from None
    if header is None:
        raise CorpusError(f"{path} is empty (no header line). Expected:\n{layout}")
    if not rows and not skipped:
        raise CorpusError(f"{path} holds only a header ({','.join(header)}), no rows.")
    return header, rows


def _check_header(path: Path, header: list[str], required: tuple[str, ...], layout: str) -> None:
    if "" in header:
        raise CorpusError(f"{path}, line 1: column {header.index('') + 1} has no name (header: {','.join(header)}); "
                          "name every column (a spreadsheet index column? write the file without it)")
    duplicated = sorted(name for name, n in Counter(header).items() if n > 1)
    if duplicated:
        raise CorpusError(f"{path}, line 1: the columns {duplicated} appear more than once in the header")
    missing = [name for name in required if name not in header]
    if missing:
        raise CorpusError(f"{path} lacks the columns {missing} (its header: {','.join(header)}). Expected:\n{layout}")


def check_label_names(label_names, source: str = "") -> list[str]:
    """`label_names` as a list, or a `CorpusError` if it is empty or holds a non-string, a blank name, a name with
    surrounding spaces or a duplicate (each would make a class that no label matches, or two ids for one class)."""
    where = f" ({source})" if source else ""
    if isinstance(label_names, str) or not label_names:
        raise CorpusError(f"label_names{where} must be a non-empty list of names, got {label_names!r}")
    label_names = list(label_names)
    bad = [name for name in label_names if not isinstance(name, str) or not name.strip() or name != name.strip()]
    if bad:
        raise CorpusError(f"label_names{where} holds {bad!r}: every name is a non-empty string without surrounding "
                          f"spaces (got {label_names!r})")
    duplicated = sorted(name for name, n in Counter(label_names).items() if n > 1)
    if duplicated:
        raise CorpusError(f"label_names{where} holds {duplicated} more than once (got {label_names!r})")
    return label_names


def check_audio(path: str) -> str | None:
    """None when `path` is a readable audio file, else the reason (header checks only: cheap). A WAV whose data chunk
    is cut short is caught here, since libsndfile would decode it silently up to where it ends."""
    import soundfile

    from ..processing_mister_e import wav_truncation

    if not os.path.isfile(path):
        return "audio file not found"
    try:
        info = soundfile.info(path)
    except Exception as error:  # soundfile raises its own error types, and RuntimeError
        return f"audio cannot be decoded ({type(error).__name__}: {str(error).strip()[:120]})"
    if info.frames == 0:
        return "audio file is empty"
    if wav_truncation(path):
        return "audio file is truncated (its WAV data chunk is cut short)"
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
    source: str = "",
    check_audio_files: bool = True,
) -> Dataset:
    """Groups utterance records into conversations, turns in order, and validates them.

    Turn numbers order a conversation's utterances; they need not be contiguous (corpora filtered upstream skip
    some): conversations with gaps are kept in turn order and recorded in `report.turn_gaps`. A turn given twice is an
    error.

    Args:
        records: dicts with `conversation_id` (a non-empty string), `turn` (an int in [0, 2**31)), `text` (str or
            None), `audio` (path or None), optionally `image` (path of one frame of the utterance, or None),
            `label` (a name from `label_names`, or None for an unlabelled utterance), the `metadata` keys and
            `_line` (where the record is in `source`, for messages).
        split: split name, for messages and the report.
        label_names: the label set, in id order (non-empty, distinct names without surrounding spaces).
        report: where skipped utterances and turn gaps are recorded.
        metadata: extra per-turn columns and their `datasets` types (speaker, sentiment, valence, ...); their names
            cannot be those of `RESERVED_COLUMNS`.
        skip_invalid: leave out utterances with an invalid id or turn, an unknown label, an unreadable audio file or a
            duplicated turn, counting them in `report`, instead of raising.
        source: the file the records come from, for messages.
        check_audio_files: check that each audio file exists and its header decodes.
    """
    metadata = metadata or {}
    label_names = check_label_names(label_names, source)
    clashing = sorted(set(metadata) & set(RESERVED_COLUMNS))
    if clashing:
        raise CorpusError(f"metadata columns {clashing}{' of ' + source if source else ''} clash with the "
                          f"conversation schema; rename them (reserved: {list(RESERVED_COLUMNS)})")
    label_ids = {name: i for i, name in enumerate(label_names)}
    by_conversation: dict[str, dict[int, dict]] = {}
    for record in records:
        problem = _record_problem(record, label_ids, by_conversation, source, check_audio_files)
        if problem is not None:
            report.invalid(split, *problem, skip_invalid)
            continue
        by_conversation.setdefault(record["conversation_id"], {})[record["turn"]] = record

    rows = []
    for conversation_id, turns in by_conversation.items():
        order = sorted(turns)
        if order[-1] - order[0] + 1 != len(order):
            missing = _missing_turns(order)
            report.turn_gap(split, conversation_id, missing, order[-1] - order[0] + 1 - len(order))
        utterances = [turns[t] for t in order]
        rows.append(
            {
                "conversation_id": conversation_id,
                "turns": order,
                "texts": [u.get("text") for u in utterances],
                "audio": [u.get("audio") for u in utterances],
                "images": [u.get("image") for u in utterances],
                "labels": [label_ids[u["label"]] if u.get("label") is not None else UNLABELLED for u in utterances],
                **{name: [u.get(name) for u in utterances] for name in metadata},
                "num_turns": len(utterances),
            }
        )
    if not rows:
        raise CorpusError(f"No conversations in split {split!r}{' in ' + source if source else ''}.")
    return Dataset.from_list(rows, features=conversation_features(label_names, metadata))


def _record_problem(record: dict, label_ids: dict, seen: dict, source: str, check_audio_files: bool):
    """`(reason, message)` of what is wrong with one utterance record, or None."""
    conversation_id, turn, label = record.get("conversation_id"), record.get("turn"), record.get("label")
    where = (f" in {source}" if source else "") + (f", line {record['_line']}" if record.get("_line") else "")
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        return "invalid conversation_id", (f"conversation_id {conversation_id!r}{where}: must be a non-empty string "
                                           f"(turn {turn!r})")
    if not isinstance(turn, int) or isinstance(turn, bool) or not 0 <= turn < 2**31:
        return "invalid turn", (f"conversation {conversation_id!r}{where}: turn {turn!r} is not an integer in "
                                "[0, 2**31)")
    at = f"conversation {conversation_id!r}, turn {turn}{where}"
    if turn in seen.get(conversation_id, {}):
        return "duplicated turn", f"conversation {conversation_id!r} has turn {turn} twice{where}"
    if label is not None and label not in label_ids:
        return "unknown label", f"unknown label {label!r} in {at}; allowed: {sorted(label_ids)}"
    if record.get("audio") is not None and check_audio_files and (reason := check_audio(record["audio"])):
        return reason, f"{reason}: {record['audio']} ({at})"
    if record.get("image") is not None and not os.path.isfile(record["image"]):
        return "image file not found", f"image file not found: {record['image']} ({at})"
    return None


def _missing_turns(order: list[int]) -> list[int]:
    """The first `MAX_LISTED` turn numbers absent between consecutive turns of sorted, distinct `order`."""
    missing = []
    for before, after in zip(order, order[1:]):
        missing.extend(range(before + 1, min(after, before + 1 + MAX_LISTED - len(missing))))
        if len(missing) >= MAX_LISTED:
            break
    return missing


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
    "MAX_LISTED",
    "build_split",
    "check_audio",
    "check_label_names",
    "read_csv",
    "read_text",
    "require_folder",
    "conversation_features",
    "find_audio",
    "require_file",
]
