"""Inputs a user can get wrong: one rule for blank text everywhere, audio and text that cannot work, nonsense
arguments, bad batches and tensors. Each is either a named error (file, conversation, turn; what is wrong; the
limit) or a correct result, never garbage."""

import json
import logging

import numpy as np
import pytest
import soundfile
import torch
from helpers import make_conversations, random_labels
from transformers import pipeline

from mister_e_hf import ConversationInputError, MisterEError, MisterEModel, MisterEProcessor
from mister_e_hf.cli import main as cli_main
from mister_e_hf.data import DataCollatorForConversations
from mister_e_hf.pipeline import TASK
from mister_e_hf.processing_mister_e import read_audio, receptive_field
from mister_e_hf.streaming import StreamingEmotionRecognizer


LABELS = {0: "calm", 1: "happy", 2: "angry", 3: "sad"}


@pytest.fixture
def model_and_processor(build):
    return build("wav2vec2", "bert", id2label=LABELS)


@pytest.fixture
def saved_model(model_and_processor, tmp_path):
    model, processor = model_and_processor
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def audio(seconds=0.5, seed=0, rate=16000):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


# ------------------------------------------------------------------------------------------------ blank text
BLANKS = [{}, {"text": None}, {"text": ""}, {"text": "   "}, {"text": "\t\n"}]


@pytest.mark.parametrize("blank", BLANKS[1:], ids=["none", "empty", "spaces", "tab-newline"])
def test_blank_text_is_absent_text_like_a_missing_key_in_the_processor_and_model(model_and_processor, blank):
    model, processor = model_and_processor
    speech = {"audio": audio(), "sampling_rate": 16000}
    conversation = [{"text": "oh no really", **speech}, {**speech, **blank}, {"text": "great", **speech}]
    missing = [conversation[0], dict(speech), conversation[2]]
    inputs, reference = processor(conversations=[conversation]), processor(conversations=[missing])
    assert inputs.keys() == reference.keys() and inputs["text_mask"].tolist() == [[1, 0, 1]]
    for key in inputs:
        torch.testing.assert_close(inputs[key], reference[key])
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.gate_weights[0, 1].tolist() == [1.0, 0.0, 0.0]  # speech only: no expert reads an empty text
    torch.testing.assert_close(outputs.gate_weights.sum(-1), torch.ones(1, 3))


