"""Half-precision frozen backbones (`backbone_dtype`): half the weights' memory for extraction, MiSTER-E's layers in
float32, kept through save/load, cached apart from float32 embeddings, refused for trainable backbones."""

import json

import pytest
import soundfile
import torch
from datasets import Dataset, DatasetDict
from helpers import make_conversations
from huggingface_hub.errors import StrictDataclassError

from mister_e_hf import MisterEModel, MisterEProcessor
from mister_e_hf.cache import add_cached_embeddings
from mister_e_hf.errors import MisterEError

SMALL = {"projection_dim": 16, "context_hidden_size": 8, "expert_hidden_size": 16, "cross_attention_heads": 2}


def build(tiny_backbones, **kwargs):
    torch.manual_seed(0)
    return MisterEModel.from_backbones(*tiny_backbones, freeze_speech_backbone=True, freeze_text_backbone=True,
                                       id2label={0: "calm", 1: "happy"}, **SMALL, **kwargs).eval()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_backbones_keep_a_float32_model_through_save_and_load(tiny_backbones, tmp_path, dtype):
    model = build(tiny_backbones, backbone_dtype=dtype)
    half = getattr(torch, dtype)
    assert model.speech_backbone.dtype == model.text_backbone.dtype == half
    assert model.projections["text"].linear.weight.dtype == torch.float32 and model.dtype == torch.float32
    processor = MisterEProcessor.from_backbones(*tiny_backbones)
    inputs = processor(conversations=make_conversations([3, 2], seed=4))
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["backbone_dtype"] == dtype and saved["dtype"] == "float32"
    loaded = MisterEModel.from_pretrained(tmp_path / "model").eval()
    assert loaded.speech_backbone.dtype == loaded.text_backbone.dtype == half
    assert loaded.projections["speech"].linear.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, logits, rtol=0, atol=0)


def test_half_precision_embeddings_are_cached_apart_and_close_to_float32(tiny_backbones, tmp_path):
    processor = MisterEProcessor.from_backbones(*tiny_backbones)
    rows = []
    for i, conversation in enumerate(make_conversations([2, 3], seed=5)):
        rows.append({"conversation_id": f"c{i}", "turns": list(range(len(conversation))),
                     "num_turns": len(conversation), "texts": [u["text"] for u in conversation],
                     "audio": [u["audio"] for u in conversation], "labels": [0] * len(conversation)})
    # the cache keys audio by its file: write the clips as a corpus has them
    for i, row in enumerate(rows):
        paths = []
        for t, audio in enumerate(row["audio"]):
            path = tmp_path / f"{i}-{t}.wav"
            soundfile.write(path, audio, 16000)
            paths.append(str(path))
        row["audio"] = paths
    data = DatasetDict({"train": Dataset.from_list(rows)})
    embeds = {}
    for dtype in ("float32", "bfloat16"):
        model = build(tiny_backbones, **({} if dtype == "float32" else {"backbone_dtype": dtype}))
        cached, stats = add_cached_embeddings(model, processor, data, tmp_path / "cache")
        assert stats.utterances_embedded == 10  # 5 utterances x 2 modalities: nothing shared with float32
        embeds[dtype] = torch.tensor(cached["train"][0]["text_embeds"])
    assert len(list((tmp_path / "cache").glob("text-*"))) == 2
    cosine = torch.nn.functional.cosine_similarity(embeds["float32"], embeds["bfloat16"], dim=-1)
    assert (cosine > 0.99).all() and not torch.equal(embeds["float32"], embeds["bfloat16"])


def test_half_precision_is_refused_for_trainable_backbones(tiny_backbones):
    with pytest.raises((MisterEError, StrictDataclassError), match="speech and text backbones are trainable"):
        MisterEModel.from_backbones(*tiny_backbones, id2label={0: "a", 1: "b"}, backbone_dtype="bfloat16")
    with pytest.raises((MisterEError, StrictDataclassError), match="backbone_dtype"):
        build(tiny_backbones, backbone_dtype="int8")
