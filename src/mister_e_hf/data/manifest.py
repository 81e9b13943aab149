"""A generic manifest, so that users bring their own corpus: CSV or JSONL, one line per utterance.

Required columns: `conversation_id`, `turn`, `text`, `label` (empty = unlabelled); optional: `audio` and `image`
(paths, relative to the manifest's folder or absolute; empty = none; `image` is one frame of the utterance). Every
other column is kept as per-turn string metadata (JSON values other than strings as their JSON text). Turn numbers
are non-negative integers that order a conversation's utterances; they need not be contiguous. Splits come as files
(`train_file`, `validation_file`, `test_file`, as in the Hugging Face examples) or as a folder holding `train`,
`validation` (or `dev`) and `test` files.

A CSV row whose field count differs from the header's (an unquoted comma), a JSONL line that is not a JSON object or
lacks a column, and a value of the wrong type are errors naming the file and line; with `skip_invalid` such rows are
left out and counted in the `DataReport`. A file that cannot be read as a whole (not UTF-8, a required column
missing, no rows) is always an error.

Without `label_names` the label set is the sorted labels found, and labels that would make classes nobody meant are
refused (see `common.infer_label_names`): `Happy` beside `happy`, invisible characters, missing-value markers such as
`null`, `NaN` or `N/A` (an unlabelled utterance has an empty label). Giving `label_names` is the escape hatch for a
corpus whose class really is `none`.
"""

import json
import re
from pathlib import Path

from datasets import DatasetDict, Value

from .common import (
    CorpusError,
    DataReport,
    build_split,
    check_flag,
    check_metadata_columns,
    infer_label_names,
    read_csv,
    read_text,
    require_file,
)
from ..registry import register_loader


REQUIRED = ("conversation_id", "turn", "text", "label")
OPTIONAL = ("audio", "image")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "dev", "valid"), "test": ("test",)}
LAYOUT = """a CSV (with a header) or JSONL file per split, one line per utterance, columns:
  conversation_id, turn (0, 1, ...), text, label (empty: unlabelled), audio and image (optional paths), metadata...
given as --train_file/--validation_file/--test_file, or a folder with train.csv|jsonl, validation.csv|jsonl
(or dev.*), test.csv|jsonl"""
_INTEGER = re.compile(r"\s*\+?\d+\s*")


def _json_type(value) -> str:
    """The JSON name of a parsed value's type (array, number, ...), for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def read_manifest(
    path: Path, report: DataReport | None = None, split: str = "", skip_invalid: bool = False
) -> list[tuple[int, dict]]:
    """The rows of a manifest file as `(line, row)`: a CSV row maps its header's columns to strings, a JSONL row is
    the line's JSON object. Rows that cannot be read (see the module's docstring) raise a `CorpusError` naming the
    file and line, or with `skip_invalid` are counted in `report` under `split` and left out."""
    path = Path(path)
    report = report if report is not None else DataReport()
    split = split or path.name
    require_file(path, LAYOUT)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv(path, REQUIRED, LAYOUT, report, split, skip_invalid)[1]
    if suffix != ".jsonl":
        raise CorpusError(f"{path}: manifests are .csv or .jsonl files. Expected:\n{LAYOUT}")
    rows, skipped = [], 0
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        problem = None
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problem = ("not valid JSON", f"{path}, line {number}: not valid JSON ({error.msg}, column {error.colno})")
        else:
            if not isinstance(row, dict):
                problem = ("not a JSON object", f"{path}, line {number}: a JSON {_json_type(row)} where each line "
                                                "is one utterance as a JSON object ({\"conversation_id\": ...})")
        if problem is not None:
            report.invalid(split, *problem, skip_invalid, what="rows")
            skipped += 1
            continue
        rows.append((number, row))
    if not rows and not skipped:
        raise CorpusError(f"{path} holds no utterances.")
    never = [c for c in REQUIRED if rows and not any(c in row for _, row in rows)]
    if never:
        raise CorpusError(f"{path} lacks the columns {never}. Expected:\n{LAYOUT}")
    return rows


def _split_files(data_dir, train_file, validation_file, test_file) -> dict[str, Path]:
    files = {k: Path(v) for k, v in (("train", train_file), ("validation", validation_file), ("test", test_file)) if v}
    if data_dir is not None and files:
        raise CorpusError(f"Give the manifest as a folder (data_dir={str(data_dir)!r}) or as split files "
                          f"({', '.join(f'{k}_file' for k in files)}), not both.")
    if data_dir is not None:
        folder = Path(data_dir)
        for split, names in SPLIT_NAMES.items():
            found = [folder / f"{name}{suffix}" for name in names for suffix in (".csv", ".jsonl")
                     if (folder / f"{name}{suffix}").exists()]
            if len(found) > 1:
                raise CorpusError(f"{folder} holds more than one {split} manifest ({', '.join(p.name for p in found)}); "
                                  "keep one")
            if found:
                files[split] = found[0]
    if "train" not in files and "test" not in files:
        raise CorpusError(f"No manifest found (looked for train/validation/test files in {data_dir}). Expected:\n{LAYOUT}")
    return files


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _resolve(value: str | None, folder: Path) -> str | None:
    """A path relative to the manifest's folder (or absolute), or None when blank."""
    if _blank(value):
        return None
    return value if Path(value).is_absolute() else str(folder / value)


