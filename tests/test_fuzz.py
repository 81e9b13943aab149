"""Property-based fuzzing of processor -> model and collator -> model on tiny models: whatever a user feeds in, the
toolkit either refuses it with one of its own named errors (`MisterEError`), or returns finite outputs whose gate
weights sum to 1 over the available experts (0 for the others). An exception from torch, tokenizers, numpy or
datasets internals fails the test. Examples are bounded and derandomised so the suite stays fast and repeatable
(set `HYPOTHESIS_PROFILE=deep` for a longer, random run)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import pytest
import torch
from helpers import TINY_HEAD, WORDS, feature_extractor, speech_config, text_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mister_e_hf import MisterEConfig, MisterEError, MisterEModel, MisterEProcessor
from mister_e_hf.data import DataCollatorForConversations


settings.register_profile("ci", max_examples=120, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def fuzzed(tokenizer):
    torch.manual_seed(0)
    config = MisterEConfig(speech_config=speech_config("wav2vec2"), text_config=text_config("bert", len(tokenizer)),
                           **TINY_HEAD)
    processor = MisterEProcessor(feature_extractor("wav2vec2"), tokenizer, max_audio_seconds=2.0)
    return Fuzzed(MisterEModel(config).eval(), processor)


class Fuzzed(tuple):
    """(model, processor), with a short repr for hypothesis' failure reports."""

    def __new__(cls, model, processor):
        return super().__new__(cls, (model, processor))

    def __repr__(self) -> str:
        return "<tiny wav2vec2 + BERT MiSTER-E model and processor>"


def _waveform(kind_length_rate):
    kind, length = kind_length_rate
    rng = np.random.default_rng(length)
    samples = 0.1 * rng.standard_normal(length)
    if kind == "float32":
        return samples.astype(np.float32)
    if kind == "float64":
        return samples
    if kind == "int16":
        return (samples * 32767).astype(np.int16)
    if kind == "uint8":
        return (128 + samples * 100).astype(np.uint8)
    if kind == "nan" and length:
        samples[length // 2] = np.nan
        return samples.astype(np.float32)
    if kind == "inf" and length:
        samples[0] = np.inf
        return samples
    if kind == "complex":
        return samples.astype(np.complex64)
    if kind == "2d":
        return samples.reshape(1, -1)
    if kind == "unscaled":
        return (samples * 32767).astype(np.float32)
    if kind == "int64":
        return (samples * 1000).astype(np.int64)
    return samples.tolist()  # a plain list of floats


good_texts = st.one_of(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join),
                       st.sampled_from([None, "", "  "]))
