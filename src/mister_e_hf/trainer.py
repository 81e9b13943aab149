"""`MisterETrainer`: `Trainer` with MiSTER-E's losses logged one by one, predictions that keep the gate weights, and
training that cannot go silently wrong or be lost.

- It refuses, before any compute, training data that cannot train (`check_labels`) and training arguments it would
  silently ignore or that cannot work (`check_training_arguments`), stops with a `TrainingError` at the first
  non-finite loss or gradient (`FiniteTrainingMixin`, which backbone fine-tuning uses too), and never saves a model or
  checkpoint holding a non-finite value.
- A run killed at any checkpoint and resumed with the same seed ends with the uninterrupted run's weights and
  `train_loss`: the length-grouped shuffle depends on the seed and the epoch only (`EpochSeededLengthGroupedSampler`),
  and the running loss sums travel in each checkpoint (`LOSS_TOTALS_NAME`).
- Resuming picks the newest complete checkpoint (`find_resumable_checkpoint`) and moves incomplete ones aside,
  refuses one made with other model or training settings (`check_resume_settings`), and every result file is written
  to a temporary name and moved into place (`mister_e_hf.atomic`).
"""

import dataclasses
import difflib
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import SequentialSampler
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, has_length
from transformers.utils import logging

from .atomic import atomic_write_json, atomic_write_text, strict_json
from . import distributed
from .cache import fit_embedding_statistics, weights_digest
from .checkpoints import LOSS_TOTALS_NAME, check_resume_settings, checkpoint_problem, find_resumable_checkpoint
from .data.common import UNLABELLED
from .errors import TrainingError
from .outputs import MisterEOutput
from .registry import HEADS


logger = logging.get_logger(__name__)

LOSS_COMPONENTS = ("mixture_loss", "expert_loss", "supcon_loss", "kl_loss", "distillation_loss")
"""The built-in heads' loss terms (a model's own are `model.loss_weights`, with plug-ins' terms)."""


# ------------------------------------------------------------------------------------------------------- sampling
class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose shuffle depends on `seed` and the epoch only (`set_epoch`, which `Trainer` calls
    at the start of every epoch), not on the global random state.

    `Trainer`'s own sampler draws its permutation from the global torch generator when its epoch starts iterating;
    a run resumed mid-epoch restores that generator only after it has skipped the epoch's first batches, so it
    trained the rest of the epoch in another order than the uninterrupted run did."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


# --------------------------------------------------------------------------------------------------------- labels
def _column(dataset, name: str) -> list:
    return list(dataset.with_format(None)[name]) if hasattr(dataset, "with_format") else list(dataset[name])


def _numbers(dataset, column: str, split: str) -> list[float]:
    """The labelled values of a per-turn regression column (None and "" are unlabelled), refusing (`TrainingError`
    naming the conversation and turn) a value that is not a number, e.g. a column of text."""
    values = []
    rows, columns = _column(dataset, column), getattr(dataset, "column_names", [])
    ids = _column(dataset, "conversation_id") if "conversation_id" in columns else range(len(rows))
    turns = _column(dataset, "turns") if "turns" in columns else [None] * len(rows)
    for row, conversation, numbers in zip(rows, ids, turns):
        for position, value in enumerate(row):
            if value is None or value == "":
                continue
            try:
                if isinstance(value, bool):
                    raise TypeError
                values.append(float(value))
            except (TypeError, ValueError):
                turn = numbers[position] if numbers else position
                raise TrainingError(f"The {split} split's {column!r} labels must be numbers (a regression target): "
                                    f"conversation {conversation!r}, turn {turn} holds {value!r}.") from None
    return values


