"""examples/run_erc.py and MisterETrainer never ignore an argument silently: arguments that cannot apply, nonsense
numbers, mistyped metrics, argument files and checkpoints of other settings are named errors before any compute;
--do_train / --do_eval / --do_predict do exactly what they say. Most run in-process (`run_erc.run()`)."""

import hashlib
import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import REPO_ROOT, TINY_HEAD
from transformers import TrainingArguments

from mister_e_hf import MisterEConfig, MisterEModel
from mister_e_hf.data import DataCollatorForConversations
from mister_e_hf.errors import MisterEError, TrainingError
from mister_e_hf.finetuning import finetune_backbone
from mister_e_hf.trainer import MisterETrainer, build_compute_metrics, check_labels


LABELS = ["calm", "happy", "angry"]


@pytest.fixture(scope="module")
def run_erc():
    spec = importlib.util.spec_from_file_location("run_erc", REPO_ROOT / "examples" / "run_erc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses pickle by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def erc(run_erc, monkeypatch, capsys):
    """`erc(*argv)`: run_erc's exit status and stderr, run in-process on that command line."""

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["run_erc.py", *map(str, argv)])
        status = run_erc.run()
        return status, capsys.readouterr().err

    return run


@pytest.fixture
def refused(erc):
    """`refused(*argv)`: the one stderr line of a refused run_erc run."""

    def run(*argv) -> str:
        status, err = erc(*argv)
        lines = err.strip().splitlines()
        assert status == 1 and len(lines) == 1 and lines[0].startswith("run_erc.py: error: "), (status, lines[-5:])
        return lines[0]

    return run


def backbone_args(tiny_backbones, corpus, output_dir):
    speech, text = tiny_backbones
    return ["--dataset", "manifest", "--data_dir", corpus, "--speech_model_name_or_path", speech,
            "--text_model_name_or_path", text, "--freeze_backbones", "--output_dir", output_dir, "--config_overrides",
            "projection_dim=16,context_hidden_size=8,expert_hidden_size=16,cross_attention_heads=2"]


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------- arguments that cannot apply
def test_a_saved_model_refuses_the_arguments_that_would_build_another(refused, tmp_path, corpus):
    saved = tmp_path / "saved"
    MisterEConfig(text_embed_dim=8, id2label=dict(enumerate(LABELS)), **{**TINY_HEAD, "num_labels": 3}) \
        .save_pretrained(saved)
    line = refused("--dataset", "manifest", "--data_dir", corpus, "--model_name_or_path", saved,
                   "--config_overrides", "dropout=0.3", "--text_model_name_or_path", "any/text", "--head",
                   "regression", "--label_columns", "valence", "--backbone_finetuning", "full",
                   "--output_dir", tmp_path / "run")
    assert ("--config_overrides, --text_model_name_or_path, --head regression (it has a classification head), "
            "--backbone_finetuning full cannot apply with --model_name_or_path: the saved model") in line
    assert "is used as saved" in line
    assert not (tmp_path / "run").exists()  # refused before anything was made
    line = refused("--dataset", "manifest", "--data_dir", corpus, "--model_name_or_path", saved,
                   "--do_eval", "--output_dir", saved)
    assert "--output_dir is the folder of --model_name_or_path" in line


