"""Prompt sets: loading from local files, stable ids, train/eval splits, the P x N sample layout.

A prompt's **id** is its 0-based row index in the file after blank rows (empty or whitespace-only text) are
dropped; ``prompts.limit`` keeps the first ids, so ids do not change with the limit. Ids are as stable as the
file: editing or reordering rows renumbers prompts. Every prompt also carries ``hash``, the first 12 hex digits
of the sha1 of its UTF-8 text (:func:`prompt_hash`), which frontier stores and evaluations keep so that a
changed file is detected rather than silently mismatched.

Formats: ``.txt`` (one prompt per line), ``.csv``, ``.jsonl`` and ``.parquet`` (text in the column
``prompts.column``), and ``builtin:demo`` for the prompts shipped in ``pgot/data/demo_prompts.txt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgot.config import PromptsConfig

__all__ = ["BUILTIN", "PromptSet", "expand", "load_prompts", "prompt_hash", "split"]

logger = logging.getLogger(__name__)

BUILTIN = {"builtin:demo": "demo_prompts.txt"}
"""Names usable as ``prompts.path`` -> file in ``pgot/data``."""

_FORMATS = (".txt", ".csv", ".jsonl", ".parquet")


def prompt_hash(text: str) -> str:
    """First 12 hex digits of sha1(text as UTF-8): a check that a stored id still names the same prompt."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


@dataclass
class PromptSet:
    """Prompts with their stable ids.

    Attributes:
        prompts: prompt texts.
        ids: stable ids (row index after blank rows are dropped), same length.
        hashes: :func:`prompt_hash` of each prompt.
        source: where they came from (file path or builtin name).
    """

    prompts: list[str]
    ids: list[int]
    hashes: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.ids):
            raise ValueError(f"PromptSet has {len(self.prompts)} prompts but {len(self.ids)} ids.")
        if not self.hashes:
            self.hashes = [prompt_hash(p) for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, positions: list[int]) -> PromptSet:
        """The prompts at list positions ``positions`` (not ids), in that order."""
        return PromptSet(
            [self.prompts[i] for i in positions],
            [self.ids[i] for i in positions],
            [self.hashes[i] for i in positions],
            self.source,
        )

    def by_id(self) -> dict[int, str]:
        """id -> prompt text."""
        return dict(zip(self.ids, self.prompts, strict=True))


class _PromptFileError(ValueError):
    """A problem pgot diagnosed itself (passed on as is; other reader errors are wrapped)."""


