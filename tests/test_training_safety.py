"""MisterETrainer refuses what cannot train, stops at the first non-finite loss or gradient, never saves a non-finite
model, evaluates in the dataset's order, and writes every result file atomically (library level, embeddings mode:
no backbones, each test trains for well under a second)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import TINY_HEAD, common_args, run_erc
from transformers import TrainingArguments

from mister_e_hf import MisterEConfig, MisterEModel
from mister_e_hf.data import DataCollatorForConversations
from mister_e_hf.errors import MisterEError, TrainingError
from mister_e_hf.trainer import EpochSeededLengthGroupedSampler, MisterETrainer, build_compute_metrics


LABELS = ["calm", "happy", "angry", "sad"]


def conversations(count=8, seed=0, labels=None, lengths=None, regression=None):
    """Rows in the layout `cache.add_cached_embeddings` gives: speech (12-d) and text (10-d) embeddings per turn.
    `labels(c, t)` gives each label (default: random); `regression` names per-turn value columns instead."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(count):
        n = lengths[c] if lengths else int(rng.integers(2, 5))
        row = {"conversation_id": f"c{c}", "turns": list(range(n)), "texts": [f"t{t}" for t in range(n)],
               "audio": [None] * n, "num_turns": n,
               "labels": [labels(c, t) if labels else int(rng.integers(0, len(LABELS))) for t in range(n)],
               "speech_embeds": rng.standard_normal((n, 12)).astype(np.float32).tolist(), "speech_present": [1] * n,
               "text_embeds": rng.standard_normal((n, 10)).astype(np.float32).tolist(), "text_present": [1] * n}
        for column in regression or []:
            row[column] = rng.uniform(1, 5, n).tolist()
        rows.append(row)
    return Dataset.from_list(rows)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = {**TINY_HEAD, "num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)), **overrides}
    return MisterEModel(MisterEConfig(speech_embed_dim=12, text_embed_dim=10, **settings))


def trainer_for(model, train, output_dir, eval_dataset=None, label_columns=None, **arguments):
    settings = dict(num_train_epochs=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                    use_cpu=True, save_strategy="no", eval_strategy="no", disable_tqdm=True,
                    remove_unused_columns=False, seed=3, logging_strategy="no")
    settings.update(arguments)
    head = "regression" if label_columns else "classification"
    return MisterETrainer(model=model, args=TrainingArguments(str(output_dir), **settings), train_dataset=train,
                          eval_dataset=eval_dataset,
                          data_collator=DataCollatorForConversations(label_columns=label_columns),
                          compute_metrics=build_compute_metrics(list(model.config.id2label.values()),
                                                                model.expert_names, head=head))


def count_training_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(module.training))
    return calls


