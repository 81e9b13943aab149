"""Small components with exact expectations: the poolings on hand-made tensors, `backbone_chunk_size`, the parsing of
`run_erc.py --config_overrides`, and that no speaker identity reaches the model."""

import copy
import dataclasses
import importlib.util
import inspect

import numpy as np
import pytest
import soundfile
import torch
from helpers import REPO_ROOT, make_conversations
from transformers import pipeline

from mister_e_hf import MisterEConfig, MisterEModel
from mister_e_hf.backbones import encode_speech, encode_text
from mister_e_hf.data import DataCollatorForConversations
from mister_e_hf.errors import MisterEError
from mister_e_hf.pipeline import TASK
from mister_e_hf.pooling import first_pool, last_pool, max_pool, mean_pool


# ---------------------------------------------------------------- poolings

# (2, 4, 2) states: row 0 right-padded (3 real positions), row 1 left-padded (2 real positions)
STATES = torch.tensor([[[1.0, -5.0], [3.0, 2.0], [-2.0, 7.0], [0.0, 0.0]],
                       [[0.0, 0.0], [0.0, 0.0], [4.0, -1.0], [6.0, -3.0]]])
MASK = torch.tensor([[True, True, True, False], [False, False, True, True]])
EXPECTED = {
    "mean": [[2 / 3, 4 / 3], [5.0, -2.0]],
    "max": [[3.0, 7.0], [6.0, -1.0]],
    "first": [[1.0, -5.0], [4.0, -1.0]],
    "last": [[-2.0, 7.0], [6.0, -3.0]],
}
POOLS = {"mean": mean_pool, "max": max_pool, "first": first_pool, "last": last_pool}


@pytest.mark.parametrize("name", list(POOLS))
def test_pooling_exact_values_with_padding_on_either_side(name):
    pool = POOLS[name]
    torch.testing.assert_close(pool(STATES, MASK), torch.tensor(EXPECTED[name]), rtol=0, atol=1e-6)
    # whatever the padded positions hold (huge, or above/below every real value), the result is the same
    for fill in (1e6, -1e6, 123.0):
        torch.testing.assert_close(pool(STATES.masked_fill(~MASK.unsqueeze(-1), fill), MASK),
                                   torch.tensor(EXPECTED[name]), rtol=0, atol=1e-6)
    noise = 1e3 * torch.randn(STATES.shape, generator=torch.Generator().manual_seed(0))
    noisy = torch.where(MASK.unsqueeze(-1), STATES, noise)
    torch.testing.assert_close(pool(noisy, MASK), torch.tensor(EXPECTED[name]), rtol=0, atol=1e-6)
    # one real position: every pooling gives that position; no padding: the plain reduction
    single = torch.tensor([[False, True, False, False]]).expand(2, 4)
    torch.testing.assert_close(pool(STATES, single), STATES[:, 1])
    full = torch.ones(2, 4, dtype=torch.bool)
    plain = {"mean": STATES.mean(1), "max": STATES.amax(1), "first": STATES[:, 0], "last": STATES[:, -1]}[name]
    torch.testing.assert_close(pool(STATES, full), plain)


@pytest.mark.parametrize("text,pooling", [("bert", "mean"), ("bert", "max"), ("bert", "first"), ("llama", "last")])
def test_text_pooling_by_name_equals_pooling_each_utterance_alone(build, text, pooling):
    """`encode_text` on a padded batch gives, per utterance, the pooling of the backbone's states of that utterance
    run alone and unpadded: the name picks that pooling, and padding tokens never enter it."""
    model, processor = build(None, text)
    texts = ["hello", "oh no really what a day", "sure thanks"]
    inputs = processor(conversations=[[{"text": text} for text in texts]])
    ids, mask = inputs["input_ids"][0], inputs["text_attention_mask"][0]
    backbone = model.text_backbone
    with torch.no_grad():
        pooled = encode_text(backbone, ids, mask, pooling)
        for i in range(len(ids)):
            alone = ids[i][mask[i].bool()].unsqueeze(0)
            states = backbone(input_ids=alone, attention_mask=torch.ones_like(alone)).last_hidden_state[0]
            expected = {"mean": states.mean(0), "max": states.amax(0), "first": states[0], "last": states[-1]}
            torch.testing.assert_close(pooled[i], expected[pooling], rtol=1e-4, atol=1e-5)
    assert mask.sum(-1).unique().numel() == 3  # three lengths: padding was there to ignore


# ---------------------------------------------------------------- backbone_chunk_size


def chunk_conversations():
    """Five utterances in two conversations; three share one audio length (one group for group-norm backbones)."""
    conversations = make_conversations([3, 2], seed=4)
    audio = conversations[0][0]["audio"]
    conversations[0][2]["audio"] = audio[::-1].copy()
    conversations[1][1]["audio"] = (0.5 * audio).astype(np.float32)
    return conversations


def record_batch_sizes(backbone) -> list[int]:
    """The number of utterances of each call of `backbone`, appended as it runs."""
    sizes = []

    def hook(module, args, kwargs):
        tensor = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
        sizes.append(tensor.shape[0])

    backbone.register_forward_pre_hook(hook, with_kwargs=True)
    return sizes


