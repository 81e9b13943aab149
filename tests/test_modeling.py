"""MiSTER-E forward/backward over several backbone pairs, padding invariance, gate masking, embeddings mode."""

import numpy as np
import pytest
import torch
from helpers import TINY_HEAD, make_conversations, random_labels

from mister_e_hf import MisterEConfig, MisterEModel


PAIRS = [("wav2vec2", "bert"), ("hubert", "roberta"), ("wavlm", "deberta-v2"), ("whisper", "llama")]


def own_parameters(model):
    """MiSTER-E's own layers (everything but the backbones)."""
    return {n: p for n, p in model.named_parameters() if not n.startswith(("speech_backbone.", "text_backbone."))}


@pytest.mark.parametrize("speech,text", PAIRS)
def test_forward_backward(build, speech, text):
    model, processor = build(speech, text)
    model.train()
    inputs = processor(conversations=make_conversations([3, 1], seed=1))
    out = model(**inputs, labels=random_labels(inputs))
    assert out.logits.shape == (2, 3, 4)
    assert out.expert_logits.shape == (2, 3, 3, 4)
    assert out.gate_weights.shape == (2, 3, 3)
    assert model.expert_names == ["speech", "text", "cross-modal"]
    for name in ("loss", "mixture_loss", "expert_loss", "supcon_loss", "kl_loss"):
        assert torch.isfinite(out.loss if name == "loss" else out.losses[name]), name
    out.loss.backward()
    no_grad = [n for n, p in own_parameters(model).items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    for backbone in (model.speech_backbone, model.text_backbone):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())


@pytest.mark.parametrize("speech,text", [(None, "bert"), ("wav2vec2", None)])
def test_single_modality_models(build, speech, text):
    model, processor = build(speech, text)
    conversations = make_conversations([2, 3], seed=2, with_audio=speech is not None)
    inputs = processor(conversations=conversations)
    out = model(**inputs, labels=random_labels(inputs))
    assert model.expert_names == ["speech" if speech else "text"]
    assert out.gate_weights.shape == (2, 3, 1)
    assert torch.equal(out.gate_weights[..., 0], inputs["utterance_mask"].float())
    assert "supcon_loss" not in out.losses and torch.isfinite(out.loss)
    out.loss.backward()


def _logits(model, processor, conversations):
    with torch.no_grad():
        return model(**processor(conversations=conversations)).logits