def test_a_batch_where_no_utterance_has_text_is_speech_only(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(conversations=[[{"audio": audio(), "sampling_rate": 16000, "text": ""}]])
    assert "input_ids" not in inputs and inputs["text_mask"].tolist() == [[0]]
    assert torch.isfinite(model(**inputs).logits).all()


def test_blank_text_with_no_other_modality_is_a_named_error(build):
    model, processor = build(None, "bert")
    for blank in BLANKS:
        with pytest.raises(ConversationInputError, match=r"conversation 0, utterance 1: no text \(missing or blank"):
            processor(conversations=[[{"text": "hello"}, blank]])


def test_blank_text_through_pipeline_streaming_collator_and_cli(model_and_processor, saved_model, tmp_path, capsys):
    model, processor = model_and_processor
    speech = {"audio": audio(), "sampling_rate": 16000}
    recognizer = pipeline(TASK, model=model, processor=processor)
    with_blank = recognizer([{"text": "fine", **speech}, {"text": " ", **speech}])
    with_missing = recognizer([{"text": "fine", **speech}, dict(speech)])
    assert with_blank == with_missing and with_blank[1]["gate_weights"]["text"] == 0.0

    causal, causal_processor = model_and_processor[0].__class__(
        model.config.__class__(**{**model.config.to_dict(), "context_bidirectional": False})), processor
    streamed = StreamingEmotionRecognizer(causal.eval(), causal_processor)
    first, second = streamed.push(dict(speech)), None
    streamed.reset()
    second = streamed.push({**speech, "text": ""})
    assert first.scores == second.scores and second.gate_weights["text"] == 0.0

    collate = DataCollatorForConversations(processor)
    path = tmp_path / "a.wav"
    soundfile.write(path, speech["audio"], 16000)
    row = {"conversation_id": "c", "turns": [0, 1], "texts": ["fine", ""], "audio": [str(path), str(path)],
           "labels": [0, 1]}
    batch = collate([row])
    assert batch["text_mask"].tolist() == [[1, 0]]
    torch.testing.assert_close(batch["input_values"], collate([{**row, "texts": ["fine", None]}])["input_values"])

    conversations = tmp_path / "c.jsonl"
    conversations.write_text(json.dumps({"conversation_id": "d1", "utterances": [
        {"text": "fine", "audio": "a.wav"}, {"text": "", "audio": "a.wav"}]}) + "\n")
    assert cli_main(["predict", str(conversations), "--model", str(saved_model)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["turn"] for line in lines] == [0, 1] and lines[1]["gate_weights"]["text"] == 0.0


# ------------------------------------------------------------------------------------------------------ audio
@pytest.mark.parametrize("subtype, dtype", [("PCM_16", np.int16), ("PCM_32", np.int32), ("PCM_U8", np.uint8)])
def test_integer_pcm_arrays_are_scaled_as_soundfile_scales_them(tmp_path, subtype, dtype):
    path = tmp_path / "clip.wav"
    soundfile.write(path, audio(0.2), 16000, subtype=subtype)
    from_file, _ = read_audio(str(path))
    raw, _ = soundfile.read(path, dtype="int16" if dtype == np.int16 else "int32")
    if dtype == np.uint8:  # soundfile has no uint8 output: rebuild the unsigned samples from the file's bytes
        raw = np.frombuffer(path.read_bytes()[-len(from_file):], dtype=np.uint8)
    samples, rate = read_audio(np.asarray(raw, dtype=dtype), 16000)
    assert rate == 16000 and samples.dtype == np.float32
    np.testing.assert_allclose(samples, from_file, atol=1e-6)


def test_a_wav_truncated_in_its_data_is_refused_by_name(tmp_path, model_and_processor):
    _, processor = model_and_processor
    whole = tmp_path / "whole.wav"
    soundfile.write(whole, audio(1.0), 16000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:20000])
    assert soundfile.read(cut)[0].size > 0  # libsndfile would decode it silently
    with pytest.raises(ConversationInputError, match=r"conversation 0, utterance 0: audio file .*cut.wav'.*truncated"):
        processor(conversations=[[{"audio": str(cut), "text": "x"}]])
    from mister_e_hf.data.common import check_audio

    assert "truncated" in check_audio(str(cut)) and check_audio(str(whole)) is None


def test_receptive_field_comes_from_the_backbone(tiny_backbones):
    speech, text = tiny_backbones
    processor = MisterEProcessor.from_backbones(str(speech), str(text))
    # the tiny wav2vec2 front end: kernels (10, 3), strides (5, 4) -> 10 + (3 - 1) * 5 samples
    assert processor.min_audio_samples == 20
    from transformers import Wav2Vec2Config

    assert receptive_field(Wav2Vec2Config()) == 400  # wav2vec2-base: 25 ms at 16 kHz
    with pytest.raises(ConversationInputError, match="19 samples .* receptive field of 20 samples"):
        processor(conversations=[[{"audio": np.zeros(19, np.float32), "sampling_rate": 16000, "text": "x"}]])
    assert processor(conversations=[[{"audio": 0.1 * np.ones(20, np.float32), "sampling_rate": 16000}]])[
        "speech_mask"].tolist() == [[1]]


def test_the_model_refuses_audio_below_the_receptive_field_even_from_a_bare_processor(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(conversations=[[{"audio": audio(), "sampling_rate": 16000, "text": "a"}]])
    inputs["speech_attention_mask"][0, 0, 15:] = 0  # 15 samples of real audio left
    with pytest.raises(ConversationInputError, match=r"conversation 0, utterance 0: .*15 samples long, shorter than "
                                                     r"the speech backbone's receptive field of 20 samples"):
        model(**inputs)


def test_long_audio_is_refused_or_truncated_with_a_warning(tokenizer, caplog):
    from helpers import feature_extractor

    long = {"audio": audio(3.0), "sampling_rate": 16000, "text": "x"}
    strict = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer, max_audio_seconds=2)
    with pytest.raises(ConversationInputError, match=r"3.0 s long, over `max_audio_seconds`=2 .*truncate_long_audio"):
        strict(conversations=[[long]])
    lenient = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer, max_audio_seconds=2, truncate_long_audio=True)
    with caplog.at_level(logging.WARNING):
        inputs = lenient(conversations=[[long, {**long, "audio": audio(2.5)}, {**long, "audio": audio(1.0)}]])
    assert inputs["speech_attention_mask"].sum(-1).tolist() == [[32000, 32000, 16000]]
    assert "2 utterance(s) had more than `max_audio_seconds`=2 s of audio and were truncated" in caplog.text
    with pytest.raises(MisterEError, match="max_audio_seconds"):
        MisterEProcessor(feature_extractor("wav2vec2"), tokenizer, max_audio_seconds=-1)


