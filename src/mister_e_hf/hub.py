"""Sharing on the Hugging Face Hub: one commit holding the model, processor, code, card and results.

`files_to_upload` is exactly what `push_to_hub` sends, so that the folder a user would download can be checked
offline (`export_for_upload`): training checkpoints, TensorBoard runs, logs, pickled training state, hidden files,
secrets (`*.env`) and temporary files stay local. Each of them takes a model folder (`config.json` and the
safetensors weights, as `save_pretrained` or `run_erc.py` writes it); anything else is a `MisterEError`.
"""

import shutil
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from .atomic import atomic_output
from .errors import MisterEError


UPLOAD_IGNORE = [
    "checkpoint-*", "*/checkpoint-*", "incomplete-checkpoint-*", "*/incomplete-checkpoint-*",  # at any depth
    "runs/*", "*/runs/*", "events.out.tfevents.*", "*/events.out.tfevents.*", "wandb/*",  # TensorBoard, W&B logs
    ".*", "*/.*",  # hidden files and folders (.git, .env, an interrupted atomic write's temporary file)
    "*.env", "*.tmp", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.pyc",
    "finetuning-*/*", "__pycache__/*", "*/__pycache__/*",
]
"""What never goes to the Hub from a run folder (globs on the relative path, `*` crossing folders): checkpoints at
any depth (also those moved aside as incomplete), TensorBoard runs and event files, W&B logs, hidden files and folders,
secrets (`*.env`), temporary files, pickles, fine-tuning runs and bytecode."""

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
"""The weights of a model folder: one file, or the index of a sharded save."""


def require_model_folder(folder: str | Path) -> Path:
    """`folder` if it holds a saved model (`config.json` and `model.safetensors` or its sharded index), else a
    `MisterEError` saying what it is instead."""
    folder = Path(folder)
    if not folder.exists():
        raise MisterEError(f"{folder} not found: give the folder of a saved model (config.json, model.safetensors).")
    if not folder.is_dir():
        raise MisterEError(f"{folder} is a file: give the folder of a saved model (config.json, model.safetensors).")
    missing = [name for name in ("config.json",) if not (folder / name).is_file()]
    missing += [] if any((folder / name).is_file() for name in WEIGHTS) else ["model.safetensors"]
    if missing:
        held = sorted(p.name for p in folder.iterdir())
        what = "it is empty" if not held else f"it holds {held[:8]}{' ...' if len(held) > 8 else ''}"
        raise MisterEError(f"{folder} is not a saved model: it lacks {' and '.join(missing)} ({what}); give the "
                           "folder that save_pretrained or run_erc.py wrote.")
    return folder


def files_to_upload(folder: str | Path) -> list[str]:
    """The files of model folder `folder` (relative paths, sorted) that `push_to_hub` uploads."""
    folder = require_model_folder(folder)
    paths = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE))


def export_for_upload(folder: str | Path, destination: str | Path) -> list[str]:
    """Copies what `push_to_hub` would upload from model folder `folder` into `destination` (to test the exact
    repository offline), which cannot be `folder` or inside it; each file is copied to a temporary name and moved
    into place, so an interrupted export leaves no half-copied file."""
    names = files_to_upload(folder)
    source, target = Path(folder).resolve(), Path(destination).resolve()
    if target == source or source in target.parents:
        raise MisterEError(f"Export {folder} into a folder outside it, not {destination}: the copy would be "
                           "uploaded with the model.")
    for name in names:
        with atomic_output(Path(destination) / name) as temporary:
            shutil.copyfile(Path(folder) / name, temporary)
    return names


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload MiSTER-E model, processor, code and card"):
    """Creates `repo_id` if needed and uploads `files_to_upload(folder)` in a single commit."""
    require_model_folder(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=UPLOAD_IGNORE,
                             commit_message=commit_message)


__all__ = ["files_to_upload", "export_for_upload", "push_to_hub", "require_model_folder", "UPLOAD_IGNORE"]
