"""IEMOCAP, read from the official release: one conversation per dialog, leave-one-session-out folds.

Each dialog's `EmoEvaluation/<dialog>.txt` gives, per utterance, its time span, categorical label and
[valence, activation, dominance] ratings (summary lines only; per-annotator lines are ignored); its
`transcriptions/<dialog>.txt` gives the text, and `sentences/wav/<dialog>/<utterance>.wav` the audio. Turns are
numbered by start time. Utterances whose label is outside the chosen set (`xxx`, `oth`, `sur`, `fea`, `dis`, and
`fru` for the 4-way set, where `exc` is merged into `happy`) stay in the conversation as unlabelled context.

The release's text files are read as UTF-8; a byte that is not is replaced by U+FFFD and noted in the report (the
corpus is as distributed), while a malformed summary line is an error naming the file and line (or, with
`skip_invalid`, a skipped utterance).

Fold k (1-5) tests on Session k; a seeded random `validation_fraction` of the other sessions' dialogs (at least one)
is held out for validation and the rest is trained on.
"""

import random
import re
from collections import Counter
from pathlib import Path

from datasets import DatasetDict, Value

from .common import (
    CorpusError,
    DataReport,
    build_split,
    check_choice,
    check_flag,
    read_text,
    require_file,
    require_folder,
)
from ..registry import register_loader


LAYOUT = """<data_dir>/                       (IEMOCAP_full_release)
  Session1/ ... Session5/
    dialog/EmoEvaluation/<dialog>.txt     e.g. Session1/dialog/EmoEvaluation/Ses01F_impro01.txt
        lines: [6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]
    dialog/transcriptions/<dialog>.txt    lines: Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.
    sentences/wav/<dialog>/<utterance>.wav   e.g. sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"""

