"""Degenerate inputs to the corpus loaders, metrics, losses, plots and the Hub export give a named error (or, where
it is the honest result, NaN or an explicit "no data" figure); never a perfect score for a NaN model, a class nobody
meant, a silently truncated prediction, an obscure traceback from numpy or matplotlib, nor a wrong upload."""

import importlib
import json
import os

import numpy as np
import pytest
import soundfile
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

from mister_e_hf import losses, metrics  # noqa: E402
from mister_e_hf.data import load_corpus  # noqa: E402
from mister_e_hf.data.common import DataReport, build_split  # noqa: E402
from mister_e_hf.data.emodb import load_emodb  # noqa: E402
from mister_e_hf.data.manifest import load_manifest  # noqa: E402
from mister_e_hf.errors import CorpusError, MisterEError  # noqa: E402
from mister_e_hf.hub import export_for_upload, files_to_upload  # noqa: E402
from mister_e_hf.metrics import concordance_correlation_coefficient, load_erc_metric, regression_metrics  # noqa: E402


NAN, INF = float("nan"), float("inf")
HEADER = "conversation_id,turn,text,label\n"


def csv_manifest(tmp_path, labels, name="train.csv"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(f"c,{t},hello,{label}\n" for t, label in enumerate(labels)), encoding="utf-8")
    return path


def jsonl_manifest(tmp_path, labels, name="train.jsonl"):
    path = tmp_path / name
    rows = [{"conversation_id": "c", "turn": t, "text": "hello", "label": label} for t, label in enumerate(labels)]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def labels_of(data):
    return data["train"].features["labels"].feature.names


# ------------------------------------------------------------------------------ concordance correlation (CCC)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_ccc_of_a_non_finite_prediction_is_nan_in_the_loss_not_perfect(bad):
    """It was 1.0 (the constant case's value: `NaN > 0` is False), so `ccc_loss` was 0 and the trainer's
    non-finite-loss check could not fire."""
    predictions, references = torch.tensor([1.0, bad, 3.0]), torch.tensor([1.0, 2.0, 3.0])
    assert torch.isnan(losses.concordance_correlation(predictions, references))
    assert torch.isnan(losses.concordance_correlation(references, predictions))
    mask = torch.ones(3, 1, dtype=torch.bool)
    assert torch.isnan(losses.ccc_loss(predictions[:, None], references[:, None], mask))
    # The documented convention for the 0 / 0 case holds: the same constant on both sides is perfect agreement.
    assert losses.concordance_correlation(torch.full((3,), 2.0), torch.full((3,), 2.0)).item() == 1.0
    assert losses.concordance_correlation(torch.full((3,), 2.0), references).item() == 0.0


@pytest.mark.parametrize("as_tensor", [True, False])
def test_ccc_metric_of_non_finite_values_is_a_named_error(as_tensor):
    predictions, references = [1.0, NAN, 3.0], [1.0, 2.0, 3.0]
    convert = torch.tensor if as_tensor else np.array
    with pytest.raises(MisterEError, match="non-finite"):
        concordance_correlation_coefficient(convert(predictions), convert(references))
    with pytest.raises(MisterEError, match="references.*non-finite"):
        concordance_correlation_coefficient(convert(references), convert([INF, 1.0, 2.0]))
    with pytest.raises(MisterEError, match="overflowed"):  # finite values whose squares overflow
        concordance_correlation_coefficient([1e200, -1e200], [1e200, -1e200])


def test_ccc_metric_uses_the_loss_implementation(monkeypatch):
    calls = []
    original = losses.concordance_correlation
    monkeypatch.setattr(metrics, "concordance_correlation", lambda p, r: calls.append(p.dtype) or original(p, r))
    assert concordance_correlation_coefficient([1.0, 2.0, 3.0], [2, 4, 6]) == pytest.approx(4 / 11)
    value = concordance_correlation_coefficient(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]))
    assert value.item() == pytest.approx(4 / 11)
    assert calls == [torch.float64, torch.float32]


# ------------------------------------------------------------------------------------------- ERC metric


