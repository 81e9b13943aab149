"""MisterEProcessor: padding, resampling, audio files, clear errors, save/load with an absent modality."""

import numpy as np
import pytest
import soundfile
from helpers import feature_extractor, make_conversations
from transformers import AutoProcessor

from mister_e_hf import ConversationInputError, MisterEProcessor


def test_shapes_and_masks(tokenizer):
    processor = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer)
    conversations = make_conversations([3, 1], seed=0)
    conversations[0][1]["audio"] = None
    inputs = processor(conversations=conversations)
    longest = max(len(u["audio"]) for c in conversations for u in c if u.get("audio") is not None)
    assert inputs["input_values"].shape == (2, 3, longest)
    assert inputs["utterance_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert inputs["speech_mask"].tolist() == [[1, 0, 1], [1, 0, 0]]
    assert inputs["text_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    lengths = inputs["speech_attention_mask"].sum(-1).tolist()
    assert lengths[0][0] == len(conversations[0][0]["audio"]) and lengths[0][1] == 0
    assert inputs["input_ids"].shape[:2] == (2, 3)
    assert (inputs["input_ids"][1, 1:] == tokenizer.pad_token_id).all()
    assert inputs["text_attention_mask"][1, 1:].sum() == 0


def test_whisper_features_and_resampling(tokenizer):
    processor = MisterEProcessor(feature_extractor("whisper"), tokenizer)
    audio = np.sin(np.linspace(0, 400 * np.pi, 8000)).astype(np.float32)  # 1 s at 8 kHz
    inputs = processor(conversations=[[{"audio": audio, "sampling_rate": 8000, "text": "hello"}]])
    assert inputs["input_features"].shape == (1, 1, 16, 3000)
    assert inputs["speech_attention_mask"].sum().item() == 100  # 16,000 samples after resampling / hop 160


def test_resampling_keeps_duration(tokenizer):
    processor = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer)
    for rate in (8000, 22050, 44100, 48000):
        audio = np.random.default_rng(0).standard_normal(rate // 2).astype(np.float32)
        inputs = processor(conversations=[[{"audio": audio, "sampling_rate": rate, "text": "hi"}]])
        assert inputs["speech_attention_mask"].sum().item() == 8000


def test_audio_file_paths_equal_arrays(tokenizer, tmp_path):
    processor = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer)
    audio = (0.1 * np.random.default_rng(1).standard_normal(12000)).astype(np.float32)
    soundfile.write(tmp_path / "clip.wav", audio, 16000, subtype="FLOAT")
    stereo = np.stack([audio, audio], axis=1)
    soundfile.write(tmp_path / "stereo.wav", stereo, 16000, subtype="FLOAT")
    from_array = processor(conversations=[[{"audio": audio, "sampling_rate": 16000, "text": "hi"}]])
    for name in ("clip.wav", "stereo.wav"):
        from_file = processor(conversations=[[{"audio": str(tmp_path / name), "text": "hi"}]])
        np.testing.assert_allclose(from_file["input_values"], from_array["input_values"], atol=1e-6)
    with pytest.raises(ConversationInputError, match=r"conversation 0, utterance 0: audio file .*missing.wav' not found"):
        processor(conversations=[[{"audio": str(tmp_path / "missing.wav"), "text": "hi"}]])
    (tmp_path / "noise.wav").write_bytes(b"not a wave file")
    with pytest.raises(ConversationInputError, match=r"utterance 0: cannot decode audio file .*noise.wav"):
        processor(conversations=[[{"audio": str(tmp_path / "noise.wav"), "text": "hi"}]])


@pytest.mark.parametrize(
    "utterance, message",
    [
        ({"audio": np.zeros((2, 800)), "sampling_rate": 16000, "text": "x"}, "audio must be 1-D"),
        ({"audio": np.array([0.0, np.nan, 0.1]), "sampling_rate": 16000, "text": "x"}, "NaN or infinite"),
        ({"audio": np.array([0.0, np.inf]), "sampling_rate": 16000, "text": "x"}, "NaN or infinite"),
        ({"audio": np.zeros(800), "text": "x"}, "needs its `sampling_rate`"),
        ({"audio": np.zeros(800), "sampling_rate": 0, "text": "x"}, r"whole number of Hz in \[4000, 384000\]"),
        ({"audio": np.zeros(800), "sampling_rate": -16000, "text": "x"}, "whole number of Hz in"),
        ({"audio": np.zeros(800), "sampling_rate": 1, "text": "x"}, "whole number of Hz in"),
        ({"audio": np.zeros(800), "sampling_rate": 16000.5, "text": "x"}, "whole number of Hz in"),
        ({"audio": np.zeros(800), "sampling_rate": "16000", "text": "x"}, "needs its `sampling_rate`"),
        ({"audio": np.zeros(800), "sampling_rate": True, "text": "x"}, "needs its `sampling_rate`"),
        ({"audio": np.zeros(800, dtype=np.complex64), "sampling_rate": 16000, "text": "x"}, "complex"),
        ({"audio": np.zeros(800, dtype=np.int64), "sampling_rate": 16000, "text": "x"}, "not a PCM sample format"),
        ({"audio": np.zeros(800, dtype=bool), "sampling_rate": 16000, "text": "x"}, "array of numbers"),
        ({"audio": np.array(["a", "b"]), "sampling_rate": 16000, "text": "x"}, "array of numbers"),
        ({"audio": np.zeros(0), "sampling_rate": 16000, "text": "x"}, "holds no samples"),
        ({"audio": 30000 * np.ones(800), "sampling_rate": 16000, "text": "x"},
         r"lie in \[-1, 1\].*peak at 3e\+04 \(more than 16\)"),
        ({"audio": np.zeros(10), "sampling_rate": 16000, "text": "x"}, "10 samples .* shorter than the speech "
                                                                       "backbone's receptive field of 400 samples"),
        ({"audio": np.zeros(61 * 8000), "sampling_rate": 8000, "text": "x"}, "61.0 s long, over `max_audio_seconds`=60"),
        ({"audio": {"array": [0.0]}, "sampling_rate": 16000, "text": "x"}, "file path or a 1-D array"),
        ({"audio": np.zeros(800), "sampling_rate": 16000, "text": 5}, "`text` must be a string, got int 5"),
        ({"audio": " ", "text": " \t"}, r"no audio or text \(missing or blank"),
        ({"txt": "typo"}, r"the utterance has \['txt'\]"),
    ],
)
def test_bad_utterances_name_conversation_and_utterance(tokenizer, utterance, message):
    processor = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer)
    good = {"audio": np.zeros(800), "sampling_rate": 16000, "text": "fine"}
    with pytest.raises(ConversationInputError, match=f"conversation 1, utterance 2: .*{message}") as error:
        processor(conversations=[[good], [good, good, utterance]])
    assert (error.value.conversation, error.value.utterance) == (1, 2)


