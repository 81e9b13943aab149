"""Real pretrained backbones (Whisper tiny.en, MiniLM) on real EmoDB clips with their transcripts.

Skipped, with the reason, where the shared assets or the MiniLM package are absent.
"""

import csv
from pathlib import Path

import pytest
import torch
from helpers import minilm_path, require_shared
from safetensors import safe_open

from mister_e_hf import MisterEModel, MisterEProcessor


def _checkpoint_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {key[len(prefix):]: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def real_model():
    whisper = require_shared("models", "whisper-tiny.en")
    minilm = minilm_path()
    model = MisterEModel.from_backbones(
        str(whisper), minilm, freeze_speech_backbone=True, freeze_text_backbone=True,
        id2label={i: e for i, e in enumerate(["anger", "boredom", "disgust", "fear", "happiness", "neutral", "sadness"])},
    )
    return model.eval(), MisterEProcessor.from_backbones(str(whisper), minilm), whisper, Path(minilm)


def test_emodb_clips_give_finite_logits(real_model):
    import soundfile

    model, processor, _, _ = real_model
    emodb = require_shared("data", "emodb")
    with open(emodb / "metadata.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:4]
    conversations = []
    for row in rows:
        audio, rate = soundfile.read(emodb / "wav" / row["file"], dtype="float32")
        conversations.append([{"audio": audio, "sampling_rate": rate, "text": row["transcript"]}])
    inputs = processor(conversations=conversations)
    assert inputs["input_features"].shape == (4, 1, 80, 3000)
    # 2.0 s clips at 22,050 Hz are resampled to 32,000 samples at 16 kHz: 200 mel frames
    assert inputs["speech_attention_mask"].sum(-1).flatten().tolist() == [200] * 4
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (4, 1, 7) and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.gate_weights).all()
    torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(4, 1))


def test_loaded_backbone_weights_equal_the_checkpoints(real_model, tmp_path):
    model, _, whisper, minilm = real_model
    expected = {
        "speech_backbone.": _checkpoint_tensors(whisper / "model.safetensors", "model.encoder."),
        "text_backbone.": _checkpoint_tensors(minilm / "model.safetensors", ""),
    }
    state = model.state_dict()
    for prefix, tensors in expected.items():
        # `position_ids` is a legacy buffer some checkpoints still store; current models rebuild it, unsaved
        tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
        assert len(tensors) > 50
        for key, tensor in tensors.items():
            assert torch.equal(state[prefix + key], tensor.to(state[prefix + key].dtype)), prefix + key
    model.save_pretrained(tmp_path)
    reloaded = MisterEModel.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())
