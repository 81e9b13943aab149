"""Model cards for trained MiSTER-E checkpoints, filled from what a run measured: nothing in a card is typed by hand.

The template is `model_cards/mister_e.md` (shipped in the package as `model_card_template.md`); the numbers go both
into the text and into the `model-index` metadata (`EvalResult`), which the Hub shows and `ModelCard.load` parses.
"""

import math
import os
from importlib.resources import files
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .atomic import atomic_output
from .errors import MisterEError


SPLITS = (("validation", "eval"), ("test", "test"))


def dataset_note(dataset: str) -> str:
    """The corpus loader's one-line description (`register_loader(..., description=...)`), for the card's biases."""
    from .registry import LOADERS, load_builtins

    load_builtins()
    description = LOADERS.info(dataset).get("description") if dataset in LOADERS else None
    return description or "a user-provided corpus; see its documentation"


def _backbone(config, modality: str, model) -> str:
    name = getattr(config, f"{modality}_backbone_name_or_path")
    backbone_config = config.backbone_config(modality)
    if backbone_config is None:
        dim = getattr(config, f"{modality}_embed_dim")
        return f"none (precomputed {dim}-d embeddings)" if dim else "none"
    from .cache import weights_digest

    frozen = "frozen" if getattr(config, f"freeze_{modality}_backbone") else "fine-tuned"
    digest = weights_digest(getattr(model, f"{modality}_backbone"))[:12]
    layers = getattr(config, f"{modality}_layers")
    return (f"`{name or backbone_config.model_type}` ({backbone_config.model_type}, {frozen}, weights digest "
            f"`{digest}`, layers: {layers})")


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and name.count("/") == 1 and not name.startswith((".", "/"))


def headline_metrics(config) -> list[str]:
    """What the card leads with: the head's `card_metrics` (weighted F1, accuracy, macro F1; or CCC per dimension)."""
    from .registry import HEADS

    return HEADS[config.head].card_metrics([config.id2label[i] for i in range(config.num_labels)])


def eval_results(results: dict, dataset: str, metrics) -> list[EvalResult]:
    return [
        EvalResult(task_type="audio-classification", task_name="Emotion Recognition in Conversations",
                   dataset_type=dataset, dataset_name=dataset, dataset_split=split, metric_type=metric,
                   metric_name=metric.replace("_", " "), metric_value=float(results[f"{prefix}_{metric}"]))
        for split, prefix in SPLITS
        for metric in metrics
        if f"{prefix}_{metric}" in results
    ]


def _table(rows: list[tuple[str, str]], header=("", "")) -> str:
    return "\n".join([f"| {header[0]} | {header[1]} |", "|---|---|", *[f"| {a} | {b} |" for a, b in rows]])


def build_model_card(model, dataset: str, label_names, results: dict, training_args=None, data_report=None,
                     repo_id: str | None = None, dataset_details: str = "") -> ModelCard:
    """A filled-in `ModelCard` for a trained model and the metrics measured on it. A non-finite metric is refused
    (`MisterEError`): a card never shows a score the model did not have."""
    bad = sorted(k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise MisterEError(f"Refusing to write a model card with non-finite results: {bad[:5]}.")
    config = model.config
    backbones = [getattr(config, f"{m}_backbone_name_or_path") for m in config.modalities]
    card_data = ModelCardData(
        library_name="transformers",
        tags=["emotion-recognition", "emotion-recognition-in-conversations", "mister-e", "multimodal"],
        datasets=[dataset] if dataset != "manifest" else None,
        metrics=["f1", "accuracy"],
        base_model=[b for b in backbones if _is_hub_id(b)] or None,
        model_name=repo_id or "MiSTER-E",
        eval_results=eval_results(results, dataset, headline_metrics(config)) or None,
    )
    scale = 100 if model.head.percent else 1
    result_rows = [
        (f"{split} {metric.replace('_', ' ')}", f"{scale * results[f'{prefix}_{metric}']:.{3 if scale == 1 else 1}f}")
        for split, prefix in SPLITS for metric in headline_metrics(config) if f"{prefix}_{metric}" in results
    ]
    result_rows += [(f"{split} F1 {name}", f"{100 * results[f'{prefix}_f1_{name}']:.1f}")
                    for split, prefix in SPLITS[1:] for name in label_names if f"{prefix}_f1_{name}" in results]
    result_rows += [(f"test mean gate weight, {name}", f"{results[f'test_gate_{name}']:.2f}")
                    for name in model.expert_names if f"test_gate_{name}" in results]
    training_rows = []
    if training_args is not None:
        for name in ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay",
                     "warmup_steps", "lr_scheduler_type", "seed", "metric_for_best_model"):
            training_rows.append((name, str(getattr(training_args, name))))
    for name in ("projection_dim", "context_kernel_sizes", "context_hidden_size", "context_num_layers",
                 "context_bidirectional", "dropout", "expert_loss_weight", "supcon_weight", "supcon_temperature",
                 "kl_weight", "focal_gamma", "gate_temperature"):
        training_rows.append((name, str(getattr(config, name))))
    parameters = sum(p.numel() for p in model.parameters())
    backbone_parameters = sum(p.numel() for m in config.modalities if getattr(model, f"{m}_backbone", None)
                              is not None for p in getattr(model, f"{m}_backbone").parameters())
    report = ""
    if data_report is not None:
        report = "Data loading: " + "; ".join(data_report.summary().splitlines()) + "."
    template = files("mister_e_hf").joinpath("model_card_template.md").read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=repo_id or "MiSTER-E",
        repo_id=repo_id or "path/to/this/folder",
        experts_sentence=f"The gate weighs {len(model.expert_names)} experts per utterance.",
        speech_backbone=_backbone(config, "speech", model),
        text_backbone=_backbone(config, "text", model),
        experts=", ".join(model.expert_names),
        fusion=config.fusion,
        head=config.head,
        labels=", ".join(label_names),
        parameters=f"{parameters / 1e6:.1f} M",
        trainable=f"{(parameters - backbone_parameters) / 1e6:.2f} M",
        dataset=dataset,
        dataset_details=dataset_details,
        dataset_bias=dataset_note(dataset),
        results_table=_table(result_rows, ("metric", "value")) if result_rows else "No evaluation was run.",
        data_report=report,
        training_table=_table(training_rows, ("setting", "value")),
    )


def write_model_card(output_dir, model, dataset: str, label_names, results: dict, training_args=None,
                     data_report=None, repo_id: str | None = None, dataset_details: str = "") -> ModelCard:
    """Writes the card as `README.md` in `output_dir` (to a temporary name, then moved into place) and returns it."""
    card = build_model_card(model, dataset, label_names, results, training_args, data_report, repo_id, dataset_details)
    with atomic_output(Path(output_dir) / "README.md") as temporary:
        with open(temporary, "w", encoding="utf-8", newline="") as f:  # as `ModelCard.save` writes it
            f.write(str(card))
    return card


__all__ = ["build_model_card", "write_model_card", "eval_results"]