# ---------------------------------------------------------------------------------------------- long text
def test_text_longer_than_the_backbone_is_truncated_with_a_counted_warning(tiny_backbones, caplog):
    speech, text = tiny_backbones
    processor = MisterEProcessor.from_backbones(None, str(text))  # the tokenizer has no maximum of its own
    assert processor.max_text_length == 512  # the tiny BERT's position embeddings
    model = MisterEModel.from_backbones(None, str(text), num_labels=2).eval()
    long, short = " ".join(["hello"] * 700), "hello there"
    with caplog.at_level(logging.WARNING):
        inputs = processor(conversations=[[{"text": long}, {"text": short}, {"text": long + " oh"}]])
    assert "2 utterance text(s) have more tokens than the text backbone's maximum of 512 and were truncated" in caplog.text
    assert inputs["input_ids"].shape[-1] == 512 and inputs["text_attention_mask"][0, 1].sum() < 10
    assert torch.isfinite(model(**inputs).logits).all()
    bare = MisterEProcessor(tokenizer=processor.tokenizer)  # no limit known: the model names the problem
    with pytest.raises(ConversationInputError, match="utterance 0: the text has 70[02] tokens, more than the text "
                                                     "backbone's 512 positions"):
        model(**bare(conversations=[[{"text": long}]]))


# ------------------------------------------------------------------------------------------- nonsense arguments
def test_pipeline_refuses_nonsense_arguments_and_inputs(model_and_processor):
    model, processor = model_and_processor
    recognizer = pipeline(TASK, model=model, processor=processor)
    conversation = [{"text": "fine"}]
    for size in (-1, 0, True, 1.5):
        with pytest.raises(MisterEError, match="`batch_size` must be a positive number"):
            recognizer(conversation, batch_size=size)
    with pytest.raises(MisterEError, match=r"Unknown parameters \['top_k'\].*takes `batch_size` and `asr_model`"):
        recognizer(conversation, top_k=3)
    for bad, message in (("hello", "got str"), (None, "got NoneType"), ([], "got an empty list"),
                         ({"text": "hi"}, r"wrap it: \[utterance\]")):
        with pytest.raises(MisterEError, match=message):
            recognizer(bad)
    # errors name the conversation's position in the whole input, not in its batch
    conversations = [conversation, conversation, [{"text": "ok"}, {"text": 7}]]
    with pytest.raises(ConversationInputError, match="conversation 2, utterance 1: `text` must be a string, got int 7"):
        recognizer(conversations, batch_size=2)
    with pytest.raises(MisterEError, match="unknown arguments"):
        MisterEProcessor(tokenizer=processor.tokenizer, max_text_len=5)
    with pytest.raises(MisterEError, match=r"Unknown modalities \['audio'\]"):
        processor(conversations=[conversation], modalities=["audio"])