NUM_SESSIONS = 5
LABEL_SETS = {
    "4": {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"},
    "6": {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"},
}
LABEL_NAMES = {
    "4": ["neutral", "happy", "sad", "angry"],
    "6": ["happy", "sad", "neutral", "angry", "excited", "frustrated"],
}
"""Label names in id order, per label set."""

_EVALUATION_LINE = re.compile(
    r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(\S+)\s+(\S+)\s+\[\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*\]"
)
_TRANSCRIPT_LINE = re.compile(r"^(\S+)\s+\[[^\]]*\]:\s?(.*)$")
METADATA = {
    "speaker": Value("string"),
    "valence": Value("float32"),
    "arousal": Value("float32"),
    "dominance": Value("float32"),
    "start": Value("float32"),
    "end": Value("float32"),
    "raw_label": Value("string"),
}


def read_evaluation(path: Path, report: DataReport | None = None, split: str = "",
                    skip_invalid: bool = False) -> list[dict]:
    """The summary lines of an EmoEvaluation file as dicts, in file order, each with the `line` it is on (per-annotator
    and comment lines are ignored). A line that starts like a summary line (`[`) but does not parse as one, or that
    repeats an utterance id, is a `CorpusError` naming the file and line, or with `skip_invalid` counted in `report`
    under `split` and left out. Bytes that are not UTF-8 are replaced (and noted in `report`, when given)."""
    report = report if report is not None else DataReport()
    utterances, seen = [], set()
    for number, line in enumerate(read_text(path, on_invalid=_replaced(report)).split("\n"), 1):
        line = line.strip()
        if not line.startswith("["):
            continue
        match = _EVALUATION_LINE.match(line)
        try:
            start, end, utterance_id, raw_label, *ratings = match.groups() if match else ()
            start, end, valence, arousal, dominance = map(float, (start, end, *ratings))
        except ValueError:
            report.invalid(split or path.name, "malformed EmoEvaluation line",
                           f"{path}, line {number}: not a summary line `[start - end]<TAB>utterance<TAB>label<TAB>"
                           f"[valence, activation, dominance]`: {line[:100]!r}", skip_invalid, what="utterances")
            continue
        if utterance_id in seen:
            report.invalid(split or path.name, "duplicated utterance",
                           f"{path}, line {number}: utterance {utterance_id} is listed twice", skip_invalid)
            continue
        seen.add(utterance_id)
        utterances.append(
            {
                "id": utterance_id,
                "start": start,
                "end": end,
                "raw_label": raw_label,
                "valence": valence,
                "arousal": arousal,
                "dominance": dominance,
                "line": number,
            }
        )
    return utterances


def read_transcripts(path: Path, report: DataReport | None = None) -> dict[str, str]:
    """Utterance id -> text, from a transcription file (lines without an `<id> [start-end]: ` prefix are ignored).
    Bytes that are not UTF-8 are replaced (and noted in `report`, when given)."""
    texts = {}
    for line in read_text(path, on_invalid=_replaced(report)).split("\n"):
        match = _TRANSCRIPT_LINE.match(line.strip())
        if match:
            texts[match.group(1)] = match.group(2).strip()
    return texts


def _replaced(report: DataReport | None):
    """What `read_text` does with bytes that are not UTF-8 in the release's files: replaced by U+FFFD, and noted."""
    if report is None:
        return lambda message: None
    return lambda message: report.note(message.replace("; save the file as UTF-8", "; such bytes replaced by U+FFFD"))


def _sessions(data_dir: Path, fold: int) -> dict[int, Path]:
    """Session number -> folder, for the `Session<k>` folders present; the test session must be one of them."""
    sessions = {}
    for folder in data_dir.glob("Session*"):
        match = re.fullmatch(r"Session(\d+)", folder.name)
        if match and folder.is_dir():
            sessions[int(match.group(1))] = folder
    require_folder(data_dir / f"Session{fold}", LAYOUT)
    for folder in sessions.values():
        require_folder(folder / "dialog" / "EmoEvaluation", LAYOUT)
        require_folder(folder / "dialog" / "transcriptions", LAYOUT)
    return dict(sorted(sessions.items()))


def _dialogs(session: Path) -> list[Path]:
    """The session's EmoEvaluation files, one per dialog (sub-folders and hidden `._*` files are not dialogs)."""
    folder = session / "dialog" / "EmoEvaluation"
    return sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("."))


@register_loader("iemocap", description="ten actors in dyadic scripted and improvised sessions, English")
def load_iemocap(
    data_dir: str | Path,
    label_set: str = "4",
    fold: int = 1,
    validation_fraction: float = 0.1,
    seed: int = 0,
    skip_invalid: bool = False,
) -> tuple[DatasetDict, DataReport]:
    """IEMOCAP with `label_set` "4" (neutral, happy = hap + exc, sad, angry) or "6" (happy, sad, neutral, angry,
    excited, frustrated: hap, sad, neu, ang, exc, fru).

    Args:
        data_dir: the release folder holding `Session1` ... `Session5` (see `LAYOUT`).
        label_set: "4" or "6"; utterances labelled outside it are kept as unlabelled context (label id -1).
        fold: the test session, 1 to 5.
        validation_fraction: share of the other sessions' dialogs held out for validation (at least one dialog;
            0 gives no validation split).
        seed: seed of the validation dialog pick.
        skip_invalid: leave out (and count in the report) labelled utterances without a transcript, malformed or
            repeated EmoEvaluation summary lines and utterances with unreadable audio, instead of raising.
    """
    data_dir = Path(data_dir)
    check_choice("IEMOCAP", "label_set", label_set, list(LABEL_SETS), "label sets")
    if not isinstance(fold, int) or isinstance(fold, bool) or not 1 <= fold <= NUM_SESSIONS:
        raise CorpusError(f"IEMOCAP fold must be a session number in [1, {NUM_SESSIONS}], got {fold!r}.")
    if (not isinstance(validation_fraction, (int, float)) or isinstance(validation_fraction, bool)
            or not 0 <= validation_fraction < 1):
        raise CorpusError(f"IEMOCAP validation_fraction must be a number in [0, 1), got {validation_fraction!r}.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CorpusError(f"IEMOCAP seed must be an integer, got {seed!r}.")
    check_flag("IEMOCAP", "skip_invalid", skip_invalid)
    mapping, label_names = LABEL_SETS[label_set], LABEL_NAMES[label_set]
    sessions = _sessions(data_dir, fold)
    report = DataReport()

    others = sorted(d for k, s in sessions.items() if k != fold for d in _dialogs(s))
    num_validation = 0
    if validation_fraction > 0 and len(others) > 1:
        num_validation = min(len(others) - 1, max(1, round(validation_fraction * len(others))))
    validation = set(random.Random(seed).sample(others, num_validation))
    split_of = {d: ("validation" if d in validation else "train") for d in others}
    split_of.update({d: "test" for d in _dialogs(sessions[fold])})
    report.note(f"fold {fold}: test Session{fold} ({sum(s == 'test' for s in split_of.values())} dialogs), "
                f"validation {sorted(d.stem for d in validation)}, train {len(others) - num_validation} dialogs "
                f"from sessions {[k for k in sessions if k != fold]}")

    records = {"train": [], "validation": [], "test": []}
    unlabelled = {split: Counter() for split in records}
    no_audio = Counter()
    no_text = Counter()
    for evaluation, split in split_of.items():
        dialog, session = evaluation.stem, evaluation.parents[2]
        transcript_file = require_file(session / "dialog" / "transcriptions" / f"{dialog}.txt", LAYOUT)
        texts = read_transcripts(transcript_file, report)
        utterances = sorted(read_evaluation(evaluation, report, split, skip_invalid),
                            key=lambda u: (u["start"], u["end"], u["id"]))
        for turn, utterance in enumerate(utterances):
            label = mapping.get(utterance["raw_label"])
            text = texts.get(utterance["id"])
            if text is None:
                if label is not None:
                    message = (f"utterance {utterance['id']} (label {utterance['raw_label']!r}) has no transcript "
                               f"in {transcript_file}")
                    report.invalid(split, "no transcript", message, skip_invalid)
                    continue
                no_text[split] += 1
            if label is None:
                unlabelled[split][utterance["raw_label"]] += 1
            wav = session / "sentences" / "wav" / dialog / f"{utterance['id']}.wav"
            no_audio[split] += not wav.exists()
            records[split].append(
                {
                    "conversation_id": dialog,
                    "turn": turn,
                    "text": text or None,
                    "audio": str(wav) if wav.exists() else None,
                    "label": label,
                    "speaker": utterance["id"].rsplit("_", 1)[-1][:1],  # metadata only: never a model input
                    **{key: utterance[key] for key in ("valence", "arousal", "dominance", "start", "end", "raw_label")},
                }
            )

    for split in records:
        if unlabelled[split]:
            report.note(f"{split}: {sum(unlabelled[split].values())} utterances labelled outside the {label_set}-way "
                        f"set ({dict(sorted(unlabelled[split].items()))}) kept as unlabelled context")
        if no_text[split]:
            report.note(f"{split}: {no_text[split]} unlabelled utterances have no transcript; kept without text")
        if no_audio[split]:
            report.note(f"{split}: {no_audio[split]} of {len(records[split])} utterances have no wav file; "
                        "kept as text-only")
    splits = {
        split: build_split(items, split, label_names, report, METADATA, skip_invalid=skip_invalid,
                           source=str(data_dir))
        for split, items in records.items()
        if items or split != "validation"
    }
    return DatasetDict(splits), report
