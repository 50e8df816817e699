"""Safe file operations shared by the stage runners: atomic writes, and :func:`source_hash`, the identity of what
produced a set of rows (cached evaluation scores, study pages).

Every file pgot writes that another process or a later run reads (store shards and ``meta.json``,
``scores.parquet``, ``trainer_state.json``, PNGs, agent records) is written to a temporary file in the
same folder and renamed over the target with ``os.replace``, which POSIX makes atomic: a reader sees
the old file or the new one, never a half-written one, and a process killed mid-write leaves at most
a ``.<name>.<pid>.tmp`` file behind (:func:`remove_temporaries` clears them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_parquet",
    "atomic_write_text",
    "remove_temporaries",
    "source_hash",
    "temporary_name",
]


def temporary_name(path: str | Path) -> Path:
    """The temporary sibling ``.<name>.<pid>.tmp`` that :func:`atomic_write` writes before renaming."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary sibling, which then replaces ``path``.

    Args:
        path: the target file; its folder is created when missing.
        write: called with the temporary path; must create that file.
        fsync: flush the temporary file to disk before the rename (survives a power cut, not only a kill).

    Returns:
        ``path``.

    Raises:
        OSError: the folder cannot be created or written; the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (with a trailing newline) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_parquet(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame as parquet (no index) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def remove_temporaries(*folders: str | Path) -> int:
    """Delete the ``.*.tmp`` files a killed writer left in ``folders`` (not recursive); returns how many."""
    n = 0
    for folder in map(Path, folders):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
    return n


def source_hash(obj: Any) -> str:
    """A 16-hex-digit hash of a JSON-able object (keys sorted; other objects by ``str``): what produced a set of rows."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
