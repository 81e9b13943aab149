"""Checkpoints a run can resume from: what makes one complete, finding the newest complete one, and refusing one
made with other settings.

`Trainer` writes a checkpoint folder file by file (weights, optimizer, scheduler, random states, and the trainer state
last), so a kill while it writes leaves a folder that lacks some of them, and every later run that trusts it fails.
`find_resumable_checkpoint` picks the newest complete checkpoint instead and moves each incomplete one aside to
`incomplete-checkpoint-<step>`: never deleted (the user may want to look), and out of reach of `Trainer`'s checkpoint
rotation, which deletes every folder named `checkpoint-*`.

`check_resume_settings` compares a checkpoint's `config.json` and `training_args.json` with the run about to resume
from it: resuming with other settings would continue the old optimizer and schedule under the new ones (or fail on a
weight shape) and record settings that never trained the model.
"""

import json
import os
import zipfile
from pathlib import Path

from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .errors import TrainingError


logger = logging.get_logger(__name__)

INCOMPLETE_PREFIX = "incomplete-"
"""Name prefix of a checkpoint folder moved aside because it is incomplete (a kill while it was written). It must not
start with `checkpoint-`: `Trainer` rotates (deletes) every folder that does."""


def _weights_problem(folder: Path) -> str | None:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as error:
            return f"its weights index {index.name} does not parse ({error})"
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        return "it holds no model weights (model.safetensors)"
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(str(folder / shard), "pt") as f:  # reads the header; fails on a truncated file
                f.keys()
        except Exception as error:  # noqa: BLE001 - any unreadable shard makes the checkpoint unusable
            return f"its weights {shard} do not load ({str(error).splitlines()[0]})"
    return None


def checkpoint_problem(folder: str | os.PathLike, need_optimizer: bool = True) -> str | None:
    """What makes `folder` unusable to resume from, or None if it is complete: its `trainer_state.json` parses (and
    names the step in the folder's name), its weights load, and (`need_optimizer`) the optimizer, scheduler and
    random states are there. `Trainer` writes the trainer state last, so a checkpoint killed while being written
    lacks it or more."""
    folder = Path(folder)
    if not folder.is_dir():
        return "it is not a folder"
    state = folder / TRAINER_STATE_NAME
    if not state.exists():
        return f"it has no {TRAINER_STATE_NAME}"
    try:
        global_step = json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, UnicodeDecodeError) as error:
        return f"its {TRAINER_STATE_NAME} does not parse ({error})"
    step = folder.name.rsplit("-", 1)[-1]
    if step.isdigit() and int(step) != global_step:
        return f"its {TRAINER_STATE_NAME} is of step {global_step}, not {step}"
    problem = _weights_problem(folder)
    if problem:
        return problem
    if need_optimizer:
        for name in (OPTIMIZER_NAME, SCHEDULER_NAME):
            if not (folder / name).exists():
                return f"it has no {name}"
        if not any(folder.glob("rng_state*.pth")):
            return "it has no rng_state.pth"
        if not zipfile.is_zipfile(folder / OPTIMIZER_NAME):  # torch.save writes a zip; a torn one has no directory
            return f"its {OPTIMIZER_NAME} is truncated"
    return None


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and name[len(PREFIX_CHECKPOINT_DIR) + 1:].isdigit():
        return int(name[len(PREFIX_CHECKPOINT_DIR) + 1:])
    return None


def move_aside(folder: Path) -> Path:
    """Renames `folder` to `incomplete-<name>` (with a number if taken) beside it; nothing is deleted."""
    target = folder.with_name(INCOMPLETE_PREFIX + folder.name)
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{INCOMPLETE_PREFIX}{folder.name}.{n}")
    folder.rename(target)
    return target


