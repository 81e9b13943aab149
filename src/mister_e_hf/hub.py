"""Sharing on the Hugging Face Hub: one commit holding the model, processor, code, card and results.

`files_to_upload` is exactly what `push_to_hub` sends, so that the folder a user would download can be checked
offline (`export_for_upload`): training checkpoints, TensorBoard runs and pickled training state stay local.
"""

import shutil
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from .atomic import atomic_output


UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/*", "incomplete-checkpoint-*", "incomplete-checkpoint-*/*", "runs/*",
                 "*.bin", "*.pt", "*.pth", "*.pkl", ".*", "*/.*", "finetuning-*/*", "__pycache__/*"]
"""What never goes to the Hub from a run folder: checkpoints (also those moved aside as incomplete), TensorBoard runs,
pickles, hidden and temporary files (an interrupted atomic write's), fine-tuning runs."""


def files_to_upload(folder: str | Path) -> list[str]:
    """The files of `folder` (relative paths) that `push_to_hub` uploads."""
    folder = Path(folder)
    paths = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE))


def export_for_upload(folder: str | Path, destination: str | Path) -> list[str]:
    """Copies what `push_to_hub` would upload into `destination` (to test the exact repository offline); each file
    is copied to a temporary name and moved into place, so an interrupted export leaves no half-copied file."""
    names = files_to_upload(folder)
    for name in names:
        with atomic_output(Path(destination) / name) as temporary:
            shutil.copyfile(Path(folder) / name, temporary)
    return names


def push_to_hub(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload MiSTER-E model, processor, code and card"):
    """Creates `repo_id` if needed and uploads `files_to_upload(folder)` in a single commit."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, exist_ok=True, private=private).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=UPLOAD_IGNORE,
                             commit_message=commit_message)


__all__ = ["files_to_upload", "export_for_upload", "push_to_hub", "UPLOAD_IGNORE"]