@pytest.mark.parametrize("speech,text", PAIRS + [("wav2vec2-group", "bert")])
def test_batching_with_a_longer_conversation_changes_nothing(build, speech, text):
    model, processor = build(speech, text)
    short, longer = make_conversations([2, 5], seed=4)
    alone = _logits(model, processor, [short])
    batched = _logits(model, processor, [short, longer])
    torch.testing.assert_close(batched[0, :2], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("speech,text", [("wav2vec2", "bert"), ("hubert", "roberta"), ("wavlm", "llama")])
def test_extra_padding_frames_and_tokens_change_nothing(build, speech, text):
    model, processor = build(speech, text)
    inputs = processor(conversations=make_conversations([3, 2], seed=5))
    padded = dict(inputs)
    for key, pad_value in (("input_values", 0.0), ("speech_attention_mask", 0), ("text_attention_mask", 0),
                           ("input_ids", processor.tokenizer.pad_token_id)):
        extra = torch.full((*inputs[key].shape[:2], 1234 if "values" in key or "speech" in key else 7), pad_value,
                           dtype=inputs[key].dtype)
        padded[key] = torch.cat([inputs[key], extra], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(model(**padded).logits, model(**inputs).logits, atol=1e-5, rtol=0)


def test_gate_weights_sum_to_one_and_masked_modality_gets_zero(build):
    model, processor = build("wav2vec2", "bert")
    conversations = make_conversations([4, 2], seed=6)
    conversations[0][2].pop("audio")
    conversations[1][0]["audio"] = None
    inputs = processor(conversations=conversations)
    assert inputs["speech_mask"].tolist() == [[1, 1, 0, 1], [0, 1, 0, 0]]
    with torch.no_grad():
        out = model(**inputs)
    weights, real = out.gate_weights, inputs["utterance_mask"].bool()
    torch.testing.assert_close(weights.sum(-1)[real], torch.ones(int(real.sum())))
    assert (weights[~real] == 0).all()
    for b, u in [(0, 2), (1, 0)]:
        speech_w, text_w, cross_w = weights[b, u].tolist()
        assert speech_w == 0.0 and cross_w == 0.0 and text_w == 1.0
    assert (weights[0, 0] > 0).all()


def test_model_with_speech_backbone_runs_on_text_alone(build):
    model, processor = build("wav2vec2", "bert")
    inputs = processor(conversations=make_conversations([3], seed=7, with_audio=False))
    assert "input_values" not in inputs and inputs["speech_mask"].sum() == 0
    with torch.no_grad():
        out = model(**inputs)
    assert out.gate_weights[0, :, 1].tolist() == [1.0, 1.0, 1.0]


def test_embeddings_mode_and_cached_embeddings_equal_raw_inputs(build):
    model, processor = build("wav2vec2", "bert")
    inputs = processor(conversations=make_conversations([3, 2], seed=8))
    with torch.no_grad():
        raw = model(**inputs).logits
        speech = model.embed_utterances("speech", inputs["speech_mask"], input_values=inputs["input_values"],
                                        speech_attention_mask=inputs["speech_attention_mask"])
        text = model.embed_utterances("text", inputs["text_mask"], input_ids=inputs["input_ids"],
                                      text_attention_mask=inputs["text_attention_mask"])
        cached = model(speech_embeds=speech, text_embeds=text, utterance_mask=inputs["utterance_mask"]).logits
    torch.testing.assert_close(cached, raw, atol=1e-6, rtol=0)
    assert speech.shape == (2, 3, 32) and (speech[1, 2] == 0).all()

    config = MisterEConfig(speech_embed_dim=12, text_embed_dim=10, **TINY_HEAD)
    embeds_model = MisterEModel(config)
    assert embeds_model.speech_backbone is None and embeds_model.text_backbone is None
    out = embeds_model(speech_embeds=torch.randn(2, 5, 12), text_embeds=torch.randn(2, 5, 10),
                       utterance_mask=torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]),
                       labels=torch.tensor([[0, 1, 2, 3, 0], [1, 1, -100, -100, -100]]))
    out.loss.backward()
    with pytest.raises(ValueError, match="no speech backbone"):
        embeds_model(input_values=torch.randn(1, 2, 800), speech_attention_mask=torch.ones(1, 2, 800),
                     text_embeds=torch.randn(1, 2, 10))


def test_frozen_backbones_get_no_gradients_and_stay_in_eval(build):
    model, processor = build("wav2vec2", "bert", freeze_speech_backbone=True, freeze_text_backbone=True)
    model.train()
    assert not model.speech_backbone.training and not model.text_backbone.training and model.fusion.training
    inputs = processor(conversations=make_conversations([2], seed=9))
    model(**inputs, labels=random_labels(inputs)).loss.backward()
    assert all(p.grad is None for p in model.speech_backbone.parameters())
    assert all(p.grad is None for p in model.text_backbone.parameters())
    assert all(p.grad is not None for p in own_parameters(model).values())


