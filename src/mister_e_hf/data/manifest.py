"""A generic manifest, so that users bring their own corpus: CSV or JSONL, one line per utterance.

Required columns: `conversation_id`, `turn`, `text`, `label` (empty = unlabelled); optional: `audio` and `image`
(paths, relative to the manifest's folder or absolute; empty = none; `image` is one frame of the utterance). Every other column is kept as per-turn string
metadata. Splits come as files (`train_file`, `validation_file`, `test_file`, as in the Hugging Face examples) or as a
folder holding `train`, `validation` (or `dev`) and `test` files.
"""

import csv
import json
from pathlib import Path

from datasets import DatasetDict, Value

from .common import CorpusError, DataReport, build_split, require_file


REQUIRED = ("conversation_id", "turn", "text", "label")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "dev", "valid"), "test": ("test",)}
LAYOUT = """a CSV (with a header) or JSONL file per split, one line per utterance, columns:
  conversation_id, turn (0, 1, ...), text, label (empty: unlabelled), audio and image (optional paths), metadata...
given as --train_file/--validation_file/--test_file, or a folder with train.csv|jsonl, validation.csv|jsonl
(or dev.*), test.csv|jsonl"""


def read_manifest(path: Path) -> list[dict]:
    require_file(path, LAYOUT)
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise CorpusError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise CorpusError(f"{path}: manifests are .csv or .jsonl files. Expected:\n{LAYOUT}")
    if not rows:
        raise CorpusError(f"{path} holds no utterances.")
    missing = [c for c in REQUIRED if c not in rows[0]]
    if missing:
        raise CorpusError(f"{path} lacks the columns {missing}. Expected:\n{LAYOUT}")
    return rows


def _split_files(data_dir, train_file, validation_file, test_file) -> dict[str, Path]:
    files = {k: Path(v) for k, v in (("train", train_file), ("validation", validation_file), ("test", test_file)) if v}
    if data_dir is not None and not files:
        folder = Path(data_dir)
        for split, names in SPLIT_NAMES.items():
            for name in names:
                for suffix in (".csv", ".jsonl"):
                    if (folder / f"{name}{suffix}").exists() and split not in files:
                        files[split] = folder / f"{name}{suffix}"
    if "train" not in files and "test" not in files:
        raise CorpusError(f"No manifest found (looked for train/validation/test files in {data_dir}). Expected:\n{LAYOUT}")
    return files


def _blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _resolve(value, folder: Path) -> str | None:
    """A path relative to the manifest's folder (or absolute), or None when blank."""
    if _blank(value):
        return None
    return str(value) if Path(str(value)).is_absolute() else str(folder / str(value))


def load_manifest(
    data_dir: str | Path | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    label_names: list[str] | None = None,
    skip_invalid: bool = False,
    **_,
) -> tuple[DatasetDict, DataReport]:
    """Loads manifest splits; the label set is `label_names` in that order, or the sorted labels found."""
    files = _split_files(data_dir, train_file, validation_file, test_file)
    tables = {split: read_manifest(path) for split, path in files.items()}
    if label_names is None:
        label_names = sorted({str(r["label"]).strip() for rows in tables.values() for r in rows if not _blank(r["label"])})
    report = DataReport()
    splits = {}
    for split, rows in tables.items():
        path = files[split]
        extra = [c for c in rows[0] if c not in (*REQUIRED, "audio", "image")]
        records = []
        for number, row in enumerate(rows, 1):
            try:
                turn = int(row["turn"])
            except (TypeError, ValueError):
                raise CorpusError(f"{path}, utterance {number}: turn {row['turn']!r} is not an integer.") from None
            audio, image = (_resolve(row.get(c), path.parent) for c in ("audio", "image"))
            records.append(
                {
                    "conversation_id": str(row["conversation_id"]),
                    "turn": turn,
                    "text": None if _blank(row["text"]) else str(row["text"]),
                    "audio": audio,
                    "image": image,
                    "label": None if _blank(row["label"]) else str(row["label"]).strip(),
                    **{c: None if row.get(c) is None else str(row[c]) for c in extra},
                }
            )
        splits[split] = build_split(records, split, list(label_names), report, {c: Value("string") for c in extra},
                                    skip_invalid=skip_invalid, source=str(path))
    return DatasetDict(splits), report