def test_cli_refuses_a_non_positive_batch_size(saved_model, tmp_path, capsys):
    conversations = tmp_path / "c.jsonl"
    conversations.write_text(json.dumps([{"text": "fine"}]) + "\n")
    for size in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as exit_:
            cli_main(["predict", str(conversations), "--model", str(saved_model), "--batch_size", size])
        assert exit_.value.code == 2 and "--batch_size" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- collator
def test_collator_names_the_conversation_and_turn(model_and_processor, tmp_path):
    _, processor = model_and_processor
    collate = DataCollatorForConversations(processor)
    path = tmp_path / "a.wav"
    soundfile.write(path, audio(), 16000)
    good = {"conversation_id": "dia7", "turns": [3, 5], "texts": ["fine", "great"], "audio": [str(path)] * 2,
            "labels": [0, 1]}
    cases = [
        ({"audio": [str(path)]}, r"conversation 'dia7': `audio` has 1 entries for the conversation's 2 turns"),
        ({"labels": [0]}, r"conversation 'dia7': `labels` has 1 entries"),
        ({"labels": [0, 1.7]}, r"conversation 'dia7', turn 5: label 1.7 is not a class id"),
        ({"labels": [0, True]}, r"conversation 'dia7', turn 5: label True is not a class id"),
        ({"texts": []}, "has no turns"),
        ({"audio": [str(path), str(tmp_path / "gone.wav")]}, r"conversation 'dia7', turn 5: audio file .*gone.wav' "
                                                              r"not found"),
    ]
    for change, message in cases:
        with pytest.raises(MisterEError, match=message):
            collate([good, {**good, **change}])
    with pytest.raises(MisterEError, match="empty batch"):
        collate([])
    assert collate([good, {**good, "labels": [2.0, -1]}])["labels"][1].tolist() == [2, -100]  # whole floats are ids
    regression = DataCollatorForConversations(processor, label_columns=["valence"])
    with pytest.raises(MisterEError, match=r"turn 3: `valence` value 'high' is not a number"):
        regression([{**good, "valence": ["high", 0.5]}])
    with pytest.raises(MisterEError, match=r"turn 5: `valence` value inf is not a finite number"):
        regression([{**good, "valence": [0.1, float("inf")]}])
    cached = {**good, "speech_embeds": [[0.0] * 4, [float("nan")] * 4], "speech_present": [1, 1]}
    with pytest.raises(MisterEError, match=r"conversation 'dia7', turn 5: the cached speech embedding holds NaN"):
        collate([cached])
    assert torch.isfinite(collate([{**cached, "speech_present": [1, 0]}])["speech_embeds"]).all()


