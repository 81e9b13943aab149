"""Corpus files that are subtly wrong give a named error (file and line) or, with skip_invalid, a reported skip; never a
silent wrong dataset nor a traceback from inside csv, json or datasets. Tiny files in tmp_path only."""

import csv
import json
import os

import numpy as np
import pytest
import soundfile

from mister_e_hf.data import LOADERS, load_corpus
from mister_e_hf.data.common import CorpusError, DataReport
from mister_e_hf.data.emodb import load_emodb
from mister_e_hf.data.iemocap import load_iemocap
from mister_e_hf.data.manifest import load_manifest
from mister_e_hf.data.meld import load_meld
from mister_e_hf.data.mosi import load_mosi


HEADER = "conversation_id,turn,text,label\n"


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def labels_of(split):
    return split.features["labels"].feature.names


# ---------------------------------------------------------------- CSV field counts (unquoted commas)


def test_csv_row_with_an_unquoted_comma_is_an_error_naming_file_line_and_quoting(tmp_path):
    path = write(tmp_path / "train.csv", HEADER + "c,0,hello,happy\nc,1,oh, no,calm\n")
    with pytest.raises(CorpusError) as error:
        load_manifest(train_file=str(path))
    message = str(error.value)
    assert str(path) in message and "line 3" in message and "5 fields" in message and "quoted" in message


def test_csv_rows_with_a_wrong_field_count_are_skipped_and_reported_with_skip_invalid(tmp_path):
    path = write(tmp_path / "train.csv", HEADER + 'c,0,hello,happy\nc,1,oh, no,calm\nc,2,"oh, yes",calm\nc,3,bye\n')
    data, report = load_manifest(train_file=str(path), skip_invalid=True)
    assert labels_of(data["train"]) == ["calm", "happy"]  # no invented class "no"
    row = data["train"][0]
    assert row["turns"] == [0, 2] and row["texts"] == ["hello", "oh, yes"]
    assert report.skipped["train"]["wrong number of fields"] == 2
    assert any("line 3" in e for e in report.examples["wrong number of fields"])
    assert any("line 5" in e for e in report.examples["wrong number of fields"])
    assert report.to_dict()["skipped_by_split"] == {"train": {"wrong number of fields": 2}}


def test_csv_short_row_is_an_error_not_an_unlabelled_utterance(tmp_path):
    path = write(tmp_path / "train.csv", HEADER + "c,0,hello,happy\nc,1,bye\n")
    with pytest.raises(CorpusError, match=r"line 3: 3 fields where the header has 4"):
        load_manifest(train_file=str(path))


def test_csv_extra_field_in_the_first_row_is_a_named_error(tmp_path):
    path = write(tmp_path / "train.csv", HEADER + "c,0,hello,there,happy\nc,1,bye,calm\n")
    with pytest.raises(CorpusError, match=r"line 2: 5 fields"):
        load_manifest(train_file=str(path))


def test_csv_line_numbers_count_physical_lines_of_quoted_multiline_fields(tmp_path):
    path = write(tmp_path / "train.csv", HEADER + 'c,0,"two\nlines",happy\nc,1,bad,row,calm\n')
    with pytest.raises(CorpusError, match=r"line 4: 5 fields"):
        load_manifest(train_file=str(path))


def test_csv_broken_quoting_is_a_named_error(tmp_path):
    path = write(tmp_path / "train.csv", HEADER + 'c,0,hello,happy\nc,1,"never closed,calm\nc,2,bye,calm\n')
    with pytest.raises(CorpusError, match=r"line 3: broken CSV quoting"):
        load_manifest(train_file=str(path))


def test_csv_header_only_and_empty_files(tmp_path):
    write(tmp_path / "train.csv", HEADER + "c,0,hello,happy\n")
    path = write(tmp_path / "test.csv", HEADER)
    with pytest.raises(CorpusError, match="only a header") as error:
        load_manifest(train_file=str(tmp_path / "train.csv"), test_file=str(path))
    assert str(path) in str(error.value)
    with pytest.raises(CorpusError, match="is empty"):
        load_manifest(train_file=str(write(tmp_path / "empty.csv", "\n")))