@pytest.mark.parametrize("speech", ["wav2vec2", "wav2vec2-group", "whisper"])
@pytest.mark.parametrize("all_layers", [False, True], ids=["last-layer", "all-layers"])
def test_speech_embeddings_do_not_depend_on_the_chunk_size(build, speech, all_layers):
    model, processor = build(speech, None)
    inputs = processor(conversations=chunk_conversations())
    present = inputs["utterance_mask"].bool()
    values = inputs.get("input_values", inputs.get("input_features"))[present]
    attention = inputs["speech_attention_mask"][present]
    sizes = record_batch_sizes(model.speech_backbone)
    with torch.no_grad():
        whole = encode_speech(model.speech_backbone, values, attention, "mean", None, all_layers)
        assert len(whole) == 5 and (sizes == [5] if speech != "wav2vec2-group" else sorted(sizes) == [1, 1, 3])
        for chunk_size in (1, 2):
            sizes.clear()
            chunked = encode_speech(model.speech_backbone, values, attention, "mean", chunk_size, all_layers)
            assert max(sizes) <= chunk_size and sum(sizes) == 5
            torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text", ["bert", "llama"])
def test_text_embeddings_do_not_depend_on_the_chunk_size(build, text):
    model, processor = build(None, text)
    inputs = processor(conversations=chunk_conversations())
    present = inputs["utterance_mask"].bool()
    ids, mask = inputs["input_ids"][present], inputs["text_attention_mask"][present]
    sizes = record_batch_sizes(model.text_backbone)
    with torch.no_grad():
        whole = encode_text(model.text_backbone, ids, mask, "last" if text == "llama" else "mean")
        assert sizes == [5]
        for chunk_size in (1, 2):
            sizes.clear()
            chunked = encode_text(model.text_backbone, ids, mask, "last" if text == "llama" else "mean", chunk_size)
            assert sizes == ([1] * 5 if chunk_size == 1 else [2, 2, 1])
            torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("speech,text", [("wav2vec2", "bert"), ("wav2vec2-group", "llama")])