def check_labels(dataset, split: str, label_names: list[str], head: str = "classification",
                 label_column: str = "labels", label_columns: list[str] | None = None,
                 training: bool = True) -> None:
    """Refuses (`TrainingError` naming `split` and its label counts) labels that cannot train or evaluate a model:
    no labelled utterance at all, and for training (`training=True`) a classifier's labels of a single class or ids
    outside `label_names`, or a regression dimension with fewer than two values, a constant one, or a non-finite
    value. Unlabelled utterances (`UNLABELLED`, -100; None or NaN for a regression) are context and do not count."""
    conversations = len(dataset)
    values = _head(head).target == "values"
    columns = (label_columns or []) if values else [label_column]
    missing = [c for c in columns if hasattr(dataset, "column_names") and c not in dataset.column_names]
    if missing:
        raise TrainingError(f"The {split} split has no label column {missing}; it has {dataset.column_names}.")
    if values:
        counts = {}
        for column in label_columns or []:
            values = np.array(_numbers(dataset, column, split), dtype=np.float64)
            if np.isinf(values).any():
                raise TrainingError(f"The {split} split's {column!r} labels hold an infinite value; only finite "
                                    "values (or empty / NaN for unlabelled) can train a regression.")
            counts[column] = values[~np.isnan(values)]
        numbers = ", ".join(f"{c} {len(v)}" for c, v in counts.items())
        if not any(len(v) for v in counts.values()):
            raise TrainingError(f"The {split} split has no labelled value in {conversations} conversations "
                                f"(labelled values per dimension: {numbers}): nothing to "
                                f"{'train' if training else 'evaluate'} on.")
        for column, values in counts.items() if training else ():
            if len(values) < 2 or values.std() == 0:
                raise TrainingError(
                    f"The {split} split's {column!r} labels cannot train a regression: "
                    + (f"{len(values)} labelled value" if len(values) < 2 else
                       f"all {len(values)} labelled values are {values[0]:g} (no variance)")
                    + f" (labelled values per dimension: {numbers}).")
        return
    ids = Counter(int(v) for row in _column(dataset, label_column) for v in row)
    unlabelled = ids.pop(UNLABELLED, 0) + ids.pop(-100, 0)
    labelled = sum(ids.values())
    outside = sorted(i for i in ids if not 0 <= i < len(label_names))
    if outside:
        raise TrainingError(f"The {split} split has label ids {outside[:5]} outside the model's {len(label_names)} "
                            f"labels {label_names}.")
    counts = ", ".join(f"{name} {ids.get(i, 0)}" for i, name in enumerate(label_names))
    described = (f"{labelled} labelled utterances ({counts}) and {unlabelled} unlabelled, in {conversations} "
                 "conversations")
    if labelled == 0:
        raise TrainingError(f"The {split} split has no labelled utterance ({described}): nothing to "
                            f"{'train' if training else 'evaluate'} on.")
    if training and len(ids) < 2:
        raise TrainingError(f"The {split} split has labels of one class only ({described}): a classifier trained on "
                            "it predicts that class everywhere (and scores 1.0 on data of that class). Give "
                            "utterances of at least two classes.")
    if training and len(ids) < len(label_names):
        missing = [name for i, name in enumerate(label_names) if i not in ids]
        logger.warning(f"The {split} split has no utterance of {missing} ({described}); the model will never learn "
                       "to predict them.")


