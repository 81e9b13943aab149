"""IEMOCAP and CMU-MOSI loaders on tiny synthetic corpora laid out as their owners distribute them."""

import csv

import numpy as np
import pytest
import soundfile

from mister_e_hf.data.common import UNLABELLED, CorpusError
from mister_e_hf.data.iemocap import load_iemocap
from mister_e_hf.data.mosi import load_mosi


def write_wav(path, seconds=0.1, sampling_rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = 0.1 * np.random.default_rng(0).standard_normal(int(seconds * sampling_rate))
    soundfile.write(path, samples.astype(np.float32), sampling_rate)


# ---------------------------------------------------------------- IEMOCAP

# dialog -> utterances (suffix, start, end, raw label, [valence, activation, dominance], text or None, has wav),
# deliberately not in time order in the files.
DIALOG = [
    ("M001", 9.10, 11.00, "exc", (4.0, 3.5, 3.0), "That is great news!", True),
    ("F000", 6.29, 8.24, "neu", (2.5, 2.5, 2.5), "Excuse me.", True),
    ("F001", 8.30, 9.00, "hap", (4.5, 3.0, 3.5), "Oh, hello.", True),
    ("M002", 11.50, 12.00, "xxx", (3.0, 3.0, 3.0), "Well.", False),
    ("F003", 12.20, 14.00, "fru", (1.5, 3.5, 3.0), "Why does this always happen?", True),
    ("M000", 0.50, 2.00, "sad", (1.5, 2.0, 2.0), "I lost it.", True),
    ("F002", 14.50, 15.00, "ang", (1.0, 4.5, 4.0), "Stop it.", True),
]
SESSIONS = {
    1: ["Ses01F_impro01", "Ses01M_script01_1"],
    2: ["Ses02F_impro01", "Ses02F_impro02", "Ses02M_script01_1"],
    3: ["Ses03F_impro01", "Ses03M_impro02", "Ses03M_script02_2"],
}


def write_dialog(root, session, dialog, utterances):
    base = root / f"Session{session}"
    evaluation = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
    transcript = []
    for suffix, start, end, label, (v, a, d), text, has_wav in utterances:
        utterance = f"{dialog}_{suffix}"
        evaluation += [
            f"[{start:.4f} - {end:.4f}]\t{utterance}\t{label}\t[{v:.4f}, {a:.4f}, {d:.4f}]",
            "C-E1:\tNeutral;\t()",
            "C-E3:\tNeutral;\t()",
            "A-E1:\tval 3; act 2; dom  2;\t()",
            "",
        ]
        if text is not None:
            transcript.append(f"{utterance} [{start:08.4f}-{end:08.4f}]: {text}")
        if has_wav:
            write_wav(base / "sentences" / "wav" / dialog / f"{utterance}.wav")
    transcript += ["M: [BREATHING]", f"{dialog}_MXX0 [020.0000-021.0000]: [LAUGHTER]"]
    for folder, lines in (("EmoEvaluation", evaluation), ("transcriptions", transcript)):
        (base / "dialog" / folder).mkdir(parents=True, exist_ok=True)
        (base / "dialog" / folder / f"{dialog}.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def iemocap(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    for session, dialogs in SESSIONS.items():
        for dialog in dialogs:
            write_dialog(root, session, dialog, DIALOG)
        (root / f"Session{session}" / "dialog" / "EmoEvaluation" / "Categorical").mkdir()  # as in the release
    return root


def conversation(split, conversation_id):
    rows = [row for row in split if row["conversation_id"] == conversation_id]
    assert len(rows) == 1
    return rows[0]


def test_iemocap_conversations_in_time_order(iemocap):
    data, _ = load_iemocap(iemocap, fold=1)
    assert sorted(data["test"]["conversation_id"]) == SESSIONS[1]
    row = conversation(data["test"], "Ses01F_impro01")
    ordered = sorted(DIALOG, key=lambda u: u[1])
    assert row["num_turns"] == len(DIALOG)
    assert row["turns"] == list(range(len(DIALOG)))
    assert row["texts"] == [u[5] for u in ordered]
    assert row["start"] == sorted(row["start"])
    assert row["audio"][0].endswith("Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M000.wav")


def test_iemocap_label_sets(iemocap):
    data, report = load_iemocap(iemocap, label_set="4", fold=1)
    names = data["test"].features["labels"].feature.names
    assert names == ["neutral", "happy", "sad", "angry"]
    row = conversation(data["test"], "Ses01F_impro01")
    # time order: sad, neu, hap, exc, xxx, fru, ang
    assert row["raw_label"] == ["sad", "neu", "hap", "exc", "xxx", "fru", "ang"]
    assert row["labels"] == [2, 0, 1, 1, UNLABELLED, UNLABELLED, 3]
    assert any("test: 4 utterances labelled outside the 4-way set" in note and "'xxx': 2" in note
               for note in report.notes)
    assert report.num_skipped == 0

    data, report = load_iemocap(iemocap, label_set="6", fold=1)
    names = data["test"].features["labels"].feature.names
    assert names == ["happy", "sad", "neutral", "angry", "excited", "frustrated"]
    row = conversation(data["test"], "Ses01F_impro01")
    assert row["labels"] == [1, 2, 0, 4, UNLABELLED, 5, 3]
    assert any("test: 2 utterances labelled outside the 6-way set ({'xxx': 2})" in note for note in report.notes)


def test_iemocap_metadata(iemocap):
    data, _ = load_iemocap(iemocap, fold=1)
    row = conversation(data["test"], "Ses01F_impro01")
    ordered = sorted(DIALOG, key=lambda u: u[1])
    assert row["speaker"] == [u[0][0] for u in ordered]
    assert row["valence"] == pytest.approx([u[4][0] for u in ordered])
    assert row["arousal"] == pytest.approx([u[4][1] for u in ordered])
    assert row["dominance"] == pytest.approx([u[4][2] for u in ordered])
    assert row["start"] == pytest.approx([u[1] for u in ordered])
    assert row["end"] == pytest.approx([u[2] for u in ordered])
    for name in ("valence", "arousal", "dominance", "start", "end"):
        assert data["test"].features[name].feature.dtype == "float32"


@pytest.mark.parametrize("fold", [1, 2, 3])
def test_iemocap_fold_selection(iemocap, fold):
    data, report = load_iemocap(iemocap, fold=fold, validation_fraction=0.25, seed=0)
    assert sorted(data["test"]["conversation_id"]) == SESSIONS[fold]
    others = sorted(d for s, dialogs in SESSIONS.items() if s != fold for d in dialogs)
    validation, train = list(data["validation"]["conversation_id"]), list(data["train"]["conversation_id"])
    assert len(validation) == round(0.25 * len(others))
    assert not set(validation) & set(train)
    assert sorted(validation + train) == others
    assert all(not d.startswith(f"Ses0{fold}") for d in validation)
    assert any(f"fold {fold}: test Session{fold}" in note for note in report.notes)


def test_iemocap_validation_is_seeded_and_at_least_one(iemocap):
    pick = lambda seed: list(load_iemocap(iemocap, fold=1, seed=seed)[0]["validation"]["conversation_id"])  # noqa: E731
    first = pick(0)
    assert len(first) == 1  # 10 % of 6 dialogs rounds to 0: at least one
    assert pick(0) == first
    assert any(pick(seed) != first for seed in range(1, 20))
    data, _ = load_iemocap(iemocap, fold=1, validation_fraction=0)
    assert set(data) == {"train", "test"}


def test_iemocap_missing_folders(iemocap, tmp_path):
    with pytest.raises(CorpusError, match="Session1") as error:
        load_iemocap(tmp_path / "nowhere", fold=1)
    assert "Expected layout" in str(error.value)
    (iemocap / "Session2" / "dialog" / "EmoEvaluation").rename(iemocap / "Session2" / "dialog" / "Evaluation")
    with pytest.raises(CorpusError) as error:
        load_iemocap(iemocap, fold=1)
    assert str(iemocap / "Session2" / "dialog" / "EmoEvaluation") in str(error.value)
    assert "Expected layout" in str(error.value)
    with pytest.raises(CorpusError, match="fold"):
        load_iemocap(iemocap, fold=6)


def test_iemocap_missing_transcript(tmp_path):
    root = tmp_path / "IEMOCAP"
    utterances = [u if u[0] != "F001" else (*u[:5], None, u[6]) for u in DIALOG]
    write_dialog(root, 1, "Ses01F_impro01", utterances)
    write_dialog(root, 2, "Ses02F_impro01", DIALOG)
    write_dialog(root, 2, "Ses02F_impro02", DIALOG)
    transcript = root / "Session1" / "dialog" / "transcriptions" / "Ses01F_impro01.txt"
    with pytest.raises(CorpusError, match="Ses01F_impro01_F001") as error:
        load_iemocap(root, fold=1)
    assert str(transcript) in str(error.value)

    data, report = load_iemocap(root, fold=1, skip_invalid=True)
    row = conversation(data["test"], "Ses01F_impro01")
    assert "Oh, hello." not in row["texts"] and row["num_turns"] == len(DIALOG) - 1
    assert report.skipped["test"]["no transcript"] == 1
    # the skipped utterance leaves a gap in the turn numbers: recorded in the report (no longer a note)
    assert report.turn_gaps["test"]["listed"]["Ses01F_impro01"] == {"missing_turns": [2], "num_missing": 1}
    assert "gaps in their turn numbers" in report.summary()

    # an unlabelled (xxx) utterance without transcript stays as context without text (None: blank text is absent)
    utterances = [u if u[3] != "xxx" else (*u[:5], None, u[6]) for u in DIALOG]
    write_dialog(root, 1, "Ses01F_impro01", utterances)
    data, report = load_iemocap(root, fold=1)
    row = conversation(data["test"], "Ses01F_impro01")
    assert row["texts"][4] is None and row["labels"][4] == UNLABELLED
    assert any("1 unlabelled utterances have no transcript" in note for note in report.notes)


def test_iemocap_absent_wav_gives_no_audio(iemocap):
    data, report = load_iemocap(iemocap, fold=1)
    row = conversation(data["test"], "Ses01F_impro01")
    assert row["raw_label"][4] == "xxx" and row["audio"][4] is None
    assert all(path is not None for i, path in enumerate(row["audio"]) if i != 4)
    assert any(note.startswith("test: 2 of 14 utterances have no wav file") for note in report.notes)


# ---------------------------------------------------------------- CMU-MOSI

MOSI_ROWS = [
    # video_id, clip_id, text, label, mode
    ("03bSnISJMiM", "10", "and it was great", "2.6", "train"),
    ("03bSnISJMiM", "2", "i did not like it", "-1.4", "train"),
    ("03bSnISJMiM", "1", "so i saw the movie", "0.0", "train"),
    ("0h-zjBukYpk", "1", "terrible acting", "-3.0", "train"),
    ("0h-zjBukYpk", "3", "but the music was fine", "0.5", "train"),
    ("1DmNV9C1hbY", "1", "it was okay", "1.5", "valid"),
    ("1DmNV9C1hbY", "2", "maybe worse", "-0.4", "valid"),
    ("2iD-tVS8NPw", "1", "best film of the year", "2.5", "test"),
    ("2iD-tVS8NPw", "2", "really", "-2.6", "test"),
]


@pytest.fixture
def mosi(tmp_path):
    root = tmp_path / "MOSI"
    root.mkdir()
    with open(root / "label.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "clip_id", "text", "label", "annotation", "mode"])
        for video, clip, text, label, mode in MOSI_ROWS:
            annotation = "Positive" if float(label) > 0 else "Negative" if float(label) < 0 else "Neutral"
            writer.writerow([video, clip, text, label, annotation, mode])
    write_wav(root / "Raw" / "Audio" / "WAV_16000" / "Segmented" / "03bSnISJMiM_1.wav")
    write_wav(root / "Raw" / "Audio" / "WAV_16000" / "Segmented" / "03bSnISJMiM_2.wav")
    write_wav(root / "wav" / "03bSnISJMiM" / "10.wav")
    return root


def test_mosi_splits_and_clip_order(mosi):
    data, report = load_mosi(mosi)
    assert set(data) == {"train", "validation", "test"}
    assert sorted(data["train"]["conversation_id"]) == ["03bSnISJMiM", "0h-zjBukYpk"]
    assert list(data["validation"]["conversation_id"]) == ["1DmNV9C1hbY"]
    assert list(data["test"]["conversation_id"]) == ["2iD-tVS8NPw"]
    row = conversation(data["train"], "03bSnISJMiM")
    assert row["turns"] == [0, 1, 2]
    assert row["clip_id"] == ["1", "2", "10"]
    assert row["texts"] == ["so i saw the movie", "i did not like it", "and it was great"]
    assert row["score"] == pytest.approx([0.0, -1.4, 2.6])
    assert data["train"].features["score"].feature.dtype == "float32"
    assert "speaker" not in data["train"].column_names
    assert row["audio"][0].endswith("Raw/Audio/WAV_16000/Segmented/03bSnISJMiM_1.wav")
    assert row["audio"][2].endswith("wav/03bSnISJMiM/10.wav")
    assert conversation(data["train"], "0h-zjBukYpk")["audio"] == [None, None]
    assert any(note.startswith("train: 2 of 5 clips have no audio file") for note in report.notes)


def test_mosi_label_sets(mosi):
    data, _ = load_mosi(mosi, label_set="binary")
    assert data["train"].features["labels"].feature.names == ["negative", "positive"]
    assert conversation(data["train"], "03bSnISJMiM")["labels"] == [1, 0, 1]  # 0 counts as positive
    assert data["test"][0]["labels"] == [1, 0]

    data, report = load_mosi(mosi, label_set="binary-non0")
    assert conversation(data["train"], "03bSnISJMiM")["labels"] == [UNLABELLED, 0, 1]
    assert conversation(data["train"], "0h-zjBukYpk")["labels"] == [0, 1]
    assert any("train: 1 clips with score 0 kept as unlabelled context" in note for note in report.notes)
    assert report.num_skipped == 0

    data, _ = load_mosi(mosi, label_set="7")
    names = data["train"].features["labels"].feature.names
    assert names == ["-3", "-2", "-1", "0", "1", "2", "3"]
    decode = lambda row: [names[i] for i in row["labels"]]  # noqa: E731
    assert decode(conversation(data["train"], "03bSnISJMiM")) == ["0", "-1", "3"]
    assert decode(conversation(data["train"], "0h-zjBukYpk")) == ["-3", "0"]  # 0.5 rounds half to even
    assert decode(data["validation"][0]) == ["2", "0"]
    assert decode(data["test"][0]) == ["2", "-3"]


def test_mosi_errors(mosi, tmp_path):
    with pytest.raises(CorpusError) as error:
        load_mosi(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "label.csv") in str(error.value) and "Expected layout" in str(error.value)
    with open(mosi / "label.csv", "a", newline="") as f:
        csv.writer(f).writerow(["2iD-tVS8NPw", "3", "odd", "n/a", "Neutral", "test"])
    with pytest.raises(CorpusError, match="line 11"):
        load_mosi(mosi)
    data, report = load_mosi(mosi, skip_invalid=True)
    assert report.skipped["test"]["unreadable score or clip id"] == 1
    assert data["test"][0]["num_turns"] == 2
    with pytest.raises(ValueError, match="label sets"):
        load_mosi(mosi, label_set="3")


# ---------------------------------------------------------------- dimensional training from these loaders


@pytest.mark.parametrize("dataset,columns", [("iemocap", "valence,arousal,dominance"), ("mosi", "score")])
def test_run_erc_trains_a_regression_head_on_the_loaders_dimensions(dataset, columns, request, tmp_path,
                                                                     tiny_backbones):
    """IEMOCAP's valence/arousal/dominance and MOSI's sentiment score train `--head regression` through run_erc.py."""
    import json

    from helpers import run_erc

    speech, text = tiny_backbones
    data_dir = request.getfixturevalue(dataset)
    output_dir = tmp_path / "run"
    result = run_erc(
        "--dataset", dataset, "--data_dir", data_dir, "--speech_model_name_or_path", speech,
        "--text_model_name_or_path", text, "--freeze_backbones", "--output_dir", output_dir,
        "--embedding_cache_dir", tmp_path / "cache", "--head", "regression", "--label_columns", columns,
        "--config_overrides", "projection_dim=16,context_hidden_size=8,expert_hidden_size=16,cross_attention_heads=2",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
        *(["--fold", "3"] if dataset == "iemocap" else []),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    test = json.loads((output_dir / "test_results.json").read_text())
    for column in columns.split(","):
        assert np.isfinite(test[f"test_ccc_{column}"]) and np.isfinite(test[f"test_mae_{column}"])
    config = json.loads((output_dir / "config.json").read_text())
    assert config["head"] == "regression" and list(config["id2label"].values()) == columns.split(",")