def test_bad_inputs_raise_clear_errors(build):
    model, processor = build("wav2vec2", "bert")
    inputs = processor(conversations=make_conversations([3, 2], seed=11))
    labels = random_labels(inputs)
    labels[1, 1] = 9
    with pytest.raises(ValueError, match="Label 9 of conversation 1, utterance 1 is outside the label set"):
        model(**inputs, labels=labels)
    bad_mask = dict(inputs, utterance_mask=torch.tensor([[1, 0, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="each conversation's utterances first"):
        model(**bad_mask)
    with pytest.raises(ValueError, match="has no utterances"):
        model(**dict(inputs, utterance_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])))
    text_only, _ = build(None, "bert")
    with pytest.raises(ValueError, match="speech inputs were given, but this model has no speech modality"):
        text_only(**inputs)


def test_config_validation_and_nested_round_trip(tmp_path):
    with pytest.raises(Exception, match="at least one modality"):
        MisterEConfig()
    with pytest.raises(Exception, match=r"Unknown pooling 'median' \(`speech_pooling`\)"):
        MisterEConfig(text_embed_dim=8, speech_pooling="median")
    with pytest.raises(Exception, match="Unknown fusion"):
        MisterEConfig(text_embed_dim=8, fusion="concat-everything")
    with pytest.raises(Exception, match="projection_dim"):
        MisterEConfig(text_embed_dim=8, projection_dim="wide")
    with pytest.raises(Exception, match="must divide"):
        MisterEConfig(text_embed_dim=8, projection_dim=10, cross_attention_heads=4)

    from helpers import speech_config

    config = MisterEConfig(speech_config=speech_config("whisper"), text_embed_dim=24, id2label={0: "calm", 1: "angry"})
    config.save_pretrained(tmp_path)
    reloaded = MisterEConfig.from_pretrained(tmp_path)
    assert type(reloaded.speech_config).__name__ == "WhisperConfig" and reloaded.text_config is None
    assert reloaded.modalities == ("speech", "text") and reloaded.embed_dim("speech") == 32
    assert reloaded.id2label == {0: "calm", 1: "angry"} and reloaded.num_labels == 2
    with pytest.raises(Exception, match="disagrees with the speech backbone"):
        MisterEConfig(speech_config=speech_config("wav2vec2"), speech_embed_dim=99)


def test_causal_mode_sees_only_the_past(build):
    model, processor = build("wav2vec2", "bert", context_bidirectional=False)
    conversation = make_conversations([5], seed=12)[0]
    with torch.no_grad():
        full = model(**processor(conversations=[conversation])).logits
        prefix = model(**processor(conversations=[conversation[:3]])).logits
    torch.testing.assert_close(full[0, :3], prefix[0], atol=1e-5, rtol=0)
    bidirectional, _ = build("wav2vec2", "bert")
    with torch.no_grad():
        full = bidirectional(**processor(conversations=[conversation])).logits
        prefix = bidirectional(**processor(conversations=[conversation[:3]])).logits
    assert not torch.allclose(full[0, :3], prefix[0], atol=1e-4)


def test_pretrained_backbone_weights_survive_construction_and_loading(tmp_path, tokenizer):
    from helpers import speech_config, text_config
    from transformers import AutoModel

    torch.manual_seed(0)
    speech = AutoModel.from_config(speech_config("whisper"))
    text = AutoModel.from_config(text_config("bert", len(tokenizer)))
    speech.save_pretrained(tmp_path / "speech")
    text.save_pretrained(tmp_path / "text")
    model = MisterEModel.from_backbones(str(tmp_path / "speech"), str(tmp_path / "text"), **TINY_HEAD)
    expected = {**{f"speech_backbone.{k}": v for k, v in speech.get_encoder().state_dict().items()},
                **{f"text_backbone.{k}": v for k, v in text.state_dict().items()}}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert model.config.speech_backbone_name_or_path == str(tmp_path / "speech")
    model.save_pretrained(tmp_path / "mister-e")
    reloaded = MisterEModel.from_pretrained(tmp_path / "mister-e").state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in state.items())
    assert not np.any([name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in
                       [p.name for p in (tmp_path / "mister-e").iterdir()]])


def test_weighted_layers_learn_over_every_hidden_layer(build):
    model, processor = build("whisper", "bert", speech_layers="weighted", text_layers="weighted")
    assert model.layer_combiners["speech"].weights.shape == (2,)  # embeddings + 1 encoder layer
    assert model.layer_combiners["text"].weights.shape == (3,)
    inputs = processor(conversations=make_conversations([2, 1], seed=13))
    with torch.no_grad():
        raw = model(**inputs).logits
        speech = model.embed_utterances("speech", inputs["speech_mask"], input_features=inputs["input_features"],
                                        speech_attention_mask=inputs["speech_attention_mask"])
        text = model.embed_utterances("text", inputs["text_mask"], input_ids=inputs["input_ids"],
                                      text_attention_mask=inputs["text_attention_mask"])
        cached = model(speech_embeds=speech, text_embeds=text, utterance_mask=inputs["utterance_mask"]).logits
    assert speech.shape == (2, 2, 2, 32) and text.shape == (2, 2, 3, 32)
    torch.testing.assert_close(cached, raw, atol=1e-6, rtol=0)
    model.train()
    model(**inputs, labels=random_labels(inputs)).loss.backward()
    assert model.layer_combiners["speech"].weights.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"must have shape \(batch, utterances, layers, dim\)"):
        model(speech_embeds=speech[:, :, 0], text_embeds=text, utterance_mask=inputs["utterance_mask"])
    with pytest.raises(Exception, match="needs `text_embed_layers`"):
        MisterEConfig(text_embed_dim=8, text_layers="weighted")
    assert MisterEModel(MisterEConfig(text_embed_dim=8, text_layers="weighted", text_embed_layers=4, **TINY_HEAD))