# ------------------------------------------------------------------------------------------------ model forward
def test_non_finite_inputs_are_refused_where_used_and_harmless_where_masked(model_and_processor):
    model, processor = model_and_processor
    conversations = make_conversations([3, 2], seed=4)
    inputs = processor(conversations=conversations)
    with torch.no_grad():
        clean = model(**inputs)
    poisoned = {**inputs, "input_values": inputs["input_values"].clone()}
    poisoned["input_values"][1, 1, 100] = float("nan")
    with pytest.raises(ConversationInputError, match=r"conversation 1, utterance 1: `input_values` holds NaN"):
        model(**poisoned)
    poisoned["speech_mask"] = inputs["speech_mask"].clone()
    poisoned["speech_mask"][1, 1] = 0  # that utterance's audio is not used: the NaN must not spread
    with torch.no_grad():
        masked = model(**poisoned)
    assert torch.isfinite(masked.logits).all() and torch.isfinite(masked.gate_weights).all()
    torch.testing.assert_close(masked.logits[0], clean.logits[0])

    speech = torch.randn(2, 3, 32)
    text = torch.randn(2, 3, 32)
    embeddings_model = MisterEModel(model.config.__class__(speech_embed_dim=32, text_embed_dim=32, num_labels=4,
                                                           projection_dim=16, cross_attention_heads=2)).eval()
    reference = embeddings_model(speech_embeds=speech, text_embeds=text, utterance_mask=torch.tensor([[1, 1, 1],
                                                                                                      [1, 1, 0]]))
    padded = speech.clone()
    padded[1, 2] = float("nan")  # in padding
    again = embeddings_model(speech_embeds=padded, text_embeds=text, utterance_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    torch.testing.assert_close(again.logits, reference.logits, equal_nan=False)
    padded[0, 1, 3] = float("inf")
    with pytest.raises(ConversationInputError, match=r"conversation 0, utterance 1: `speech_embeds` holds NaN or inf"):
        embeddings_model(speech_embeds=padded, text_embeds=text)


def test_tensor_types_are_cast_or_refused_clearly(model_and_processor):
    model, processor = model_and_processor
    inputs = processor(conversations=make_conversations([2, 3], seed=5))
    labels = random_labels(inputs)
    with torch.no_grad():
        reference = model(**inputs, labels=labels).loss
        for given in (labels.numpy(), labels.tolist(), labels.to(torch.int32)):
            torch.testing.assert_close(model(**inputs, labels=given).loss, reference)
        with pytest.raises(MisterEError, match="`labels` are booleans"):
            model(**inputs, labels=labels > 0)
        with pytest.raises(MisterEError, match="`input_ids` must be integer token ids"):
            model(**{**inputs, "input_ids": inputs["input_ids"].float()})
        with pytest.raises(MisterEError, match=r"`speech_mask` must have shape \(batch, utterances\) = \(2, 3\)"):
            model(**{**inputs, "speech_mask": inputs["speech_mask"][:, :2]})
        with pytest.raises(MisterEError, match="`text_attention_mask` must have the shape of `input_ids`"):
            model(**{**inputs, "text_attention_mask": inputs["text_attention_mask"][..., :-1]})

        embeddings = MisterEModel(model.config.__class__(speech_embed_dim=8, num_labels=4, projection_dim=16,
                                                         cross_attention_heads=2)).eval()
        vectors = torch.randn(1, 2, 8)
        expected = embeddings(speech_embeds=vectors).logits
        torch.testing.assert_close(embeddings(speech_embeds=vectors.double()).logits, expected)
        torch.testing.assert_close(embeddings(speech_embeds=vectors.numpy()).logits, expected)
        with pytest.raises(MisterEError, match="`speech_embeds` must hold floating-point values, got torch.int64"):
            embeddings(speech_embeds=vectors.long())
        half = embeddings.to(torch.bfloat16)
        assert half(speech_embeds=vectors).logits.dtype == torch.bfloat16  # float32 inputs cast to the model's dtype

    model.to(torch.bfloat16)
    with torch.no_grad():
        outputs = model(**inputs)
    assert torch.isfinite(outputs.logits.float()).all()


# ---------------------------------------------------------------------------------------------- saved models
def test_a_folder_with_pickled_weights_only_is_refused(saved_model, capsys):
    state = {k: v.clone() for k, v in MisterEModel.from_pretrained(saved_model).state_dict().items()}
    (saved_model / "model.safetensors").unlink()
    torch.save(state, saved_model / "pytorch_model.bin")
    with pytest.raises(MisterEError, match=r"no model.safetensors; it holds only pytorch_model.bin \(pickled weights, "
                                           r"refused"):
        MisterEModel.from_pretrained(saved_model)
    with pytest.raises(MisterEError, match="safetensors weights only"):
        MisterEModel.from_pretrained(saved_model, use_safetensors=False)
    conversations = saved_model.parent / "c.jsonl"
    conversations.write_text(json.dumps([{"text": "fine"}]) + "\n")
    assert cli_main(["predict", str(conversations), "--model", str(saved_model)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pytorch_model.bin (pickled weights, refused" in error


def test_a_model_with_non_finite_weights_is_never_saved_loaded_or_used(model_and_processor, tmp_path, capsys):
    model, processor = model_and_processor
    with torch.no_grad():
        model.fusion.gate.net[0].weight[0, 0] = float("nan")
    with pytest.raises(ConversationInputError, match="NaN or infinite scores"):
        pipeline(TASK, model=model, processor=processor)([{"text": "fine", "audio": audio(), "sampling_rate": 16000}])
    with pytest.raises(MisterEError, match=r"Refusing to save to .*nan: the weight `fusion.gate.net.0.weight` holds"):
        model.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan" / "model.safetensors").exists()
    with torch.no_grad():  # a file corrupted after saving
        model.fusion.gate.net[0].weight[0, 0] = 0.0
    model.save_pretrained(tmp_path / "nan")
    processor.save_pretrained(tmp_path / "nan")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "nan" / "model.safetensors")
    weights["fusion.gate.net.0.weight"][0, 0] = float("nan")
    save_file(weights, tmp_path / "nan" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MisterEError, match=r"the weight `fusion.gate.net.0.weight` holds NaN"):
        MisterEModel.from_pretrained(tmp_path / "nan")
    conversations = tmp_path / "c.jsonl"
    conversations.write_text(json.dumps([{"text": "fine"}]) + "\n")
    assert cli_main(["predict", str(conversations), "--model", str(tmp_path / "nan"), "-o", str(tmp_path / "p.jsonl")]) == 1
    assert "holds NaN" in capsys.readouterr().err and not (tmp_path / "p.jsonl").exists()


# --------------------------------------------------------------------------------------------------- streaming
def test_a_failed_push_names_the_turn_and_leaves_the_conversation_as_it_was(build):
    model, processor = build("wav2vec2", "bert", context_bidirectional=False)
    turns = make_conversations([3], seed=6)[0]
    streamed = StreamingEmotionRecognizer(model, processor)
    reference = [streamed.push(turn).scores for turn in turns]
    streamed.reset()
    streamed.push(turns[0])
    with pytest.raises(ConversationInputError, match=r"streamed turn 1: audio holds 8000 NaN"):
        streamed.push({**turns[1], "audio": np.full(8000, np.nan, np.float32)})
    with pytest.raises(ConversationInputError, match="streamed turn 1: no audio or text"):
        streamed.push({"text": ""})
    assert streamed.turns == 1
    assert [streamed.push(turn).scores for turn in turns[1:]] == reference[1:]


# ------------------------------------------------------------------------------------------------------ images
def test_frames_of_any_mode_or_layout_become_the_same_rgb_pixels(tmp_path):
    from PIL import Image
    from transformers import ViTImageProcessor

    processor = MisterEProcessor(image_processor=ViTImageProcessor(size={"height": 16, "width": 16}))
    grey = np.random.default_rng(0).integers(0, 256, (5, 7, 1), dtype=np.uint8)
    rgb = np.repeat(grey, 3, axis=-1)
    path = tmp_path / "frame.png"
    Image.fromarray(rgb).save(path)
    reference = processor(conversations=[[{"image": str(path)}]])["pixel_values"]
    for frame in (grey, rgb, np.concatenate([rgb, np.full_like(grey, 9)], -1), rgb / 255.0, rgb.astype(np.float64),
                  Image.fromarray(grey[..., 0]), Image.fromarray(rgb).convert("RGBA"), rgb.astype(np.int64)):
        torch.testing.assert_close(processor(conversations=[[{"image": frame}]])["pixel_values"], reference,
                                   atol=1e-6, rtol=0)
    assert processor(conversations=[[{"image": np.zeros((1, 1, 3), np.uint8)}]])["pixel_values"].shape[-1] == 16
    for bad, message in ((-np.ones((4, 4, 3)), r"lie in \[0, 255\]"), (np.zeros((3, 8, 8)), "1, 3 or 4 channels"),
                         (np.zeros((4, 4, 3), bool), "real numbers"), ({"pixels": 1}, "PIL image or an")):
        with pytest.raises(ConversationInputError, match=message):
            processor(conversations=[[{"image": bad}]])


def test_empty_batches_foreign_token_ids_and_missing_backbone_folders_are_named(model_and_processor, tmp_path):
    model, processor = model_and_processor
    with pytest.raises(MisterEError, match=r"Empty batch: the inputs have shape \(0, 3\)"):
        model(speech_embeds=None, input_ids=torch.zeros(0, 3, 4, dtype=torch.long),
              text_attention_mask=torch.ones(0, 3, 4, dtype=torch.long))
    inputs = processor(conversations=[[{"text": "fine thanks"}]])
    inputs["input_ids"][0, 0, 0] = 10 ** 6
    with pytest.raises(ConversationInputError, match=r"utterance 0: `input_ids` holds token ids outside the text "
                                                     r"backbone's vocabulary \[0, \d+\)"):
        model(**inputs)
    for path in (tmp_path / "gone", "./gone", "models/typo/whisper"):
        with pytest.raises(MisterEError, match="is not a folder that exists"):
            MisterEModel.from_backbones(str(path), None, num_labels=2)
        with pytest.raises(MisterEError, match="is not a folder that exists"):
            MisterEProcessor.from_backbones(None, str(path))


def test_damaged_model_folders_give_one_line(saved_model, tmp_path, capsys):
    conversations = tmp_path / "c.jsonl"
    conversations.write_text(json.dumps([{"text": "fine"}]) + "\n")
    weights = saved_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(MisterEError, match="its weights cannot be read .* truncated or corrupted"):
        MisterEModel.from_pretrained(saved_model)
    assert cli_main(["predict", str(conversations), "--model", str(saved_model)]) == 1
    assert "weights cannot be read" in capsys.readouterr().err
    (saved_model / "config.json").write_text("{not json")
    assert cli_main(["predict", str(conversations), "--model", str(saved_model)]) == 1
    assert "config.json is not valid JSON" in capsys.readouterr().err
    (saved_model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert cli_main(["predict", str(conversations), "--model", str(saved_model)]) == 1
    assert "not a MiSTER-E model (its config.json has model_type 'bert')" in capsys.readouterr().err


def test_a_mistyped_config_override_is_refused():
    import importlib.util

    from helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location("run_erc", REPO_ROOT / "examples" / "run_erc.py")
    run_erc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_erc)
    assert run_erc.parse_overrides("projection_dim=16,supcon_weight=0") == {"projection_dim": 16, "supcon_weight": 0.0}
    with pytest.raises(MisterEError, match="'projection_dimm' is not a MisterEConfig setting; did you mean "
                                           "'projection_dim'"):
        run_erc.parse_overrides("projection_dimm=16")


def test_a_processor_must_prepare_what_the_model_reads(model_and_processor, build, tokenizer):
    from helpers import feature_extractor

    model, processor = model_and_processor
    speech_only = MisterEProcessor(feature_extractor("wav2vec2"))
    for make in (lambda: pipeline(TASK, model=model, processor=speech_only),
                 lambda: StreamingEmotionRecognizer(model, speech_only)):
        with pytest.raises(MisterEError, match="The processor has no tokenizer, but the model has a text backbone"):
            make()
    with pytest.raises(MisterEError, match="feature extractor makes `input_features`, but the speech backbone "
                                           r"\(wav2vec2\) reads `input_values`"):
        model.check_processor(MisterEProcessor(feature_extractor("whisper"), tokenizer))
    whisper, _ = build("whisper", "bert")
    from transformers import WhisperFeatureExtractor

    with pytest.raises(MisterEError, match="makes 80 mel bins, the speech backbone reads 16"):
        whisper.check_processor(MisterEProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer))
    with pytest.raises(MisterEError, match=r"text views \['text', 'emphasis'\], the model was built for \['text'\]"):
        model.check_processor(MisterEProcessor(feature_extractor("wav2vec2"), tokenizer, text_views=["text", "emphasis"]))
    from helpers import speech_config

    with pytest.raises(MisterEError, match=r"The text backbone \(wav2vec2\) reads `input_values`.* not a text encoder"):
        MisterEModel(model.config.__class__(text_config=speech_config("wav2vec2"), num_labels=2))


def test_cli_resolves_images_beside_the_file_and_refuses_odd_files_and_outputs(saved_model, tmp_path, capsys):
    from mister_e_hf.cli import read_conversations

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "c.json").write_text(json.dumps([{"text": "hi", "image": "frame.png", "audio": " "}]))
    ((_, _, (utterance,)),) = read_conversations(str(folder / "c.json"))
    assert utterance["image"] == str(folder / "frame.png") and utterance["audio"] == " "
    (folder / "bom.jsonl").write_bytes("\ufeff".encode() + json.dumps([{"text": "hi"}]).encode() + b"\n")
    assert len(read_conversations(str(folder / "bom.jsonl"))) == 1
    for content, message in (("5", "holds a JSON int"), ("null", "holds a JSON NoneType"),
                             ("[" * 100000 + "]" * 100000, "nested too deeply")):
        (folder / "odd.json").write_text(content)
        assert cli_main(["predict", str(folder / "odd.json"), "--model", str(saved_model)]) == 1
        assert message in capsys.readouterr().err
    (folder / "one.json").write_text(json.dumps([{"text": "fine"}]))
    assert cli_main(["predict", str(folder / "one.json"), "--model", str(saved_model), "-o", str(folder)]) == 1
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert cli_main(["plot-gates", str(folder / "one.json"), "--model", str(saved_model), "-o",
                     str(tmp_path / "gates")]) == 1
    assert "give the file a suffix" in capsys.readouterr().err


def test_model_conventions_return_dict_half_backbones_and_config_bounds(tiny_backbones, model_and_processor):
    from mister_e_hf import MisterEConfig

    model, processor = model_and_processor
    inputs = processor(conversations=make_conversations([2], seed=8))
    with torch.no_grad():
        as_tuple, as_output = model(**inputs, return_dict=False), model(**inputs)
    assert torch.equal(as_tuple[0], as_output.logits)
    speech, text = tiny_backbones
    half = MisterEModel.from_backbones(str(speech), str(text), num_labels=2, backbone_kwargs={"dtype": torch.float16})
    assert half.speech_backbone.dtype == torch.float16 and half.projections["speech"].linear.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(half.eval()(**MisterEProcessor.from_backbones(str(speech), str(text))(
            conversations=make_conversations([2], seed=9))).logits).all()
    for bad, message in ((dict(gate_temperature=1e-300), r"gate_temperature[\s\S]*greater or equal to 0.001"),
                         (dict(initializer_range=-0.02), r"initializer_range[\s\S]*greater or equal to 0"),
                         (dict(speech_embed_layers=-1, speech_layers="concat"), "must be positive"),
                         (dict(text_views=["text", "audio"]), "not text"),
                         (dict(text_views=["text", "speaker"]), "speakers"),
                         (dict(projection_dimm=16), "Unknown MisterEConfig settings: 'projection_dimm' \\(did you mean "
                                                    "'projection_dim'")):
        with pytest.raises(Exception, match=message):
            MisterEConfig(speech_embed_dim=8, text_embed_dim=8, num_labels=2, **bad)


def test_pil_frames_of_16_bit_and_float_modes_keep_their_brightness():
    from PIL import Image

    from mister_e_hf.processing_mister_e import read_image

    grey = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    expected = np.asarray(read_image(grey[..., None]))
    sixteen = Image.fromarray((grey * 65535).astype(np.uint16))
    assert sixteen.mode.startswith("I;16")
    for frame in (sixteen, Image.fromarray(grey, mode="F")):
        np.testing.assert_allclose(np.asarray(read_image(frame)), expected, atol=1)