def _turn(value) -> int | None:
    """A turn number from an int or a string of digits (CSV), else None (1.5, "1.0", True, "", -1 are not turns)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    if isinstance(value, str) and _INTEGER.fullmatch(value):
        return int(value)
    return None


def _label_hint(value) -> str:
    """How to write a non-string JSON label: a number as the class name's string; NaN (pandas' missing value) as
    null, since a label is either a class name or absent."""
    if isinstance(value, float) and value != value:
        return '; an unlabelled utterance has "label": null (or "")'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'; if {value!r} is a class, write its name as a string ("{value}")'
    return ""


def _record(row: dict, path: Path, line: int, extra: list[str]) -> tuple[dict | None, tuple[str, str] | None]:
    """`(utterance record, None)` from one manifest row, or `(None, (reason, message))` when it is invalid."""
    at = f"{path}, line {line}"
    missing = [c for c in REQUIRED if c not in row]
    if missing:
        return None, ("missing column", f"{at}: lacks the columns {missing}")
    for column in (*REQUIRED[2:], *OPTIONAL):  # text, label, audio, image: a string or nothing
        if column in row and row[column] is not None and not isinstance(row[column], str):
            return None, ("value is not a string", f"{at}: {column} {row[column]!r} is a JSON "
                                                  f"{_json_type(row[column])}, not a string (or null)"
                                                  + (_label_hint(row[column]) if column == "label" else ""))
    conversation_id = row["conversation_id"]
    if isinstance(conversation_id, int) and not isinstance(conversation_id, bool):
        conversation_id = str(conversation_id)
    if not isinstance(conversation_id, str) or not conversation_id.strip():
        return None, ("invalid conversation_id", f"{at}: conversation_id {row['conversation_id']!r} is not a "
                                                 "non-empty string")
    turn = _turn(row["turn"])
    if turn is None:
        return None, ("invalid turn", f"{at}: turn {row['turn']!r} is not a non-negative integer")
    record = {
        "conversation_id": conversation_id.strip(),
        "turn": turn,
        "text": None if _blank(row["text"]) else row["text"],
        "audio": _resolve(row.get("audio"), path.parent),
        "image": _resolve(row.get("image"), path.parent),
        "label": None if _blank(row["label"]) else row["label"].strip(),
        "_line": line,
    }
    for column in extra:
        value = row.get(column)
        record[column] = value if value is None or isinstance(value, str) else json.dumps(value)
    return record, None


@register_loader("manifest", description="a user-provided corpus; see its documentation")
def load_manifest(
    data_dir: str | Path | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    label_names: list[str] | None = None,
    skip_invalid: bool = False,
) -> tuple[DatasetDict, DataReport]:
    """Loads manifest splits; the label set is `label_names` in that order (names stripped of surrounding spaces), or
    the sorted labels found in every split.

    Args:
        data_dir: a folder holding `train`, `validation` (or `dev`, `valid`) and `test` files (`.csv` or `.jsonl`);
            or give the files instead.
        train_file, validation_file, test_file: the split files (at least `train_file` or `test_file`).
        label_names: the label set in id order; labels outside it are errors (or skipped with `skip_invalid`).
            Without it the labels found make the set, checked as the module's docstring says.
        skip_invalid: leave out (and count in the report) invalid rows and utterances instead of raising.
    """
    check_flag("manifest", "skip_invalid", skip_invalid)
    files = _split_files(data_dir, train_file, validation_file, test_file)
    if label_names is not None and not isinstance(label_names, str):
        label_names = [name.strip() if isinstance(name, str) else name for name in label_names]
    report = DataReport()
    splits_records = {}
    for split, path in files.items():
        rows = read_manifest(path, report, split, skip_invalid)
        extra = list(dict.fromkeys(c for _, row in rows for c in row if c not in (*REQUIRED, *OPTIONAL)))
        check_metadata_columns(extra, str(path))
        records = []
        for line, row in rows:
            record, problem = _record(row, path, line, extra)
            if problem is not None:
                report.invalid(split, *problem, skip_invalid, what="rows")
                continue
            records.append(record)
        splits_records[split] = (path, records, extra)
    if label_names is None:
        labels = ((r["label"], f"{path}, line {r['_line']}") for path, records, _ in splits_records.values()
                  for r in records)
        label_names = infer_label_names(labels, ", ".join(str(p) for p, _, _ in splits_records.values()),
                                        option="label_names / --manifest_labels")
    splits = {
        split: build_split(records, split, label_names, report, {c: Value("string") for c in extra},
                           skip_invalid=skip_invalid, source=str(path))
        for split, (path, records, extra) in splits_records.items()
    }
    return DatasetDict(splits), report
