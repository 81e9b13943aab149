"""CMU-MOSI: the MMSA `label.csv` (text, sentiment score in [-3, 3], split), optionally with the raw segmented audio.

One conversation per video (a single speaker, so no speaker column), turns in clip order. Audio is looked up as
`Raw/Audio/WAV_16000/Segmented/<video_id>_<clip_id>.wav`, then `wav/<video_id>/<clip_id>.wav`; clips with neither
keep their text and are marked as having no audio.
"""

import math
from pathlib import Path

from datasets import DatasetDict, Value

from .common import CorpusError, DataReport, build_split, check_choice, check_flag, read_csv
from ..registry import register_loader


LAYOUT = """<data_dir>/
  label.csv   columns: video_id,clip_id,text,label,annotation,mode
              (label: sentiment score in [-3, 3]; mode: train, valid or test)
  optional audio, the first that exists:
    Raw/Audio/WAV_16000/Segmented/<video_id>_<clip_id>.wav   e.g. Raw/Audio/WAV_16000/Segmented/03bSnISJMiM_1.wav
    wav/<video_id>/<clip_id>.wav"""

REQUIRED = ("video_id", "clip_id", "text", "label", "mode")
SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "test": "test"}
LABEL_NAMES = {
    "binary": ["negative", "positive"],
    "binary-non0": ["negative", "positive"],
    "7": [str(k) for k in range(-3, 4)],
}
"""Label names in id order, per label set."""


def score_label(score: float, label_set: str) -> str | None:
    """The class of a sentiment score: binary "has-0" (score >= 0 is positive), binary "non-0" (0 is unlabelled,
    None) or 7 classes "-3".."3" (the clipped score rounded half to even, as `numpy.round` does)."""
    if label_set == "binary":
        return "positive" if score >= 0 else "negative"
    if label_set == "binary-non0":
        return None if score == 0 else ("positive" if score > 0 else "negative")
    return str(int(round(min(3.0, max(-3.0, score)))))


def _audio(data_dir: Path, video_id: str, clip_id: str) -> str | None:
    for candidate in (data_dir / "Raw" / "Audio" / "WAV_16000" / "Segmented" / f"{video_id}_{clip_id}.wav",
                      data_dir / "wav" / video_id / f"{clip_id}.wav"):
        if candidate.exists():
            return str(candidate)
    return None


@register_loader("mosi", description="YouTube opinion monologues, English; sentiment, not emotion")
def load_mosi(
    data_dir: str | Path,
    label_set: str = "binary",
    skip_invalid: bool = False,
) -> tuple[DatasetDict, DataReport]:
    """CMU-MOSI with `label_set` "binary" (negative < 0 <= positive), "binary-non0" (score 0 kept as unlabelled
    context) or "7" (classes "-3".."3"); the score itself is kept as the `score` metadata column.

    Args:
        data_dir: the folder holding `label.csv` (see `LAYOUT`).
        label_set: "binary", "binary-non0" or "7".
        skip_invalid: leave out (and count in the report) rows with a wrong field count (under `label.csv`), a blank
            video id, an unreadable score, clip id or mode, duplicated clips and clips with unreadable audio, instead
            of raising.
    """
    data_dir = Path(data_dir)
    check_choice("MOSI", "label_set", label_set, list(LABEL_NAMES), "label sets")
    check_flag("MOSI", "skip_invalid", skip_invalid)
    label_file = data_dir / "label.csv"
    report = DataReport()
    _, rows = read_csv(label_file, REQUIRED, LAYOUT, report, label_file.name, skip_invalid)
    clips: dict[str, dict[str, list]] = {split: {} for split in ("train", "validation", "test")}
    seen = set()
    for line, row in rows:
        video_id, clip_id = row["video_id"].strip(), row["clip_id"].strip()
        split = SPLITS.get(row["mode"].strip().lower())
        problem = None
        try:
            score, clip_number = float(row["label"]), int(clip_id)
        except ValueError:
            problem = "unreadable score or clip id"
        else:
            if not video_id:
                problem = "blank video_id"
            elif split is None:
                problem = "unknown mode"
            elif (video_id, clip_number) in seen:
                problem = "duplicated clip"
            elif not math.isfinite(score):
                problem = "unreadable score or clip id"
        if problem is not None:
            message = (f"{problem} in {label_file}, line {line}: video_id={video_id!r}, clip_id={clip_id!r}, "
                       f"label={row['label']!r}, mode={row['mode']!r}")
            report.invalid(split or str(row["mode"]), problem, message, skip_invalid, what="rows")
            continue
        seen.add((video_id, clip_number))
        clips[split].setdefault(video_id, []).append((clip_number, clip_id, score, row["text"], line))

    shared = set(clips["train"]) & (set(clips["validation"]) | set(clips["test"])) | (
        set(clips["validation"]) & set(clips["test"]))
    if shared:
        report.note(f"{len(shared)} videos have clips in more than one split (e.g. {sorted(shared)[:3]})")
    splits = {}
    metadata = {"clip_id": Value("string"), "score": Value("float32")}
    for split, videos in clips.items():
        records, unlabelled, no_audio = [], 0, 0
        for video_id, video_clips in videos.items():
            for turn, (_, clip_id, score, text, line) in enumerate(sorted(video_clips)):
                label = score_label(score, label_set)
                audio = _audio(data_dir, video_id, clip_id)
                unlabelled += label is None
                no_audio += audio is None
                records.append({"conversation_id": video_id, "turn": turn, "text": text.strip() or None,
                                "audio": audio, "label": label, "clip_id": clip_id, "score": score, "_line": line})
        if not records:
            raise CorpusError(f"No clips with mode {split if split != 'validation' else 'valid'!r} in {label_file}.")
        if unlabelled:
            report.note(f"{split}: {unlabelled} clips with score 0 kept as unlabelled context ({label_set})")
        if no_audio:
            report.note(f"{split}: {no_audio} of {len(records)} clips have no audio file; kept as text-only")
        splits[split] = build_split(records, split, LABEL_NAMES[label_set], report, metadata,
                                    skip_invalid=skip_invalid, source=str(label_file))
    return DatasetDict(splits), report
