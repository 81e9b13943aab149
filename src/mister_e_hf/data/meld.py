"""MELD: the official `{train,dev,test}_sent_emo.csv`, optionally with audio clips from MELD.Raw.

MELD.Raw ships video clips (`dia{D}_utt{U}.mp4`); give `audio_dir` a folder of audio files with the same stems
(e.g. made with `ffmpeg -i dia0_utt0.mp4 -ac 1 -ar 16000 dia0_utt0.wav`), either flat or in per-split folders named
like the official ones. Utterances whose clip is absent keep their text and are marked as having no audio.
"""

from pathlib import Path

from datasets import DatasetDict, Value

from .common import (CorpusError, DataReport, build_split, check_choice, check_flag, find_audio, read_csv,
                     require_folder)
from ..registry import register_loader


LAYOUT = """<data_dir>/
  train_sent_emo.csv  dev_sent_emo.csv  test_sent_emo.csv
  (columns: Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode, ...)"""

REQUIRED = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")
SPLITS = {"train": "train", "validation": "dev", "test": "test"}
AUDIO_FOLDERS = {
    "train": ["train", "train_splits"],
    "validation": ["dev", "dev_splits_complete", "dev_splits"],
    "test": ["test", "output_repeated_splits_test", "test_splits"],
}
EMOTIONS = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
SENTIMENTS = ["negative", "neutral", "positive"]
LABEL_COLUMNS = ("emotion", "sentiment")
"""What `label_column` takes: the MELD column that gives the labels."""


def _audio_folders(audio_dir: Path, split: str) -> list[Path]:
    return [audio_dir / name for name in AUDIO_FOLDERS[split] if (audio_dir / name).is_dir()] + [audio_dir]


@register_loader("meld", description="TV-series dialogue (Friends), English, multi-party; neutral dominates")
def load_meld(
    data_dir: str | Path,
    audio_dir: str | Path | None = None,
    label_column: str = "emotion",
    skip_invalid: bool = False,
) -> tuple[DatasetDict, DataReport]:
    """MELD with `label_column` `emotion` (7 classes) or `sentiment` (3); the other one is kept as metadata.

    Args:
        data_dir: the folder holding the official `{train,dev,test}_sent_emo.csv` (see `LAYOUT`).
        audio_dir: a folder of audio clips `dia{D}_utt{U}.*` in per-split folders (`AUDIO_FOLDERS`), or None for text
            only. A flat folder works only for clips whose name belongs to one split (dialogue ids restart in every
            split): an ambiguous one is an error.
        label_column: "emotion" or "sentiment".
        skip_invalid: leave out (and count in the report) rows with a wrong field count, a non-integer
            `Dialogue_ID` / `Utterance_ID`, an unknown label or unreadable audio, instead of raising.
    """
    data_dir = Path(data_dir)
    check_choice("MELD", "label_column (--label_set)", label_column, LABEL_COLUMNS, "label columns")
    check_flag("MELD", "skip_invalid", skip_invalid)
    if audio_dir is not None:
        require_folder(Path(audio_dir), "a folder of audio clips dia{D}_utt{U}.wav (or .flac, ...), flat or in "
                                        "per-split folders (train, dev, test)")
    label_names = EMOTIONS if label_column == "emotion" else SENTIMENTS
    other = "sentiment" if label_column == "emotion" else "emotion"
    report = DataReport()
    tables = {split: (data_dir / f"{name}_sent_emo.csv",
                      read_csv(data_dir / f"{name}_sent_emo.csv", REQUIRED, LAYOUT, report, split, skip_invalid)[1])
              for split, name in SPLITS.items()}
    stems = {split: {f"dia{row['Dialogue_ID'].strip()}_utt{row['Utterance_ID'].strip()}" for _, row in rows}
             for split, (_, rows) in tables.items()}
    splits = {}
    for split, (path, rows) in tables.items():
        folders = _audio_folders(Path(audio_dir), split) if audio_dir is not None else []
        records, no_audio = [], 0
        for line, row in rows:
            try:
                dialogue, utterance = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            except ValueError:
                report.invalid(split, "non-integer Dialogue_ID or Utterance_ID",
                               f"{path}, line {line}: Dialogue_ID {row['Dialogue_ID']!r} and Utterance_ID "
                               f"{row['Utterance_ID']!r} must be integers", skip_invalid, what="rows")
                continue
            audio, stem = None, f"dia{dialogue}_utt{utterance}"
            for folder in folders:
                if (audio := find_audio(folder, stem)) is not None:
                    break
            shared = [other_split for other_split in stems if other_split != split and stem in stems[other_split]]
            if audio is not None and folder == Path(audio_dir) and shared:
                raise CorpusError(
                    f"{audio}: MELD's dialogue ids restart in every split, so {stem} names an utterance of "
                    f"{split} and of {', '.join(shared)}, and a clip in the flat audio folder cannot say which. Put "
                    f"each split's clips in its own folder under {audio_dir} (e.g. train/, dev/, test/, or MELD.Raw's "
                    "train_splits/, dev_splits_complete/, output_repeated_splits_test/).")
            no_audio += audio_dir is not None and audio is None
            records.append(
                {
                    "conversation_id": f"{split}-dia{dialogue}",
                    "turn": utterance,
                    "text": row["Utterance"] if row["Utterance"].strip() else None,
                    "audio": audio,
                    "label": row[label_column.capitalize()].strip().lower(),  # blank: an unknown label, not unlabelled
                    "speaker": row["Speaker"],  # metadata only: never a model input
                    other: row[other.capitalize()].strip().lower(),
                    "_line": line,
                }
            )
        if no_audio:
            report.note(f"{split}: {no_audio} of {len(records)} utterances have no audio clip; kept as text-only")
        metadata = {"speaker": Value("string"), other: Value("string")}
        splits[split] = build_split(records, split, label_names, report, metadata, skip_invalid=skip_invalid,
                                    source=str(path))
    return DatasetDict(splits), report