def test_csv_with_a_byte_order_mark_and_spaced_header_loads(tmp_path):
    path = write(tmp_path / "train.csv", "\ufeff" + HEADER + "c,0,hello,happy\nc,1,bye,calm\n")
    data, _ = load_manifest(train_file=str(path))
    assert data["train"][0]["texts"] == ["hello", "bye"] and labels_of(data["train"]) == ["calm", "happy"]
    path = write(tmp_path / "spaced.csv", "conversation_id, turn, text, label\nc, 0,hello,happy\n")
    data, _ = load_manifest(train_file=str(path))
    assert data["train"][0]["conversation_id"] == "c" and data["train"][0]["turns"] == [0]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_manifest_is_a_named_error(tmp_path, suffix):
    text = (HEADER + "c,0,hello,happy\nc,1,caf\u00e9,calm\n" if suffix == ".csv" else
            '{"conversation_id": "c", "turn": 0, "text": "hi", "label": "a"}\n'
            '{"conversation_id": "c", "turn": 1, "text": "caf\u00e9", "label": "a"}\n')
    path = write(tmp_path / f"train{suffix}", text, encoding="latin-1")
    with pytest.raises(CorpusError) as error:
        load_manifest(train_file=str(path))
    assert str(path) in str(error.value) and f"line {3 if suffix == '.csv' else 2}" in str(error.value)
    assert "UTF-8" in str(error.value)


# ---------------------------------------------------------------- JSONL rows


def jsonl(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ROW = {"conversation_id": "c", "turn": 0, "text": "hello", "label": "happy"}


def test_jsonl_later_row_missing_a_column(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", ROW, {"conversation_id": "c", "turn": 1, "text": "bye"})
    with pytest.raises(CorpusError) as error:
        load_manifest(train_file=str(path))
    assert str(path) in str(error.value) and "line 2" in str(error.value) and "label" in str(error.value)
    data, report = load_manifest(train_file=str(path), skip_invalid=True)
    assert data["train"][0]["turns"] == [0] and report.skipped["train"]["missing column"] == 1


@pytest.mark.parametrize("line", ["[1, 2, 3]", "42", '"text"', "null"])
def test_jsonl_line_that_is_not_an_object(tmp_path, line):
    path = jsonl(tmp_path / "train.jsonl", ROW, line)
    with pytest.raises(CorpusError, match=r"line 2: a JSON \w+ where each line is one utterance"):
        load_manifest(train_file=str(path))
    data, report = load_manifest(train_file=str(path), skip_invalid=True)
    assert data["train"].num_rows == 1 and report.skipped["train"]["not a JSON object"] == 1


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"text": 5}, "value is not a string"),
        ({"label": 3}, "value is not a string"),
        ({"audio": ["a.wav"]}, "value is not a string"),
        ({"turn": 1.5}, "invalid turn"),
        ({"turn": "1.0"}, "invalid turn"),
        ({"turn": True}, "invalid turn"),
        ({"turn": -1}, "invalid turn"),
        ({"turn": None}, "invalid turn"),
        ({"conversation_id": ""}, "invalid conversation_id"),
        ({"conversation_id": "  "}, "invalid conversation_id"),
        ({"conversation_id": None}, "invalid conversation_id"),
    ],
)
def test_jsonl_values_of_the_wrong_type(tmp_path, change, reason):
    path = jsonl(tmp_path / "train.jsonl", ROW, {**ROW, "turn": 1, **change})
    with pytest.raises(CorpusError) as error:
        load_manifest(train_file=str(path))
    assert str(path) in str(error.value) and "line 2" in str(error.value)
    data, report = load_manifest(train_file=str(path), skip_invalid=True)
    assert data["train"][0]["turns"] == [0] and report.skipped["train"][reason] == 1


def test_jsonl_accepts_integer_ids_and_digit_string_turns_and_keeps_later_metadata(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", {**ROW, "conversation_id": 7}, {**ROW, "conversation_id": 7, "turn": "1",
                                                                           "speaker": "B", "score": 0.5})
    data, _ = load_manifest(train_file=str(path))
    row = data["train"][0]
    assert row["conversation_id"] == "7" and row["turns"] == [0, 1]
    assert row["speaker"] == [None, "B"] and row["score"] == [None, "0.5"]  # a column first seen on line 2 is kept


# ---------------------------------------------------------------- turn numbers: gaps allowed, duplicates not


