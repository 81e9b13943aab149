"""The optional third modality: one frame per utterance through any vision encoder, or precomputed embeddings."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_HEAD, feature_extractor, make_conversations, random_labels, speech_config, text_config
from PIL import Image
from transformers import AutoModel, CLIPConfig, CLIPModel, ViTConfig, ViTImageProcessor

from mister_e_hf import MisterEConfig, MisterEModel, MisterEProcessor
from mister_e_hf.cache import add_cached_embeddings
from mister_e_hf.data import load_corpus


VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=37)


def image_processor():
    return ViTImageProcessor(size={"height": 32, "width": 32})


def with_frames(conversations, seed=0, skip=()):
    rng = np.random.default_rng(seed)
    for b, conversation in enumerate(conversations):
        for u, utterance in enumerate(conversation):
            if (b, u) not in skip:
                utterance["image"] = rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8)
    return conversations


@pytest.fixture
def trimodal(tokenizer):
    def _build(fusion="mister-e", **overrides):
        torch.manual_seed(0)
        config = MisterEConfig(speech_config=speech_config("wav2vec2"), text_config=text_config("bert", len(tokenizer)),
                               visual_config=ViTConfig(**VIT), fusion=fusion, **{**TINY_HEAD, **overrides})
        processor = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer, image_processor())
        return MisterEModel(config).eval(), processor

    return _build


@pytest.mark.parametrize("fusion,experts", [
    ("mister-e", ["speech", "text", "visual", "cross-modal"]),
    ("guided-gated", ["speech", "text", "visual", "speech+text", "speech+visual", "text+visual", "joint"]),
])
def test_three_modalities_forward_backward_and_missing_frames(trimodal, fusion, experts):
    model, processor = trimodal(fusion)
    assert model.expert_names == experts
    conversations = with_frames(make_conversations([3, 2], seed=61), skip={(0, 1)})
    inputs = processor(conversations=conversations)
    assert inputs["pixel_values"].shape == (2, 3, 3, 32, 32)
    assert inputs["visual_mask"].tolist() == [[1, 0, 1], [1, 1, 0]]
    model.train()
    out = model(**inputs, labels=random_labels(inputs))
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual_backbone.parameters())
    weights = dict(zip(experts, out.gate_weights[0, 1].tolist()))
    assert all(weights[name] == 0.0 for name in experts if "visual" in name or name == "joint")
    torch.testing.assert_close(out.gate_weights.sum(-1)[inputs["utterance_mask"].bool()], torch.ones(5))


def test_two_modality_guided_fusion_is_guided_by_the_third_when_present(trimodal):
    model, processor = trimodal("guided-gated")
    conversations = with_frames(make_conversations([2], seed=62))
    inputs = processor(conversations=conversations)
    captured = {}
    model.fusion.guide["speech+text"].register_forward_hook(lambda m, args, out: captured.update(guide=args[0]))
    with torch.no_grad():
        model(**inputs)
    visual_enhanced = captured["guide"]
    assert visual_enhanced.shape[-1] == model.config.expert_hidden_size  # the visual branch guides speech+text
    frames_changed = dict(inputs, pixel_values=inputs["pixel_values"].flip(-1))
    captured.clear()
    with torch.no_grad():
        model(**frames_changed)
    assert not torch.allclose(captured["guide"], visual_enhanced)


def test_visual_processor_and_model_round_trip_and_paths(trimodal, tmp_path):
    model, processor = trimodal()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = AutoModel.from_pretrained(tmp_path).eval(), MisterEProcessor.from_pretrained(tmp_path)
    assert loaded_processor.image_processor is not None and loaded_processor.modalities == ("speech", "text", "visual")
    conversations = with_frames(make_conversations([2], seed=63))
    Image.fromarray(conversations[0][0]["image"]).save(tmp_path / "frame.png")
    from_path = [[dict(conversations[0][0], image=str(tmp_path / "frame.png")), conversations[0][1]]]
    with torch.no_grad():
        expected = model(**processor(conversations=conversations)).logits
        assert torch.equal(loaded(**loaded_processor(conversations=conversations)).logits, expected)
        torch.testing.assert_close(model(**processor(conversations=from_path)).logits, expected)
    from mister_e_hf import ConversationInputError

    with pytest.raises(ConversationInputError, match="utterance 0: image file .*missing.png' not found"):
        processor(conversations=[[dict(conversations[0][0], image=str(tmp_path / "missing.png"))]])


def test_vision_tower_of_a_clip_checkpoint_and_embeddings_mode(tmp_path, tokenizer):
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=16, projection_dim=16),
        vision_config=dict(**VIT, projection_dim=16), projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    image_processor().save_pretrained(tmp_path / "clip")
    model = MisterEModel.from_backbones(None, None, str(tmp_path / "clip"), freeze_visual_backbone=True, **TINY_HEAD)
    assert type(model.visual_backbone).__name__ == "CLIPVisionModel" and model.expert_names == ["visual"]
    expected = {f"visual_backbone.{k}": v for k, v in clip.vision_model.state_dict().items()}
    state = model.state_dict()
    assert expected and all(torch.equal(state[k], v) for k, v in expected.items())

    embeds_only = MisterEModel(MisterEConfig(text_embed_dim=8, visual_embed_dim=6, **TINY_HEAD))
    out = embeds_only(text_embeds=torch.randn(1, 3, 8), visual_embeds=torch.randn(1, 3, 6),
                      visual_mask=torch.tensor([[1, 0, 1]]))
    assert out.gate_weights[0, 1].tolist() == [1.0, 0.0]


def test_manifest_images_through_the_cache(tmp_path, tokenizer):
    speech, text = None, None
    rows = []
    for c in range(3):
        for t in range(2):
            name = f"f{c}{t}.png"
            Image.fromarray(np.full((20, 20, 3), 40 * c + t, dtype=np.uint8)).save(tmp_path / name)
            rows.append({"conversation_id": f"c{c}", "turn": t, "text": "hello there", "label": "a" if t else "b",
                         "image": name})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets, _ = load_corpus("manifest", data_dir=tmp_path)
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    AutoModel.from_config(ViTConfig(**VIT)).save_pretrained(folder)
    image_processor().save_pretrained(folder)
    model = MisterEModel.from_backbones(speech, text, str(folder), freeze_visual_backbone=True,
                                        id2label={0: "a", 1: "b"}, **{**TINY_HEAD, "num_labels": 2})
    processor = MisterEProcessor.from_backbones(None, None, str(folder))
    cached, stats = add_cached_embeddings(model, processor, datasets, tmp_path / "cache")
    assert stats.utterances_embedded == 6
    row = cached["train"][0]
    inputs = processor(conversations=[[{"image": p} for p in row["images"]]])
    with torch.no_grad():
        raw = model.embed_utterances("visual", inputs["visual_mask"], pixel_values=inputs["pixel_values"])
    np.testing.assert_allclose(np.array(row["visual_embeds"]), raw[0].numpy(), atol=1e-5)
    _, again = add_cached_embeddings(model, processor, datasets, tmp_path / "cache")
    assert again.utterances_embedded == 0
