"""The MELD and EmoDB loaders: official splits, grouping and turn order, label sets, metadata, audio matching and the
speaker-independent EmoDB folds, on tiny synthetic corpora and (when present) on the real shared copies, whose sizes
and label counts are computed here from the files with the `csv` module, independently of the loaders."""

import csv
from collections import Counter, defaultdict

import numpy as np
import pytest
import soundfile
import torch
from helpers import require_shared

from mister_e_hf.data.common import CorpusError
from mister_e_hf.data.emodb import load_emodb, speaker_folds
from mister_e_hf.data.meld import load_meld


MELD_EMOTIONS = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
MELD_SENTIMENTS = ["negative", "neutral", "positive"]
MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]
MELD_FILES = {"train": "train", "validation": "dev", "test": "test"}

# split -> rows (Dialogue_ID, Utterance_ID, text, speaker, emotion, sentiment), deliberately not in turn order:
# Utterance_ID 10 sorts before 2 as a string, and dialogues interleave. Dialogue ids restart in every split (as in
# MELD), so the dev and test files reuse train's ids for other utterances.
MELD_ROWS = {
    "train": [
        (0, 2, "Two.", "Ross", "surprise", "positive"),
        (5, 0, "Five zero.", "Rachel", "anger", "negative"),
        (0, 0, "Zero.", "Monica", "neutral", "neutral"),
        (0, 10, "Ten.", "Ross", "disgust", "negative"),
        (5, 1, "Five one.", "Joey", "joy", "positive"),
        (0, 1, "One.", "Chandler", "fear", "negative"),
    ],
    "validation": [
        (0, 1, "Dev one.", "Phoebe", "sadness", "negative"),
        (0, 0, "Dev zero.", "Joey", "joy", "positive"),
    ],
    "test": [
        (3, 1, "Test one.", "Gunther", "neutral", "neutral"),
        (3, 0, "Test zero.", "Rachel", "surprise", "negative"),
    ],
}