@pytest.fixture(scope="module")
def erc_metric(tmp_path_factory):
    return load_erc_metric(keep_in_memory=True, cache_dir=str(tmp_path_factory.mktemp("metrics_cache")))


@pytest.mark.parametrize(
    "predictions, match",
    [
        ([0.9, 0.2], r"integer class ids, got 0\.9 at index 0"),  # probabilities: 0.9 was truncated to class 0
        ([NAN, 0], "integer class ids, got nan"),
        (["a", "b"], "integer class ids, got str 'a'"),
        ([[0.1, 0.9], [0.8, 0.2]], r"one class id per item .* shape \(2, 2\).*argmax"),
    ],
    ids=["probabilities", "nan", "strings", "2-d"],
)
def test_erc_metric_refuses_predictions_that_are_not_class_ids(erc_metric, predictions, match):
    with pytest.raises(MisterEError, match=match):
        erc_metric.compute(predictions=predictions, references=[1, 0], label_names=["a", "b"])


def test_erc_metric_refuses_float_references_and_absurd_ids(erc_metric):
    with pytest.raises(MisterEError, match="references"):
        erc_metric.compute(predictions=[1, 0], references=[0.6, 0.0], label_names=["a", "b"])
    with pytest.raises(MisterEError, match="without `label_names`"):  # was a MemoryError (2**40 classes)
        erc_metric.compute(predictions=[2**40], references=[0])
    with pytest.raises(MisterEError, match=r"-100.*drop padded"):
        erc_metric.compute(predictions=[1, 0], references=[-100, 0], label_names=["a", "b"])
    with pytest.raises(MisterEError, match="prediction"):
        erc_metric.add(prediction=0.5, reference=1)
    # Whole-number floats and tensors of ids are ids.
    results = erc_metric.compute(predictions=np.array([1.0, 0.0]), references=torch.tensor([1, 0]))
    assert results["accuracy"] == 1.0 and results["confusion_matrix"] == [[1, 0], [0, 1]]


# ------------------------------------------------------------------------------------ regression metrics


@pytest.mark.parametrize(
    "predictions, references, names, match",
    [
        (np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), ["v"], r"\(utterances, dimensions\)"),  # IndexError
        (np.ones((3, 1)), np.ones((3, 1)), ["v", "a"], "name each of the 1 dimensions"),  # IndexError
        (np.ones((3, 2)), np.ones((3, 2)), ["v"], "name each of the 2 dimensions"),  # one dimension ignored
        (np.ones((3, 2)), np.ones((4, 2)), ["v", "a"], "same shape"),
        (np.array([[NAN], [1.0], [2.0]]), np.array([[1.0], [2.0], [3.0]]), ["v"], "non-finite.*utterance 0"),
        (np.ones((3, 1)), np.array([[INF], [1.0], [2.0]]), ["v"], "infinite"),
    ],
    ids=["1-d", "more-names", "fewer-names", "shapes", "nan-prediction", "inf-reference"],
)
def test_regression_metrics_refuse_mismatched_names_and_non_finite_predictions(predictions, references, names,
                                                                               match):
    with pytest.raises(MisterEError, match=match):
        regression_metrics(predictions, references, names)


def test_regression_metrics_still_skip_unlabelled_references():
    results = regression_metrics(np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [NAN], [3.0]]), ["v"])
    assert results["ccc_v"] == pytest.approx(2 / 3) and results["mae_v"] == 1.0


# ------------------------------------------------------------------------------- manifest label strings


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_labels_differing_only_by_case_are_an_error_naming_them(tmp_path, suffix):
    write = csv_manifest if suffix == "csv" else jsonl_manifest
    path = write(tmp_path, ["happy", "Happy", "HAPPY", "sad"])
    with pytest.raises(CorpusError, match="differ only by case") as error:
        load_manifest(train_file=str(path))
    message = str(error.value)
    assert "'Happy'" in message and "'HAPPY'" in message and str(path) in message and "line 3" in message
    assert "--manifest_labels" in message
    # The explicit label set says which spelling is the class; the others are unknown labels that say so.
    with pytest.raises(CorpusError, match="'Happy' differs from 'happy' only by case"):
        load_manifest(train_file=str(path), label_names=["happy", "sad"])