def test_bad_batches(tokenizer):
    processor = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer)
    with pytest.raises(ConversationInputError, match="conversation 1: the conversation is empty"):
        processor(conversations=[[{"text": "a"}], []])
    with pytest.raises(ConversationInputError, match="non-empty list of conversations"):
        processor(conversations=[])
    with pytest.raises(ConversationInputError, match="lists of utterance dicts"):
        processor(conversations=[{"text": "a"}])
    with pytest.raises(ValueError, match="needs a feature extractor, a tokenizer or an image processor"):
        MisterEProcessor()
    speech_only = MisterEProcessor(feature_extractor("wav2vec2"), None)
    with pytest.raises(ConversationInputError, match="conversation 0, utterance 0: no audio .*this model needs"):
        speech_only(conversations=[[{"text": "words but no sound"}]])


@pytest.mark.parametrize("kind", ["text-only", "speech-only", "whisper+text"])
def test_save_and_load_with_an_absent_modality(tokenizer, tmp_path, kind):
    fe = {"text-only": None, "speech-only": feature_extractor("wav2vec2"), "whisper+text": feature_extractor("whisper")}[kind]
    processor = MisterEProcessor(fe, None if kind == "speech-only" else tokenizer, max_text_length=5)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MisterEProcessor and loaded.max_text_length == 5
    assert (loaded.feature_extractor is None) == (fe is None)
    assert (loaded.tokenizer is None) == (kind == "speech-only")
    conversations = make_conversations([2, 1], seed=3, with_audio=fe is not None)
    conversations[0][0]["text"] = "hello there how are you i am fine thanks"  # truncated to 5 tokens
    expected, actual = processor(conversations=conversations), loaded(conversations=conversations)
    assert expected.keys() == actual.keys()
    for key in expected:
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy())
    if kind != "speech-only":
        assert actual["input_ids"].shape[-1] == 5
