"""Training end to end: collator, embedding cache, MisterETrainer, examples/run_erc.py (results, resume after a kill)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from helpers import REPO_ROOT, common_args, run_erc
from transformers import AutoModel, TrainingArguments

from mister_e_hf import MisterEModel, MisterEProcessor
from mister_e_hf.cache import add_cached_embeddings, extraction_settings, fit_embedding_statistics
from mister_e_hf.data import DataCollatorForConversations, load_corpus
from mister_e_hf.trainer import MisterETrainer


def test_collator_pads_labels_and_embeddings(tokenizer):
    rows = [
        {"texts": ["a", "b", "c"], "audio": [None] * 3, "labels": [0, -1, 2], "num_turns": 3,
         "text_embeds": [[1.0, 2.0]] * 3, "text_present": [1, 1, 1]},
        {"texts": ["d"], "audio": [None], "labels": [1], "num_turns": 1,
         "text_embeds": [[3.0, 4.0]], "text_present": [1]},
    ]
    batch = DataCollatorForConversations()(rows)
    assert batch["labels"].tolist() == [[0, -100, 2], [1, -100, -100]]
    assert batch["text_embeds"].shape == (2, 3, 2) and batch["text_embeds"][1, 1:].abs().sum() == 0
    assert batch["text_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["utterance_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_cache_is_reused_and_keyed_on_weights_and_data(tiny_backbones, corpus, tmp_path):
    speech, text = tiny_backbones
    model = MisterEModel.from_backbones(str(speech), str(text), freeze_speech_backbone=True,
                                        freeze_text_backbone=True, num_labels=3, projection_dim=16,
                                        cross_attention_heads=2)
    processor = MisterEProcessor.from_backbones(str(speech), str(text))
    datasets, _ = load_corpus("manifest", data_dir=corpus)
    first, stats = add_cached_embeddings(model, processor, datasets, tmp_path, batch_size=4)
    utterances = sum(sum(d["num_turns"]) for d in datasets.values())
    unique_texts = len({t for d in datasets.values() for r in d["texts"] for t in r})
    assert stats.utterances_embedded == utterances + unique_texts  # each distinct text is embedded once
    assert stats.cached_utterances == utterances - unique_texts
    again, stats = add_cached_embeddings(model, processor, datasets, tmp_path, batch_size=4)
    assert stats.utterances_embedded == 0 and stats.cached_utterances == 2 * utterances
    assert again["train"]["text_embeds"] == first["train"]["text_embeds"]
    # another split of the same utterances (e.g. another fold) reuses them too
    _, stats = add_cached_embeddings(model, processor, {"all": datasets["train"].select(range(4))}, tmp_path)
    assert stats.utterances_embedded == 0
    # the same weights from another folder (a copy, a symlink, a Hub id) hit the same entry
    moved = tmp_path / "moved-speech-backbone"
    shutil.copytree(speech, moved)
    elsewhere = MisterEModel.from_backbones(str(moved), str(text), freeze_speech_backbone=True,
                                            freeze_text_backbone=True, num_labels=3, projection_dim=16,
                                            cross_attention_heads=2)
    _, stats = add_cached_embeddings(elsewhere, MisterEProcessor.from_backbones(str(moved), str(text)),
                                     {"test": datasets["test"]}, tmp_path)
    assert stats.utterances_embedded == 0
    # the audio is keyed on its bytes: a copy of the corpus elsewhere (new paths and modification times) hits the
    # cache; a file whose bytes changed, and only that one, is extracted again
    copied = tmp_path / "copied-corpus"
    shutil.copytree(corpus, copied)
    for wav in (copied / "wav").iterdir():
        os.utime(wav, ns=(1, 1))
    copy, _ = load_corpus("manifest", data_dir=copied)
    _, stats = add_cached_embeddings(model, processor, copy, tmp_path)
    assert stats.utterances_embedded == 0 and stats.cached_utterances == 2 * utterances
    changed = copied / copy["test"][0]["audio"][0]
    audio, rate = soundfile.read(changed, dtype="float32")
    soundfile.write(changed, audio[::-1].copy(), rate)
    _, stats = add_cached_embeddings(model, processor, {"test": copy["test"]}, tmp_path)
    assert stats.utterances_embedded == 1

    # the cached embeddings are exactly what the model computes from raw inputs
    row = first["test"][0]
    inputs = processor(conversations=[[{"text": t, "audio": a} for t, a in zip(row["texts"], row["audio"])]])
    with torch.no_grad():
        raw = model.embed_utterances("speech", inputs["speech_mask"], input_values=inputs["input_values"],
                                     speech_attention_mask=inputs["speech_attention_mask"])
    np.testing.assert_allclose(np.array(row["speech_embeds"]), raw[0].numpy(), atol=1e-5)

    settings = extraction_settings(model, processor, "text")
    with torch.no_grad():
        model.text_backbone.embeddings.word_embeddings.weight[5] += 1.0
    assert extraction_settings(model, processor, "text") != settings  # other weights: another cache entry
    _, stats = add_cached_embeddings(model, processor, {"test": datasets["test"]}, tmp_path)
    assert stats.utterances_embedded == len({t for r in datasets["test"]["texts"] for t in r})  # text only


def test_run_erc_end_to_end_writes_results_model_and_card(trained_run, tiny_backbones, corpus, tmp_path):
    output, cache = trained_run
    for name in ("train_results.json", "eval_results.json", "test_results.json", "all_results.json",
                 "confusion_matrix_test.png", "gate_weights_test.png", "model.safetensors", "config.json",
                 "processor_config.json", "modeling_mister_e.py", "README.md", "data_report.json"):
        assert (output / name).exists(), name
    test = json.loads((output / "test_results.json").read_text())
    for key in ("test_weighted_f1", "test_accuracy", "test_macro_f1", "test_f1_calm", "test_gate_cross-modal"):
        assert key in test, key
    assert 0.0 <= test["test_weighted_f1"] <= 1.0
    train = json.loads((output / "train_results.json").read_text())
    assert train["utterances_embedded"] > 0 and train["extraction_seconds"] > 0
    logs = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert any("supcon_loss" in entry and "kl_loss" in entry and "mixture_loss" in entry for entry in logs)
    assert any("eval_supcon_loss" in entry for entry in logs)

    # the saved model holds its backbones: it runs on raw audio and text
    model, processor = AutoModel.from_pretrained(output).eval(), MisterEProcessor.from_pretrained(output)
    row = json.loads((corpus / "test.jsonl").read_text().splitlines()[0])
    conversation = [{"text": row["text"], "audio": str(corpus / row["audio"])}]
    with torch.no_grad():
        assert torch.isfinite(model(**processor(conversations=[conversation])).logits).all()

    # a second run with the same backbones and data extracts nothing
    again = run_erc(*common_args(tiny_backbones, corpus, tmp_path / "run2", cache), "--num_train_epochs", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    train = json.loads((tmp_path / "run2" / "train_results.json").read_text())
    assert train["cached_utterances"] > 0 and train["utterances_embedded"] == 0


def test_run_erc_resumes_after_being_killed(tiny_backbones, corpus, tmp_path):
    """Kill a run right after a checkpoint lands; the resumed run finishes with the same weights and metrics as a run
    that was never interrupted."""
    args = [*common_args(tiny_backbones, corpus, tmp_path / "killed", tmp_path / "cache"),
            "--num_train_epochs", "60", "--save_strategy", "steps", "--save_steps", "15", "--eval_strategy", "steps",
            "--eval_steps", "15", "--logging_strategy", "steps", "--logging_steps", "5", "--save_total_limit", "100"]
    command = [sys.executable, str(REPO_ROOT / "examples" / "run_erc.py"), *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "killed" / "checkpoint-30"
    deadline = time.time() + 300
    while not (checkpoint / "trainer_state.json").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (checkpoint / "trainer_state.json").exists(), process.stderr.read()[-3000:]
    assert not (tmp_path / "killed" / "model.safetensors").exists(), "the run finished before it could be killed"

    resumed = run_erc(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout
    uninterrupted = run_erc(*[str(tmp_path / "straight") if str(a) == str(tmp_path / "killed") else a for a in args])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    state = json.loads((tmp_path / "killed" / "trainer_state.json").read_text())
    straight = json.loads((tmp_path / "straight" / "trainer_state.json").read_text())
    assert state["global_step"] == straight["global_step"]
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert losses == pytest.approx([e["loss"] for e in straight["log_history"] if "loss" in e], rel=1e-4)
    test, reference = (json.loads((tmp_path / d / "test_results.json").read_text()) for d in ("killed", "straight"))
    assert test["test_weighted_f1"] == pytest.approx(reference["test_weighted_f1"])
    a, b = (AutoModel.from_pretrained(tmp_path / d).state_dict() for d in ("killed", "straight"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_backbone_finetuning_changes_the_backbone_and_leaves_a_plain_model(tiny_backbones, corpus, tmp_path, method):
    from mister_e_hf.finetuning import finetune_backbone

    speech, text = tiny_backbones
    model = MisterEModel.from_backbones(str(speech), str(text), freeze_speech_backbone=True,
                                        freeze_text_backbone=True, num_labels=3, projection_dim=16,
                                        cross_attention_heads=2)
    processor = MisterEProcessor.from_backbones(str(speech), str(text))
    datasets, _ = load_corpus("manifest", data_dir=corpus)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune_backbone(model, processor, "text", datasets, method=method, epochs=1, learning_rate=1e-2,
                      output_dir=tmp_path / "ft")
    after = model.state_dict()
    assert after.keys() == before.keys()  # adapters merged away: the same plain backbone
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("text_backbone.") for k in changed)
    assert not any(p.requires_grad for p in model.text_backbone.parameters())  # frozen again
    assert not any(p.requires_grad for p in model.speech_backbone.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters()
               if not n.startswith(("speech_backbone.", "text_backbone.")))
    model.save_pretrained(tmp_path / "saved")
    reloaded = MisterEModel.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.equal(reloaded[k], after[k]) for k in after)


def test_standardized_embeddings_are_fitted_on_the_training_cache_and_saved(tiny_backbones, corpus, tmp_path):
    speech, text = tiny_backbones
    model = MisterEModel.from_backbones(str(speech), str(text), freeze_speech_backbone=True,
                                        freeze_text_backbone=True, num_labels=3, projection_dim=16,
                                        cross_attention_heads=2, speech_layers="weighted",
                                        standardize_embeddings=True)
    processor = MisterEProcessor.from_backbones(str(speech), str(text))
    datasets, _ = load_corpus("manifest", data_dir=corpus)
    datasets, _ = add_cached_embeddings(model, processor, datasets, tmp_path / "cache", batch_size=4)
    collator = DataCollatorForConversations()
    batch = collator([datasets["test"][i] for i in range(2)])
    with pytest.raises(ValueError, match="speech statistics were never fitted"):
        model(**batch)
    with pytest.raises(ValueError, match="no `speech_embeds` and `speech_present` columns"):
        fit_embedding_statistics(model, datasets["train"].remove_columns(["speech_embeds"]))

    # MisterETrainer fits the statistics on the training set's embeddings before it trains
    args = TrainingArguments(str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    MisterETrainer(model=model, args=args, train_dataset=datasets["train"], data_collator=collator).train()
    assert model.embedding_statistics_fitted
    for modality in ("speech", "text"):  # reference: every turn of every training conversation, numpy
        turns = np.array([t for conversation in datasets["train"][f"{modality}_embeds"] for t in conversation])
        standardizer = model.standardizers[modality]
        assert int(standardizer.num_fitted) == len(turns) == sum(datasets["train"]["num_turns"])
        np.testing.assert_allclose(standardizer.mean.numpy(), turns.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(standardizer.std.numpy(), turns.std(0), rtol=1e-4, atol=1e-5)
        standardized = standardizer(torch.from_numpy(turns)).numpy()
        np.testing.assert_allclose(standardized.mean(0), 0.0, atol=1e-4)
    # per layer and feature where the layers are combined, per feature otherwise
    assert model.standardizers["speech"].mean.shape == (3, 32) and model.standardizers["text"].mean.shape == (32,)

    # raw audio + text and cached embeddings give the same outputs; the statistics travel with the checkpoint
    model.eval()
    row = datasets["test"][0]
    conversation = [{"text": t, "audio": a} for t, a in zip(row["texts"], row["audio"])]
    with torch.no_grad():
        from_cache = model(**collator([row])).logits
        from_raw = model(**processor(conversations=[conversation])).logits
    torch.testing.assert_close(from_raw, from_cache, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModel.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(loaded.standardizers["speech"].std, model.standardizers["speech"].std)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**processor(conversations=[conversation])).logits, from_raw)


def test_run_erc_gives_frozen_backbones_the_defaults_chosen_without_test_data(trained_run, tiny_backbones):
    """benchmarks/results/defaults.md chose them on MELD dev and EmoDB's training speakers."""
    import importlib.util

    from mister_e_hf import FROZEN_BACKBONE_DEFAULTS

    config = json.loads((trained_run[0] / "config.json").read_text())
    assert (config["speech_layers"], config["text_layers"], config["standardize_embeddings"]) == (
        "concat", "concat", True) and FROZEN_BACKBONE_DEFAULTS["standardize_embeddings"] is True
    assert config["dropout"] == 0.4 and config["supcon_weight"] == 0.0 and config["projection_dim"] == 16

    spec = importlib.util.spec_from_file_location("run_erc_defaults", REPO_ROOT / "examples" / "run_erc.py")
    run_erc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_erc)
    speech, text = map(str, tiny_backbones)
    frozen, _ = run_erc.build_model(run_erc.ModelArguments(
        text_model_name_or_path=text, freeze_backbones=True, config_overrides="text_layers=weighted"), ["a", "b"])
    assert (frozen.config.text_layers, frozen.config.standardize_embeddings) == ("weighted", True)  # overrides win
    assert frozen.config.speech_layers == "last"  # no speech backbone: nothing to combine
    trainable, _ = run_erc.build_model(run_erc.ModelArguments(speech_model_name_or_path=speech,
                                                             text_model_name_or_path=text), ["a", "b"])
    assert (trainable.config.speech_layers, trainable.config.standardize_embeddings) == ("last", False)
