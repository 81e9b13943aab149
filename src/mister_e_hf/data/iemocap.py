"""IEMOCAP, read from the official release: one conversation per dialog, leave-one-session-out folds.

Each dialog's `EmoEvaluation/<dialog>.txt` gives, per utterance, its time span, categorical label and
[valence, activation, dominance] ratings (summary lines only; per-annotator lines are ignored); its
`transcriptions/<dialog>.txt` gives the text, and `sentences/wav/<dialog>/<utterance>.wav` the audio. Turns are
numbered by start time. Utterances whose label is outside the chosen set (`xxx`, `oth`, `sur`, `fea`, `dis`, and
`fru` for the 4-way set, where `exc` is merged into `happy`) stay in the conversation as unlabelled context.

Fold k (1-5) tests on Session k; a seeded random `validation_fraction` of the other sessions' dialogs (at least one)
is held out for validation and the rest is trained on.
"""

import random
import re
from collections import Counter
from pathlib import Path

from datasets import DatasetDict, Value

from .common import CorpusError, DataReport, build_split, require_file


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


def read_evaluation(path: Path) -> list[dict]:
    """The summary lines of an EmoEvaluation file as dicts, in file order (other lines are ignored)."""
    utterances = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = _EVALUATION_LINE.match(line.strip())
            if match:
                start, end, utterance_id, raw_label, valence, arousal, dominance = match.groups()
                utterances.append(
                    {
                        "id": utterance_id,
                        "start": float(start),
                        "end": float(end),
                        "raw_label": raw_label,
                        "valence": float(valence),
                        "arousal": float(arousal),
                        "dominance": float(dominance),
                    }
                )
    return utterances


def read_transcripts(path: Path) -> dict[str, str]:
    """Utterance id -> text, from a transcription file (lines without an `<id> [start-end]: ` prefix are ignored)."""
    texts = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            match = _TRANSCRIPT_LINE.match(line.strip())
            if match:
                texts[match.group(1)] = match.group(2).strip()
    return texts


def _sessions(data_dir: Path, fold: int) -> dict[int, Path]:
    """Session number -> folder, for the `Session<k>` folders present; the test session must be one of them."""
    sessions = {}
    for folder in data_dir.glob("Session*"):
        match = re.fullmatch(r"Session(\d+)", folder.name)
        if match and folder.is_dir():
            sessions[int(match.group(1))] = folder
    require_file(data_dir / f"Session{fold}", LAYOUT)
    for folder in sessions.values():
        require_file(folder / "dialog" / "EmoEvaluation", LAYOUT)
        require_file(folder / "dialog" / "transcriptions", LAYOUT)
    return dict(sorted(sessions.items()))


def _dialogs(session: Path) -> list[Path]:
    """The session's EmoEvaluation files, one per dialog (sub-folders and hidden `._*` files are not dialogs)."""
    folder = session / "dialog" / "EmoEvaluation"
    return sorted(p for p in folder.glob("*.txt") if p.is_file() and not p.name.startswith("."))


def load_iemocap(
    data_dir: str | Path,
    label_set: str = "4",
    fold: int = 1,
    validation_fraction: float = 0.1,
    seed: int = 0,
    skip_invalid: bool = False,
    **_,
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
        skip_invalid: leave out (and count in the report) labelled utterances without a transcript and utterances
            with unreadable audio, instead of raising.
    """
    data_dir = Path(data_dir)
    if label_set not in LABEL_SETS:
        raise ValueError(f"IEMOCAP label sets are {sorted(LABEL_SETS)}, got {label_set!r}.")
    if not 1 <= fold <= NUM_SESSIONS:
        raise CorpusError(f"IEMOCAP fold must be a session number in [1, {NUM_SESSIONS}], got {fold}.")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}.")
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
        texts = read_transcripts(transcript_file)
        utterances = sorted(read_evaluation(evaluation), key=lambda u: (u["start"], u["end"], u["id"]))
        for turn, utterance in enumerate(utterances):
            label = mapping.get(utterance["raw_label"])
            text = texts.get(utterance["id"])
            if text is None:
                if label is not None:
                    message = (f"utterance {utterance['id']} (label {utterance['raw_label']!r}) has no transcript "
                               f"in {transcript_file}")
                    if not skip_invalid:
                        raise CorpusError(message + " (pass skip_invalid=True / --skip_invalid to leave such "
                                                    "utterances out)")
                    report.skip(split, "no transcript", message)
                    continue
                no_text[split] += 1
                text = ""
            if label is None:
                unlabelled[split][utterance["raw_label"]] += 1
            wav = session / "sentences" / "wav" / dialog / f"{utterance['id']}.wav"
            no_audio[split] += not wav.exists()
            records[split].append(
                {
                    "conversation_id": dialog,
                    "turn": turn,
                    "text": text,
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
            report.note(f"{split}: {no_text[split]} unlabelled utterances have no transcript; kept with empty text")
        if no_audio[split]:
            report.note(f"{split}: {no_audio[split]} of {len(records[split])} utterances have no wav file; "
                        "kept as text-only")
    splits = {
        split: build_split(items, split, label_names, report, METADATA, skip_invalid=skip_invalid,
                           missing_turns="allow" if skip_invalid else "error", source=str(data_dir))
        for split, items in records.items()
        if items or split != "validation"
    }
    return DatasetDict(splits), report