def test_turn_gaps_are_ordered_and_recorded_in_the_report(tmp_path):
    rows = [("s1", 7, "seven", "calm"), ("s1", 0, "zero", "happy"), ("s1", 3, "three", "calm"),
            ("s2", 0, "a", "calm"), ("s2", 1, "b", "calm")]
    path = write(tmp_path / "train.csv", HEADER + "".join(f"{c},{t},{x},{y}\n" for c, t, x, y in rows))
    data, report = load_manifest(train_file=str(path), skip_invalid=False)
    s1 = [r for r in data["train"] if r["conversation_id"] == "s1"][0]
    assert s1["turns"] == [0, 3, 7] and s1["texts"] == ["zero", "three", "seven"]
    assert report.turn_gaps == {"train": {"conversations": 1,
                                          "listed": {"s1": {"missing_turns": [1, 2, 4, 5, 6], "num_missing": 5}}}}
    assert "train: 1 conversations have gaps in their turn numbers" in report.summary()
    assert "'s1' lacks turns 1, 2, 4, 5, 6" in report.summary()
    report.save(tmp_path / "out" / "data_report.json")
    saved = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert saved["turn_gaps"]["train"]["listed"]["s1"]["num_missing"] == 5


def test_turn_gap_listing_is_capped_but_counts_are_exact(tmp_path):
    from mister_e_hf.data.common import MAX_LISTED

    rows = [{**ROW, "conversation_id": f"c{i}", "turn": t} for i in range(MAX_LISTED + 5) for t in (0, 2)]
    rows += [{**ROW, "conversation_id": "far", "turn": 0}, {**ROW, "conversation_id": "far", "turn": 1_000_000}]
    _, report = load_manifest(train_file=str(jsonl(tmp_path / "train.jsonl", *rows)))
    gaps = report.turn_gaps["train"]
    assert gaps["conversations"] == MAX_LISTED + 6 and len(gaps["listed"]) == MAX_LISTED
    _, report = load_manifest(train_file=str(jsonl(tmp_path / "far.jsonl", *rows[-2:])))
    far = report.turn_gaps["train"]["listed"]["far"]
    assert far["num_missing"] == 999_999 and far["missing_turns"] == list(range(1, MAX_LISTED + 1))