def _read_rows(path: Path, column: str) -> list[str | None]:
    """Raw prompt cells of a file, in file order (None for missing cells)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    if suffix == ".jsonl":
        rows: list[str | None] = []
        keys: set[str] = set()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _PromptFileError(f"prompts.path={str(path)!r}: line {n} is not valid JSON ({exc.msg}).") from None
            if not isinstance(obj, dict):
                raise _PromptFileError(f"prompts.path={str(path)!r}: line {n} is not a JSON object.")
            keys.update(obj)
            rows.append(obj.get(column))
        if rows and column not in keys:
            raise _PromptFileError(
                f"prompts.path={str(path)!r} has no field {column!r} (fields: {', '.join(sorted(keys))}). "
                f"Set prompts.column to the field that holds the prompt text."
            )
        return rows
    import pandas as pd

    df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    if column not in df.columns:
        raise _PromptFileError(
            f"prompts.path={str(path)!r} has no column {column!r} (columns: {', '.join(map(str, df.columns))}). "
            f"Set prompts.column to the column that holds the prompt text."
        )
    return [None if (isinstance(v, float) and math.isnan(v)) or v is None else str(v) for v in df[column].tolist()]


def load_prompts(cfg: PromptsConfig) -> PromptSet:
    """Read the prompt set named by ``prompts.path`` (blank rows dropped, ids assigned, ``prompts.limit`` applied).

    Raises:
        ValueError: missing, empty or unreadable file, unknown format, or missing column (the message lists
            the columns there are).
    """
    name = cfg.path.strip()
    if name.startswith("builtin:"):
        if name not in BUILTIN:
            raise ValueError(f"prompts.path={name!r} is not a builtin prompt set; builtins: {', '.join(BUILTIN)}.")
        res = resources.files("pgot") / "data" / BUILTIN[name]
        with resources.as_file(res) as p:
            rows = Path(p).read_text(encoding="utf-8").splitlines()
        source = name
    else:
        if not name:
            raise ValueError("prompts.path is empty. Set it to a .txt/.csv/.jsonl/.parquet file or builtin:demo.")
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(
                f"prompts.path={name!r} does not exist or is not a file. Give a prompt file or builtin:demo."
            )
        if path.suffix.lower() not in _FORMATS:
            raise ValueError(
                f"prompts.path={name!r} has an unknown format {path.suffix!r}; use one of {', '.join(_FORMATS)}."
            )
        try:
            rows = _read_rows(path, cfg.column)
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompts.path={name!r} could not be read as UTF-8 text: {exc}") from None
        except _PromptFileError:
            raise
        except Exception as exc:  # pandas / pyarrow / decoding errors all mean the same to the user
            raise ValueError(
                f"prompts.path={name!r} could not be read as {path.suffix}: {type(exc).__name__}: {exc}"
            ) from None
        source = str(path)
    prompts = [r.strip() for r in rows if r is not None and str(r).strip()]
    if not prompts:
        raise ValueError(f"prompts.path={name!r} holds no prompts (every row is blank).")
    if cfg.limit < 0:
        raise ValueError(f"prompts.limit must be >= 0, got {cfg.limit}.")
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    return PromptSet(prompts, list(range(len(prompts))), source=source)


def _rank_key(seed: int, prompt_id: int) -> bytes:
    return hashlib.blake2b(struct.pack("<qq", int(seed), int(prompt_id)), digest_size=8).digest()


def split(prompt_set: PromptSet, eval_fraction: float, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """Deterministic train / eval split.

    Prompts are ranked by ``blake2b(seed, id)``; the first ``round(eval_fraction * P)`` (at least one when
    ``eval_fraction > 0``) form the eval split. A prompt's side depends only on ``(seed, id)`` and the set size,
    not on Python's or numpy's random generators. Both splits keep file order.

    Args:
        prompt_set: the prompts.
        eval_fraction: in [0, 1) (``prompts.eval_fraction``).
        seed: ``prompts.split_seed``.

    Returns:
        (train, eval); eval is empty when ``eval_fraction == 0``.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"prompts.eval_fraction must be in [0, 1), got {eval_fraction}.")
    n = len(prompt_set)
    n_eval = 0 if eval_fraction == 0 else max(1, round(eval_fraction * n))
    if n_eval >= n and n_eval > 0:
        raise ValueError(
            f"prompts.eval_fraction={eval_fraction} leaves no training prompts out of {n}. "
            "Lower prompts.eval_fraction or use more prompts (prompts.limit)."
        )
    order = sorted(range(n), key=lambda i: _rank_key(seed, prompt_set.ids[i]))
    eval_pos = set(order[:n_eval])
    train = prompt_set.subset([i for i in range(n) if i not in eval_pos])
    ev = prompt_set.subset([i for i in range(n) if i in eval_pos])
    return train, ev


def expand(prompt_set: PromptSet, samples_per_prompt: int, start: int = 0) -> tuple[list[str], list[int], list[int]]:
    """The ``B = P * N`` layout: each prompt repeated N times in a row with sample indices ``start .. start+N-1``.

    Returns:
        (prompts (B,), prompt_ids (B,), sample_indices (B,)), ready for ``pgot.generate.generate``.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {samples_per_prompt}.")
    prompts, ids, idx = [], [], []
    for p, i in zip(prompt_set.prompts, prompt_set.ids, strict=True):
        for s in range(start, start + samples_per_prompt):
            prompts.append(p)
            ids.append(i)
            idx.append(s)
    return prompts, ids, idx
