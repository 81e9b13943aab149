"""EmoDB (Berlin Database of Emotional Speech): `wav/` + `metadata.csv`, one-utterance conversations.

Speaker-independent folds: the 10 speakers, sorted, form 5 pairs; fold k tests on pair k, validates on pair k+1
(mod 5) for model selection, and trains on the other 6 speakers (or on all 8 others with `validation=False`).
"""

import csv
from pathlib import Path

from datasets import DatasetDict, Value

from .common import CorpusError, DataReport, build_split, require_file


LAYOUT = """<data_dir>/
  metadata.csv   columns: file,speaker,sentence_code,emotion,transcript
  wav/<file>     e.g. wav/03a01Fa.wav"""

NUM_FOLDS = 5


def speaker_folds(speakers: list[str], num_folds: int = NUM_FOLDS) -> list[list[str]]:
    """Sorted speakers split into `num_folds` consecutive groups (pairs for EmoDB's 10 speakers)."""
    speakers = sorted(set(speakers))
    if len(speakers) < num_folds:
        raise CorpusError(f"{len(speakers)} speakers cannot make {num_folds} speaker-independent folds.")
    size, extra = divmod(len(speakers), num_folds)
    folds, start = [], 0
    for k in range(num_folds):
        end = start + size + (k < extra)
        folds.append(speakers[start:end])
        start = end
    return folds


def load_emodb(
    data_dir: str | Path,
    fold: int = 0,
    num_folds: int = NUM_FOLDS,
    validation: bool = True,
    skip_invalid: bool = False,
    **_,
) -> tuple[DatasetDict, DataReport]:
    data_dir = Path(data_dir)
    metadata_file = require_file(data_dir / "metadata.csv", LAYOUT)
    require_file(data_dir / "wav", LAYOUT)
    with open(metadata_file, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"file", "speaker", "emotion", "transcript"} - set(rows[0] if rows else {})
    if missing:
        raise CorpusError(f"{metadata_file} lacks columns {sorted(missing)}. Expected layout:\n{LAYOUT}")
    if not 0 <= fold < num_folds:
        raise CorpusError(f"EmoDB fold must be in [0, {num_folds}), got {fold}.")
    label_names = sorted({row["emotion"] for row in rows})
    folds = speaker_folds([row["speaker"] for row in rows], num_folds)
    split_of = {s: "test" for s in folds[fold]}
    if validation:
        split_of.update({s: "validation" for s in folds[(fold + 1) % num_folds]})
    report = DataReport()
    report.note(f"fold {fold}: test speakers {folds[fold]}"
                + (f", validation speakers {folds[(fold + 1) % num_folds]}" if validation else ""))
    records = {"train": [], "validation": [], "test": []}
    for row in rows:
        records[split_of.get(row["speaker"], "train")].append(
            {
                "conversation_id": Path(row["file"]).stem,
                "turn": 0,
                "text": row["transcript"],
                "audio": str(data_dir / "wav" / row["file"]),
                "label": row["emotion"],
                "speaker": row["speaker"],
                "sentence_code": row.get("sentence_code"),
            }
        )
    metadata = {"speaker": Value("string"), "sentence_code": Value("string")}
    splits = {
        split: build_split(items, split, label_names, report, metadata, skip_invalid=skip_invalid,
                           source=str(metadata_file))
        for split, items in records.items()
        if items
    }
    return DatasetDict(splits), report
