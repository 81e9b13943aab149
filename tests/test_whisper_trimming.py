"""Whisper-family encoders on the frames that cover each utterance (`speech_trim_padding`): the same modules and
weights as transformers' forward (equal on the full window), each row independent of its batch, honoured by the
model, the streaming path and the cache key, saved with the model, refused for other encoders."""

import pytest
import torch
from helpers import make_conversations

from mister_e_hf import MisterEModel
from mister_e_hf.backbones import encode_whisper_trimmed, is_whisper_encoder
from mister_e_hf.cache import extraction_settings
from mister_e_hf.errors import MisterEError
from mister_e_hf.outputs import ConversationState


def whisper_model(build, **overrides):
    model, processor = build(speech="whisper", text=None, **overrides)
    return model, processor


def test_on_the_full_window_it_is_transformers_forward(build):
    model, processor = whisper_model(build)
    encoder = model.speech_backbone
    assert is_whisper_encoder(encoder)
    features = processor(conversations=make_conversations([3], seed=1), modalities=["speech"])["input_features"][0]
    with torch.no_grad():
        reference = encoder(input_features=features, output_hidden_states=True)
        mine = encode_whisper_trimmed(encoder, features, torch.full((3,), features.shape[-1]), True)
    assert len(mine.hidden_states) == len(reference.hidden_states)
    for ours, theirs in zip(mine.hidden_states, reference.hidden_states):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(mine.last_hidden_state, reference.last_hidden_state, rtol=0, atol=0)


def test_each_row_gives_what_it_gives_alone(build):
    model, processor = whisper_model(build)
    inputs = processor(conversations=make_conversations([4], seed=2), modalities=["speech"])
    features, frames = inputs["input_features"][0], inputs["speech_attention_mask"][0].sum(-1)
    assert len(set(frames.tolist())) > 1  # clips of different lengths share the batch
    with torch.no_grad():
        batch = encode_whisper_trimmed(model.speech_backbone, features, frames).last_hidden_state
        for i in range(len(frames)):
            alone = encode_whisper_trimmed(model.speech_backbone, features[i:i + 1], frames[i:i + 1]).last_hidden_state
            assert batch.shape[1] == int(frames.max() + frames.max() % 2) // 2
            torch.testing.assert_close(batch[i, : alone.shape[1]], alone[0], rtol=1e-4, atol=1e-5)


def test_the_model_streams_and_caches_with_trimming(build, tmp_path):
    model, processor = whisper_model(build, speech_trim_padding=True, context_bidirectional=False)
    padded, _ = whisper_model(build, context_bidirectional=False)
    padded.load_state_dict(model.state_dict())
    conversations = make_conversations([3], seed=3)
    inputs = processor(conversations=conversations, modalities=["speech"])
    with torch.no_grad():
        whole = model(**inputs).logits[0]
        other = padded(**inputs).logits[0]
        state, steps = ConversationState(), []
        for t in range(3):
            step = processor(conversations=[conversations[0][t:t + 1]], modalities=["speech"])
            out = model(**step, conversation_state=state)
            state = out.conversation_state
            steps.append(out.logits[0, 0])
    torch.testing.assert_close(torch.stack(steps), whole, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whole, other)  # trimming changes the embeddings: it is not a no-op
    trimmed_key = extraction_settings(model, processor, "speech")
    padded_key = extraction_settings(padded, processor, "speech")
    assert trimmed_key["encoder"] == {"trim_padding": True} and "encoder" not in padded_key
    model.save_pretrained(tmp_path / "model")
    assert MisterEModel.from_pretrained(tmp_path / "model").config.speech_trim_padding is True


def test_trimming_is_refused_for_other_speech_encoders(build):
    with pytest.raises(MisterEError, match="Whisper-family"):
        build(speech="wav2vec2", text=None, speech_trim_padding=True)


def test_a_clip_shorter_than_two_frames_still_encodes(build):
    model, _ = whisper_model(build, speech_trim_padding=True)
    features = torch.randn(1, model.speech_backbone.config.num_mel_bins, 3000)
    with torch.no_grad():
        out = encode_whisper_trimmed(model.speech_backbone, features, torch.tensor([1]))
    assert out.last_hidden_state.shape[1] == 1 and torch.isfinite(out.last_hidden_state).all()


def test_new_models_on_a_whisper_encoder_trim_unless_told_not_to(tmp_path):
    """`from_backbones` turns trimming on for Whisper-family encoders (as accurate with the default recipe, about
    13x faster to extract: benchmarks/results/whisper_trimming-defaults.md); the field's default, which configs saved
    before it existed load with, stays padded."""
    from helpers import TINY_HEAD, speech_config
    from transformers import Wav2Vec2Model, WhisperModel

    from mister_e_hf import MisterEConfig

    WhisperModel(speech_config("whisper")).save_pretrained(tmp_path / "whisper")
    Wav2Vec2Model(speech_config("wav2vec2")).save_pretrained(tmp_path / "wav2vec2")
    assert MisterEModel.from_backbones(str(tmp_path / "whisper"), **TINY_HEAD).config.speech_trim_padding is True
    assert MisterEModel.from_backbones(str(tmp_path / "whisper"), speech_trim_padding=False,
                                       **TINY_HEAD).config.speech_trim_padding is False
    assert MisterEModel.from_backbones(str(tmp_path / "wav2vec2"), **TINY_HEAD).config.speech_trim_padding is False
    assert MisterEConfig(speech_embed_dim=8).speech_trim_padding is False