def test_invisible_characters_in_labels_are_an_error_never_a_class(tmp_path):
    path = jsonl_manifest(tmp_path, ["happy", "happy\u200b", "sad"])
    with pytest.raises(CorpusError, match="invisible characters") as error:
        load_manifest(train_file=str(path))
    assert r"'happy\u200b'" in str(error.value)
    alone = jsonl_manifest(tmp_path, ["happy\u200b", "sad"], "alone.jsonl")
    with pytest.raises(CorpusError, match=r"U\+200B"):
        load_manifest(train_file=str(alone))
    with pytest.raises(CorpusError, match=r"differs from 'happy' only by .*invisible characters"):
        load_manifest(train_file=str(path), label_names=["happy", "sad"])
    with pytest.raises(CorpusError, match="invisible characters"):
        load_manifest(train_file=str(path), label_names=["happy\u200b", "sad"])
    # Surrounding whitespace, a no-break space included, is stripped as documented: one class.
    spaced = jsonl_manifest(tmp_path, ["happy", "happy\u00a0", "sad"], "spaced.jsonl")
    assert labels_of(load_manifest(train_file=str(spaced))[0]) == ["happy", "sad"]


@pytest.mark.parametrize("marker", ["null", "NaN", "NA", "None", "N/A", "missing", "-"])
def test_missing_value_markers_are_not_classes(tmp_path, marker):
    path = csv_manifest(tmp_path, ["happy", marker, "sad"])
    with pytest.raises(CorpusError, match="mark a missing value") as error:
        load_manifest(train_file=str(path))
    assert repr(marker) in str(error.value) and "Leave the label empty" in str(error.value)
    with pytest.raises(CorpusError, match="marks a missing value"):
        load_manifest(train_file=str(path), label_names=["happy", "sad"])


def test_an_explicit_label_set_may_hold_a_real_class_named_none(tmp_path):
    path = csv_manifest(tmp_path, ["happy", "none", ""])  # the empty label: an unlabelled utterance
    data, _ = load_manifest(train_file=str(path), label_names=["happy", "none"])
    assert labels_of(data) == ["happy", "none"] and data["train"][0]["labels"] == [0, 1, -1]


def test_jsonl_nan_label_hint_does_not_suggest_a_nan_class(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"conversation_id": "c", "turn": 0, "text": "hi", "label": NaN}\n'
                    '{"conversation_id": "c", "turn": 1, "text": "hi", "label": "sad"}\n')
    with pytest.raises(CorpusError, match="line 1") as error:
        load_manifest(train_file=str(path))
    assert 'write it as "nan"' not in str(error.value) and '"label": null' in str(error.value)


def test_emodb_emotions_are_checked_like_manifest_labels(tmp_path):
    (tmp_path / "wav").mkdir()
    lines = ["file,speaker,sentence_code,emotion,transcript"]
    for s in range(5):
        for i, emotion in enumerate(("anger", "Anger" if s == 4 else "neutral")):
            name = f"{s:02d}a0{i}.wav"
            soundfile.write(tmp_path / "wav" / name, np.zeros(160, dtype=np.float32), 16000)
            lines.append(f"{name},{s:02d},a0{i},{emotion},Der Satz.")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"differ only by case.*'Anger' \(.*metadata.csv, line 11\)"):
        load_emodb(tmp_path)


# ------------------------------------------------------------------------- reserved metadata column names


@pytest.mark.parametrize("column", ["text_embeds", "speech_present", "text_view_present", "visual_mask"])
def test_metadata_columns_named_like_cache_or_collator_columns_are_refused(tmp_path, column):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"conversation_id": "c", "turn": 0, "text": "hi", "label": "a", column: "x"}) + "\n")
    with pytest.raises(CorpusError, match=rf"\['{column}'\] clash") as error:
        load_manifest(train_file=str(path))
    assert str(path) in str(error.value)
    record = {"conversation_id": "c", "turn": 0, "text": "hi", "audio": None, "label": "a", column: "x"}
    with pytest.raises(CorpusError, match=rf"\['{column}'\] clash"):
        build_split([record], "train", ["a"], DataReport(), metadata={column: None})


