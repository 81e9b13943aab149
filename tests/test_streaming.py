"""Streaming one utterance at a time equals the offline causal model on the same conversation."""

import pytest
import torch
from helpers import make_conversations

from mister_e_hf.streaming import StreamingEmotionRecognizer


@pytest.mark.parametrize("speech,text,layers", [("wav2vec2", "bert", "last"), ("whisper", "llama", "weighted"),
                                                 (None, "bert", "last")])
def test_streaming_equals_offline_causal_model(build, speech, text, layers):
    model, processor = build(speech, text, context_bidirectional=False, context_kernel_sizes=[1, 3, 5],
                             cross_attention_layers=2, text_layers=layers)
    conversation = make_conversations([6], seed=31, with_audio=speech is not None)[0]
    if speech is not None:
        conversation[2].pop("audio")  # an utterance without audio in the middle
    with torch.no_grad():
        offline = model(**processor(conversations=[conversation]))

    recognizer = StreamingEmotionRecognizer(model, processor)
    predictions = [recognizer.push(utterance) for utterance in conversation]
    for turn, prediction in enumerate(predictions):
        assert prediction.turn == turn and prediction.latency_ms > 0
        expected = offline.logits[0, turn].exp()
        actual = torch.tensor([prediction.scores[model.config.id2label[i]] for i in range(model.config.num_labels)])
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
        gates = torch.tensor([prediction.gate_weights[name] for name in model.expert_names])
        torch.testing.assert_close(gates, offline.gate_weights[0, turn], atol=1e-5, rtol=0)
    if speech is not None:
        assert predictions[2].gate_weights["speech"] == 0.0 and predictions[2].gate_weights["cross-modal"] == 0.0

    recognizer.reset()
    assert recognizer.push(conversation[0]).scores == predictions[0].scores


def test_streaming_never_recomputes_earlier_utterances(build):
    model, processor = build("wav2vec2", "bert", context_bidirectional=False)
    calls = []
    model.speech_backbone.register_forward_hook(lambda module, args, out: calls.append(out.last_hidden_state.shape[0]))
    recognizer = StreamingEmotionRecognizer(model, processor)
    for utterance in make_conversations([5], seed=32)[0]:
        recognizer.push(utterance)
    assert calls == [1] * 5  # one backbone call per new utterance, on that utterance only


def test_streaming_needs_a_causal_model(build):
    model, processor = build("wav2vec2", "bert")
    with pytest.raises(ValueError, match="causal model"):
        StreamingEmotionRecognizer(model, processor)
    inputs = processor(conversations=make_conversations([2], seed=33))
    causal, _ = build("wav2vec2", "bert", context_bidirectional=False)
    with pytest.raises(ValueError, match="exactly one new utterance"):
        causal(**inputs, conversation_state={})
