"""One training and evaluation path for `examples/run_erc.py`, `mister-e evaluate` and the benchmarks: the trainer is
built the same way (`build_trainer`), and a split is evaluated by `Trainer.predict`, then the model's head scores it
(its metrics, and for class labels the confusion matrix and gate plots).

```python
from mister_e_hf.evaluation import build_trainer, evaluate_split, evaluation_trainer
trainer = build_trainer(model, training_args, datasets["train"], datasets["validation"], processor)
trainer.train()                                                       # or evaluation_trainer(model, processor)
metrics = evaluate_split(trainer, datasets["test"], "test", output_dir="runs/x")   # test_weighted_f1, ...
```
"""

import tempfile
from pathlib import Path

import numpy as np
from transformers import TrainingArguments
from transformers.utils import logging

from .atomic import atomic_write_json
from .data.collator import DataCollatorForConversations
from .errors import MisterEError


logger = logging.get_logger(__name__)


def label_names(model) -> list[str]:
    """The model's label (or dimension) names in id order."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def build_trainer(model, args, train_dataset=None, eval_dataset=None, processor=None, callbacks=None):
    """The `MisterETrainer` for `model`, as run_erc, the CLI and the benchmarks build it: the conversation collator
    (embeddings mode for cached rows, else `processor`), labels read as the head reads them (class ids, or a
    regression head's dimensions from the columns named after them) and the head's metrics."""
    from .trainer import MisterETrainer, build_compute_metrics

    names = label_names(model)
    label_columns = names if model.head.target == "values" else None
    return MisterETrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=processor,
                          data_collator=DataCollatorForConversations(processor, label_columns=label_columns),
                          compute_metrics=build_compute_metrics(names, model.expert_names, head=model.head),
                          callbacks=callbacks)


def evaluation_trainer(model, processor, batch_size: int = 8, output_dir: str | None = None, **arguments):
    """A trainer (`build_trainer`) that only evaluates and predicts `model`: batches of `batch_size` conversations,
    no training arguments to get wrong."""
    args = TrainingArguments(output_dir=output_dir or tempfile.mkdtemp(prefix="mister-e-evaluation-"),
                             per_device_eval_batch_size=batch_size, report_to="none", remove_unused_columns=False,
                             **arguments)
    return build_trainer(model, args, processor=processor)


def evaluate_split(trainer, dataset, prefix: str, output_dir=None, confusion_matrix: bool = False) -> dict:
    """Metrics of one split under `<prefix>_` names: `trainer.predict` (the head's metrics and the mean gate weight
    per expert) plus what the head's detailed metrics add (per-class F1, CMU-MOSI's score metrics, ...). With
    `output_dir`, also `predictions_<prefix>.jsonl` (`write_predictions`) and, when the head gives a confusion matrix, also `confusion_matrix_<prefix>.png/.json` and
    `gate_weights_<prefix>.png` (mean gate weight by true class). Metrics that are undefined on the split (e.g.
    MOSI's non-0 scores when every true score is 0) are `None`, never NaN. `confusion_matrix=True` also returns the
    matrix (rows: true classes) as `<prefix>_confusion_matrix`."""
    from .plotting import plot_confusion_matrix, plot_gate_weights_by_class

    model = trainer.model
    head, names = model.head, label_names(model)
    prediction = trainer.predict(dataset, metric_key_prefix=prefix)
    if prediction.label_ids is None:
        raise MisterEError(f"The {prefix} split has no labels to evaluate against.")
    predicted, true, scores, gates = head.flatten(prediction.predictions, prediction.label_ids)
    metrics = dict(prediction.metrics)
    detailed = head.metrics(predicted, true, names, **head.metric_extras(dataset, scores, names))
    matrix = detailed.pop("confusion_matrix", None)
    undefined = sorted(k for k, v in detailed.items() if isinstance(v, float) and not np.isfinite(v))
    if undefined:
        logger.warning(f"{prefix}: {undefined} are undefined on this split; written as null.")
        detailed.update(dict.fromkeys(undefined))
    metrics.update({f"{prefix}_{k}": v for k, v in detailed.items()})
    if confusion_matrix and matrix is not None:
        metrics[f"{prefix}_confusion_matrix"] = matrix
    if output_dir is None or not trainer.is_world_process_zero():  # in several processes, the main one writes
        return metrics
    write_predictions(Path(output_dir) / f"predictions_{prefix}.jsonl", model, dataset, prediction)
    if matrix is not None:
        output_dir = Path(output_dir)
        headline = detailed.get(head.headline_metric)
        shown = "" if headline is None else f": {head.headline_metric.replace('_', ' ')} " + (
            f"{100 * headline:.1f}" if head.percent else f"{headline:.3f}")
        plot_confusion_matrix(matrix, names, output_dir / f"confusion_matrix_{prefix}.png", title=f"{prefix}{shown}")
        plot_gate_weights_by_class(gates, true, names, model.expert_names, output_dir / f"gate_weights_{prefix}.png",
                                   title=f"{prefix}: mean gate weight by true class")
        atomic_write_json(output_dir / f"confusion_matrix_{prefix}.json", {"labels": names, "matrix": matrix},
                          indent=1)
    return metrics


def write_predictions(path, model, dataset, prediction) -> int:
    """One JSON line per utterance of `dataset` (in its order): `conversation_id`, `turn`, what the head decodes
    (`label`, `score`, `scores`, `gate_weights`; or `values`) and the `true` label (or values; null when
    unlabelled), from `Trainer.predict`'s output on that dataset. Returns the number of lines."""
    import torch

    from .atomic import atomic_write_text, strict_json

    (logits, gates), labels = prediction.predictions, prediction.label_ids
    if len(logits) != len(dataset):
        raise MisterEError(f"{len(logits)} predicted conversations for {len(dataset)} in the split: predictions were "
                           "duplicated or dropped (a distributed gather gone wrong?); nothing was written.")
    names, lines = label_names(model), []
    columns = dataset.column_names
    ids = dataset["conversation_id"] if "conversation_id" in columns else list(range(len(dataset)))
    turns = dataset["turns"] if "turns" in columns else None
    for i, n in enumerate(dataset["num_turns"]):
        decoded = model.head.decode(torch.from_numpy(logits[i, :n]), torch.from_numpy(gates[i, :n]),
                                    model.config.id2label, model.expert_names)
        for t, item in enumerate(decoded):
            true = labels[i, t] if labels is not None else None
            if model.head.target == "values":
                true = None if true is None or np.isnan(np.where(true == -100, np.nan, true)).all() else {
                    name: (None if np.isnan(v) else float(v)) for name, v in zip(names, true)}
            else:
                true = None if true is None or int(true) == -100 else names[int(true)]
            lines.append(strict_json({"conversation_id": ids[i], "turn": turns[i][t] if turns else t, **item,
                                      "true": true}))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


__all__ = ["build_trainer", "evaluate_split", "evaluation_trainer", "label_names", "write_predictions"]