def saved(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------- non-finite training
def test_a_nan_embedding_stops_training_with_a_named_error_and_saves_nothing(tmp_path):
    """The issue's case: one NaN in one cached embedding trained an all-NaN model with exit 0 (loss logged as 0)."""
    train = conversations(8)
    embeds = list(train["text_embeds"])
    embeds[5][1][3] = float("nan")
    train = train.remove_columns("text_embeds").add_column("text_embeds", embeds)
    model = tiny_model()
    trainer = trainer_for(model, train, tmp_path / "run", save_strategy="steps", save_steps=1)
    with pytest.raises(MisterEError):  # a TrainingError, or an input error if the model refuses NaN inputs itself
        trainer.train()
    assert not [name for name in saved(tmp_path / "run") if name.startswith("checkpoint-")
                and not (tmp_path / "run" / name / "trainer_state.json").exists()]
    for name in saved(tmp_path / "run"):  # the checkpoints of the steps before it, all finite
        weights = MisterEModel.from_pretrained(tmp_path / "run" / name).state_dict()
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the update that the NaN would make never ran


def test_non_finite_loss_names_the_step_the_epoch_and_the_loss_term(tmp_path):
    model = tiny_model()
    trainer = trainer_for(model, conversations(6), tmp_path / "run", save_strategy="steps", save_steps=1)
    calls = []

    def poison(module, args, kwargs, output):  # the fifth training forward: step 5 of 6, the second epoch
        calls.append(1)
        if module.training and len(calls) == 5:
            output.losses["supcon_loss"] = output.losses["supcon_loss"] * float("nan")
            output.loss = output.loss + output.losses["supcon_loss"]
        return output

    model.register_forward_hook(poison, with_kwargs=True)
    with pytest.raises(TrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert "training step 5 of 6" in message and "epoch 2 of 2" in message, message
    assert "supcon_loss" in message and "mixture_loss" not in message.split("not finite")[0], message
    assert saved(tmp_path / "run") == [f"checkpoint-{step}" for step in (1, 2, 3, 4)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_gradient_names_the_parameter(tmp_path):
    model = tiny_model()
    name, parameter = next((n, p) for n, p in model.named_parameters() if n.startswith("fusion.") and p.ndim == 2)
    steps = []
    parameter.register_hook(lambda grad: steps.append(1) or (grad * float("inf") if len(steps) == 2 else grad))
    before = parameter.detach().clone()
    trainer = trainer_for(model, conversations(6), tmp_path / "run", max_grad_norm=1.0)
    with pytest.raises(TrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert "Non-finite gradient at training step 2 of 6 (epoch 1 of 2)" in message, message
    assert name in message and f"{parameter.numel()} values non-finite" in message, message
    assert torch.isfinite(parameter).all() and not torch.equal(parameter, before)  # step 1 ran, step 2 did not


def test_saving_refuses_non_finite_weights(tmp_path):
    model = tiny_model()
    trainer = trainer_for(model, conversations(4), tmp_path / "run")
    name = next(n for n, p in model.named_parameters() if n.startswith("fusion."))
    with torch.no_grad():
        model.get_parameter(name).view(-1)[0] = float("inf")
    with pytest.raises(TrainingError, match=f"Refusing to save the model.*{name}"):
        trainer.save_model(str(tmp_path / "model"))
    assert saved(tmp_path / "model") == []


def test_evaluation_refuses_non_finite_results_and_json_refuses_nan(tmp_path):
    evaluation = conversations(3, seed=1)
    embeds = list(evaluation["speech_embeds"])
    embeds[1][0][0] = float("inf")
    evaluation = evaluation.remove_columns("speech_embeds").add_column("speech_embeds", embeds)
    trainer = trainer_for(tiny_model(), conversations(4), tmp_path / "run")
    with pytest.raises(MisterEError, match=r"(?i)finite|nan|inf"):  # ours, or the model's own input error
        trainer.evaluate(evaluation)
    with pytest.raises(ValueError, match="eval_loss"):
        trainer.save_metrics("eval", {"eval_loss": float("nan"), "eval_accuracy": 0.5})
    assert saved(tmp_path / "run") == []


# ------------------------------------------------------------------------------------------ data that cannot train
def test_unlabelled_or_single_class_training_data_is_refused_before_any_compute(tmp_path):
    model = tiny_model()
    forwards = count_training_forwards(model)
    unlabelled = conversations(5, labels=lambda c, t: -1)
    with pytest.raises(TrainingError, match=r"training split has no labelled utterance \(0 labelled utterances "
                                            r"\(calm 0, happy 0, angry 0, sad 0\) and \d+ unlabelled, in 5 conv"):
        trainer_for(model, unlabelled, tmp_path / "a").train()
    one_class = conversations(5, labels=lambda c, t: 1 if t else -1)
    with pytest.raises(TrainingError, match=r"labels of one class only \(\d+ labelled utterances \(calm 0, happy \d+, "
                                            r"angry 0, sad 0\)"):
        trainer_for(model, one_class, tmp_path / "b").train()
    with pytest.raises(TrainingError, match=r"label ids \[7\] outside the model's 4 labels"):
        trainer_for(model, conversations(5, labels=lambda c, t: 7 if c == 2 else t % 2), tmp_path / "c").train()
    with pytest.raises(TrainingError, match=r"The validation split has no labelled utterance"):
        trainer_for(model, conversations(5), tmp_path / "d", eval_dataset=unlabelled, eval_strategy="epoch").train()
    assert forwards == [] and [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_regression_data_without_values_or_variance_is_refused(tmp_path):
    dims = ["valence", "arousal"]
    model = tiny_model(head="regression", num_labels=2, id2label=dict(enumerate(dims)))
    forwards = count_training_forwards(model)
    train = conversations(5, regression=dims)
    constant = train.remove_columns("arousal").add_column("arousal", [[3.0] * n for n in train["num_turns"]])
    with pytest.raises(TrainingError, match=r"'arousal' labels cannot train a regression: all \d+ labelled "
                                            r"values are 3"):
        trainer_for(model, constant, tmp_path / "a", label_columns=dims).train()
    empty = train.remove_columns(dims)
    for column in dims:
        empty = empty.add_column(column, [[None] * n for n in train["num_turns"]])
    with pytest.raises(TrainingError, match=r"training split has no labelled value in 5 conversations"):
        trainer_for(model, empty, tmp_path / "b", label_columns=dims).train()
    assert forwards == []
    trainer_for(model, train, tmp_path / "c", label_columns=dims, max_steps=1).train()  # real values train
    assert forwards


# ------------------------------------------------------------------------------------------------ order, sampling
def test_predict_returns_predictions_in_the_dataset_order_under_length_grouping(tmp_path):
    """With `group_by_length`, `Trainer` also length-groups evaluation, so `predict` came back shuffled against the
    dataset's rows (run_erc then paired MOSI's scores with other utterances' predictions)."""
    lengths = [2, 7, 3, 6, 2, 5, 4, 7, 3, 2]
    dataset = conversations(len(lengths), lengths=lengths)
    model = tiny_model().eval()
    trainer = trainer_for(model, dataset, tmp_path / "run", train_sampling_strategy="group_by_length",
                          length_column_name="num_turns", per_device_eval_batch_size=2)
    logits, _ = trainer.predict(dataset).predictions
    collator = DataCollatorForConversations()
    for i, n in enumerate(lengths):
        with torch.no_grad():
            expected = model(**collator([dataset[i]])).logits[0]
        np.testing.assert_allclose(logits[i, :n], expected.numpy(), atol=1e-5)


def test_length_grouped_shuffle_depends_on_the_seed_and_epoch_only():
    lengths = list(np.random.default_rng(0).integers(1, 20, 40))
    sampler = EpochSeededLengthGroupedSampler(4, lengths, seed=3)
    orders = []
    for epoch, global_seed in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(global_seed)
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == list(range(40))


# ------------------------------------------------------------------------------------------------- atomic writes
def test_result_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """Every writer goes through a temporary file and `os.replace`: when the move does not happen (a kill just
    before it), the previous file is intact and no temporary file is left behind."""
    from mister_e_hf.hub import export_for_upload
    from mister_e_hf.modelcard import write_model_card
    from mister_e_hf.plotting import plot_confusion_matrix, plot_gate_weights_by_class

    model = tiny_model()
    trainer = trainer_for(model, conversations(4), tmp_path)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"")
    writers = {
        "train_results.json": lambda: trainer.save_metrics("train", {"train_loss": 1.0}, combined=False),
        "trainer_state.json": trainer.save_state,
        "README.md": lambda: write_model_card(tmp_path, model, "manifest", LABELS, {"test_accuracy": 0.5}),
        "matrix.png": lambda: plot_confusion_matrix(np.eye(4), LABELS, tmp_path / "matrix.png"),
        "gates.png": lambda: plot_gate_weights_by_class(np.full((3, 3), 1 / 3), np.arange(3), LABELS,
                                                        model.expert_names, tmp_path / "gates.png"),
        "export/config.json": lambda: export_for_upload(source, tmp_path / "export"),
    }

    def killed(*args):
        raise KeyboardInterrupt("killed before the move")

    for name, write in writers.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("previous content")
        before = set(os.listdir(path.parent))
        monkeypatch.setattr(os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            write()
        monkeypatch.undo()
        assert path.read_text() == "previous content", name
        assert set(os.listdir(path.parent)) == before, name
        write()
        assert path.read_bytes() != b"previous content", name
    assert json.loads((tmp_path / "train_results.json").read_text()) == {"train_loss": 1.0}
    assert json.loads((tmp_path / "trainer_state.json").read_text())["global_step"] == 0


# --------------------------------------------------------------------------------------------- examples/run_erc.py
def test_run_erc_stops_at_a_non_finite_loss_with_one_line_and_writes_nothing(tiny_backbones, corpus, tmp_path):
    """A diverging run (learning rate 1e30: the weights overflow after the first update) used to go on to the end,
    saving NaN weights and a model card with a validation score, with exit status 0."""
    output = tmp_path / "run"
    result = run_erc(*common_args(tiny_backbones, corpus, output, tmp_path / "cache"), "--num_train_epochs", "2",
                     "--learning_rate", "1e30", "--warmup_steps", "0", "--save_strategy", "steps", "--save_steps", "1",
                     "--eval_strategy", "no", "--load_best_model_at_end", "false")
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("run_erc.py: error: Non-finite loss at training step 2 of 6 (epoch 1 of 2): "), last
    assert saved(output) == ["checkpoint-1", "data_report.json"]  # step 1, finite; nothing of step 2 or after


def test_run_erc_refuses_an_unlabelled_training_split_before_extracting(tiny_backbones, corpus, tmp_path):
    unlabelled = tmp_path / "corpus"
    shutil.copytree(corpus, unlabelled)
    rows = [json.loads(line) for line in (unlabelled / "train.jsonl").read_text().splitlines()]
    (unlabelled / "train.jsonl").write_text("".join(json.dumps({**row, "label": None}) + "\n" for row in rows))
    cache = tmp_path / "cache"
    result = run_erc(*common_args(tiny_backbones, unlabelled, tmp_path / "run", cache),
                     "--manifest_labels", "calm,happy,angry")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"run_erc.py: error: The train split has no labelled utterance (0 labelled utterances (calm 0, happy 0, "
        f"angry 0) and {len(rows)} unlabelled, in 12 conversations): nothing to train on.")
    assert not cache.exists() and saved(tmp_path / "run") == ["data_report.json"]