# ------------------------------------------------------------------------------------------------------- trainer
class _RestoreLossTotals(TrainerCallback):
    """Hands `MisterETrainer` the moment (`on_train_begin`) right after `Trainer` reset its loss sums."""

    def __init__(self, trainer: "MisterETrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._restore_loss_totals()


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in `tensors` that hold a NaN or an infinity (one device sync)."""
    names = [name for name, t in tensors.items() if t is not None and t.is_floating_point() and t.numel()]
    if not names:
        return []
    finite = [torch.isfinite(tensors[name]).all().to(tensors[names[0]].device) for name in names]
    flags = torch.stack(finite)
    if bool(flags.all()):
        return []
    return [name for name, ok in zip(names, flags.tolist()) if not ok]


class FiniteTrainingMixin:
    """For a `Trainer` subclass: stops training with a `TrainingError` naming the step and epoch at the first
    non-finite loss (`compute_loss`, before its backward) or gradient (after the last backward of an optimizer step,
    before the optimizer uses it). `MisterETrainer` and the backbone fine-tuning's trainer both use it."""

    def _where(self, during_step: bool = True) -> str:
        """'training step 7 of 36 (epoch 3 of 12)': the step being computed, or (`during_step=False`) the last one
        done. `state.epoch` is the fraction of epochs done, so its whole part is the running epoch's index."""
        state = self.state
        epochs = f" of {math.ceil(state.num_train_epochs)}" if state.num_train_epochs else ""
        step = state.global_step + 1 if during_step else state.global_step
        return (f"{'' if during_step else 'after '}training step {step} of {state.max_steps} "
                f"(epoch {int(state.epoch or 0) + 1 if during_step else math.ceil(state.epoch or 0)}{epochs})")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss`; in training, a non-finite loss raises a `TrainingError`."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingError(
                f"Non-finite loss at {self._where()}: {loss.detach().float().mean().item():.4g}. Training stopped "
                "before this step's update; nothing was saved from this state. Look for NaN or infinite inputs or "
                "labels, or lower the learning rate.")
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last backward before the optimizer step
            self._check_gradients()
        return loss

    def _check_gradients(self) -> None:
        """Raises a `TrainingError` naming the parameters whose gradient holds a NaN or an infinity, with one fused
        norm over all gradients (one device sync). Skipped under a gradient scaler (fp16), which skips such steps
        itself."""
        if getattr(self.accelerator, "scaler", None) is not None:
            return
        if getattr(self, "_gradients", None) is None:
            self._gradients = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        named = [(n, p.grad) for n, p in self._gradients if p.grad is not None]
        if not named:
            return
        norms = torch._foreach_norm([g for _, g in named])
        try:
            finite = torch.isfinite(torch.stack(norms))
        except RuntimeError:  # gradients on several devices, or of several dtypes
            finite = torch.isfinite(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]))
        if bool(finite.all()):
            return
        bad = [(n, g) for (n, g), ok in zip(named, finite.tolist()) if not ok]
        details = ", ".join(
            f"{n} ({int((~torch.isfinite(g)).sum())} of {g.numel()} values non-finite)"
            if not torch.isfinite(g).all() else f"{n} (finite values, but their norm overflows)" for n, g in bad[:5])
        raise TrainingError(
            f"Non-finite gradient at {self._where()}: {details}"
            + (f" and {len(bad) - 5} more parameters" if len(bad) > 5 else "")
            + ". Training stopped before the optimizer used it; nothing was saved from this state. Look for NaN or "
            "infinite inputs, or lower the learning rate.")


# ------------------------------------------------------------------------------------------ training arguments
def _lower_is_better(metric: str) -> bool | None:
    """Whether a smaller value of `metric` (without `eval_`) is better: True for losses and errors, False for
    accuracies, F1 and CCC, None when neither (gate weights)."""
    if metric.endswith("loss") or metric.startswith("mae"):
        return True
    if metric.startswith("gate_"):
        return None
    return False


def training_argument_problems(args, compute_metrics=None, training: bool = True, data_collator=None,
                               loss_terms=LOSS_COMPONENTS) -> list[str]:
    """What makes `args` unusable by `MisterETrainer`, one phrase per problem (see `check_training_arguments`)."""
    problems = []

    def number(name, minimum, inclusive=True, integer=False, why=""):
        value = getattr(args, name, None)
        if value is None:
            return
        bad = (isinstance(value, float) and not math.isfinite(value)) or (
            value < minimum if inclusive else value <= minimum)
        if bad:
            limit = f">= {minimum}" if inclusive else f"> {minimum}"
            problems.append(f"{name} is {value} (it must be {limit}" + ("" if integer else " and finite") + f"){why}")

    if getattr(args, "label_smoothing_factor", 0.0):
        problems.append(f"label_smoothing_factor is {args.label_smoothing_factor}, but MiSTER-E computes its own "
                        "losses and Trainer's label smoother never runs (it would be silently ignored): leave it 0 "
                        "(the config's focal_gamma down-weights easy utterances instead)")
    if getattr(args, "eval_do_concat_batches", True) is False:
        problems.append("eval_do_concat_batches=False is not supported: metrics, plots and the non-finite check "
                        "need the whole split's predictions")
    if getattr(args, "batch_eval_metrics", False) and compute_metrics is not None:
        problems.append("batch_eval_metrics=True is not supported: metrics and the non-finite check need the whole "
                        "split's predictions")
    if getattr(args, "prediction_loss_only", False) and compute_metrics is not None:
        problems.append("prediction_loss_only=True would skip compute_metrics (no accuracy, F1, CCC or gate "
                        "weights, and metric_for_best_model would not exist): leave it False")
    if getattr(args, "label_names", None) not in (None, ["labels"]):
        problems.append(f"label_names={args.label_names} is not supported: the conversation collator always gives "
                        "the labels as `labels`")
    if getattr(args, "remove_unused_columns", False) and data_collator is not None and hasattr(
            data_collator, "label_columns"):
        problems.append("remove_unused_columns=True would drop the conversation columns (texts, audio, cached "
                        "embeddings) that DataCollatorForConversations reads: set it to False")
    if getattr(args, "neftune_noise_alpha", None) is not None:
        problems.append("neftune_noise_alpha is not supported: MiSTER-E has no single input-embedding layer to add "
                        "noise to")
    number("per_device_eval_batch_size", 1, integer=True)
    number("dataloader_num_workers", 0, integer=True)
    if not 0 <= getattr(args, "seed", 0) < 2**32:
        problems.append(f"seed is {args.seed} (it must be in [0, 2**32), as numpy's)")
    if training:
        number("per_device_train_batch_size", 1, integer=True)
        number("gradient_accumulation_steps", 1, integer=True)
        if getattr(args, "max_steps", -1) <= 0:
            number("num_train_epochs", 0, inclusive=False, why=": 0 epochs train nothing (or give max_steps > 0)")
        number("learning_rate", 0, inclusive=False)
        number("weight_decay", 0)
        number("warmup_steps", 0)
        number("max_grad_norm", 0)
        number("adam_epsilon", 0, inclusive=False)
    if training and getattr(args, "metric_for_best_model", None) and getattr(args, "eval_strategy", "no") != "no":
        metric = args.metric_for_best_model
        name = metric[len("eval_"):] if metric.startswith("eval_") else metric
        given = getattr(compute_metrics, "metric_names", None) if compute_metrics is not None else []
        if given is not None:
            available = ["loss", *loss_terms, *given]
            if name not in available:
                close = difflib.get_close_matches(name, available, n=1, cutoff=0.6) or difflib.get_close_matches(
                    name.lower(), available, n=1, cutoff=0.6)
                problems.append(f"metric_for_best_model {metric!r} is not a metric of this evaluation ("
                                + (f"did you mean {close[0]!r}? " if close else "")
                                + f"it gives: {', '.join(available)})")
        lower = _lower_is_better(name)
        if lower is not None and getattr(args, "greater_is_better", None) is lower:
            problems.append(f"greater_is_better is {args.greater_is_better} for metric_for_best_model {metric!r}, "
                            f"which is {'lower' if lower else 'higher'}-is-better: the worst model would be kept "
                            f"(set greater_is_better {not lower})")
    return problems


def check_training_arguments(args, compute_metrics=None, training: bool = True, data_collator=None,
                             loss_terms=LOSS_COMPONENTS) -> None:
    """Refuses, with one `TrainingError` listing every problem, `TrainingArguments` that `MisterETrainer` would
    silently ignore or cannot honour, and nonsense numbers, before any compute (`training_argument_problems`):

    - `label_smoothing_factor` (MiSTER-E computes its own losses; `Trainer`'s label smoother never runs: use the
      config's `focal_gamma`), `eval_do_concat_batches=False` and `batch_eval_metrics` (metrics and the non-finite
      check need whole-split predictions), `prediction_loss_only` with a `compute_metrics` (it would never run),
      `label_names` other than `["labels"]`, `remove_unused_columns` with the conversation collator (it would drop
      the columns the collator reads);
    - batch sizes and gradient accumulation below 1, and for training (`training=True`) no step to train
      (`num_train_epochs` <= 0 without `max_steps`), a learning rate that is not positive and finite, and non-finite
      or negative weight decay, warm-up, gradient clipping or Adam epsilon;
    - for training with evaluation, a `metric_for_best_model` that `compute_metrics` does not give (when it says
      what it gives: `build_compute_metrics` does, as `metric_names`) or whose `greater_is_better` points the wrong
      way (`mae_*` and losses are lower-is-better). A `compute_metrics` without `metric_names` is taken at its
      word: the metric's name is not checked."""
    problems = training_argument_problems(args, compute_metrics, training, data_collator, loss_terms)
    if problems:
        raise TrainingError("Training arguments that cannot work: " + "; ".join(problems) + ".")


class MisterETrainer(FiniteTrainingMixin, Trainer):
    """A `Trainer` for [`MisterEModel`].

    - `compute_loss` takes the model's total loss (its loss terms weighted by `config.loss_term_weights()`) and
      records every term the model returns (`outputs.losses`, a plug-in's own terms included), which `log` adds,
      averaged since the last log, to the training logs (`mixture_loss`, `supcon_loss`, ...) and `evaluation_loop`
      to the evaluation metrics (`eval_mixture_loss`).
    - `prediction_step` returns `(logits, gate_weights)` as predictions, so that `compute_metrics` and `predict` see
      the experts' weights beside the mixture; predictions come in the dataset's order.
    - Training arguments it would silently ignore (`label_smoothing_factor`, ...) or that cannot work (no step to
      train, a `metric_for_best_model` that evaluation does not give) are refused up front
      (`check_training_arguments`).
    - `train` refuses labels that cannot train (`check_labels`) before any compute, resumes from the newest complete
      checkpoint for `resume_from_checkpoint=True` (`find_resumable_checkpoint`) and refuses an incomplete one, or
      one made with other settings (`check_resume_settings`).
    - Training stops with a `TrainingError` naming the step, the epoch and the loss term or parameter at the first
      non-finite loss or gradient (before the optimizer uses it), and evaluation at the first non-finite metric or
      prediction; no model or checkpoint with a non-finite weight is ever saved.
    - A resumed run trains, logs and reports (`train_loss`: the mean over all the run's steps) exactly as the
      uninterrupted run does; results and state files are written atomically, as strict JSON.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args, self.compute_metrics, training=False, data_collator=self.data_collator,
                                 loss_terms=self._loss_terms())
        processor = getattr(self.data_collator, "processor", None) or self.processing_class
        if hasattr(self.model, "check_processor") and hasattr(processor, "modalities"):
            self.model.check_processor(processor)  # e.g. a processor without the model's tokenizer
        self._components = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._resume_totals = None
        self._loss_totals_restored = False
        self._whole_run_loss = None
        self._gradients = None
        self.add_callback(_RestoreLossTotals(self))

    def _loss_terms(self) -> list[str]:
        """The loss terms the model's head and fusion return (logged, and usable as `metric_for_best_model`)."""
        return list(getattr(self.model, "loss_weights", None) or LOSS_COMPONENTS)

    # ------------------------------------------------------------------------------------------------ train
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`, after

        - refusing training (and, when evaluation is scheduled, validation) labels that cannot train or evaluate;
        - refusing training arguments it would ignore or that cannot work (`check_training_arguments`);
        - resolving `resume_from_checkpoint=True` to the newest complete checkpoint of `output_dir` (moving
          incomplete ones aside), or refusing an incomplete checkpoint given by path, or one made with other model
          or training settings (`check_resume_settings`: resuming would mix them);
        - fitting the model's embedding standardisation (`config.standardize_embeddings`) on the training set's
          cached embeddings if it was never fitted (a resumed run then loads the same values)."""
        check_training_arguments(self.args, self.compute_metrics, training=True, data_collator=self.data_collator,
                                 loss_terms=self._loss_terms())
        self._check_datasets()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = find_resumable_checkpoint(self.args.output_dir, not self.args.save_only_model)
            if resume_from_checkpoint is None:
                raise TrainingError(f"No complete checkpoint in {self.args.output_dir} to resume from.")
        if resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint, not self.args.save_only_model)
            if problem:
                raise TrainingError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
            check_resume_settings(resume_from_checkpoint, self.model.config, self.args)
            logger.info(f"Resuming from {resume_from_checkpoint}")
        self._resume_totals = self._read_loss_totals(resume_from_checkpoint) if resume_from_checkpoint else None
        if not getattr(self.model, "embedding_statistics_fitted", True) and self.train_dataset is not None:
            counts = fit_embedding_statistics(self.model, self.train_dataset)
            logger.info(f"Embedding standardisation fitted on the training set: {counts}")
            self.embedding_statistics_digests = distributed.all_gather_objects(
                weights_digest(self.model.standardizers))
            if len(set(self.embedding_statistics_digests)) > 1:  # each process fits on the whole training split
                raise TrainingError("The embedding standardisation differs between processes (digests "
                                    f"{self.embedding_statistics_digests}): their training splits differ. Every "
                                    "process must load the same data (same corpus, arguments and cache).")
        try:
            return super().train(resume_from_checkpoint or None, *args, **kwargs)
        finally:
            self._resume_totals, self._gradients = None, None

    def _label_settings(self) -> tuple[list[str], str, str, list[str] | None] | None:
        config = getattr(self.model, "config", None)
        if config is None or not hasattr(config, "head"):
            return None
        label_column = getattr(self.data_collator, "label_column", "labels")
        label_columns = getattr(self.data_collator, "label_columns", None)
        if HEADS[config.head].target == "values" and not label_columns:
            return None  # a collator of the user's own: its label columns are unknown here
        names = [config.id2label[i] for i in range(config.num_labels)]
        return names, config.head, label_column, label_columns

    def _check_datasets(self) -> None:
        settings = self._label_settings()
        if settings is None:
            return
        names, head, label_column, label_columns = settings
        columns = label_columns if HEADS[head].target == "values" else [label_column]

        def check(dataset, split, training):
            if hasattr(dataset, "column_names") and all(c in dataset.column_names for c in columns):
                check_labels(dataset, split, names, head, label_column, label_columns, training=training)

        if self.train_dataset is not None:
            check(self.train_dataset, "training", True)
        if self.eval_dataset is not None and self.args.eval_strategy != "no":
            evaluated = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"validation": self.eval_dataset}
            for name, dataset in evaluated.items():
                check(dataset, name, False)

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batching (`group_by_length`) seeded by epoch, grouped by the *global* batch (per-device
        batch x processes): accelerate hands consecutive per-device batches of the one order to the processes, so
        1 process with batch 8 and 2 with batch 4 train on the same conversations at every step."""
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthGroupedSampler(sampler.batch_size * self.args.world_size, sampler.lengths, seed)
        return sampler

    def _get_eval_sampler(self, eval_dataset):
        """In the dataset's order (`Trainer` length-groups evaluation too when training does, which shuffles what
        `predict` returns against the dataset's rows)."""
        if eval_dataset is None or not has_length(eval_dataset):
            return None
        return SequentialSampler(eval_dataset)  # in several processes, accelerate shards it (gathered in order)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own total loss. The model averages over labelled utterances itself, so `num_items_in_batch`
        is not used (the Trainer divides by the gradient-accumulation steps, as for any model without loss kwargs).
        In training, a non-finite loss raises a `TrainingError` naming the step, the epoch and the loss terms.

        In several processes, training computes the loss of the global batch (`gather_loss`: every process's
        conversations), so that the result does not depend on how the batch is split between processes."""
        gather = model.training and self.args.world_size > 1
        outputs: MisterEOutput = model(**inputs, **({"gather_loss": True} if gather else {}))
        if outputs.loss is None:
            raise ValueError("The batch has no `labels`: MisterETrainer needs them to compute the loss.")
        bucket = self._components["train" if model.training else "eval"]
        terms = outputs.losses or {}
        for name, value in terms.items():  # whatever terms the head and the fusion return
            bucket[name].append(value.detach())
        if model.training and not bool(torch.isfinite(outputs.loss.detach())):
            bad = [name for name, value in terms.items() if not bool(torch.isfinite(value.detach()))]
            values = ", ".join(f"{name} {value.item():.4g}" for name, value in terms.items())
            raise TrainingError(
                f"Non-finite loss at {self._where()}: {', '.join(bad) or 'the weighted sum of the terms'} "
                f"{'is' if len(bad) < 2 else 'are'} not finite ({values}). Training stopped before this step's "
                "update; nothing was saved from this state. Look for NaN or infinite inputs or labels, or lower the "
                "learning rate.")
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    # ------------------------------------------------------------------------------------ whole-run loss sums
    def _loss_totals(self) -> dict:
        """What `Trainer` and this trainer keep about the losses between logs: the sum of the logged losses, the sum
        and the loss terms of the steps not logged yet, and the step of the last log."""
        return {"global_step": self.state.global_step, "num_processes": self.args.world_size,
                "logged_loss_sum": self._total_loss_scalar,
                "unlogged_loss_sum": self._tr_loss.item(), "last_logged_step": self._globalstep_last_logged,
                "unlogged_loss_terms": {name: [v.item() for v in values]
                                        for name, values in self._components["train"].items() if values}}

    @staticmethod
    def _read_loss_totals(checkpoint: str) -> dict | None:
        path = Path(checkpoint) / LOSS_TOTALS_NAME
        if not path.exists():
            logger.warning(f"{checkpoint} holds no {LOSS_TOTALS_NAME} (a checkpoint of another trainer): the "
                           "losses logged until the next log, and train_loss, cover only the steps after it.")
            return None
        return json.loads(path.read_text())

    def _restore_loss_totals(self) -> None:
        """Puts back, on resume, what `_loss_totals` saved in the checkpoint, so that the next log and `train_loss`
        are those of the uninterrupted run."""
        totals = self._resume_totals
        self._loss_totals_restored = False
        if totals is None or not hasattr(self, "_tr_loss"):
            return
        if totals["global_step"] != self.state.global_step:
            logger.warning(f"{LOSS_TOTALS_NAME} is of step {totals['global_step']}, the checkpoint of step "
                           f"{self.state.global_step}: not used.")
            return
        self._total_loss_scalar = totals["logged_loss_sum"]
        self._tr_loss = torch.tensor(totals["unlogged_loss_sum"], device=self.args.device)
        self._globalstep_last_logged = totals["last_logged_step"]
        self._components["train"] = defaultdict(list, {
            name: [torch.tensor(v, device=self.args.device) for v in values]
            for name, values in totals.get("unlogged_loss_terms", {}).items()})
        self._loss_totals_restored = True

    def _finalize_training(self, trial, num_train_samples, start_time):
        """`Trainer`'s, with `train_loss` the mean loss over all the run's steps (also those before a resume)."""
        self._whole_run_loss = None
        if self._initial_global_step == 0 or self._loss_totals_restored:
            self._whole_run_loss = (self._total_loss_scalar + self._tr_loss.item()) / max(self.state.global_step, 1)
        output = super()._finalize_training(trial, num_train_samples, start_time)
        if self._whole_run_loss is None:
            return output
        loss, self._whole_run_loss = self._whole_run_loss, None
        return TrainOutput(output.global_step, loss, output.metrics)

    def _pop_components(self, bucket: str, prefix: str = "") -> dict[str, float]:
        values = self._components[bucket]
        logs = {f"{prefix}{name}": round(torch.stack(v).float().mean().item(), 4) for name, v in values.items() if v}
        values.clear()
        return logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            logs.update(self._pop_components("train"))
        if "train_loss" in logs and self._whole_run_loss is not None:  # the final training metrics
            logs["train_loss"] = self._whole_run_loss
        super().log(logs, start_time)

    # --------------------------------------------------------------------------------------------- evaluation
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update(self._pop_components("eval", prefix=f"{metric_key_prefix}_"))
        bad = {k: v for k, v in output.metrics.items() if isinstance(v, float) and not math.isfinite(v)}
        if output.predictions is not None and output.label_ids is not None and len(output.predictions) == 2:
            head = getattr(self.model, "head", None) or HEADS["classification"]
            _, _, values, gates = flatten_predictions(output.predictions, output.label_ids, head)
            nan = np.isnan(values).any(axis=tuple(range(1, values.ndim))) | np.isnan(gates).any(axis=-1)
            if nan.any():
                bad[f"{metric_key_prefix} predictions"] = f"NaN for {int(nan.sum())} of {len(nan)} labelled utterances"
        if bad:
            when = f" {self._where(during_step=False)}" if self.is_in_train else ""
            raise TrainingError(f"{description} of the {metric_key_prefix} split{when} gave non-finite results: {bad}. "
                                "The model or the evaluation data holds NaN or infinite values; nothing was written "
                                "from them.")
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad():
            if labels is not None:
                loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach()
            else:
                loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        return loss, (outputs.logits.detach(), outputs.gate_weights.detach()), labels

    # ------------------------------------------------------------------------------------------------ saving
    def _refuse_non_finite_weights(self, state_dict: dict | None, what: str) -> None:
        tensors = state_dict if state_dict is not None else self.model.state_dict()
        bad = _non_finite(tensors)
        if bad:
            raise TrainingError(f"Refusing to save {what}: {len(bad)} weights hold NaN or infinite values ({bad[:5]}"
                                f"{' ...' if len(bad) > 5 else ''}).")

    def _save_checkpoint(self, model, trial):
        """`Trainer`'s checkpoint, refused if a weight is not finite, with the loss sums (`LOSS_TOTALS_NAME`) written
        before the trainer state (which `Trainer` writes last, and which marks a checkpoint complete)."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._refuse_non_finite_weights(None, f"{name} ({self._where(during_step=False)})")
        if self.args.should_save:
            atomic_write_json(Path(self._get_output_dir(trial)) / name / LOSS_TOTALS_NAME, self._loss_totals())
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict=None):
        """Saves like `Trainer` (the model's `save_pretrained` is atomic), refusing non-finite weights, with the
        training arguments as JSON (`training_args.json`, atomic) instead of a pickle."""
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        self._refuse_non_finite_weights(state_dict, f"the model to {output_dir}")
        super()._save(str(output_dir), state_dict)
        if self.args.should_save:
            (output_dir / TRAINING_ARGS_NAME).unlink(missing_ok=True)
            atomic_write_text(output_dir / "training_args.json", self.args.to_json_string() + "\n")

    def save_metrics(self, split, metrics, combined=True):
        """`<split>_results.json` (and `all_results.json` updated), each written atomically as strict JSON: a
        non-finite metric is refused, not written as `NaN`."""
        if not self.is_world_process_zero():
            return
        output_dir = Path(self.args.output_dir)
        atomic_write_json(output_dir / f"{split}_results.json", metrics, indent=4, sort_keys=True)
        if combined:
            path = output_dir / "all_results.json"
            combined_metrics = {}
            if path.exists():
                try:
                    combined_metrics = json.loads(path.read_text())
                except ValueError:
                    logger.warning(f"{path} did not parse (a file torn by an earlier kill?); it is rewritten.")
            combined_metrics.update(metrics)
            atomic_write_json(path, combined_metrics, indent=4, sort_keys=True)

    def save_state(self):
        """`trainer_state.json`, atomically and as strict JSON."""
        if self.is_world_process_zero():
            atomic_write_text(Path(self.args.output_dir) / TRAINER_STATE_NAME,
                              strict_json(dataclasses.asdict(self.state), indent=2, sort_keys=True) + "\n")