bad_texts = st.one_of(
    st.sampled_from(["\t\n", "\u00a0", "\u200b"]), st.text(max_size=12),
    st.lists(st.sampled_from(WORDS), min_size=600, max_size=700).map(" ".join),
    st.integers(), st.floats(allow_nan=True), st.lists(st.sampled_from(WORDS), max_size=3),
)
good_audio = st.sampled_from([400, 1200, 8000]).map(lambda n: _waveform(("float32", n)))
bad_audio = st.one_of(
    st.sampled_from(["", "  ", "/no/such/file.wav"]),
    st.tuples(st.sampled_from(["float32", "float64", "int16", "uint8", "nan", "inf", "complex", "2d", "unscaled",
                               "int64", "list"]),
              st.sampled_from([0, 1, 10, 19, 20, 400, 1200, 8000])).map(_waveform),
    st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
good_rates = st.sampled_from([16000, 8000, 22050])
bad_rates = st.one_of(st.sampled_from([None, 0, 1, -16000, 16000.5, 1e9, True, "16000"]), st.floats())
bad_utterances = st.one_of(st.none(), st.text(max_size=5), st.integers(), st.just({}), st.just({"txt": "typo"}))


@st.composite
def good_utterance(draw):
    utterance = {"text": draw(good_texts)}
    if draw(st.booleans()) or utterance["text"] is None or not utterance["text"].strip():
        utterance.update(audio=draw(good_audio), sampling_rate=draw(good_rates))
    return utterance


@st.composite
def conversations(draw):
    """Valid conversations with 0-3 faults put in: most examples are nearly right, as real inputs are."""
    batch = draw(st.lists(st.lists(good_utterance(), min_size=1, max_size=4), min_size=1, max_size=3))
    for _ in range(draw(st.integers(0, 3))):
        b = draw(st.integers(0, len(batch) - 1))
        if not isinstance(batch[b], list) or not batch[b]:
            continue  # already broken
        u = draw(st.integers(0, len(batch[b]) - 1))
        fault = draw(st.sampled_from(["text", "audio", "sampling_rate", "utterance", "conversation", "batch"]))
        if fault in ("text", "audio", "sampling_rate") and not isinstance(batch[b][u], dict):
            continue
        if fault == "text":
            batch[b][u]["text"] = draw(bad_texts)
        elif fault == "audio":
            batch[b][u]["audio"] = draw(bad_audio)
        elif fault == "sampling_rate":
            batch[b][u]["sampling_rate"] = draw(bad_rates)
        elif fault == "utterance":
            batch[b][u] = draw(bad_utterances)
        elif fault == "conversation":
            batch[b] = draw(st.sampled_from([[], None, "text", {"text": "hi"}]))
        else:
            return draw(st.sampled_from([[], None, "text", batch[0]]))
    return batch


label_values = st.one_of(st.sampled_from([-100, -1, 0, 1, 2, 3]), st.integers(-101, 5), st.floats(), st.booleans(),
                         st.none(), st.text(max_size=2))


def check_outputs(outputs, utterance_mask):
    """Finite outputs; per real utterance the gate weights sum to 1 over the available experts, 0 elsewhere."""
    assert torch.isfinite(outputs.logits).all(), "non-finite logits"
    assert torch.isfinite(outputs.gate_weights).all(), "non-finite gate weights"
    real = utterance_mask.bool()
    gates, available = outputs.gate_weights, outputs.expert_mask
    torch.testing.assert_close(gates.sum(-1)[real], torch.ones(int(real.sum())))
    assert (gates[~available] == 0).all(), "an unavailable expert has weight"
    assert (gates[~real] == 0).all(), "a padding utterance has weights"
    if outputs.loss is not None:
        assert torch.isfinite(outputs.loss), "non-finite loss"


def run_and_classify(step):
    """Runs `step`; a MisterEError is a fine outcome, any other exception fails the test with its origin."""
    try:
        return step()
    except MisterEError as error:
        event(f"named error: {type(error).__name__}")
        return None


@given(conversations=conversations(), labels=st.lists(label_values, max_size=12))
def test_processor_then_model_gives_a_named_error_or_a_finite_result(fuzzed, conversations, labels):
    model, processor = fuzzed
    inputs = run_and_classify(lambda: processor(conversations=conversations))
    if inputs is None:
        return
    shape = inputs["utterance_mask"].shape
    label_tensor = None
    if labels:
        flat = (labels * (shape.numel() // len(labels) + 1))[: shape.numel()]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            label_tensor = torch.tensor(flat).view(shape)
    with torch.no_grad():
        outputs = run_and_classify(lambda: model(**inputs, labels=label_tensor))
    if outputs is not None:
        check_outputs(outputs, inputs["utterance_mask"])
        event("finite result" + (" with loss" if outputs.loss is not None else ""))


def _audio_files() -> list[str]:
    """WAV files as a corpus holds them: good ones of several lengths and rates, and broken ones."""
    folder = Path(tempfile.mkdtemp(prefix="mister-e-fuzz-"))
    atexit.register(shutil.rmtree, folder, True)
    rng = np.random.default_rng(0)
    files = {}
    for name, seconds, rate in (("short", 0.05, 16000), ("half", 0.5, 16000), ("phone", 0.4, 8000),
                                ("cd", 0.3, 44100), ("tiny", 0.0005, 16000), ("long", 2.5, 16000)):
        files[name] = folder / f"{name}.wav"
        soundfile.write(files[name], (0.1 * rng.standard_normal(max(1, int(seconds * rate)))).astype(np.float32), rate)
    files["nan"] = folder / "nan.wav"
    samples = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    samples[100] = np.nan
    soundfile.write(files["nan"], samples, 16000, subtype="FLOAT")
    files["cut"] = folder / "cut.wav"
    files["cut"].write_bytes(files["half"].read_bytes()[:6000])
    files["text"] = folder / "notes.wav"
    files["text"].write_text("not audio")
    files["stereo"] = folder / "stereo.wav"
    soundfile.write(files["stereo"], 0.1 * rng.standard_normal((8000, 2)), 16000)
    return [str(files[k]) for k in ("half", "phone", "cd", "stereo")], [str(p) for p in files.values()]


GOOD_FILES, ANY_FILES = _audio_files()


@st.composite
def rows(draw):
    """Conversation rows as a corpus loader gives them (audio in memory here), with 0-3 faults put in."""
    batch = []
    for c in range(draw(st.integers(1, 3))):
        turns = draw(st.lists(good_utterance(), min_size=1, max_size=4))
        batch.append({"conversation_id": f"c{c}", "turns": list(range(len(turns))),
                      "texts": [t["text"] for t in turns],
                      "audio": [draw(st.sampled_from(GOOD_FILES)) if "audio" in t else None for t in turns],
                      "labels": draw(st.lists(st.sampled_from([-1, 0, 1, 2, 3]), min_size=len(turns),
                                              max_size=len(turns)))})
    for _ in range(draw(st.integers(0, 3))):
        row = draw(st.sampled_from(batch))
        column = draw(st.sampled_from(["texts", "audio", "labels", "turns", "conversation_id"]))
        change = draw(st.sampled_from(["shorter", "longer", "value", "drop", "none"]))
        if change == "drop":
            row.pop(column, None)
        elif change == "none":
            row[column] = None
        elif column == "conversation_id":
            row[column] = draw(st.one_of(st.text(max_size=3), st.integers()))
        elif change == "shorter" and isinstance(row.get(column), list):
            row[column] = row[column][:-1]
        elif change == "longer" and isinstance(row.get(column), list):
            row[column] = row[column] + row[column][:1]
        elif isinstance(row.get(column), list) and row[column]:
            value = {"texts": bad_texts, "audio": st.one_of(st.sampled_from(ANY_FILES), bad_audio),
                     "labels": label_values, "turns": label_values}[column]
            row[column][draw(st.integers(0, len(row[column]) - 1))] = draw(value)
    return draw(st.sampled_from([batch] * 8 + [[], None]))


@given(rows=rows())
def test_collator_then_model_gives_a_named_error_or_a_finite_result(fuzzed, rows):
    model, processor = fuzzed
    batch = run_and_classify(lambda: DataCollatorForConversations(processor)(rows))
    if batch is None:
        return
    with torch.no_grad():
        outputs = run_and_classify(lambda: model(**batch))
    if outputs is not None:
        check_outputs(outputs, batch["utterance_mask"])
        event("finite result" + (" with loss" if outputs.loss is not None else ""))