def find_resumable_checkpoint(output_dir: str | os.PathLike, need_optimizer: bool = True) -> str | None:
    """The newest complete `checkpoint-<step>` folder of `output_dir` (see `checkpoint_problem`), or None.

    Every incomplete one is moved aside to `incomplete-checkpoint-<step>` (never deleted), with a warning saying
    what it lacks, so that neither this run nor `Trainer`'s checkpoint rotation trusts it."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = sorted((p for p in output_dir.iterdir() if p.is_dir() and _checkpoint_step(p) is not None),
                        key=_checkpoint_step, reverse=True)
    found = None
    for folder in candidates:
        problem = checkpoint_problem(folder, need_optimizer)
        if problem is None:
            found = found or str(folder)
            continue
        moved = move_aside(folder)
        logger.warning(f"Checkpoint {folder.name} is incomplete ({problem}): a kill while it was written (or "
                       f"deleted by checkpoint rotation) left it so. Moved aside to {moved.name}.")
    return found


# ------------------------------------------------------------------------------------------ settings on resume
RESULT_ARGUMENTS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "weight_decay", "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "seed", "data_seed", "optim",
    "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "label_smoothing_factor",
    "train_sampling_strategy", "length_column_name", "dataloader_drop_last", "eval_strategy", "eval_steps",
    "save_strategy", "save_steps", "metric_for_best_model", "greater_is_better", "load_best_model_at_end",
    "early_stopping_patience", "bf16", "fp16",
)
"""The training arguments that change what a run computes. A resumed run restores the optimizer, the scheduler and
the trainer state of its checkpoint, which all follow the settings the checkpoint was made with."""

IGNORED_CONFIG_KEYS = frozenset({
    "transformers_version", "_name_or_path", "auto_map", "architectures", "dtype", "torch_dtype", "label2id",
    # Trainer aligns the token ids with the tokenizer and turns the cache off when it starts; no effect on MiSTER-E
    "pad_token_id", "bos_token_id", "eos_token_id", "use_cache",
})
"""Model settings that do not change the model: labels of where things came from, and bookkeeping. Also every
`*_name_or_path` (a backbone's path: the same weights may sit in another folder)."""

TRAINING_ARGS_FILE = "training_args.json"

LOSS_TOTALS_NAME = "loss_totals.json"
"""In each checkpoint (written by `MisterETrainer`): the sums of the training losses so far, so that a resumed run
logs and reports the whole run, and the number of processes that trained it."""


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if key in IGNORED_CONFIG_KEYS or key.endswith("_name_or_path"):
            continue
        if isinstance(value, dict) and key not in ("id2label",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _normalised(settings: dict) -> dict:
    """JSON's view of `settings` (int keys become strings, tuples lists), as a checkpoint's files hold them."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def _differences(old: dict, new: dict, keys=None) -> list[str]:
    """`"key old → new"` for each of `keys` (default: all) whose value differs between `old` and `new`."""
    def shown(settings, key):
        return json.dumps(settings[key]) if key in settings else "(absent)"

    keys = keys if keys is not None else sorted(set(old) | set(new))
    return [f"{key} {shown(old, key)} → {shown(new, key)}" for key in keys
            if (key in old) != (key in new) or (key in old and old[key] != new[key])]


def resume_settings_differences(checkpoint: str | os.PathLike, config=None, args=None) -> list[str]:
    """What differs between the settings `checkpoint` was made with and this run's, as `"name old → new"`: the model
    config (`config.json` against `config`, a `PreTrainedConfig`; see `IGNORED_CONFIG_KEYS`) and the training
    arguments that change the result (`training_args.json` against `args`, a `TrainingArguments`; see
    `RESULT_ARGUMENTS`). A file the checkpoint lacks is not compared (a warning says so)."""
    checkpoint = Path(checkpoint)
    differences = []
    if config is not None:
        path = checkpoint / "config.json"
        if not path.exists():
            logger.warning(f"{checkpoint} holds no config.json: its model settings cannot be compared with this run's.")
        else:
            try:
                saved = type(config).from_json_file(str(path)).to_dict()
            except Exception as error:  # noqa: BLE001 - any unreadable config makes the checkpoint unusable
                raise TrainingError(f"Cannot resume from {checkpoint}: its config.json does not load "
                                    f"({str(error).splitlines()[0]}).") from None
            differences += _differences(_flatten(_normalised(saved)), _flatten(_normalised(config.to_dict())))
    if args is not None:
        path = checkpoint / TRAINING_ARGS_FILE
        if not path.exists():
            logger.warning(f"{checkpoint} holds no {TRAINING_ARGS_FILE}: its training arguments cannot be compared "
                           "with this run's.")
        else:
            try:
                saved = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as error:
                raise TrainingError(f"Cannot resume from {checkpoint}: its {TRAINING_ARGS_FILE} does not parse "
                                    f"({error}).") from None
            current = _normalised(json.loads(args.to_json_string()))
            keys = [k for k in RESULT_ARGUMENTS if k in saved and k in current]
            differences += _differences(saved, current, keys)
        try:  # the global batch is per-device batch x processes: another count trains on other batches
            processes = json.loads((checkpoint / LOSS_TOTALS_NAME).read_text()).get("num_processes")
        except (OSError, ValueError, AttributeError):
            processes = None
        if processes is not None and processes != args.world_size:
            differences.append(f"number of processes {processes} → {args.world_size} (resume in {processes})")
    return differences


def check_resume_settings(checkpoint: str | os.PathLike, config=None, args=None) -> None:
    """Refuses (`TrainingError`, naming each difference as `name old → new`) to resume from `checkpoint` with model
    or training settings other than those it was made with: the restored weights, optimizer, scheduler and state
    would continue the old run under the new settings (or fail on a shape), and the saved model, results and card
    would record settings that never trained it."""
    differences = resume_settings_differences(checkpoint, config, args)
    if differences:
        checkpoint = Path(checkpoint)
        raise TrainingError(
            f"{checkpoint} was made with other settings than this run's, so resuming from it would mix them: "
            f"{'; '.join(differences)}. Give a new output_dir to train with the new settings (or move the "
            f"checkpoint-* folders of {checkpoint.parent} away to start over there), or rerun with the old settings "
            "to resume.")


__all__ = ["checkpoint_problem", "find_resumable_checkpoint", "move_aside", "check_resume_settings",
           "resume_settings_differences", "INCOMPLETE_PREFIX", "LOSS_TOTALS_NAME", "RESULT_ARGUMENTS"]