def write_meld(folder, rows=MELD_ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in MELD_FILES.items():
        with open(folder / f"{name}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(MELD_HEADER)
            for i, (dialogue, utterance, text, speaker, emotion, sentiment) in enumerate(rows[split]):
                writer.writerow([i + 1, text, speaker, emotion, sentiment, dialogue, utterance, 1, 1,
                                 "00:00:01,000", "00:00:02,000"])
    return folder


def write_clip(path, seconds=0.05):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, 0.1 * np.ones(int(16000 * seconds), dtype=np.float32), 16000)
    return str(path)


def conversations(split) -> dict:
    return {row["conversation_id"]: row for row in split}


def label_names(split) -> list[str]:
    return split.features["labels"].feature.names


# ---------------------------------------------------------------- MELD, synthetic


def test_meld_reads_the_official_split_files_into_dialogues_in_utterance_order(tmp_path):
    data, report = load_meld(write_meld(tmp_path / "meld"))
    assert set(data) == {"train", "validation", "test"}
    train = conversations(data["train"])
    assert sorted(train) == ["train-dia0", "train-dia5"]
    dia0 = train["train-dia0"]
    assert dia0["turns"] == [0, 1, 2, 10] and dia0["num_turns"] == 4  # numeric order, not file order
    assert dia0["texts"] == ["Zero.", "One.", "Two.", "Ten."]
    names = label_names(data["train"])
    assert [names[i] for i in dia0["labels"]] == ["neutral", "fear", "surprise", "disgust"]
    assert dia0["sentiment"] == ["neutral", "negative", "positive", "negative"]  # the other label: metadata
    assert dia0["speaker"] == ["Monica", "Chandler", "Ross", "Ross"]
    assert train["train-dia5"]["texts"] == ["Five zero.", "Five one."]
    assert report.turn_gaps["train"]["listed"] == {"train-dia0": {"missing_turns": [3, 4, 5, 6, 7, 8, 9],
                                                                  "num_missing": 7}}
    # validation is dev_sent_emo.csv, test is test_sent_emo.csv: each split from its own file despite shared ids
    assert conversations(data["validation"])["validation-dia0"]["texts"] == ["Dev zero.", "Dev one."]
    assert conversations(data["test"])["test-dia3"]["texts"] == ["Test zero.", "Test one."]
    assert [data[s].num_rows for s in ("train", "validation", "test")] == [2, 1, 1]
    assert all(audio is None for split in data.values() for row in split for audio in row["audio"])


def test_meld_label_sets_are_the_seven_emotions_or_the_three_sentiments(tmp_path):
    folder = write_meld(tmp_path / "meld")
    emotion, _ = load_meld(folder)
    sentiment, _ = load_meld(folder, label_column="sentiment")
    for split in ("train", "validation", "test"):
        assert label_names(emotion[split]) == MELD_EMOTIONS  # the full set, even for classes a split lacks
        assert label_names(sentiment[split]) == MELD_SENTIMENTS
        assert "sentiment" in emotion[split].column_names and "emotion" not in emotion[split].column_names
        assert "emotion" in sentiment[split].column_names and "sentiment" not in sentiment[split].column_names
    row = conversations(sentiment["train"])["train-dia0"]
    assert [MELD_SENTIMENTS[i] for i in row["labels"]] == ["neutral", "negative", "positive", "negative"]
    assert row["emotion"] == ["neutral", "fear", "surprise", "disgust"]
    assert row["speaker"] == ["Monica", "Chandler", "Ross", "Ross"]


def test_meld_an_emotion_outside_the_seven_is_named(tmp_path):
    rows = dict(MELD_ROWS, test=[*MELD_ROWS["test"], (3, 2, "Yay.", "Rachel", "happy", "positive")])
    folder = write_meld(tmp_path / "meld", rows)
    with pytest.raises(CorpusError, match=r"unknown label 'happy' in conversation 'test-dia3', turn 2 in .*"
                                          r"test_sent_emo.csv, line 4"):
        load_meld(folder)
    data, report = load_meld(folder, skip_invalid=True)
    assert data["test"][0]["turns"] == [0, 1]
    assert report.skipped["test"]["unknown label"] == 1


def test_meld_speaker_is_metadata_that_never_reaches_the_model_inputs(tmp_path, tokenizer):
    from mister_e_hf import MisterEProcessor
    from mister_e_hf.data import DataCollatorForConversations

    data, _ = load_meld(write_meld(tmp_path / "meld"))
    assert data["train"].features["speaker"].feature.dtype == "string"
    rows = list(data["train"])
    batch = DataCollatorForConversations(MisterEProcessor(tokenizer=tokenizer))(rows)
    assert not [key for key in batch if "speaker" in key]
    renamed = [dict(row, speaker=["Nobody"] * row["num_turns"]) for row in rows]
    other = DataCollatorForConversations(MisterEProcessor(tokenizer=tokenizer))(renamed)
    assert batch.keys() == other.keys() and all(torch.equal(batch[k], other[k]) for k in batch)


def test_meld_flat_audio_folder_matches_clips_by_stem_and_notes_missing_ones(tmp_path):
    audio = tmp_path / "audio"
    # stems that only train has (dev and test reuse dialogue 0's and 3's ids: see the collision test below)
    clips = {(0, 2): write_clip(audio / "dia0_utt2.wav"), (0, 10): write_clip(audio / "dia0_utt10.flac"),
             (5, 0): write_clip(audio / "dia5_utt0.wav"), (5, 1): write_clip(audio / "dia5_utt1.wav")}
    write_clip(audio / "dia0_utt1x.wav")  # not dia0_utt1: a stem must match exactly
    data, report = load_meld(write_meld(tmp_path / "meld"), audio_dir=audio)
    train = conversations(data["train"])
    assert train["train-dia0"]["audio"] == [None, None, clips[0, 2], clips[0, 10]]
    assert train["train-dia0"]["texts"] == ["Zero.", "One.", "Two.", "Ten."]  # clipless utterances keep their text
    assert train["train-dia5"]["audio"] == [clips[5, 0], clips[5, 1]]
    assert report.notes == [
        "train: 2 of 6 utterances have no audio clip; kept as text-only",
        "validation: 2 of 2 utterances have no audio clip; kept as text-only",
        "test: 2 of 2 utterances have no audio clip; kept as text-only",
    ]


@pytest.mark.parametrize("layout", [("train_splits", "dev_splits_complete", "output_repeated_splits_test"),
                                    ("train", "dev", "test")], ids=["MELD.Raw-names", "short-names"])
def test_meld_per_split_audio_folders_give_each_split_its_own_clips(tmp_path, layout):
    audio = tmp_path / "audio"
    folders = dict(zip(("train", "validation", "test"), layout))
    expected = {}
    for split, rows in MELD_ROWS.items():
        for dialogue, utterance, *_ in rows:
            if (split, dialogue, utterance) != ("train", 5, 1):  # one clip missing
                expected[split, dialogue, utterance] = write_clip(
                    audio / folders[split] / f"dia{dialogue}_utt{utterance}.wav")
    data, report = load_meld(write_meld(tmp_path / "meld"), audio_dir=audio)
    for split in ("train", "validation", "test"):
        for row in data[split]:
            dialogue = int(row["conversation_id"].rsplit("dia", 1)[1])
            assert row["audio"] == [expected.get((split, dialogue, turn)) for turn in row["turns"]]
    # dev's dia0_utt0 is dev's own clip, not train's clip of the same name
    assert conversations(data["validation"])["validation-dia0"]["audio"][0].endswith(
        f"{folders['validation']}/dia0_utt0.wav")
    assert report.notes == ["train: 1 of 6 utterances have no audio clip; kept as text-only"]


def test_meld_flat_audio_folder_never_gives_one_clip_to_utterances_of_two_splits(tmp_path):
    """MELD's dialogue ids restart in every split: dev's dia0_utt0 is not train's, so one flat clip of that name is
    refused by name rather than given to both."""
    audio = tmp_path / "audio"
    write_clip(audio / "dia0_utt0.wav")
    folder = write_meld(tmp_path / "meld")
    with pytest.raises(CorpusError, match=r"dia0_utt0.wav: MELD's dialogue ids restart in every split.*own folder"):
        load_meld(folder, audio_dir=audio)


# ---------------------------------------------------------------- MELD, the real shared copy


MELD_README_SIZES = {"train": (9989, 1038), "validation": (1109, 114), "test": (2610, 280)}
"""(utterances, dialogues) per split, from the shared copy's README (13,708 utterances in 1,432 dialogues)."""

MELD_README_EMOTIONS = {
    "train": [1109, 271, 268, 1743, 4710, 683, 1205],
    "validation": [153, 22, 40, 163, 470, 111, 150],
    "test": [345, 68, 50, 402, 1256, 208, 281],
}
MELD_README_SENTIMENTS = {"train": [2945, 4710, 2334], "validation": [406, 470, 233], "test": [833, 1256, 521]}


def read_meld_csv(path):
    """{dialogue id: [(utterance id, row), ...] sorted by utterance id}, with the csv module only."""
    dialogues = defaultdict(list)
    with open(path, encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            dialogues[int(row["Dialogue_ID"])].append((int(row["Utterance_ID"]), row))
    return {d: sorted(turns, key=lambda t: t[0]) for d, turns in dialogues.items()}


@pytest.fixture(scope="module")
def real_meld():
    folder = require_shared("data", "meld")
    return folder, load_meld(folder)


def test_real_meld_split_sizes_and_label_counts_match_the_files(real_meld):
    folder, (data, report) = real_meld
    assert set(data) == {"train", "validation", "test"}
    totals = Counter()
    for split, name in MELD_FILES.items():
        files = read_meld_csv(folder / f"{name}_sent_emo.csv")
        utterances = sum(len(turns) for turns in files.values())
        assert (utterances, len(files)) == MELD_README_SIZES[split]
        loaded = data[split]
        assert (sum(loaded["num_turns"]), loaded.num_rows) == (utterances, len(files)), split
        totals.update(utterances=utterances, dialogues=len(files))

        emotions = Counter(row["Emotion"] for turns in files.values() for _, row in turns)
        sentiments = Counter(row["Sentiment"] for turns in files.values() for _, row in turns)
        assert [emotions[e] for e in MELD_EMOTIONS] == MELD_README_EMOTIONS[split]
        assert [sentiments[s] for s in MELD_SENTIMENTS] == MELD_README_SENTIMENTS[split]
        names = label_names(loaded)
        assert names == MELD_EMOTIONS
        assert Counter(names[i] for labels in loaded["labels"] for i in labels) == emotions, split
        assert Counter(s for turns in loaded["sentiment"] for s in turns) == sentiments, split

        # every dialogue: its utterances in Utterance_ID order, with their own text, emotion and speaker
        by_id = conversations(loaded)
        assert sorted(by_id) == sorted(f"{split}-dia{d}" for d in files)
        for dialogue, turns in files.items():
            row = by_id[f"{split}-dia{dialogue}"]
            assert row["turns"] == [u for u, _ in turns]
            assert row["texts"] == [r["Utterance"] for _, r in turns]
            assert [names[i] for i in row["labels"]] == [r["Emotion"] for _, r in turns]
            assert row["speaker"] == [r["Speaker"] for _, r in turns]
        gaps = sum(1 for turns in files.values() if turns[-1][0] - turns[0][0] + 1 != len(turns))
        assert report.turn_gaps.get(split, {"conversations": 0})["conversations"] == gaps, split
    assert totals == {"utterances": 13708, "dialogues": 1432}
    assert report.num_skipped == 0


# ---------------------------------------------------------------- EmoDB, synthetic


EMODB_SPEAKERS = ["03", "08", "09", "10", "11", "12", "13", "14", "15", "16"]
EMODB_PAIRS = [["03", "08"], ["09", "10"], ["11", "12"], ["13", "14"], ["15", "16"]]
EMODB_EMOTIONS = {"W": "anger", "N": "neutral", "T": "sadness"}


def write_emodb(folder):
    """Each speaker reads 1 to 3 sentences (so that every split size is distinct per speaker)."""
    lines = ["file,speaker,sentence_code,emotion,transcript"]
    for s, speaker in enumerate(reversed(EMODB_SPEAKERS)):  # not sorted in the file
        for i, letter in enumerate("WNT"[: 1 + s % 3]):
            name = f"{speaker}a0{i}{letter}a.wav"
            write_clip(folder / "wav" / name)
            lines.append(f"{name},{speaker},a0{i},{EMODB_EMOTIONS[letter]},Der Satz {i}.")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def speakers_of(data) -> dict[str, set[str]]:
    return {split: {s for turns in data[split]["speaker"] for s in turns} for split in data}


def test_emodb_speaker_folds_are_sorted_consecutive_pairs():
    assert speaker_folds(EMODB_SPEAKERS) == EMODB_PAIRS
    assert speaker_folds(list(reversed(EMODB_SPEAKERS)) + ["03", "16"]) == EMODB_PAIRS  # order, repeats ignored
    assert speaker_folds([f"{s:02d}" for s in range(7)], 3) == [["00", "01", "02"], ["03", "04"], ["05", "06"]]
    with pytest.raises(CorpusError, match="4 speakers cannot make 5 speaker-independent folds"):
        speaker_folds(["a", "b", "c", "d"])


def test_emodb_folds_are_speaker_independent_and_test_every_speaker_once(tmp_path):
    folder = write_emodb(tmp_path / "emodb")
    with open(folder / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    per_speaker = Counter(row["speaker"] for row in rows)
    tested, validated = Counter(), Counter()
    for fold in range(5):
        data, report = load_emodb(folder, fold=fold)
        speakers = speakers_of(data)
        assert speakers["test"] == set(EMODB_PAIRS[fold])
        assert speakers["validation"] == set(EMODB_PAIRS[(fold + 1) % 5])  # the next fold's pair
        assert speakers["train"] == set(EMODB_SPEAKERS) - speakers["test"] - speakers["validation"]
        assert len(speakers["train"]) == 6
        for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
            assert not speakers[a] & speakers[b], (fold, a, b)
        for split in data:  # every utterance in exactly one split, as many as its speakers read
            assert data[split].num_rows == sum(per_speaker[s] for s in speakers[split])
            assert all(row["num_turns"] == 1 and row["turns"] == [0] for row in data[split])
        files = sorted(c for split in data for c in data[split]["conversation_id"])
        assert files == sorted(row["file"][:-4] for row in rows)
        assert label_names(data["train"]) == ["anger", "neutral", "sadness"]
        assert f"fold {fold}: test speakers {EMODB_PAIRS[fold]}" in report.notes[0]
        tested.update(speakers["test"])
        validated.update(speakers["validation"])
    assert tested == validated == Counter(EMODB_SPEAKERS)  # each speaker tested once and validated once


def test_emodb_without_validation_trains_on_the_other_eight_speakers(tmp_path):
    folder = write_emodb(tmp_path / "emodb")
    for fold in range(5):
        data, report = load_emodb(folder, fold=fold, validation=False)
        assert set(data) == {"train", "test"}
        speakers = speakers_of(data)
        assert speakers["test"] == set(EMODB_PAIRS[fold])
        assert speakers["train"] == set(EMODB_SPEAKERS) - set(EMODB_PAIRS[fold]) and len(speakers["train"]) == 8
        assert "validation" not in report.notes[0]


def test_emodb_keeps_speaker_codes_as_strings_and_the_clip_and_transcript_of_each_file(tmp_path):
    folder = write_emodb(tmp_path / "emodb")
    data, _ = load_emodb(folder, fold=0)
    row = conversations(data["test"])["03a00Wa"]
    assert row["speaker"] == ["03"] and row["sentence_code"] == ["a00"]  # leading zero kept
    assert row["audio"] == [str(folder / "wav" / "03a00Wa.wav")] and row["texts"] == ["Der Satz 0."]
    assert label_names(data["test"])[row["labels"][0]] == "anger"


# ---------------------------------------------------------------- EmoDB, the real shared copy


EMODB_README_SPEAKERS = {"03": 49, "08": 58, "09": 43, "10": 38, "11": 55, "12": 35, "13": 61, "14": 69, "15": 56,
                         "16": 71}
"""Clips per speaker, from the shared copy's README."""


def test_real_emodb_has_535_clips_of_10_speakers_and_the_fold_sizes_of_its_speakers():
    folder = require_shared("data", "emodb")
    with open(folder / "metadata.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    per_speaker = Counter(row["speaker"] for row in rows)
    assert len(rows) == 535 and per_speaker == EMODB_README_SPEAKERS
    emotions = sorted({row["emotion"] for row in rows})
    assert len(emotions) == 7
    tested = Counter()
    for fold in range(5):
        test, validation = EMODB_PAIRS[fold], EMODB_PAIRS[(fold + 1) % 5]
        expected = {"test": sum(per_speaker[s] for s in test), "validation": sum(per_speaker[s] for s in validation)}
        expected["train"] = 535 - expected["test"] - expected["validation"]
        data, report = load_emodb(folder, fold=fold)
        assert {split: data[split].num_rows for split in data} == expected, fold
        speakers = speakers_of(data)
        assert speakers["test"] == set(test) and speakers["validation"] == set(validation)
        assert not speakers["train"] & (speakers["test"] | speakers["validation"])
        assert label_names(data["train"]) == emotions
        tested.update(speakers["test"])
        closed, _ = load_emodb(folder, fold=fold, validation=False)
        assert {split: closed[split].num_rows for split in closed} == {
            "train": 535 - expected["test"], "test": expected["test"]}
        assert report.num_skipped == 0
        if fold == 0:  # by hand from the README's speaker table: 03+08 test, 09+10 validation
            assert expected == {"test": 49 + 58, "validation": 43 + 38, "train": 535 - 107 - 81}
    assert tested == Counter(EMODB_SPEAKERS)
