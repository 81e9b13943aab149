"""What every corpus loader shares: the conversation schema, validation with clear errors, and the skip report.

A loader reads a corpus as its owners distribute it into *utterance records* (plain dicts with `conversation_id`,
`turn`, `text`, `audio`, `label` and metadata) and hands them to `build_split`, which groups them into one row per
conversation (turns in order; gaps in the turn numbers are allowed and recorded) and checks them. Problems raise
`CorpusError` naming the file, line, conversation or label; with `skip_invalid=True` the offending utterances (or
source rows) are left out instead and counted, with the reason, in a `DataReport`, which `run_erc.py` writes next to
the model. Nothing is dropped silently. `read_csv` and `read_text` are the one way loaders read their text files:
UTF-8 (a byte-order mark ignored), every CSV row with as many fields as the header.

Labels are compared exactly. A label set inferred from the data (`infer_label_names`) refuses labels that would make
classes nobody meant: spellings of one label that differ only by case, Unicode form or invisible characters,
invisible characters at either end, and missing-value markers (`MISSING_MARKERS`: `null`, `NaN`, `N/A`, ...; an
unlabelled utterance has an empty label). An explicit label set is the escape hatch: a corpus whose class really is
`none` lists it. Invisible characters are never stripped from a label (with an explicit set, a label that differs
from a name only by them is an unknown label, and the error says which name it resembles).
"""

import csv
import io
import os
import unicodedata
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

RESERVED_SUFFIXES = ("_embeds", "_present", "_mask")
"""Endings a metadata column name cannot have: the embedding cache adds `<modality>_embeds`, `<modality>_present`
and `<modality>_view_present` columns, and the collator reads any such column as cached embeddings (`*_mask` names
model inputs)."""

MISSING_MARKERS = frozenset({"null", "nan", "na", "n/a", "#n/a", "<na>", "none", "missing", "nil", "-", "?"})
"""Label values (compared without case) that spreadsheets and dataframes write for a missing value: refused as
classes unless an explicit label set lists them."""