# ------------------------------------------------------------------------------------------ loader options


@pytest.mark.parametrize(
    "corpus, options, match",
    [
        ("meld", {"label_column": "Speaker"}, "'Speaker' is not one of its label columns: 'emotion', 'sentiment'"),
        ("meld", {"skip_invalid": "no"}, "skip_invalid must be True or False"),
        ("emodb", {"validation": "no"}, "validation must be True or False"),  # "no" is truthy: kept validation
        ("emodb", {"skip_invalid": 1}, "skip_invalid must be True or False"),
        ("iemocap", {"label_set": 4}, "label_set 4 is not one of its label sets: '4', '6'"),
        ("iemocap", {"validation_fraction": "0.1"}, "validation_fraction must be a number"),
        ("iemocap", {"skip_invalid": "yes"}, "skip_invalid must be True or False"),
        ("mosi", {"label_set": "seven"}, "label_set 'seven' is not one of its label sets"),
        ("mosi", {"skip_invalid": "no"}, "skip_invalid must be True or False"),
        ("manifest", {"skip_invalid": "no"}, "skip_invalid must be True or False"),
    ],
    ids=["meld-label_column", "meld-skip_invalid", "emodb-validation", "emodb-skip_invalid", "iemocap-label_set",
         "iemocap-validation_fraction", "iemocap-skip_invalid", "mosi-label_set", "mosi-skip_invalid",
         "manifest-skip_invalid"],
)
def test_loader_options_of_the_wrong_value_or_type_are_corpus_errors(tmp_path, corpus, options, match):
    with pytest.raises(CorpusError, match=match):
        load_corpus(corpus, data_dir=str(tmp_path), **options)


# ------------------------------------------------------------------------------------------------- CSV


def test_a_long_unquoted_csv_field_is_not_reported_as_broken_quoting(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + "c,0," + "a" * 200_000 + ",happy\nc,1,hi,sad\n")
    data, _ = load_manifest(train_file=str(path))
    assert len(data["train"][0]["texts"][0]) == 200_000 and labels_of(data) == ["happy", "sad"]
    broken = tmp_path / "broken.csv"
    broken.write_text(HEADER + 'c,0,"never closed,happy\nc,1,hi,sad\n')
    with pytest.raises(CorpusError, match="line 2: broken CSV quoting"):
        load_manifest(train_file=str(broken))


# ------------------------------------------------------------------------------------------------ plotting


def test_plotting_does_not_change_the_matplotlib_backend(monkeypatch):
    import matplotlib

    from mister_e_hf import plotting

    switched = []
    monkeypatch.setattr(matplotlib, "use", lambda *args, **kwargs: switched.append(args))
    importlib.reload(plotting)
    assert switched == [] and not hasattr(plotting, "plt")


def _plots():
    from mister_e_hf.plotting import (
        plot_confusion_matrix,
        plot_gate_weights_along_turns,
        plot_gate_weights_by_class,
    )

    return plot_confusion_matrix, plot_gate_weights_by_class, plot_gate_weights_along_turns


@pytest.mark.parametrize(
    "which, args, kwargs, match",
    [
        (0, ([], []), {}, "`label_names` is empty"),  # AxisError
        (0, ([[1, 2], [3, 4]], ["a", "b", "c"]), {}, r"must be \(3, 3\)"),  # IndexError
        (0, ([[NAN, 2], [3, 4]], ["a", "b"]), {}, "non-finite"),  # ValueError in int()
        (0, ([[1, -2], [3, 4]], ["a", "b"]), {}, "counts"),
        (1, (np.zeros((2, 0)), [0, 1], ["a", "b"], []), {}, "`expert_names` is empty"),  # ZeroDivisionError
        (1, (np.full((2, 2), 0.5), [0, 5], ["a", "b"], ["s", "t"]), {}, r"class ids in range\(0, 2\)"),
        (1, (np.full((2, 2), 0.5), [0], ["a", "b"], ["s", "t"]), {}, "one class id per utterance"),
        (2, ([], ["s", "t"]), {}, r"\(utterances, experts\)"),  # IndexError
        (2, ([0.5, 0.5], ["s", "t"]), {}, r"got shape \(2,\)"),  # IndexError
        (2, ([[0.5, 0.5]], ["s", "t", "c"]), {}, r"\(N, 3\)"),
        (2, ([[0.5, 0.5]], ["s", "t"]), {"labels": ["a", "b", "c"]}, "one label per turn"),  # matplotlib error
        (2, ([[NAN, 0.5]], ["s", "t"]), {}, "non-finite"),
        (2, ([[1.5, -0.5]], ["s", "t"]), {}, r"weights in \[0, 1\]"),
    ],
    ids=["matrix-empty", "matrix-shape", "matrix-nan", "matrix-negative", "by-class-no-experts", "by-class-id",
         "by-class-ids-length", "turns-empty", "turns-1-d", "turns-experts", "turns-labels", "turns-nan",
         "turns-range"],
)
def test_plots_of_degenerate_inputs_are_named_errors(tmp_path, which, args, kwargs, match):
    plot = _plots()[which]
    with pytest.raises(MisterEError, match=match):
        plot(*args, tmp_path / "plot.png", **kwargs)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file


