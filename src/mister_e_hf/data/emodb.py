"""EmoDB (Berlin Database of Emotional Speech): `wav/` + `metadata.csv`, one-utterance conversations.

Speaker-independent folds: the 10 speakers, sorted, form 5 pairs; fold k tests on pair k, validates on pair k+1
(mod 5) for model selection, and trains on the other 6 speakers (or on all 8 others with `validation=False`).
"""

from pathlib import Path

from datasets import DatasetDict, Value

from .common import CorpusError, DataReport, build_split, check_flag, infer_label_names, read_csv, require_folder
from ..registry import register_loader


LAYOUT = """<data_dir>/
  metadata.csv   columns: file,speaker,sentence_code,emotion,transcript
  wav/<file>     e.g. wav/03a01Fa.wav"""

NUM_FOLDS = 5
REQUIRED = ("file", "speaker", "emotion", "transcript")


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


@register_loader("emodb", description="ten German actors reading ten neutral sentences in seven acted emotions")
def load_emodb(
    data_dir: str | Path,
    fold: int = 0,
    num_folds: int = NUM_FOLDS,
    validation: bool = True,
    skip_invalid: bool = False,
) -> tuple[DatasetDict, DataReport]:
    """EmoDB as one-utterance conversations in speaker-independent folds.

    Args:
        data_dir: the folder holding `metadata.csv` and `wav/` (see `LAYOUT`).
        fold: the test fold, in [0, num_folds).
        num_folds: how many speaker groups to make.
        validation: hold out the next fold's speakers for validation (else they are trained on).
        skip_invalid: leave out (and count in the report, under `metadata.csv` for rows that belong to no split)
            rows with a wrong field count or a blank file, speaker or emotion, and unreadable clips, instead of raising.
    """
    data_dir = Path(data_dir)
    for name, value in (("fold", fold), ("num_folds", num_folds)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise CorpusError(f"EmoDB {name} must be an integer, got {value!r}.")
    if num_folds < 1 or not 0 <= fold < num_folds:
        raise CorpusError(f"EmoDB fold must be in [0, {num_folds}), got {fold}.")
    check_flag("EmoDB", "validation", validation)
    check_flag("EmoDB", "skip_invalid", skip_invalid)
    metadata_file = data_dir / "metadata.csv"
    report = DataReport()
    _, table = read_csv(metadata_file, REQUIRED, LAYOUT, report, metadata_file.name, skip_invalid)
    require_folder(data_dir / "wav", LAYOUT)
    rows = []
    for line, row in table:
        blank = [column for column in ("file", "speaker", "emotion") if not row[column].strip()]
        if blank:
            report.invalid(metadata_file.name, "blank file, speaker or emotion",
                           f"{metadata_file}, line {line}: {' and '.join(blank)} blank", skip_invalid, what="rows")
            continue
        rows.append((line, {k: v.strip() if k != "transcript" else v for k, v in row.items()}))
    if not rows:
        raise CorpusError(f"No valid row in {metadata_file}.")
    label_names = infer_label_names(((row["emotion"], f"{metadata_file}, line {line}") for line, row in rows),
                                    str(metadata_file), option="the emotion column")
    folds = speaker_folds([row["speaker"] for _, row in rows], num_folds)
    split_of = {s: "test" for s in folds[fold]}
    if validation:
        split_of.update({s: "validation" for s in folds[(fold + 1) % num_folds]})
    report.note(f"fold {fold}: test speakers {folds[fold]}"
                + (f", validation speakers {folds[(fold + 1) % num_folds]}" if validation else ""))
    records = {"train": [], "validation": [], "test": []}
    for line, row in rows:
        records[split_of.get(row["speaker"], "train")].append(
            {
                "conversation_id": Path(row["file"]).stem,
                "turn": 0,
                "text": row["transcript"] if row["transcript"].strip() else None,
                "audio": str(data_dir / "wav" / row["file"]),
                "label": row["emotion"],
                "speaker": row["speaker"],
                "sentence_code": row.get("sentence_code"),
                "_line": line,
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