CSV_FIELD_LIMIT = 2**31 - 1
"""The `csv` module's field-size limit while reading a corpus: its default (131072 characters) would report a long
transcript as broken quoting."""


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
    limit = csv.field_size_limit(CSV_FIELD_LIMIT)  # the file is in memory already: any field length is fine
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
        if "field limit" in str(error):
            raise CorpusError(f"{path}, line {previous + 1}: a field is longer than {CSV_FIELD_LIMIT} characters") \
                from None
        raise CorpusError(f"{path}, line {previous + 1}: broken CSV quoting ({error}); a value that starts with a "
                          'double quote must end with one, and a quote inside it is doubled ("")') from None
    finally:
        csv.field_size_limit(limit)
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
    surrounding spaces or invisible characters, or a duplicate (each would make a class that no label matches, or two
    ids for one class). Names that differ only by case are allowed here: an explicit label set says what it means."""
    where = f" ({source})" if source else ""
    if isinstance(label_names, (str, bytes, dict)) or not label_names:
        raise CorpusError(f"label_names{where} must be a non-empty list of names, got {label_names!r}")
    label_names = list(label_names)
    bad = [name for name in label_names if not isinstance(name, str) or not name.strip() or name != _trim(name)]
    if bad:
        raise CorpusError(f"label_names{where} holds {bad!r}: every name is a non-empty string without surrounding "
                          f"spaces or invisible characters (got {label_names!r})")
    duplicated = sorted(name for name, n in Counter(label_names).items() if n > 1)
    if duplicated:
        raise CorpusError(f"label_names{where} holds {duplicated} more than once (got {label_names!r})")
    return label_names


def _invisible(character: str) -> bool:
    """Zero-width and other format characters (U+200B, U+200C, U+200D, U+2060, U+FEFF, U+00AD, ...)."""
    return unicodedata.category(character) == "Cf"


def _trim(name: str) -> str:
    """`name` without surrounding whitespace (NBSP included) and invisible characters."""
    start, end = 0, len(name)
    while start < end and (name[start].isspace() or _invisible(name[start])):
        start += 1
    while end > start and (name[end - 1].isspace() or _invisible(name[end - 1])):
        end -= 1
    return name[start:end]


def label_key(name: str) -> str:
    """What two spellings of one label share: NFKC form, invisible characters removed, stripped, case-folded."""
    visible = "".join(c for c in unicodedata.normalize("NFKC", name) if not _invisible(c))
    return visible.strip().casefold()


def _twins(names) -> list[list[str]]:
    """Groups of distinct names with the same `label_key`."""
    groups = defaultdict(set)
    for name in names:
        groups[label_key(name)].add(name)
    return [sorted(group) for group in groups.values() if len(group) > 1]


def is_missing_marker(label: str) -> bool:
    """True for a label that spreadsheets and dataframes write for a missing value (`MISSING_MARKERS`)."""
    return label_key(label) in MISSING_MARKERS


def infer_label_names(labels, source: str = "", option: str = "label_names") -> list[str]:
    """The sorted distinct labels of a corpus whose label set is not given, or a `CorpusError` for labels that would
    make classes nobody meant: spellings that differ only by case, Unicode form or invisible characters (`Happy`,
    `happy`, and `happy` followed by U+200B), invisible characters at either end, and missing-value markers
    (`MISSING_MARKERS`).

    Args:
        labels: `(label, where)` pairs, `where` locating the label (file and line) for messages; None labels (an
            unlabelled utterance) are ignored.
        source: the files the labels come from, for messages.
        option: how a user gives the label set explicitly (e.g. "label_names / --manifest_labels"), for messages.
    """
    first = {}
    for label, where in labels:
        if label is not None and label not in first:
            first[label] = where
    of = f" in {source}" if source else ""
    twins = _twins(first)
    if twins:
        listed = "; ".join(", ".join(f"{name!r} ({first[name]})" for name in group) for group in twins[:5])
        raise CorpusError(f"labels{of} that differ only by case, Unicode form or invisible characters would be "
                          f"separate classes: {listed}. Write each label one way in the data, or give the label set "
                          f"({option}) to say which spelling is the class")
    edges = [name for name in first if _trim(name) != name]
    if edges:
        name = edges[0]
        codes = ", ".join(f"U+{ord(c):04X}" for c in name if _invisible(c) or c.isspace())
        raise CorpusError(f"label {name!r} ({first[name]}) has invisible characters or spaces at an end ({codes}); "
                          "remove them from the data")
    markers = sorted(name for name in first if is_missing_marker(name))
    if markers:
        listed = ", ".join(f"{name!r} ({first[name]})" for name in markers)
        raise CorpusError(f"labels{of} that mark a missing value would be classes: {listed}. Leave the label empty "
                          f"for an unlabelled utterance; if it really is a class, give the label set ({option}) "
                          "listing it")
    if not first:
        raise CorpusError(f"No labelled utterance{of}: nothing gives the label set (give {option}).")
    return sorted(first)


def check_flag(corpus: str, name: str, value) -> bool:
    """`value` if it is a bool, else a `CorpusError` ("no" or 0 would pass as a truth value)."""
    if not isinstance(value, bool):
        raise CorpusError(f"{corpus} option {name} must be True or False, got {value!r}")
    return value


def check_choice(corpus: str, name: str, value, choices, kind: str = "choices") -> None:
    """A `CorpusError` listing `choices` (`kind`: what they are, e.g. "label sets") unless `value` is one of them,
    compared exactly, with its type."""
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise CorpusError(f"{corpus} {name} {value!r} is not one of its {kind}: {', '.join(map(repr, choices))}")


def reserved_column(name: str) -> bool:
    """True when a metadata column cannot be named `name` (`RESERVED_COLUMNS`, or a `RESERVED_SUFFIXES` ending)."""
    return name in RESERVED_COLUMNS or name.endswith(RESERVED_SUFFIXES)


def check_metadata_columns(names, source: str = "") -> None:
    """A `CorpusError` naming the metadata columns whose names the conversation schema, the embedding cache or the
    collator use for something else."""
    clashing = sorted(name for name in names if reserved_column(name))
    if clashing:
        raise CorpusError(f"{source + ': ' if source else ''}metadata columns {clashing} clash with the "
                          f"conversation schema or the embedding cache; rename them (reserved: "
                          f"{list(RESERVED_COLUMNS)} and names ending in {', '.join(RESERVED_SUFFIXES)})")


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
            cannot be those of `RESERVED_COLUMNS` nor end in `RESERVED_SUFFIXES`.
        skip_invalid: leave out utterances with an invalid id or turn, an unknown label, an unreadable audio file or a
            duplicated turn, counting them in `report`, instead of raising.
        source: the file the records come from, for messages.
    """
    metadata = metadata or {}
    label_names = check_label_names(label_names, source)
    check_metadata_columns(metadata, source)
    label_ids = {name: i for i, name in enumerate(label_names)}
    by_conversation: dict[str, dict[int, dict]] = {}
    for record in records:
        problem = _record_problem(record, label_ids, by_conversation, source)
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


def _record_problem(record: dict, label_ids: dict, seen: dict, source: str):
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
        return "unknown label", (f"unknown label {label!r} in {at}; allowed: {sorted(label_ids)}"
                                 + _resembles(label, label_ids))
    if record.get("audio") is not None and (reason := check_audio(record["audio"])):
        return reason, f"{reason}: {record['audio']} ({at})"
    if record.get("image") is not None and not os.path.isfile(record["image"]):
        return "image file not found", f"image file not found: {record['image']} ({at})"
    return None


def _resembles(label, label_names) -> str:
    """A hint for an unknown label: the name it differs from only by case or invisible characters, or that it looks
    like a missing-value marker."""
    if not isinstance(label, str):
        return ""
    similar = [name for name in label_names if label_key(name) == label_key(label)]
    if similar:
        return f" ({label!r} differs from {similar[0]!r} only by case, Unicode form or invisible characters)"
    if is_missing_marker(label):
        return (f" ({label!r} marks a missing value: leave the label empty for an unlabelled utterance, or list it in "
                "the label set if it is a class)")
    return ""


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
    "MISSING_MARKERS",
    "RESERVED_COLUMNS",
    "RESERVED_SUFFIXES",
    "build_split",
    "check_audio",
    "check_choice",
    "check_flag",
    "check_label_names",
    "check_metadata_columns",
    "infer_label_names",
    "is_missing_marker",
    "label_key",
    "reserved_column",
    "read_csv",
    "read_text",
    "require_folder",
    "conversation_features",
    "find_audio",
    "require_file",
]
