"""Writes that a kill cannot leave half done: every file the toolkit writes for a user (models, processors, cards,
results, plots, reports, predictions) is written under a temporary name beside its destination and moved into place
with `os.replace` (atomic on POSIX), so a reader sees the old file or the new one, never a torn one.

JSON is written strictly (`allow_nan=False`): NaN and infinity are not JSON, and a result holding them is refused
instead of written.
"""

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike):
    """Yields a temporary path beside `path` (same suffix, so writers that look at it choose the same format); it
    replaces `path` only if the block succeeds, and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give what a plain open() would
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_output(path) as temporary:
        with open(temporary, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def strict_json(value, **kwargs) -> str:
    """`json.dumps` that refuses NaN and infinity (they are not JSON) with an error naming the first such key."""
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:
        raise ValueError(f"Refusing to write non-finite numbers as JSON: {_non_finite_keys(value)[:5]}") from None


def _non_finite_keys(value, prefix: str = "") -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [prefix or "<value>"]
    if isinstance(value, dict):
        return [k for key, item in value.items() for k in _non_finite_keys(item, f"{prefix}.{key}".lstrip("."))]
    if isinstance(value, (list, tuple)):
        return [k for i, item in enumerate(value) for k in _non_finite_keys(item, f"{prefix}[{i}]")]
    return []


def atomic_write_json(path: str | os.PathLike, value, indent: int | None = 2, **kwargs) -> None:
    """Strict JSON (see `strict_json`), written atomically, with a final newline."""
    atomic_write_text(path, strict_json(value, indent=indent, **kwargs) + "\n")


@contextmanager
def atomic_directory_update(directory: str | os.PathLike, last: tuple[str, ...] = ("config.json",),
                            replaces: tuple[str, ...] = ()):
    """Yields a temporary folder beside `directory`; what the block writes there is moved into `directory` file by
    file with `os.replace` once the block succeeds (the names in `last` after the others, so a folder whose config
    is new has its new weights too). Files of `directory` matching a glob of `replaces` that the new save does not
    hold are then removed (e.g. the shards of an earlier, differently sharded save). On failure the temporary folder
    is removed and `directory` is unchanged."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.saving-"))
    try:
        yield staging
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
        mode = 0o666 & ~_umask()
        for source in files:
            target = directory / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(source, mode)
            os.replace(source, target)
        written = {source.relative_to(staging) for source in files}
        for pattern in replaces:
            for stale in directory.glob(pattern):
                if stale.is_file() and stale.relative_to(directory) not in written:
                    stale.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["atomic_output", "atomic_write_text", "atomic_write_json", "atomic_directory_update", "strict_json"]