@pytest.mark.parametrize("arguments,message", [
    (["--extraction_batch_size", "0"], "--extraction_batch_size is 0 (it must be >= 1)"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size is 0 (it must be >= 1)"),
    (["--max_train_samples", "-1"], "--max_train_samples is -1 (it must be >= 1"),
    (["--max_eval_samples", "0"], "--max_eval_samples is 0 (it must be >= 1"),
    (["--max_test_samples", "0"], "--max_test_samples is 0 (it must be >= 1"),
    (["--num_train_epochs", "0"], "num_train_epochs is 0.0 (it must be > 0 and finite): 0 epochs train nothing"),
    (["--learning_rate", "nan"], "learning_rate is nan (it must be > 0 and finite)"),
    (["--backbone_finetuning", "lora", "--finetuning_epochs", "0"], "epochs is 0.0 (it must be > 0"),
    (["--backbone_finetuning", "lora", "--finetuning_learning_rate", "nan"], "the learning rate is nan"),
    (["--backbone_finetuning", "full", "--finetuning_learning_rate", "1e9"], "the learning rate is 1000000000.0"),
    (["--backbone_finetuning", "lora", "--lora_r", "0"], "the LoRA rank is 0"),
    (["--backbone_finetuning", "lora", "--lora_alpha", "0"], "the LoRA scaling (alpha) is 0"),
    (["--lora_r", "4"], "--lora_r do nothing without --backbone_finetuning"),
    (["--head", "regression", "--label_columns", "valence,valence"], "--label_columns 'valence,valence' repeats"),
    (["--head", "regression", "--label_columns", "valence", "--backbone_finetuning", "full"],
     "utterance-level fine-tuning learns class labels; a regression head has none"),
    (["--label_smoothing_factor", "0.5"], "label_smoothing_factor is 0.5, but MiSTER-E computes its own losses"),
    (["--eval_do_concat_batches", "false"], "eval_do_concat_batches=False is not supported"),
    (["--prediction_loss_only", "true"], "prediction_loss_only=True would skip compute_metrics"),
    (["--metric_for_best_model", "mae_valence", "--head", "regression", "--label_columns", "valence"],
     "greater_is_better is True for metric_for_best_model 'mae_valence', which is lower-is-better"),
    (["--do_eval"], "evaluating or predicting without training (--do_train not given) needs --model_name_or_path"),
    (["--do_train", "false", "--do_eval", "false", "--do_predict", "false"], "nothing to do"),
    (["--config_overrides", "head=regression"], "'head' is set by --head, not by an override"),
    (["--push_to_hub", "--hub_model_id", "bad id/with spaces/x"], "'bad id/with spaces/x' is not a valid Hub"),
    (["--seed", "-1"], "--seed is -1 (it must be in [0, 2**32)"),
    (["--early_stopping_patience", "0"], "--early_stopping_patience is 0 (it must be >= 1"),
    (["--neftune_noise_alpha", "5"], "--neftune_noise_alpha is not supported"),
    (["--eval_strategy", "no", "--load_best_model_at_end", "true"],  # TrainingArguments' own check: one line too
     "--load_best_model_at_end requires the save and eval strategy to match"),
])
def test_nonsense_arguments_are_refused_before_anything_is_loaded(refused, tmp_path, tiny_backbones, corpus, arguments,
                                                                  message):
    line = refused(*backbone_args(tiny_backbones, corpus, tmp_path / "run"), *arguments)
    assert message in line, line
    assert not (tmp_path / "run").exists()


def test_standardising_unfrozen_backbones_and_folders_that_are_files_are_refused(refused, tmp_path,
                                                                                 tiny_backbones, corpus):
    speech, text = tiny_backbones
    line = refused("--dataset", "manifest", "--data_dir", corpus, "--text_model_name_or_path", text,
                   "--config_overrides", "standardize_embeddings=true", "--output_dir", tmp_path / "run")
    assert "standardize_embeddings=true standardises cached embeddings" in line and "--freeze_backbones" in line
    (tmp_path / "file").write_text("not a folder")
    line = refused(*backbone_args(tiny_backbones, corpus, tmp_path / "file" / "run"),
                   "--embedding_cache_dir", tmp_path / "file")
    assert f"--output_dir {tmp_path / 'file' / 'run'} is inside {tmp_path / 'file'}, which is a file" in line
    assert f"--embedding_cache_dir {tmp_path / 'file'} is a file, not a folder" in line


def test_unknown_options_are_one_line_and_never_abbreviations(refused, tmp_path, tiny_backbones, corpus):
    line = refused(*backbone_args(tiny_backbones, corpus, tmp_path / "run"), "--no_such_option", "1")
    assert "unrecognized arguments: --no_such_option 1" in line
    line = refused(*backbone_args(tiny_backbones, corpus, tmp_path / "run"), "--num_train_epoch", "1")
    assert "unrecognized arguments" in line  # no abbreviation silently meaning another option


# --------------------------------------------------------------------------------------------- argument files
def test_argument_files_are_checked_like_the_command_line(run_erc, tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("dataset: manifest\noutput_dir: run\nlearning_rate: 1e-3\nmax_train_samples: '5'\n"
                    "freeze_backbones: true\nconfig_overrides:\n  projection_dim: 16\n  text_views: [text, emphasis]\n"
                    "do_eval: true\n")
    model_args, data_args, training_args, given, stages = run_erc.parse_arguments([str(path), "--seed", "7"])
    assert training_args.learning_rate == 1e-3 and isinstance(training_args.learning_rate, float)
    assert data_args.max_train_samples == 5 and model_args.freeze_backbones is True and training_args.seed == 7
    assert run_erc.parse_overrides(model_args.config_overrides) == {"projection_dim": 16,
                                                                    "text_views": ["text", "emphasis"]}
    assert stages == {"do_eval": True} and {"learning_rate", "seed", "config_overrides"} <= given

    for text, message in [
        ("dataset: manifest\nnum_train_epochs: two\n", "argument --num_train_epochs/--num-train-epochs: invalid float "
                                                       "value: 'two' (arguments from"),
        ("dataset: manifest\nfreeze_backbones: yes please\n", "Truthy value expected: got yes please"),
        ("dataset: manifest\nlerning_rate: 0.5\n", "'lerning_rate' is not an argument of run_erc.py; did you mean "
                                                   "'learning_rate'?"),
        ("- 1\n- 2\n", "an argument file holds a mapping of argument names to values, not a list"),
    ]:
        path.write_text(text)
        with pytest.raises(MisterEError, match=None) as caught:
            run_erc.parse_arguments([str(path)])
        assert message in str(caught.value), str(caught.value)
    (tmp_path / "args.json").write_text("[1, 2]")
    with pytest.raises(MisterEError, match="args.json: an argument file holds a mapping"):
        run_erc.parse_arguments([str(tmp_path / "args.json")])


# ----------------------------------------------------------------------------------- do_train / eval / predict
def test_evaluating_and_predicting_a_saved_model_writes_results_only(erc, refused, trained_run, corpus, tmp_path):
    """--do_eval / --do_predict with --model_name_or_path evaluate the saved model, never train or overwrite it; a
    manifest with only a test split predicts; asking to train without a train split is a named error."""
    model_dir, cache = trained_run
    before = digest(model_dir)
    test_only = tmp_path / "only"
    test_only.mkdir()
    lines = [json.loads(line) for line in (corpus / "test.jsonl").read_text().splitlines()]
    keep = [line for line in lines if line["conversation_id"] == "test0"]
    for line in keep:
        line["audio"] = str(corpus / line["audio"])
    (test_only / "test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in keep))

    predicted = tmp_path / "predicted"
    status, err = erc("--dataset", "manifest", "--test_file", test_only / "test.jsonl", "--model_name_or_path",
                      model_dir, "--do_predict", "--output_dir", predicted, "--embedding_cache_dir", cache,
                      "--disable_tqdm", "true")
    assert status == 0, err[-2000:]
    assert (predicted / "test_results.json").exists() and not (predicted / "eval_results.json").exists()
    assert not any((predicted / name).exists() for name in ("model.safetensors", "train_results.json", "README.md"))
    evaluated = tmp_path / "evaluated"
    status, err = erc("--dataset", "manifest", "--data_dir", corpus, "--model_name_or_path", model_dir, "--do_eval",
                      "--output_dir", evaluated, "--embedding_cache_dir", cache, "--disable_tqdm", "true")
    assert status == 0, err[-2000:]
    results = json.loads((evaluated / "eval_results.json").read_text())
    assert results["eval_weighted_f1"] == json.loads((model_dir / "eval_results.json").read_text())[
        "eval_weighted_f1"]  # the saved model, as saved
    assert not (evaluated / "test_results.json").exists() and not (evaluated / "model.safetensors").exists()
    assert digest(model_dir) == before

    line = refused("--dataset", "manifest", "--test_file", test_only / "test.jsonl",
                   "--model_name_or_path", model_dir, "--do_train", "--output_dir", tmp_path / "trained")
    assert "--do_train needs a train split, and the corpus has only test" in line
    assert digest(model_dir) == before


def test_evaluation_settings_without_a_validation_split_are_refused(refused, tmp_path, tiny_backbones, corpus):
    speech, text = tiny_backbones
    line = refused("--dataset", "manifest", "--train_file", corpus / "train.jsonl", "--text_model_name_or_path", text,
                   "--freeze_backbones", "--output_dir", tmp_path / "run", "--metric_for_best_model", "accuracy")
    assert "--metric_for_best_model needs a validation split to evaluate on while training" in line


def test_requested_stages(run_erc):
    assert run_erc.requested_stages({}) == (True, True, True)  # today's commands: train, evaluate, predict
    assert run_erc.requested_stages({"do_eval": True}) == (False, True, False)
    assert run_erc.requested_stages({"do_train": True, "do_predict": True}) == (True, False, True)
    assert run_erc.requested_stages({"do_train": False, "do_eval": True}) == (False, True, False)


# ------------------------------------------------------------------------------------------ MisterETrainer
def conversations(count=6, seed=0, regression=False) -> Dataset:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(count):
        n = int(rng.integers(2, 5))
        row = {"conversation_id": f"c{c}", "turns": list(range(n)), "texts": [f"t{t}" for t in range(n)],
               "audio": [None] * n, "num_turns": n, "labels": [int((c + t) % 3) for t in range(n)],
               "speech_embeds": rng.standard_normal((n, 12)).astype(np.float32).tolist(), "speech_present": [1] * n,
               "text_embeds": rng.standard_normal((n, 10)).astype(np.float32).tolist(), "text_present": [1] * n}
        if regression:
            row["valence"] = rng.uniform(1, 5, n).tolist()
            row["emphasis"] = ["great"] * n
        rows.append(row)
    return Dataset.from_list(rows)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = {**TINY_HEAD, "num_labels": 3, "id2label": dict(enumerate(LABELS)), **overrides}
    return MisterEModel(MisterEConfig(speech_embed_dim=12, text_embed_dim=10, **settings))


def trainer_for(model, output_dir, **arguments):
    settings = dict(num_train_epochs=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                    use_cpu=True, save_strategy="epoch", eval_strategy="epoch", disable_tqdm=True,
                    remove_unused_columns=False, seed=3, logging_strategy="no", metric_for_best_model="weighted_f1")
    settings.update(arguments)
    return MisterETrainer(model=model, args=TrainingArguments(str(output_dir), **settings),
                          train_dataset=conversations(), eval_dataset=conversations(3, seed=1),
                          data_collator=DataCollatorForConversations(),
                          compute_metrics=build_compute_metrics(LABELS, model.expert_names))


def test_resuming_with_other_settings_is_refused_naming_each_difference(tmp_path):
    trainer_for(tiny_model(), tmp_path).train()
    checkpoint = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    with pytest.raises(TrainingError) as caught:
        trainer_for(tiny_model(projection_dim=32, gate_type="mean"), tmp_path, learning_rate=2e-2,
                    num_train_epochs=1).train(resume_from_checkpoint=True)
    message = str(caught.value)
    for difference in ('gate_type "learned" → "mean"', "projection_dim 16 → 32", "learning_rate 0.01 → 0.02",
                       "num_train_epochs 2 → 1"):
        assert difference in message, message
    assert "Give a new output_dir" in message

    from mister_e_hf.checkpoints import check_resume_settings, resume_settings_differences

    assert resume_settings_differences(checkpoint, tiny_model().config, trainer_for(tiny_model(), tmp_path).args) == []
    # where the backbones came from is a label, not a setting: a moved backbone folder still resumes
    moved = tiny_model()
    moved.config.text_backbone_name_or_path = "elsewhere/text"
    check_resume_settings(checkpoint, moved.config, trainer_for(tiny_model(), tmp_path).args)
    resumed = trainer_for(tiny_model(), tmp_path).train(resume_from_checkpoint=True)  # same settings: resumes
    assert resumed.global_step == json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


@pytest.mark.parametrize("arguments,message", [
    ({"label_smoothing_factor": 0.5}, "label_smoothing_factor is 0.5"),
    ({"eval_do_concat_batches": False}, "eval_do_concat_batches=False is not supported"),
    ({"prediction_loss_only": True}, "prediction_loss_only=True would skip compute_metrics"),
    ({"remove_unused_columns": True}, "remove_unused_columns=True would drop the conversation columns"),
])
def test_trainer_refuses_arguments_it_would_ignore(tmp_path, arguments, message):
    with pytest.raises(TrainingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        trainer_for(tiny_model(), tmp_path, **arguments)


def test_a_mistyped_metric_for_best_model_is_refused_before_the_first_step(tmp_path):
    model = tiny_model()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    trainer = trainer_for(model, tmp_path, metric_for_best_model="weighted_F1", load_best_model_at_end=True)
    with pytest.raises(TrainingError, match="metric_for_best_model 'weighted_F1' is not a metric of this evaluation "
                                            r"\(did you mean 'weighted_f1'\?"):
        trainer.train()
    assert calls == []
    with pytest.raises(TrainingError, match=r"num_train_epochs is 0 \(it must be > 0 and finite\): 0 epochs train"):
        trainer_for(tiny_model(), tmp_path, num_train_epochs=0).train()
    assert not list(tmp_path.iterdir()) or not any(p.name.startswith("checkpoint") for p in tmp_path.iterdir())


def test_a_text_column_given_as_regression_labels_is_named():
    data = conversations(regression=True)
    check_labels(data, "train", ["valence"], "regression", label_columns=["valence"])
    with pytest.raises(TrainingError, match="The train split's 'emphasis' labels must be numbers .*: conversation "
                                            "'c0', turn 0 holds 'great'"):
        check_labels(data, "train", ["emphasis"], "regression", label_columns=["emphasis"])


# --------------------------------------------------------------------------------------- backbone fine-tuning
def test_backbone_finetuning_stops_at_a_non_finite_loss_and_refuses_regression(build, tmp_path):
    model, processor = build("wav2vec2", "bert", num_labels=3, id2label=dict(enumerate(LABELS)),
                             freeze_text_backbone=True, freeze_speech_backbone=True)
    with torch.no_grad():  # an overflowing embedding: every text embedding, and the loss, become non-finite
        model.text_backbone.embeddings.word_embeddings.weight.fill_(math.inf)
    rows = [{"conversation_id": f"c{c}", "turns": [0, 1], "texts": ["hello there", "oh no"], "audio": [None, None],
             "labels": [c % 3, (c + 1) % 3]} for c in range(4)]
    with pytest.raises(TrainingError, match=r"text backbone fine-tuning \(full\): Non-finite (loss|gradient) at "
                                            r"training step 1 of"):
        finetune_backbone(model, processor, "text", DatasetDict(train=Dataset.from_list(rows)), method="full",
                          epochs=1, learning_rate=1e-3, output_dir=tmp_path / "ft")

    from mister_e_hf.finetuning import check_finetuning_settings

    with pytest.raises(MisterEError, match="utterance-level fine-tuning learns class labels"):
        check_finetuning_settings("full", head="regression")


# ------------------------------------------------------------------------------------------------ skip_invalid
def test_inputs_refused_at_extraction_are_skipped_and_reported_under_skip_invalid(erc, tmp_path, tiny_backbones,
                                                                                   corpus):
    """A clip shorter than the speech backbone's receptive field passes loading and is refused at extraction: under
    --skip_invalid the utterance trains without its audio, and data_report.json (and the card) count it."""
    import shutil

    import soundfile

    data = tmp_path / "corpus"
    shutil.copytree(corpus, data)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    soundfile.write(data / first["audio"], np.zeros(5, dtype=np.float32), 16000)
    status, err = erc(*backbone_args(tiny_backbones, data, tmp_path / "run"), "--embedding_cache_dir",
                      tmp_path / "cache", "--num_train_epochs", "1", "--skip_invalid", "--disable_tqdm", "true")
    assert status == 0, err[-2000:]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped_by_split"]["train"] == {"speech refused at extraction (the utterance is kept without it)": 1}
    assert f"conversation {first['conversation_id']!r}, turn {first['turn']}" in json.dumps(report["examples"])


def test_backbone_dtype_is_for_frozen_cached_backbones_only(refused, tiny_backbones, corpus, tmp_path):
    args = [a for a in backbone_args(tiny_backbones, corpus, tmp_path / "run") if a != "--freeze_backbones"]
    assert "--backbone_dtype bfloat16 is for frozen backbones" in refused(*args, "--backbone_dtype", "bfloat16")
    frozen = backbone_args(tiny_backbones, corpus, tmp_path / "run")
    assert "'backbone_dtype' is set by --backbone_dtype" in refused(
        *frozen[:-1], frozen[-1] + ",backbone_dtype=float16")
    assert "is for frozen backbones" in refused(*args, "--backbone_dtype", "float16", "--backbone_finetuning", "lora")