def test_plots_refuse_an_unknown_image_format_and_draw_empty_splits_honestly(tmp_path):
    plot_confusion_matrix, plot_gate_weights_by_class, _ = _plots()
    with pytest.raises(MisterEError, match="cannot write a 'xyz' image"):
        plot_confusion_matrix(np.eye(2), ["a", "b"], tmp_path / "matrix.xyz")
    plot_gate_weights_by_class(np.zeros((0, 2)), [], ["a", "b"], ["s", "t"], tmp_path / "gates.png")
    plot_confusion_matrix(np.zeros((2, 2)), ["a", "b"], tmp_path / "matrix.svg")
    assert "no labelled utterance" in (tmp_path / "matrix.svg").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gates.png", "matrix.svg"]


# ------------------------------------------------------------------------------------------------------ hub


def make_files(folder, names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")


UPLOADED = ["README.md", "all_results.json", "config.json", "confusion_matrix_test.png", "model.safetensors",
            "modeling_mister_e.py", "processor_config.json", "tokenizer.json"]
LOCAL = ["checkpoint-3/model.safetensors", "sub/checkpoint-5/optimizer.pt", "sub/checkpoint-5/scheduler.safetensors",
         "incomplete-checkpoint-4/trainer_state.json", "a/b/incomplete-checkpoint-2/x.json", "secret.env", ".env",
         ".git/config", "notes/.hidden", "model.safetensors.tmp", ".model.k2j3.safetensors", "events.out.tfevents.1",
         "runs/Jan01/events.out.tfevents.2", "logs/events.out.tfevents.3", "wandb/run-1/log.txt",
         "finetuning-text/model.safetensors", "__pycache__/x.cpython-311.pyc", "training_args.bin", "rng_state.pth"]


def test_files_to_upload_lists_the_model_and_nothing_local(tmp_path):
    make_files(tmp_path, UPLOADED + LOCAL)
    assert files_to_upload(tmp_path) == UPLOADED
    destination = tmp_path.parent / f"{tmp_path.name}-export"
    assert export_for_upload(tmp_path, destination) == UPLOADED
    assert sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*") if p.is_file()) == UPLOADED


def test_hub_export_needs_a_model_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    make_files(tmp_path / "corpus", ["train.csv", "wav/a.wav"])
    make_files(tmp_path / "no_weights", ["config.json", "README.md"])
    for folder, match in ((tmp_path / "nowhere", "not found"), (tmp_path / "corpus" / "train.csv", "is a file"),
                          (tmp_path / "empty", r"lacks config.json and model.safetensors \(it is empty\)"),
                          (tmp_path / "corpus", r"lacks config.json and model.safetensors \(it holds"),
                          (tmp_path / "no_weights", "lacks model.safetensors")):
        with pytest.raises(MisterEError, match=match):
            files_to_upload(folder)
        with pytest.raises(MisterEError, match=match):
            export_for_upload(folder, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    model = tmp_path / "model"
    make_files(model, ["config.json", "model.safetensors"])
    with pytest.raises(MisterEError, match="outside it"):
        export_for_upload(model, model / "export")
