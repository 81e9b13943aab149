"""Checkpoints a run can resume from: what makes one complete, and finding the newest complete one.

`Trainer` writes a checkpoint folder file by file (weights, optimizer, scheduler, random states, and the trainer state
last), so a kill while it writes leaves a folder that lacks some of them, and every later run that trusts it fails.
`find_resumable_checkpoint` picks the newest complete checkpoint instead and moves each incomplete one aside to
`incomplete-checkpoint-<step>`: never deleted (the user may want to look), and out of reach of `Trainer`'s checkpoint
rotation, which deletes every folder named `checkpoint-*`.
"""

import json
import os
import zipfile
from pathlib import Path

from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging


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


__all__ = ["checkpoint_problem", "find_resumable_checkpoint", "move_aside", "INCOMPLETE_PREFIX"]
