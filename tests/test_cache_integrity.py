"""The embedding cache never uses what it cannot trust: corrupted, truncated or non-finite shards are named, moved
aside and re-extracted; non-finite embeddings and bad utterances are refused at extraction, naming the file (or
text), split, conversation and turn."""

import json
import logging
import shutil

import numpy as np
import pytest
import soundfile
import torch
from datasets import Dataset, Features, List, Value

from mister_e_hf import MisterEModel, MisterEProcessor
from mister_e_hf.cache import EmbeddingCache, add_cached_embeddings, file_digest, fit_embedding_statistics
from mister_e_hf.data import load_corpus
from mister_e_hf.errors import CacheError, ConversationInputError


@pytest.fixture(scope="module")
def setup(tiny_backbones, corpus):
    """(model, processor, the corpus' test split) with frozen tiny backbones."""
    speech, text = tiny_backbones
    model = MisterEModel.from_backbones(str(speech), str(text), freeze_speech_backbone=True, freeze_text_backbone=True,
                                        num_labels=3, projection_dim=16, cross_attention_heads=2)
    processor = MisterEProcessor.from_backbones(str(speech), str(text))
    datasets, _ = load_corpus("manifest", data_dir=corpus)
    return model, processor, datasets["test"]


@pytest.fixture(scope="module")
def clean(setup, tmp_path_factory):
    """(cache folder, columns) of one run on an intact cache: the reference every recovery must reproduce."""
    model, processor, test = setup
    folder = tmp_path_factory.mktemp("clean-cache")
    cached, stats = add_cached_embeddings(model, processor, {"test": test}, folder, batch_size=4)
    assert stats.utterances_embedded > 0
    return folder, cached["test"]


def _shard(cache, modality: str):
    (entry,) = cache.glob(f"{modality}-*")
    (shard,) = entry.glob("shard-*")
    return entry, shard


def _same_as_clean(cached, clean_columns):
    for column in ("speech_embeds", "text_embeds", "speech_present", "text_present"):
        for got, want in zip(cached[column], clean_columns[column], strict=True):  # one conversation at a time
            np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=column)