def test_combined_layers_of_a_trainable_backbone_never_lose_a_layer_to_layerdrop(build):
    """wav2vec2's LayerDrop skips layers at random in training, leaving no hidden state for them: with its layers
    combined it is off (the layers would shift, and the concatenation change size from step to step)."""
    model, processor = build("wav2vec2", "bert", speech_layers="concat", text_layers="weighted")
    assert model.speech_backbone.config.layerdrop == 0.0
    plain, _ = build("wav2vec2", "bert")  # the last layer only: LayerDrop left as the backbone has it
    assert plain.speech_backbone.config.layerdrop == 0.1
    model.train()
    inputs = processor(conversations=make_conversations([2, 1], seed=3))
    for step in range(12):  # with LayerDrop 0.1 over 2 layers, some of these would skip one
        torch.manual_seed(step)
        model(**inputs, labels=random_labels(inputs)).loss.backward()


def test_ablation_switches_no_gate_and_no_context(build):
    model, processor = build("wav2vec2", "bert", gate_type="mean", context_layer="none")
    conversations = make_conversations([3], seed=14)
    conversations[0][1].pop("audio")
    inputs = processor(conversations=conversations)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(out.gate_weights[0], torch.tensor([[1 / 3] * 3, [0.0, 1.0, 0.0], [1 / 3] * 3]))
    assert not list(model.contexts.parameters()) and not list(model.fusion.gate.parameters())
    with pytest.raises(Exception, match=r"Unknown gate 'sparse' \(`gate_type`\)"):
        MisterEConfig(text_embed_dim=8, gate_type="sparse")
    with pytest.raises(Exception, match=r"Unknown context layer 'transformer' \(`context_layer`\)"):
        MisterEConfig(text_embed_dim=8, context_layer="transformer")


def test_embedding_standardization_fits_per_feature_and_names_bad_input():
    model = MisterEModel(MisterEConfig(speech_embed_dim=4, text_embed_dim=3, speech_embed_layers=2,
                                       speech_layers="concat", standardize_embeddings=True,
                                       **TINY_HEAD)).eval()
    speech = torch.randn(50, 2, 4) * torch.tensor([1.0, 10.0, 100.0, 0.0]) + 5.0  # the last feature never varies
    model.fit_embedding_statistics("speech", speech)
    standardizer = model.standardizers["speech"]
    torch.testing.assert_close(standardizer.mean, speech.double().mean(0).float())
    assert torch.all(standardizer.std[:, 3] == 1.0)  # constant features are centred, not blown up
    standardized = standardizer(speech)
    torch.testing.assert_close(standardized[..., :3].std(0, unbiased=False), torch.ones(2, 3), atol=1e-4, rtol=0)
    assert not model.embedding_statistics_fitted  # text is not fitted yet
    with pytest.raises(ValueError, match="text statistics were never fitted"):
        model(speech_embeds=speech[:2].unsqueeze(0), text_embeds=torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match=r"at least 2 embeddings of shape \(3,\)"):
        model.fit_embedding_statistics("text", torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"at least 2 embeddings of shape \(3,\)"):
        model.fit_embedding_statistics("text", torch.randn(10, 2, 3))
    with pytest.raises(ValueError, match="does not standardise visual"):
        model.fit_embedding_statistics("visual", torch.randn(10, 3))
    model.fit_embedding_statistics("text", torch.randn(10, 3))
    assert model.embedding_statistics_fitted
    # padding utterances (standardised to -mean / std) still reach no context layer: alone = padded in a batch
    alone = model(speech_embeds=speech[:2].unsqueeze(0), text_embeds=torch.randn(1, 2, 3, generator=torch.Generator().manual_seed(0)))
    padded_speech = torch.cat([speech[:2], torch.zeros(1, 2, 4)]).unsqueeze(0)
    padded_text = torch.cat([torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(1, 3)]).unsqueeze(0)
    batched = model(speech_embeds=torch.cat([padded_speech, speech[2:5].unsqueeze(0)]),
                    text_embeds=torch.cat([padded_text, torch.randn(1, 3, 3)]),
                    utterance_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    torch.testing.assert_close(batched.logits[0, :2], alone.logits[0], atol=1e-5, rtol=1e-4)