def test_duplicated_turns_are_still_an_error(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", ROW, {**ROW, "text": "again"}, {**ROW, "turn": 3})
    with pytest.raises(CorpusError, match=r"conversation 'c' has turn 0 twice .*line 2"):
        load_manifest(train_file=str(path))
    data, report = load_manifest(train_file=str(path), skip_invalid=True)
    assert data["train"][0]["texts"] == ["hello", "hello"] and report.skipped["train"]["duplicated turn"] == 1
    assert report.turn_gaps["train"]["conversations"] == 1


# ---------------------------------------------------------------- label names, folders, columns


def test_label_names_are_checked(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", ROW, {**ROW, "turn": 1, "label": " calm "})
    data, _ = load_manifest(train_file=str(path), label_names=[" calm", "happy "])  # e.g. --manifest_labels "calm, happy"
    assert labels_of(data["train"]) == ["calm", "happy"] and data["train"][0]["labels"] == [1, 0]
    for bad, match in ((["calm", "calm", "happy"], "more than once"), (["calm", "", "happy"], "non-empty string"),
                       ([], "non-empty list")):
        with pytest.raises(CorpusError, match=match):
            load_manifest(train_file=str(path), label_names=bad)


def test_ambiguous_manifest_folder_and_reserved_columns(tmp_path):
    jsonl(tmp_path / "train.jsonl", ROW)
    write(tmp_path / "train.csv", HEADER + "c,0,hello,happy\n")
    with pytest.raises(CorpusError, match="more than one train manifest"):
        load_manifest(tmp_path)
    path = jsonl(tmp_path / "other.jsonl", {**ROW, "labels": "x"})
    with pytest.raises(CorpusError, match=r"\['labels'\] clash"):
        load_manifest(train_file=str(path))
    with pytest.raises(CorpusError, match="is a folder, not a file"):
        load_manifest(train_file=str(tmp_path))


def test_data_report_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "data_report.json"
    path.write_text('{"old": true}\n')
    report = DataReport()
    report.note("something")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        report.save(path)
    assert json.loads(path.read_text()) == {"old": True}  # never a torn or half-new file
    monkeypatch.undo()
    report.save(path)
    assert json.loads(path.read_text())["notes"] == ["something"]


# ---------------------------------------------------------------- MELD


MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
               "Episode", "StartTime", "EndTime"]


def write_meld(folder, header=MELD_HEADER, bad=None):
    folder.mkdir(exist_ok=True)
    for name in ("train", "dev", "test"):
        rows = [[1, "Hi, you.", "Joey", "joy", "positive", 0, 0, 1, 1, "00:00:01,000", "00:00:02,000"],
                [2, "Oh no.", "Ross", "sadness", "negative", 0, 1, 1, 1, "00:00:02,000", "00:00:03,000"]]
        if bad is not None and name == "dev":
            rows.append(bad)
        with open(folder / f"{name}_sent_emo.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows([[v for h, v in zip(MELD_HEADER, row) if h in header] for row in rows])
    return folder


def test_meld_missing_column_is_named(tmp_path):
    folder = write_meld(tmp_path / "meld", header=[h for h in MELD_HEADER if h != "Sentiment"])
    with pytest.raises(CorpusError, match=r"lacks the columns \['Sentiment'\]") as error:
        load_meld(folder)
    assert str(folder / "train_sent_emo.csv") in str(error.value)


def test_meld_non_integer_dialogue_id_is_named(tmp_path):
    data, _ = load_meld(write_meld(tmp_path / "clean"))
    assert data["validation"][0]["texts"] == ["Hi, you.", "Oh no."] and data["test"][0]["sentiment"] == [
        "positive", "negative"]
    bad = [3, "Huh?", "Monica", "surprise", "positive", "x1", 2, 1, 1, "00:00:03,000", "00:00:04,000"]
    folder = write_meld(tmp_path / "meld", bad=bad)
    with pytest.raises(CorpusError, match=r"dev_sent_emo.csv, line 4: Dialogue_ID 'x1'"):
        load_meld(folder)
    data, report = load_meld(folder, skip_invalid=True)
    assert data["validation"][0]["num_turns"] == 2
    assert report.skipped["validation"]["non-integer Dialogue_ID or Utterance_ID"] == 1


def test_meld_missing_audio_dir_is_named(tmp_path):
    with pytest.raises(CorpusError, match="nowhere not found"):
        load_meld(write_meld(tmp_path / "meld"), audio_dir=tmp_path / "nowhere")


# ---------------------------------------------------------------- EmoDB, CMU-MOSI, IEMOCAP files


def write_emodb(folder, lines, encoding="utf-8"):
    (folder / "wav").mkdir(parents=True, exist_ok=True)
    for line in lines[1:]:
        name = line.split(",")[0]
        if name.endswith(".wav"):
            soundfile.write(folder / "wav" / name, np.zeros(160, dtype=np.float32), 16000)
    write(folder / "metadata.csv", "".join(line + "\n" for line in lines), encoding)
    return folder


EMODB = ["file,speaker,sentence_code,emotion,transcript"] + [
    f"{s:02d}a0{i}{e[0].upper()}a.wav,{s:02d},a0{i},{e},Der Satz {i}."
    for s in (3, 8, 9, 10, 11) for i, e in enumerate(("anger", "neutral"))
]


def test_emodb_metadata_with_a_byte_order_mark_loads(tmp_path):
    data, _ = load_emodb(write_emodb(tmp_path / "emodb", EMODB, encoding="utf-8-sig"), fold=0)
    assert labels_of(data["train"]) == ["anger", "neutral"]


def test_emodb_metadata_problems_are_named(tmp_path):
    folder = write_emodb(tmp_path / "emodb", EMODB[:4] + ["05a01Wa.wav,05,a01"] + EMODB[4:])
    with pytest.raises(CorpusError, match=r"metadata.csv, line 5: 3 fields where the header has 5"):
        load_emodb(folder)
    data, report = load_emodb(folder, skip_invalid=True)
    assert report.skipped["metadata.csv"]["wrong number of fields"] == 1
    assert sum(d.num_rows for d in data.values()) == len(EMODB) - 1

    write_emodb(folder, EMODB[:3] + ["05a01Wa.wav,05,a01,,Ein Satz."] + EMODB[3:])
    with pytest.raises(CorpusError, match=r"line 4: emotion blank"):  # not a class named ""
        load_emodb(folder)
    write(folder / "metadata.csv", EMODB[0] + "\n" + "\n".join(EMODB[1:]).replace("Satz", "S\u00e4tze") + "\n",
          encoding="latin-1")
    with pytest.raises(CorpusError, match=r"metadata.csv, line 2: not UTF-8"):
        load_emodb(folder)
    write(folder / "metadata.csv", "")
    with pytest.raises(CorpusError, match=r"metadata.csv is empty"):
        load_emodb(folder)
    (folder / "metadata.csv").unlink()
    (folder / "metadata.csv").mkdir()
    with pytest.raises(CorpusError, match=r"metadata.csv is a folder, not a file"):
        load_emodb(folder)


def test_mosi_short_row_is_named_by_physical_line(tmp_path):
    folder = tmp_path / "MOSI"
    folder.mkdir()
    write(folder / "label.csv", "video_id,clip_id,text,label,annotation,mode\n"
                                'v1,1,"a text\nover two lines",1.0,Positive,train\n'
                                "v1,2,short row,1.0,train\n"
                                "v2,1,fine,-1.0,Negative,valid\nv3,1,fine,-2.0,Negative,test\n")
    with pytest.raises(CorpusError, match=r"label.csv, line 4: 5 fields where the header has 6"):
        load_mosi(folder)
    data, report = load_mosi(folder, skip_invalid=True)
    assert data["train"][0]["texts"] == ["a text\nover two lines"]
    assert report.skipped["label.csv"]["wrong number of fields"] == 1


def test_iemocap_malformed_summary_line_is_named(tmp_path):
    root = tmp_path / "IEMOCAP"
    for session, dialog in ((1, "Ses01F_impro01"), (2, "Ses02F_impro01"), (2, "Ses02F_impro02")):
        base = root / f"Session{session}" / "dialog"
        for folder in ("EmoEvaluation", "transcriptions"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        rating = "[2.5000, nan, 2.5000]" if dialog == "Ses01F_impro01" else "[2.5000, 2.5000, 2.5000]"
        (base / "EmoEvaluation" / f"{dialog}.txt").write_text(
            "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
            f"[1.0000 - 2.0000]\t{dialog}_F000\tneu\t[2.5000, 2.5000, 2.5000]\n\n"
            f"[3.0000 - 4.0000]\t{dialog}_M000\tang\t{rating}\n")
        (base / "transcriptions" / f"{dialog}.txt").write_text(
            f"{dialog}_F000 [001.0000-002.0000]: Hello.\n{dialog}_M000 [003.0000-004.0000]: Go away.\n")
    evaluation = root / "Session1" / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt"
    with pytest.raises(CorpusError, match="line 5: not a summary line") as error:  # not silently one utterance less
        load_iemocap(root, fold=1)
    assert str(evaluation) in str(error.value)
    data, report = load_iemocap(root, fold=1, skip_invalid=True)
    assert data["test"][0]["texts"] == ["Hello."] and report.skipped["test"]["malformed EmoEvaluation line"] == 1


# ---------------------------------------------------------------- loader options


def test_unknown_loader_option_is_named_with_the_accepted_ones(tmp_path):
    from mister_e_hf.data import loader_options

    assert loader_options("meld") == ["data_dir", "audio_dir", "label_column", "skip_invalid"]
    with pytest.raises(CorpusError) as error:
        load_corpus("meld", data_dir=str(tmp_path), fold=1)
    assert str(error.value) == ("meld does not take option 'fold'; it takes: data_dir, audio_dir, label_column, "
                                "skip_invalid")
    with pytest.raises(CorpusError, match="needs option 'data_dir'"):
        load_corpus("emodb", fold=1)
    with pytest.raises(CorpusError, match="Unknown dataset 'meld2'"):
        load_corpus("meld2", data_dir=str(tmp_path))


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_mistyped_option_for_each_loader(tmp_path, name):
    from mister_e_hf.data import loader_options

    with pytest.raises(CorpusError, match=rf"{name} does not take option 'skip_invalids'; it takes: .*skip_invalid"):
        load_corpus(name, data_dir=str(tmp_path), skip_invalids=True)
    assert "skip_invalid" in loader_options(name) and "data_dir" in loader_options(name)
    with pytest.raises(TypeError, match="skip_invalids"):  # called directly, Python names it
        LOADERS[name](data_dir=str(tmp_path), skip_invalids=True)


def test_mistyped_manifest_option_is_not_ignored_on_a_valid_corpus(tmp_path):
    jsonl(tmp_path / "train.jsonl", ROW)
    assert load_corpus("manifest", data_dir=str(tmp_path))[0]["train"].num_rows == 1
    with pytest.raises(CorpusError, match="'label_name'"):
        load_corpus("manifest", data_dir=str(tmp_path), label_name=["happy", "sad"])