def _with_turn(dataset, conversation: int, turn: int, column: str, value):
    """`dataset` with one utterance's `column` replaced by `value`."""
    rows = dataset.to_list()
    rows[conversation][column][turn] = value
    return Dataset.from_list(rows, features=dataset.features)


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "truncated-digest-rewritten"])
def test_a_damaged_shard_is_named_set_aside_and_re_extracted_exactly(setup, clean, tmp_path, caplog, damage):
    model, processor, test = setup
    folder, reference = clean
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache)
    entry, shard = _shard(cache, "speech")
    (arrow,) = shard.glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    if damage == "flipped-byte":  # one bit of one embedding value: the file still loads, with another number
        data[len(data) * 2 // 3] ^= 0x10
    else:
        data = data[: len(data) // 2]
    arrow.write_bytes(bytes(data))
    if damage == "truncated-digest-rewritten":  # digest matches: the loader's own error must be caught too
        record = json.loads((shard / "integrity.json").read_text())
        record["files"][arrow.name] = {"bytes": len(data), "blake2b": file_digest(arrow)}
        (shard / "integrity.json").write_text(json.dumps(record))

    with caplog.at_level(logging.WARNING, logger="mister_e_hf.cache"):
        cached, stats = add_cached_embeddings(model, processor, {"test": test}, cache, batch_size=4)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(shard) in message and "cannot be trusted" in message for message in warnings), warnings
    assert not shard.exists() and (entry / f"corrupt-{shard.name}" / arrow.name).exists()  # kept, never deleted
    assert stats.shards_set_aside == 1
    assert stats.utterances_embedded == sum(len(a) for a in test["audio"])  # the speech shard's utterances only
    _same_as_clean(cached["test"], reference)

    again, stats = add_cached_embeddings(model, processor, {"test": test}, cache, batch_size=4)  # healed
    assert stats.utterances_embedded == 0 and stats.shards_set_aside == 0
    _same_as_clean(again["test"], reference)


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("with_digest", [False, True])
def test_a_shard_holding_non_finite_embeddings_is_never_used(setup, clean, tmp_path, caplog, value, with_digest):
    model, processor, test = setup
    folder, reference = clean
    cache = tmp_path / "cache"
    shutil.copytree(folder, cache)
    entry, good = _shard(cache, "text")
    keys = Dataset.load_from_disk(str(good))["key"]
    dim = model.config.embedding_shape("text")[-1]
    embeddings = np.ones((len(keys), dim), dtype=np.float32)
    embeddings[len(keys) // 2, 3] = value
    poisoned = entry / "shard-9999999999999999999-0"  # sorts after the good shard: it would win the key lookup
    Dataset.from_dict({"key": list(keys), "embedding": list(embeddings)},
                      features=Features({"key": Value("string"), "embedding": List(Value("float32"))})
                      ).save_to_disk(str(poisoned))
    if with_digest:  # even a shard whose digest matches its (non-finite) data is refused
        files = {p.name: {"bytes": p.stat().st_size, "blake2b": file_digest(p)} for p in poisoned.iterdir()}
        (poisoned / "integrity.json").write_text(json.dumps({"format": 3, "rows": len(keys), "files": files}))

    with caplog.at_level(logging.WARNING, logger="mister_e_hf.cache"):
        cached, stats = add_cached_embeddings(model, processor, {"test": test}, cache, batch_size=4)
    assert any(str(poisoned) in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    if with_digest:
        assert any("non-finite" in r.getMessage() for r in caplog.records)
    assert not poisoned.exists() and (entry / f"corrupt-{poisoned.name}").exists()
    assert stats.utterances_embedded == 0  # the good shard still holds every utterance
    _same_as_clean(cached["test"], reference)


@pytest.mark.parametrize("damage", ["no-record", "garbage-record", "missing-file", "unexpected-file", "rows",
                                    "shape"])
def test_a_shard_that_does_not_match_its_record_is_set_aside(tmp_path, caplog, damage):
    cache = EmbeddingCache(tmp_path)
    entry = cache.entry({"modality": "text", "format": "test"})
    rng = np.random.default_rng(0)
    cache.append(entry, ["a", "b"], list(rng.standard_normal((2, 4), dtype=np.float32)))
    (kept,) = entry.glob("shard-*")
    cache.append(entry, ["c"], list(rng.standard_normal((1, 4), dtype=np.float32)))
    (damaged,) = set(entry.glob("shard-*")) - {kept}
    record = json.loads((damaged / "integrity.json").read_text())
    if damage == "no-record":
        (damaged / "integrity.json").unlink()
    elif damage == "garbage-record":
        (damaged / "integrity.json").write_text('{"files": ')
    elif damage == "missing-file":
        (damaged / "dataset_info.json").unlink()
    elif damage == "unexpected-file":
        (damaged / "cache-1234.arrow").write_bytes(b"\0" * 64)
    elif damage == "rows":
        (damaged / "integrity.json").write_text(json.dumps({**record, "rows": 5}))

    with caplog.at_level(logging.WARNING, logger="mister_e_hf.cache"):
        index, table = EmbeddingCache(tmp_path).read(entry, (3,) if damage == "shape" else (4,))
    if damage == "shape":  # no shard has this entry's shape
        assert index == {} and not list(entry.glob("shard-*"))
        return
    assert sorted(index) == ["a", "b"] and len(table) == 2
    assert not damaged.exists() and (entry / f"corrupt-{damaged.name}").is_dir()
    assert any(str(damaged) in r.getMessage() for r in caplog.records)


def test_non_finite_embeddings_at_extraction_are_refused_naming_the_utterance(setup, tmp_path, monkeypatch):
    model, processor, test = setup
    test = _with_turn(test, 1, 1, "texts", "why not stop")
    marker = processor.tokenizer.convert_tokens_to_ids("why")
    original = model.embed_utterances

    def poisoned(modality, mask, **inputs):  # the backbone "overflows" on the one utterance holding "why"
        embeds = original(modality, mask, **inputs)
        if modality == "text":
            rows = (inputs["input_ids"] == marker).any(-1)
            embeds[rows] = float("nan")
        return embeds

    monkeypatch.setattr(model, "embed_utterances", poisoned)
    with pytest.raises(CacheError) as raised:
        add_cached_embeddings(model, processor, {"test": test}, tmp_path, batch_size=4)
    message = str(raised.value)
    conversation, turn = test[1]["conversation_id"], test[1]["turns"][1]
    for part in ("'why not stop'", "split 'test'", f"conversation {conversation!r}", f"turn {turn}", "non-finite"):
        assert part in message, (part, message)
    assert list(tmp_path.glob("text-*")) and not list(tmp_path.glob("text-*/*shard-*"))  # nothing written


def test_any_input_error_of_the_backbone_is_named_by_utterance_not_batch_position(setup, tmp_path, monkeypatch):
    model, processor, test = setup
    test = _with_turn(test, 2, 1, "texts", "why not stop")
    marker = processor.tokenizer.convert_tokens_to_ids("why")
    original = model.embed_utterances

    def refusing(modality, mask, **inputs):  # e.g. an input the backbone cannot take, at its batch position
        if modality == "text" and (rows := (inputs["input_ids"] == marker).any(-1).nonzero()).numel():
            raise ConversationInputError("too long for the backbone", int(rows[0, 0]), 0)
        return original(modality, mask, **inputs)

    monkeypatch.setattr(model, "embed_utterances", refusing)
    with pytest.raises(ConversationInputError) as raised:
        add_cached_embeddings(model, processor, {"test": test}, tmp_path, batch_size=2)
    message = str(raised.value)
    conversation, turn = test[2]["conversation_id"], test[2]["turns"][1]
    for part in ("'why not stop'", "split 'test'", f"conversation {conversation!r}", f"turn {turn}",
                 "too long for the backbone"):
        assert part in message, (part, message)


def test_a_wav_holding_a_nan_sample_is_named_by_file_conversation_and_turn(setup, tmp_path):
    model, processor, test = setup
    source = test[2]["audio"][0]
    audio, rate = soundfile.read(source, dtype="float32")
    audio[len(audio) // 2] = np.nan
    broken = tmp_path / "nan-sample.wav"
    soundfile.write(broken, audio, rate, subtype="FLOAT")
    test = _with_turn(test, 2, 0, "audio", str(broken))
    with pytest.raises(ConversationInputError) as raised:
        add_cached_embeddings(model, processor, {"test": test}, tmp_path / "cache", batch_size=4)
    message = str(raised.value)
    for part in (str(broken), "split 'test'", f"conversation {test[2]['conversation_id']!r}",
                 f"turn {test[2]['turns'][0]}", "NaN"):
        assert part in message, (part, message)
    assert not list((tmp_path / "cache").glob("speech-*/*shard-*"))


def test_an_unreadable_audio_file_is_named_by_file_conversation_and_turn(setup, tmp_path):
    model, processor, test = setup
    garbage = tmp_path / "not-audio.wav"
    garbage.write_bytes(b"RIFF but not really a wave file" * 10)
    test = _with_turn(test, 0, 1, "audio", str(garbage))
    with pytest.raises(ConversationInputError) as raised:
        add_cached_embeddings(model, processor, {"test": test}, tmp_path / "cache", batch_size=4)
    message = str(raised.value)
    for part in (str(garbage), f"conversation {test[0]['conversation_id']!r}", f"turn {test[0]['turns'][1]}"):
        assert part in message, (part, message)


def test_blank_text_is_absent_in_the_cache(setup, tmp_path):
    model, processor, test = setup
    test = _with_turn(test, 0, 0, "texts", "  \t ")
    cached, _ = add_cached_embeddings(model, processor, {"test": test}, tmp_path, batch_size=4)
    assert cached["test"][0]["text_present"][0] == 0
    assert not np.any(cached["test"][0]["text_embeds"][0])


def test_fitting_statistics_on_non_finite_embeddings_is_refused(build):
    model, _ = build(speech=None, standardize_embeddings=True)
    dim = model.config.embedding_shape("text")[-1]
    embeds = [[np.ones(dim, np.float32), np.zeros(dim, np.float32)], [np.full(dim, 2.0, np.float32)] * 3]
    embeds[1][2] = embeds[1][2].copy()
    embeds[1][2][0] = np.inf
    dataset = Dataset.from_dict({"conversation_id": ["a", "b"], "turns": [[0, 1], [4, 5, 7]],
                                 "text_embeds": embeds, "text_present": [[1, 1], [1, 1, 1]], "num_turns": [2, 3]})
    with pytest.raises(CacheError, match=r"conversation 'b', turn 7"):
        fit_embedding_statistics(model, dataset)
    assert not model.embedding_statistics_fitted
    embeds[1][2][0] = 3.0  # finite: fits
    fit_embedding_statistics(model, dataset.remove_columns("text_embeds").add_column("text_embeds", embeds))
    assert model.embedding_statistics_fitted and torch.isfinite(model.standardizers["text"].mean).all()


def test_skip_invalid_leaves_out_inputs_refused_at_extraction_and_reports_them(setup, clean, tmp_path):
    from mister_e_hf.data import DataReport

    model, processor, test = setup
    _, reference = clean
    source = test[2]["audio"][0]
    audio, rate = soundfile.read(source, dtype="float32")
    audio[len(audio) // 2] = np.nan
    broken = tmp_path / "nan-sample.wav"
    soundfile.write(broken, audio, rate, subtype="FLOAT")
    tiny = tmp_path / "tiny.wav"
    soundfile.write(tiny, np.zeros(5, np.float32), 16000)
    damaged = _with_turn(_with_turn(test, 2, 0, "audio", str(broken)), 0, 1, "audio", str(tiny))
    report = DataReport()
    cached, _ = add_cached_embeddings(model, processor, {"test": damaged}, tmp_path / "cache", batch_size=4,
                                      skip_invalid=True, report=report)
    rows = cached["test"]
    assert rows[2]["speech_present"][0] == 0 and rows[0]["speech_present"][1] == 0  # kept, without their audio
    assert rows[2]["text_present"][0] == 1 and rows[0]["text_present"][1] == 1
    assert report.skipped["test"]["speech refused at extraction (the utterance is kept without it)"] == 2
    examples = " ".join(report.examples["speech refused at extraction (the utterance is kept without it)"])
    assert "nan-sample.wav" in examples and "tiny.wav" in examples and "receptive field" in examples
    for i, row in enumerate(rows):  # every other utterance is embedded as in a clean run (other batches: fp noise)
        for t, present in enumerate(row["speech_present"]):
            if present:
                np.testing.assert_allclose(row["speech_embeds"][t], reference[i]["speech_embeds"][t], atol=1e-5)

    speech_only = MisterEModel.from_backbones(str(setup[0].config.speech_backbone_name_or_path), None,
                                              freeze_speech_backbone=True, num_labels=3, projection_dim=16,
                                              cross_attention_heads=2)
    report = DataReport()
    cached, _ = add_cached_embeddings(speech_only, MisterEProcessor(processor.feature_extractor,
                                                                    min_audio_samples=processor.min_audio_samples),
                                      {"test": damaged}, tmp_path / "cache", batch_size=4, skip_invalid=True,
                                      report=report)
    assert [row["num_turns"] for row in cached["test"]] == [n - (i in (0, 2)) for i, n in enumerate(test["num_turns"])]
    assert report.skipped["test"]["no usable modality left after extraction"] == 2
    assert cached["test"][0]["turns"] == [t for k, t in enumerate(test[0]["turns"]) if k != 1]


def test_a_text_view_missing_from_the_data_is_named(tiny_backbones, corpus, tmp_path):
    speech, text = tiny_backbones
    model = MisterEModel.from_backbones(None, str(text), freeze_text_backbone=True, num_labels=3, projection_dim=16,
                                        cross_attention_heads=2, text_views=["text", "emphasis"])
    processor = MisterEProcessor.from_backbones(None, str(text), text_views=["text", "emphasis"])
    datasets, _ = load_corpus("manifest", data_dir=corpus)
    with pytest.raises(CacheError, match=r"text views \['text', 'emphasis'\], but the test split has no column "
                                         r"\['emphasis'\]"):
        add_cached_embeddings(model, processor, {"test": datasets["test"]}, tmp_path)