def _head(head):
    """A head class from its registered name (or the class, or an instance, as given)."""
    return HEADS[head] if isinstance(head, str) else head


def flatten_predictions(predictions, label_ids, head="classification"):
    """The head's `flatten`: `(logits, gates)` predictions and label ids -> per labelled utterance: predicted labels
    or values, true ones, scores (class probabilities or values) and gate weights."""
    return _head(head).flatten(predictions, label_ids)


def build_compute_metrics(label_names: list[str], expert_names: list[str], metric=None, head="classification"):
    """`compute_metrics` for the Trainer: the head's metrics (for classification the ERC metrics: accuracy,
    weighted/macro F1, per-class F1; for regression CCC and MAE per dimension and `ccc_mean`) and the mean gate weight
    of each expert over the labelled utterances (`gate_<expert>`). The function's `metric_names` lists them (without
    `eval_`), for `check_training_arguments` to check `metric_for_best_model` against before training. `metric`: an
    already loaded metric module to use instead of the head's (classification)."""
    head = _head(head)

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predicted, true, _, gates = head.flatten(eval_prediction.predictions, eval_prediction.label_ids)
        if metric is not None:
            results = metric.compute(predictions=predicted, references=true, label_names=label_names)
        else:
            results = head.metrics(predicted, true, label_names)
        results.pop("confusion_matrix", None)  # a matrix is not a loggable scalar; evaluation saves it separately
        results.update({f"gate_{name}": float(w) for name, w in zip(expert_names, gates.mean(0))})
        return results

    compute_metrics.metric_names = head.metric_names(label_names) + [f"gate_{name}" for name in expert_names]
    return compute_metrics


__all__ = ["MisterETrainer", "FiniteTrainingMixin", "build_compute_metrics", "flatten_predictions", "check_labels",
           "check_training_arguments", "training_argument_problems",
           "EpochSeededLengthGroupedSampler", "LOSS_COMPONENTS", "LOSS_TOTALS_NAME"]
