"""The conversational-emotion-recognition pipeline and the `mister-e` command (real subprocess calls)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import make_conversations, minilm_path, require_shared
from transformers import pipeline

import mister_e_hf  # noqa: F401
from mister_e_hf.pipeline import TASK


MISTER_E = str(Path(sys.executable).parent / "mister-e")


@pytest.fixture
def saved_model(build, tmp_path):
    model, processor = build("wav2vec2", "bert", id2label={0: "calm", 1: "happy", 2: "angry", 3: "sad"})
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_pipeline_single_and_batched_give_equal_results(saved_model):
    recognizer = pipeline(TASK, model=str(saved_model))
    conversations = make_conversations([3, 1, 4], seed=41)
    singles = [recognizer(conversation) for conversation in conversations]
    batched = recognizer(conversations, batch_size=2)
    assert [len(c) for c in batched] == [3, 1, 4]
    for single, many in zip(singles, batched):
        for a, b in zip(single, many):
            assert a["label"] == b["label"]
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)
            assert a["gate_weights"] == pytest.approx(b["gate_weights"], abs=1e-6)
    first = singles[0][0]
    assert set(first) == {"label", "score", "scores", "gate_weights"}
    assert set(first["scores"]) == {"calm", "happy", "angry", "sad"} and sum(first["scores"].values()) == pytest.approx(1)
    assert set(first["gate_weights"]) == {"speech", "text", "cross-modal"}
    assert first["score"] == max(first["scores"].values())


def test_pipeline_transcribes_missing_text_with_an_asr_model(tokenizer):
    whisper = require_shared("models", "whisper-tiny.en")
    emodb = require_shared("data", "emodb")
    from mister_e_hf import MisterEModel, MisterEProcessor

    model = MisterEModel.from_backbones(str(whisper), minilm_path(), freeze_speech_backbone=True,
                                        freeze_text_backbone=True, num_labels=3)
    processor = MisterEProcessor.from_backbones(str(whisper), minilm_path())
    recognizer = pipeline(TASK, model=model, processor=processor)
    clip = str(emodb / "wav" / "03a01Fa.wav")
    (prediction,) = recognizer([{"audio": clip}], asr_model=str(whisper))
    assert isinstance(prediction["transcript"], str) and prediction["transcript"]
    # without an ASR model, missing (or blank) text is absent text: the speech expert alone predicts
    for utterance in ({"audio": clip}, {"audio": clip, "text": ""}, {"audio": clip, "text": "  "}):
        (alone,) = recognizer([utterance])
        assert alone["gate_weights"]["speech"] == pytest.approx(1.0) and "transcript" not in alone
        assert alone["gate_weights"]["text"] == alone["gate_weights"]["cross-modal"] == 0.0


def mister_e(*args):
    return subprocess.run([MISTER_E, *map(str, args)], capture_output=True, text=True, timeout=300)


def write_conversations(folder: Path, count: int = 3) -> Path:
    lines = []
    for c, conversation in enumerate(make_conversations([2, 3, 1][:count], seed=42)):
        utterances = []
        for t, utterance in enumerate(conversation):
            name = f"c{c}t{t}.wav"
            soundfile.write(folder / name, utterance["audio"], utterance["sampling_rate"])
            utterances.append({"audio": name, "text": utterance["text"]})
        lines.append(json.dumps({"conversation_id": f"dialogue-{c}", "utterances": utterances}))
    (folder / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "conversations.jsonl"


def test_cli_predict_writes_one_line_per_utterance(saved_model, tmp_path):
    conversations = write_conversations(tmp_path)
    result = mister_e("predict", "--model", saved_model, conversations, "-o", tmp_path / "out.jsonl")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(x["conversation_id"], x["turn"]) for x in lines] == [
        ("dialogue-0", 0), ("dialogue-0", 1), ("dialogue-1", 0), ("dialogue-1", 1), ("dialogue-1", 2), ("dialogue-2", 0)]
    assert lines[0]["label"] in {"calm", "happy", "angry", "sad"} and "gate_weights" in lines[0]
    (tmp_path / "plain.txt").write_text("")  # the output gets the permissions any new file gets, not 0600
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    to_stdout = mister_e("predict", "--model", saved_model, conversations)
    assert to_stdout.stdout.splitlines()[0] == (tmp_path / "out.jsonl").read_text().splitlines()[0]


def test_cli_bad_input_is_one_line_nonzero_and_writes_nothing(saved_model, tmp_path):
    conversations = write_conversations(tmp_path)
    lines = conversations.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["utterances"][2]["audio"] = "missing.wav"
    lines[1] = json.dumps(broken)
    conversations.write_text("\n".join(lines) + "\n")
    result = mister_e("predict", "--model", saved_model, conversations, "-o", tmp_path / "out.jsonl")
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()
    assert len(error) == 1, result.stderr
    assert "conversations.jsonl, line 2 (conversation 'dialogue-1', utterance 2): audio file" in error[0]
    assert "missing.wav' not found" in error[0]
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".out*"))

    (tmp_path / "bad.jsonl").write_text('{"utterances": [{"text": "hi"}]}\nnot json\n')
    result = mister_e("predict", "--model", saved_model, tmp_path / "bad.jsonl")
    assert result.returncode == 1 and "bad.jsonl: not valid JSON" in result.stderr
    result = mister_e("predict", "--model", tmp_path / "nowhere", conversations)
    assert result.returncode == 1 and "not a saved model folder" in result.stderr


def test_cli_plot_gates_and_evaluate(saved_model, tmp_path, tiny_backbones, corpus):
    conversations = write_conversations(tmp_path, count=2)
    single = tmp_path / "conversation.json"
    single.write_text(json.dumps(json.loads(conversations.read_text().splitlines()[1])))
    result = mister_e("plot-gates", "--model", saved_model, single, "-o", tmp_path / "gates.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # evaluate: a model whose labels match the corpus (the tiny training corpus of test_training)
    from mister_e_hf import MisterEModel, MisterEProcessor

    speech, text = tiny_backbones
    model = MisterEModel.from_backbones(str(speech), str(text), id2label={0: "angry", 1: "calm", 2: "happy"},
                                        projection_dim=16, cross_attention_heads=2)
    model.save_pretrained(tmp_path / "corpus-model")
    MisterEProcessor.from_backbones(str(speech), str(text)).save_pretrained(tmp_path / "corpus-model")
    result = mister_e("evaluate", "--model", tmp_path / "corpus-model", "--dataset", "manifest", "--data_dir", corpus,
                      "-o", tmp_path / "metrics.json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"test_weighted_f1", "test_accuracy", "test_confusion_matrix", "test_gate_speech"} <= set(metrics)
    assert np.array(metrics["test_confusion_matrix"]).sum() == sum(
        1 for line in (corpus / "test.jsonl").read_text().splitlines())
    result = mister_e("evaluate", "--model", saved_model, "--dataset", "manifest", "--data_dir", corpus)
    assert result.returncode == 1 and "predicts ['calm', 'happy', 'angry', 'sad']" in result.stderr