def test_the_model_honours_backbone_chunk_size_with_the_same_outputs(build, speech, text):
    """`MisterEConfig.backbone_chunk_size` reaches both backbones (no call sees more utterances) and changes nothing
    in the model's outputs."""
    outputs = {}
    conversations = chunk_conversations()
    for chunk_size in (None, 1, 2):
        model, processor = build(speech, text, seed=0, backbone_chunk_size=chunk_size)
        speech_sizes, text_sizes = record_batch_sizes(model.speech_backbone), record_batch_sizes(model.text_backbone)
        with torch.no_grad():
            outputs[chunk_size] = model(**processor(conversations=conversations))
        if chunk_size is not None:
            assert max(speech_sizes) <= chunk_size and max(text_sizes) <= chunk_size
        else:
            assert text_sizes == [5] and max(speech_sizes) == (3 if speech == "wav2vec2-group" else 5)
    for chunk_size in (1, 2):
        for name in ("logits", "gate_weights", "expert_logits"):
            torch.testing.assert_close(getattr(outputs[chunk_size], name), getattr(outputs[None], name),
                                       rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- --config_overrides


@pytest.fixture(scope="module")
def parse_overrides():
    spec = importlib.util.spec_from_file_location("run_erc_for_overrides", REPO_ROOT / "examples" / "run_erc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_overrides


def exact(value):
    """A value with its type, so that 0 == 0.0 == False do not compare equal."""
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact(v) for v in value]
    return type(value).__name__, value


@pytest.mark.parametrize("text,expected", [
    ("projection_dim=16", {"projection_dim": 16}),
    ("dropout=0.25", {"dropout": 0.25}),
    ("supcon_weight=0", {"supcon_weight": 0.0}),  # a whole number for a float setting is a float
    ("gate_temperature=2,kl_weight=1e-3", {"gate_temperature": 2.0, "kl_weight": 0.001}),
    ("standardize_embeddings=true,context_bidirectional=false",
     {"standardize_embeddings": True, "context_bidirectional": False}),
    ("backbone_chunk_size=null", {"backbone_chunk_size": None}),
    ("context_kernel_sizes=[1,3]", {"context_kernel_sizes": [1, 3]}),
    ("text_views=[text,emphasis]", {"text_views": ["text", "emphasis"]}),  # bare words
    ("text_views=[ text , emphasis ]", {"text_views": ["text", "emphasis"]}),
    ('text_views=["text","description"]', {"text_views": ["text", "description"]}),
    ("context_kernel_sizes=[1,3],text_views=[text,emphasis],projection_dim=16",  # commas inside [] stay
     {"context_kernel_sizes": [1, 3], "text_views": ["text", "emphasis"], "projection_dim": 16}),
    ("fusion=film-moe,speech_layers=concat", {"fusion": "film-moe", "speech_layers": "concat"}),
    ('fusion="guided-gated"', {"fusion": "guided-gated"}),
    ("speech_pooling=a=b", {"speech_pooling": "a=b"}),  # only the first = separates key and value
    ("  projection_dim = 16 ,  dropout = 0.1  ", {"projection_dim": 16, "dropout": 0.1}),
    ("projection_dim=16,", {"projection_dim": 16}),
    ("", {}),
    ("   ", {}),
    (None, {}),
    ('{"projection_dim": 16, "supcon_weight": 0, "text_views": ["text", "emphasis"]}',
     {"projection_dim": 16, "supcon_weight": 0.0, "text_views": ["text", "emphasis"]}),
], ids=lambda value: None if isinstance(value, dict) else repr(value))
def test_config_overrides_parse_to_typed_settings(parse_overrides, text, expected):
    assert exact(parse_overrides(text)) == exact(expected)


def test_parsed_overrides_build_a_config(parse_overrides):
    config = MisterEConfig(**parse_overrides("supcon_weight=0,gate_temperature=1,context_kernel_sizes=[1,3],"
                                             "text_views=[text,emphasis],standardize_embeddings=true"),
                           text_embed_dim=8)
    assert config.supcon_weight == 0.0 and isinstance(config.supcon_weight, float)
    assert config.gate_temperature == 1.0 and isinstance(config.gate_temperature, float)
    assert config.context_kernel_sizes == [1, 3] and config.text_views == ["text", "emphasis"]
    assert config.standardize_embeddings is True


@pytest.mark.parametrize("text,message", [
    ("projection_dim", r"config_overrides entries are key=value, got 'projection_dim'"),
    ("projection_dim=16,dropout", r"entries are key=value, got 'dropout'"),
    ("context_kernel_sizes=1,3", r"entries are key=value, got '3'"),  # a list needs its brackets
    ("projection_dimm=16", r"'projection_dimm' is not a MisterEConfig setting; did you mean 'projection_dim'"),
    ("zzzzzz=1", r"'zzzzzz' is not a MisterEConfig setting\.$"),
    ("head=regression", r"'head' is set by --head, not by an override"),
    ("num_labels=3", r"'num_labels' is set by the data's labels"),
    ("freeze_text_backbone=true", r"'freeze_text_backbone' is set by --freeze_backbones"),
    ('{"projection_dim": 16', r"config_overrides is not a valid JSON object"),
    ('{"projection_dimm": 16}', r"'projection_dimm' is not a MisterEConfig setting"),
])
def test_bad_config_overrides_are_refused(parse_overrides, text, message):
    with pytest.raises(MisterEError, match=message):
        parse_overrides(text)


# ---------------------------------------------------------------- no speaker identity


def test_no_speaker_identity_enters_the_model(build, tmp_path):
    """Replaces `test_modeling.py::test_no_speaker_identity_is_accepted` (which only checked that Python refuses an
    unknown keyword): nothing of the model takes a speaker, and two conversations that differ only in their
    speakers give identical inputs and outputs through the processor, the collator, the model and the pipeline."""
    assert not [name for name in inspect.signature(MisterEModel.forward).parameters if "speaker" in name]
    assert not [f.name for f in dataclasses.fields(MisterEConfig) if "speaker" in f.name]

    model, processor = build("wav2vec2", "bert")
    plain = make_conversations([3, 2], seed=10)
    casts = ([["Monica", "Ross", "Monica"], ["Joey", "Joey"]], [["Phoebe"] * 3, ["Rachel", "Chandler"]])
    variants = []
    for cast in casts:
        conversations = copy.deepcopy(plain)
        for conversation, speakers in zip(conversations, cast):
            for utterance, speaker in zip(conversation, speakers):
                utterance["speaker"] = speaker
        variants.append(conversations)

    reference = processor(conversations=plain)
    for conversations in variants:
        inputs = processor(conversations=conversations)
        assert inputs.keys() == reference.keys() and not [key for key in inputs if "speaker" in key]
        assert all(torch.equal(inputs[key], reference[key]) for key in inputs)

    # dataset rows (as the loaders write them, speaker as a per-turn metadata column) through the collator
    paths = []
    for c, conversation in enumerate(plain):
        paths.append([])
        for t, utterance in enumerate(conversation):
            paths[-1].append(str(tmp_path / f"{c}-{t}.wav"))
            soundfile.write(paths[-1][-1], utterance["audio"], 16000, subtype="FLOAT")
    batches = []
    for cast in casts:
        rows = [{"conversation_id": f"c{c}", "turns": list(range(len(conversation))),
                 "texts": [u["text"] for u in conversation], "audio": paths[c], "labels": [0] * len(conversation),
                 "speaker": cast[c]} for c, conversation in enumerate(plain)]
        batches.append(DataCollatorForConversations(processor)(rows))
    assert batches[0].keys() == batches[1].keys() and not [key for key in batches[0] if "speaker" in key]
    assert all(torch.equal(batches[0][key], batches[1][key]) for key in batches[0])
    with torch.no_grad():
        first, second = (model(**batch) for batch in batches)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.gate_weights, second.gate_weights)

    recognizer = pipeline(TASK, model=model, processor=processor)
    assert recognizer(variants[0]) == recognizer(variants[1]) == recognizer(plain)
