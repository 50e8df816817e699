"""The precomputed Pareto-frontier store: write shards, merge them, load, look up fronts by prompt.

A store is a folder::

    <store>/
      meta.json              schema version, rewards, model fingerprint, sampler settings, N, seed, stats
      samples.parquet        one row per base-model sample (written by the merge)
      shards/                shard-<rank>-<n>.parquet, written during precompute, removed by the merge
      images/<prompt_id>/<sample_index>.png   (optional)
      .pgot.lock, .pgot.lock.json             the folder lock of the precompute writing it (pgot.files)

``samples.parquet`` has the columns ``prompt_id`` (int64), ``prompt`` (str), ``seed`` (int64),
``sample_index`` (int64), one float32 column per reward (named after the reward, in config order)
and ``on_frontier`` (bool), sorted by ``(prompt_id, sample_index)``. Each prompt has exactly N rows,
and ``on_frontier`` marks the non-dominated rows among its N (maximisation: :mod:`pgot.pareto`).
It is readable with ``pandas.read_parquet``.

Every file is written atomically (a temporary file, then ``os.replace``), so a killed precompute
leaves only whole shards behind and a rerun skips the samples they hold. A shard holds the sample rows of one
batch (its ``on_frontier`` is False: fronts need all N samples of a prompt); the merge marks each prompt's front
among its N samples. ``meta.json`` is written just before the first shard (:mod:`pgot.precompute`), so a store
whose ``meta.json`` has no sample next to it is the trace of a precompute that never finished a batch.

This is the store module, so it reads and writes files; it does not print and does not use
accelerate (the runner, :mod:`pgot.precompute`, does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from pgot.arrays import table_tensor
from pgot.files import atomic_write_parquet, atomic_write_text
from pgot.pareto import pareto_mask

if TYPE_CHECKING:
    from pgot.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION",
    "Frontier",
    "RewardStats",
    "StoreNotFoundError",
    "build_rows",
    "compare_settings",
    "completed_prompts",
    "has_new_samples",
    "has_shards",
    "load_store",
    "merge_shards",
    "next_shard_index",
    "read_meta",
    "read_rows",
    "remove_stale_temporaries",
    "reset",
    "reward_stats",
    "sample_rows",
    "write_meta",
    "write_shard",
]

SCHEMA_VERSION = 1
SAMPLES_FILE = "samples.parquet"
META_FILE = "meta.json"
SHARDS_DIR = "shards"
IMAGES_DIR = "images"
KEY_COLUMNS = ["prompt_id", "prompt", "seed", "sample_index"]
_SHARD_RE = re.compile(r"^shard-(\d+)-(\d+)\.parquet$")


class StoreNotFoundError(FileNotFoundError, ValueError):
    """The store folder or one of its files is missing (a user error: both a FileNotFoundError and a ValueError)."""


# --------------------------------------------------------------------------------------------
# Low-level writing
# --------------------------------------------------------------------------------------------


def _normalise_rows(df: pd.DataFrame, reward_names: Sequence[str]) -> pd.DataFrame:
    """Fixed column order and dtypes, so that shards, merges and reruns compare equal."""
    cols = [*KEY_COLUMNS, *reward_names, "on_frontier"]
    missing = [c for c in cols if c not in df.columns]
    assert not missing, f"rows lack columns {missing}"
    out = df[cols].copy()
    out["prompt_id"] = out["prompt_id"].astype("int64")
    out["prompt"] = out["prompt"].astype(str)
    out["seed"] = out["seed"].astype("int64")
    out["sample_index"] = out["sample_index"].astype("int64")
    for name in reward_names:
        out[name] = out[name].astype("float32")
    out["on_frontier"] = out["on_frontier"].astype(bool)
    return out.reset_index(drop=True)


def build_rows(
    prompt_id: int,
    prompt: str,
    seed: int,
    sample_indices: Sequence[int] | torch.Tensor,
    scores: torch.Tensor,
    on_frontier: torch.Tensor,
    reward_names: Sequence[str],
) -> pd.DataFrame:
    """The store rows of one prompt.

    Args:
        prompt_id: the prompt's stable id.
        prompt: its text.
        seed: ``precompute.seed``.
        sample_indices: (N,) sample indices.
        scores: (N, M) reward vectors, columns in ``reward_names`` order.
        on_frontier: (N,) bool, the Pareto mask of ``scores``.
        reward_names: the M reward names.

    Returns:
        A DataFrame with N rows in the ``samples.parquet`` layout.
    """
    scores = scores.detach().to("cpu", torch.float32)
    n, m = scores.shape
    assert m == len(reward_names), f"scores have {m} columns for {len(reward_names)} rewards"
    idx = torch.as_tensor(sample_indices).tolist()
    data: dict[str, Any] = {
        "prompt_id": [int(prompt_id)] * n,
        "prompt": [prompt] * n,
        "seed": [int(seed)] * n,
        "sample_index": idx,
    }
    arr = scores.numpy()
    for j, name in enumerate(reward_names):
        data[name] = arr[:, j]
    data["on_frontier"] = on_frontier.detach().to("cpu", torch.bool).numpy()
    return _normalise_rows(pd.DataFrame(data), reward_names)


def sample_rows(
    prompt_ids: Sequence[int],
    prompts: Sequence[str],
    seed: int,
    sample_indices: Sequence[int],
    scores: torch.Tensor,
    reward_names: Sequence[str],
) -> pd.DataFrame:
    """The store rows of B samples of any prompts (a shard), in the ``samples.parquet`` layout.

    Args:
        prompt_ids: (B,) each sample's prompt id.
        prompts: (B,) each sample's prompt text.
        seed: ``precompute.seed``.
        sample_indices: (B,) each sample's index among its prompt's N.
        scores: (B, M) reward vectors, columns in ``reward_names`` order.
        reward_names: the M reward names.

    Returns:
        B rows with ``on_frontier`` False (the merge marks the fronts, which need all N samples of a prompt).
    """
    scores = scores.detach().to("cpu", torch.float32)
    assert scores.shape[1] == len(reward_names), (
        f"scores have {scores.shape[1]} columns for {len(reward_names)} rewards"
    )
    data: dict[str, Any] = {
        "prompt_id": [int(p) for p in prompt_ids],
        "prompt": list(prompts),
        "seed": [int(seed)] * len(prompt_ids),
        "sample_index": [int(i) for i in sample_indices],
    }
    arr = scores.numpy()
    for j, name in enumerate(reward_names):
        data[name] = arr[:, j]
    data["on_frontier"] = np.zeros(len(prompt_ids), dtype=bool)
    return _normalise_rows(pd.DataFrame(data), reward_names)


def write_meta(store: str | Path, meta: dict) -> Path:
    """Write ``meta.json`` atomically; returns its path."""
    return atomic_write_text(Path(store) / META_FILE, json.dumps(meta, indent=2, sort_keys=False) + "\n")


def read_meta(store: str | Path) -> dict | None:
    """``meta.json`` of a store, or None when there is none yet."""
    path = Path(store) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}). The store is damaged: delete {Path(store)} and rerun pgot-precompute."
        ) from None


def _shard_paths(store: Path) -> list[Path]:
    folder = store / SHARDS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SHARD_RE.match(p.name))


def next_shard_index(store: str | Path, rank: int) -> int:
    """One past the largest shard index of process ``rank`` in the store (0 when it has none)."""
    folder = Path(store) / SHARDS_DIR
    if not folder.is_dir():
        return 0
    taken = [int(m.group(2)) for p in folder.iterdir() if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) == rank]
    return max(taken, default=-1) + 1


def write_shard(
    store: str | Path, rows: pd.DataFrame, rank: int, index: int | None = None, *, key: str = "precompute.store"
) -> Path:
    """Write some sample rows as a new shard of process ``rank``, atomically.

    Shards are named ``shards/shard-<rank>-<index>.parquet``. Processes of one run have distinct
    ranks, so they never collide; ``index`` defaults to :func:`next_shard_index`, so a rerun never
    overwrites an earlier shard (a writer of many shards passes a running counter started there).

    Args:
        store: the store folder.
        rows: samples in the ``samples.parquet`` layout (see :func:`sample_rows`).
        rank: the writing process's rank.
        index: the shard's index (default: the next free one of this rank).
        key: the config key naming the store, for the error.

    Returns:
        The shard's path.

    Raises:
        ValueError: the shard exists already: another process writes shards of this rank into the store (two
            precomputes at once, which the store's lock prevents; or a store shared across machines without it).
    """
    folder = Path(store) / SHARDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    index = next_shard_index(store, rank) if index is None else index
    path = folder / f"shard-{rank:05d}-{index:06d}.parquet"
    if path.exists():
        raise ValueError(
            f"{key}={store}: shard {path.name} appeared while this precompute was writing it, so another process is "
            f"writing into the same store. Run one pgot-precompute per store at a time (or set {key} to another "
            "folder); then rerun this one, which keeps every finished sample."
        )
    atomic_write_parquet(rows.reset_index(drop=True), path)
    return path


def has_shards(store: str | Path) -> bool:
    """Whether the store holds unmerged shards."""
    return bool(_shard_paths(Path(store)))


def reset(store: str | Path) -> None:
    """Delete a store's ``meta.json``, ``samples.parquet``, shards and images: what a precompute that never
    finished a batch left behind (main process, under the store's lock; the lock files stay)."""
    store = Path(store)
    for name in (META_FILE, SAMPLES_FILE):
        (store / name).unlink(missing_ok=True)
    for name in (SHARDS_DIR, IMAGES_DIR):
        shutil.rmtree(store / name, ignore_errors=True)


def remove_stale_temporaries(store: str | Path) -> int:
    """Delete the ``.*.tmp`` files a killed writer left behind; returns how many."""
    store = Path(store)
    n = 0
    for folder in (store, store / SHARDS_DIR):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
    return n


# --------------------------------------------------------------------------------------------
# Reading and merging
# --------------------------------------------------------------------------------------------


def read_rows(store: str | Path) -> pd.DataFrame:
    """Every row of a store: ``samples.parquet`` plus any shards, without duplicates.

    Rows are deduplicated on ``(prompt_id, sample_index)`` (a merge killed after writing
    ``samples.parquet`` but before removing the shards leaves both) and sorted by that key.

    Returns:
        The rows, or an empty DataFrame when the store has none.
    """
    store = Path(store)
    parts = []
    if (store / SAMPLES_FILE).is_file():
        parts.append(pd.read_parquet(store / SAMPLES_FILE))
    parts += [pd.read_parquet(p) for p in _shard_paths(store)]
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(columns=[*KEY_COLUMNS, "on_frontier"])
    df = pd.concat(parts, ignore_index=True)
    df = df.drop_duplicates(subset=["prompt_id", "sample_index"], keep="first")
    return df.sort_values(["prompt_id", "sample_index"], kind="stable").reset_index(drop=True)


def completed_prompts(store: str | Path, samples_per_prompt: int) -> dict[int, str]:
    """Prompts whose ``samples_per_prompt`` samples are all in the store (merged file or shards).

    Returns:
        prompt_id -> prompt text, for the complete prompts.
    """
    df = read_rows(store)
    if not len(df):
        return {}
    counts = df.groupby("prompt_id")["sample_index"].nunique()
    done = counts.index[counts >= samples_per_prompt]
    first = df.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"]
    return {int(pid): str(first[pid]) for pid in done}


def reward_stats(df: pd.DataFrame, reward_names: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """Per-reward statistics over all samples, ignoring NaN: mean, std (population, ddof=0), min, max, count, nan_count.

    These feed the OT normalisation (``ot.normalize=frontier`` divides rewards by ``std``).
    """
    out: dict[str, dict[str, float | int | None]] = {}
    for name in reward_names:
        x = df[name].to_numpy(dtype=np.float64)
        finite = x[~np.isnan(x)]
        some = finite.size > 0
        out[name] = {
            "mean": float(finite.mean()) if some else None,
            "std": float(finite.std(ddof=0)) if some else None,
            "min": float(finite.min()) if some else None,
            "max": float(finite.max()) if some else None,
            "count": int(finite.size),
            "nan_count": int(x.size - finite.size),
        }
    return out


def merge_shards(store: str | Path, reward_names: Sequence[str], samples_per_prompt: int) -> pd.DataFrame:
    """Merge the complete prompts of ``samples.parquet`` and every shard into ``samples.parquet``, mark each
    prompt's front among its N samples (``on_frontier``), then remove the shards.

    The samples of prompts that do not have all N yet (a precompute killed mid-prompt, then rerun with fewer
    prompts) are kept in one new shard, for a later precompute with those prompts to finish. The merged file is
    written atomically before any shard is removed, so a merge killed halfway loses nothing (see
    :func:`read_rows`).

    Args:
        store: the store folder.
        reward_names: the reward columns, in order.
        samples_per_prompt: N.

    Returns:
        The merged rows (complete prompts), sorted by ``(prompt_id, sample_index)``.
    """
    store = Path(store)
    shards = _shard_paths(store)
    df = _normalise_rows(read_rows(store), reward_names)
    counts = df.groupby("prompt_id")["sample_index"].nunique()
    assert (counts <= samples_per_prompt).all(), f"prompts with more than N={samples_per_prompt} samples in {store}"
    complete = df["prompt_id"].isin(counts.index[counts == samples_per_prompt])
    merged, unfinished = df[complete].reset_index(drop=True), df[~complete]
    if len(merged):  # rows are sorted by (prompt_id, sample_index): (P * N, M) -> (P, N, M)
        scores = table_tensor(merged[list(reward_names)].to_numpy(), np.float32)
        mask = pareto_mask(scores.view(-1, samples_per_prompt, len(reward_names)))
        merged["on_frontier"] = mask.reshape(-1).numpy()
    atomic_write_parquet(merged, store / SAMPLES_FILE)
    kept = write_shard(store, unfinished, rank=0) if len(unfinished) else None
    for p in shards:
        if p != kept:
            p.unlink(missing_ok=True)
    folder = store / SHARDS_DIR
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    return merged


def has_new_samples(store: str | Path, samples_per_prompt: int) -> bool:
    """Whether a shard holds a sample of a prompt that has all N samples in the store: something to merge."""
    shards = _shard_paths(Path(store))
    if not shards:
        return False
    in_shards = set(pd.concat([pd.read_parquet(p, columns=["prompt_id"]) for p in shards])["prompt_id"].tolist())
    counts = read_rows(store).groupby("prompt_id")["sample_index"].nunique()
    return bool(in_shards & set(counts.index[counts >= samples_per_prompt].tolist()))


# --------------------------------------------------------------------------------------------
# The loaded store
# --------------------------------------------------------------------------------------------


@dataclass
class RewardStats:
    """Per-reward statistics over all samples of a store, each (M,) float32, columns in ``reward_names`` order.

    ``std`` is safe to divide by: a reward with zero or undefined spread gets 1 (the raw values
    are in ``Frontier.meta["stats"]``).
    """

    mean: torch.Tensor
    std: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor


def _stats_from_meta(meta: dict, reward_names: Sequence[str]) -> RewardStats:
    raw = meta.get("stats") or {}

    def col(key: str, default: float) -> torch.Tensor:
        vals = []
        for name in reward_names:
            v = (raw.get(name) or {}).get(key)
            vals.append(default if v is None else float(v))
        return torch.tensor(vals, dtype=torch.float32)

    std = col("std", 1.0)
    std = torch.where(torch.isfinite(std) & (std > 0), std, torch.ones_like(std))
    return RewardStats(mean=col("mean", 0.0), std=std, min=col("min", math.nan), max=col("max", math.nan))


@dataclass
class Frontier:
    """A loaded frontier store: every prompt's Pareto front of base-model reward vectors.

    Attributes:
        reward_names: the M reward columns, in order.
        prompt_ids: the prompts in the store, sorted.
        meta: the contents of ``meta.json``.
        stats: per-reward mean, std, min, max over all samples, each (M,).
        path: the store folder.
        samples: every sample row (the ``samples.parquet`` table).
        fronts: prompt_id -> (F_p, M) float32 front points, in sample order.
        texts: prompt_id -> prompt text.
    """

    reward_names: list[str]
    prompt_ids: list[int]
    meta: dict
    stats: RewardStats
    path: Path
    samples: pd.DataFrame = field(repr=False)
    fronts: dict[int, torch.Tensor] = field(repr=False)
    texts: dict[int, str] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        """The model fingerprint the store was computed with."""
        return str(self.meta.get("model", {}).get("fingerprint", ""))

    def lookup(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        device: torch.device | str | None = None,
        prompts: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fronts of some prompts, padded to the largest front among them.

        Args:
            prompt_ids: (P,) prompt ids.
            device: where the returned tensors live (default CPU).
            prompts: optional (P,) prompt texts; when given, each must equal the stored text of its id
                (catches a prompt file edited since the precompute).

        Returns:
            front: (P, F, M) float32 front points, zero where padded; F = max front size among the P prompts.
            front_mask: (P, F) bool, True on real points.

        Raises:
            ValueError: a prompt is not in the store, or its text differs from the stored one.
        """
        ids = [int(i) for i in torch.as_tensor(prompt_ids).reshape(-1).tolist()]
        missing = [pid for pid in ids if pid not in self.fronts]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(
                f"prompt id {missing[0]}{more} is not in the frontier store {self.path}, which holds "
                f"{len(self.prompt_ids)} prompts. Rerun pgot-precompute with the same prompts config as training "
                "(prompts.path, prompts.limit) and precompute.store pointing there, or point train.store at a store "
                "computed for these prompts."
            )
        for j, pid in enumerate(ids):
            if prompts is not None and self.texts[pid] != prompts[j]:
                raise ValueError(
                    f"prompt id {pid} is {prompts[j]!r} in the prompt set but {self.texts[pid]!r} in the frontier store "
                    f"{self.path}. The prompts file changed since the precompute: rerun pgot-precompute with a new "
                    "precompute.store and point train.store at it."
                )
        m = len(self.reward_names)
        sizes = [self.fronts[pid].shape[0] for pid in ids]
        f = max(sizes, default=0)
        front = torch.zeros(len(ids), f, m, dtype=torch.float32)
        mask = torch.zeros(len(ids), f, dtype=torch.bool)
        for j, pid in enumerate(ids):
            front[j, : sizes[j]] = self.fronts[pid]
            mask[j, : sizes[j]] = True
        return front.to(device or "cpu"), mask.to(device or "cpu")

    def select(self, reward_names: Sequence[str]) -> Frontier:
        """The store seen through a subset or reordering of its rewards.

        A reordering keeps every front. A strict subset recomputes each prompt's front among its N
        samples on those rewards only (the projection of an M-reward front is not the front of
        fewer rewards). Stats are reordered accordingly.

        Args:
            reward_names: rewards of this store, in the wanted column order.

        Returns:
            A new Frontier whose columns follow ``reward_names``.
        """
        unknown = [n for n in reward_names if n not in self.reward_names]
        if unknown or not reward_names or len(set(reward_names)) != len(reward_names):
            raise ValueError(
                f"cannot select rewards {list(reward_names)} from the frontier store {self.path}, which has "
                f"{self.reward_names}. Name each of the store's rewards at most once."
            )
        names = list(reward_names)
        samples = self.samples.copy()
        if set(names) != set(self.reward_names):
            n = int(self.meta.get("precompute", {}).get("samples_per_prompt", 0)) or int(
                samples.groupby("prompt_id").size().max()
            )
            scores = table_tensor(samples[names].to_numpy(), np.float32).reshape(-1, n, len(names))
            samples["on_frontier"] = pareto_mask(scores).reshape(-1).numpy()
        perm = [self.reward_names.index(n) for n in names]
        stats = RewardStats(*(getattr(self.stats, k)[perm] for k in ("mean", "std", "min", "max")))
        meta = dict(self.meta, reward_names=names)
        return _frontier_from(samples, names, meta, stats, self.path)


def _frontier_from(
    samples: pd.DataFrame, reward_names: list[str], meta: dict, stats: RewardStats, path: Path
) -> Frontier:
    on = samples[samples["on_frontier"]]
    values = table_tensor(on[reward_names].to_numpy(), np.float32)  # (rows on a front, M)
    pids = on["prompt_id"].to_numpy()
    prompt_ids = sorted(int(p) for p in samples["prompt_id"].unique())
    m = len(reward_names)
    fronts = {pid: torch.zeros(0, m) for pid in prompt_ids}  # prompts whose rows are all NaN have F = 0
    if len(on):
        starts = np.flatnonzero(np.r_[True, pids[1:] != pids[:-1]])
        ends = np.r_[starts[1:], len(pids)]
        for s, e in zip(starts, ends, strict=True):
            fronts[int(pids[s])] = values[s:e]
    first = samples.drop_duplicates("prompt_id")
    texts = {int(p): str(t) for p, t in zip(first["prompt_id"], first["prompt"], strict=True)}
    return Frontier(
        reward_names=list(reward_names),
        prompt_ids=prompt_ids,
        meta=meta,
        stats=stats,
        path=path,
        samples=samples,
        fronts=fronts,
        texts=texts,
    )


def load_store(path: str | Path) -> Frontier:
    """Load a frontier store written by ``pgot-precompute``.

    Args:
        path: the store folder (``precompute.store`` / ``train.store``).

    Returns:
        The :class:`Frontier`.

    Raises:
        StoreNotFoundError: the folder, ``meta.json`` or ``samples.parquet`` is missing.
        ValueError: the store has another schema version, or its files disagree with each other.
    """
    store = Path(path)
    how = "Run pgot-precompute with precompute.store pointing there, or set train.store to an existing store."
    if not store.is_dir():
        raise StoreNotFoundError(f"frontier store {store} does not exist. {how}")
    meta = read_meta(store)
    if meta is None:
        raise StoreNotFoundError(
            f"frontier store {store} has no {META_FILE}, so it is not a pgot frontier store. {how}"
        )
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"frontier store {store} has schema version {version!r}, but this pgot reads version {SCHEMA_VERSION}. "
            "Rerun pgot-precompute with a new precompute.store to rebuild it with this pgot."
        )
    if not (store / SAMPLES_FILE).is_file():
        shards = len(_shard_paths(store))
        if shards:
            raise StoreNotFoundError(
                f"frontier store {store} is unfinished: {shards} shards, no {SAMPLES_FILE} (the precompute was "
                "interrupted). Rerun pgot-precompute with the same config and precompute.store pointing there to "
                "finish it (finished samples are kept)."
            )
        raise StoreNotFoundError(
            f"frontier store {store} holds no samples: a precompute stopped there before finishing a batch. Run "
            "pgot-precompute with precompute.store pointing there (it starts the store afresh, with any settings)."
        )
    reward_names = list(meta.get("reward_names", []))
    samples = pd.read_parquet(store / SAMPLES_FILE)
    missing = [c for c in [*KEY_COLUMNS, *reward_names, "on_frontier"] if c not in samples.columns]
    if missing:
        raise ValueError(
            f"frontier store {store}: {SAMPLES_FILE} lacks columns {missing} named by {META_FILE}. "
            "The store is damaged: rerun pgot-precompute with a new precompute.store."
        )
    samples = _normalise_rows(samples, reward_names)
    if not meta.get("stats"):
        meta = dict(meta, stats=reward_stats(samples, reward_names))
    if _shard_paths(store):
        log.warning(
            "frontier store %s also holds samples in shards/ that samples.parquet does not (unfinished prompts, or an "
            "interrupted merge); they are ignored here. pgot-precompute with the store's prompts finishes and merges "
            "them.", store,
        )  # fmt: skip
    return _frontier_from(samples, reward_names, meta, _stats_from_meta(meta, reward_names), store)


def _same_path(a: object, b: object) -> bool:
    """Two configured paths name the same thing: equal as typed (trailing slashes aside), or the same file."""
    x, y = str(a or "").strip().rstrip("/"), str(b or "").strip().rstrip("/")
    if x == y:
        return True
    px, py = Path(x).expanduser(), Path(y).expanduser()
    try:
        return bool(x and y and px.exists() and py.exists() and os.path.samefile(px, py))
    except OSError:
        return False


def _shown(value: object) -> str:
    return "null" if value is None else repr(value)


def compare_settings(
    meta: dict,
    cfg: Config,
    *,
    store: str | Path = "",
    fingerprint: str | None = None,
    default_shift: float | None = None,
    sigmas: Sequence[float] | None = None,
    dtype: str | None = None,
    extend: bool = False,
) -> list[str]:
    """Every setting of ``cfg`` that differs from the one a store was built with and changes what its fronts mean.

    Compared (each where both sides are known): the schema version; the base model (``model.tiny``, the model
    fingerprint, ``model.use_t5`` and ``model.max_sequence_length`` with T5, ``model.lora_path``,
    ``model.resolution``); the sampler (``draft.num_steps``, ``draft.guidance_scale``, ``draft.shift`` with null
    resolved to ``default_shift``, and the sigma schedule when ``sigmas`` is given); the rewards, in order
    (names, then each learned reward's ``path``, ``arch``, ``dtype`` and, for tiny / random builds,
    ``tiny_seed``). Weights of the loss (``weight``, ``target``, ``strength``) and the training settings
    do not change the fronts and are not compared. A reward name that is not a known reward is left to the
    config check (a "did you mean"), not reported here.

    Args:
        meta: the store's ``meta.json`` (:func:`read_meta`).
        cfg: the config that will read (or extend) the store.
        store: the store folder, for the messages.
        fingerprint: ``SD3Model.fingerprint`` of the configured model (None: not compared).
        default_shift: the configured model's scheduler shift, what ``draft.shift: null`` means (None: unknown).
        sigmas: (T+1,) the configured sampler's sigma schedule (None: not compared).
        dtype: the configured model's weights dtype, e.g. ``float32`` (compared only with ``extend``).
        extend: the config adds samples to the store (a resumed ``pgot-precompute``): then N
            (``precompute.samples_per_prompt``), ``precompute.seed`` and the weights dtype must match too.

    Returns:
        One line per mismatch, ``<key as typed>: <value> in the config, <value> in the store <path>`` and how to fix
        it; empty when the store fits.
    """
    from pgot.config import ANALYTIC_REWARDS, known_reward_names

    where = str(store) if store else "(meta.json)"
    if extend:
        fix = f"Set precompute.store to a new folder, or delete {where} to rebuild it."
    else:
        fix = (
            "Use the store's value, or build a store for this config (pgot-precompute with it and a new "
            "precompute.store; point train.store there)."
        )
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        return [
            f"the store {where} has schema version {version!r}, but this pgot reads and writes version "
            f"{SCHEMA_VERSION}. {fix}"
        ]
    out: list[str] = []

    def differ(key: str, mine: object, theirs: object) -> None:
        out.append(f"{key}: {_shown(mine)} in the config, {_shown(theirs)} in the store {where}. {fix}")

    m, s, mc = meta.get("model") or {}, meta.get("sampler") or {}, cfg.model
    if "tiny" in m and bool(m["tiny"]) != mc.tiny:
        differ("model.tiny", mc.tiny, bool(m["tiny"]))
    elif fingerprint and m.get("fingerprint") and fingerprint != m["fingerprint"]:
        key, value = ("model.tiny_seed", mc.tiny_seed) if mc.tiny else ("model.path", mc.path)
        out.append(
            f"{key}: {value!r} (model fingerprint {fingerprint}) in the config, {m.get('path', '')!r} (fingerprint "
            f"{m['fingerprint']}) in the store {where}: its fronts describe another base model. {fix}"
        )
    if not mc.tiny and "use_t5" in m:
        if bool(m["use_t5"]) != mc.use_t5:
            differ("model.use_t5", mc.use_t5, bool(m["use_t5"]))
        elif mc.use_t5 and m.get("max_sequence_length") not in (None, mc.max_sequence_length):
            differ("model.max_sequence_length", mc.max_sequence_length, m["max_sequence_length"])
    if "lora_path" in m and not _same_path(m["lora_path"], mc.lora_path):
        differ("model.lora_path", mc.lora_path, m["lora_path"])
    if extend and dtype is not None and m.get("dtype") not in (None, dtype):
        differ("model.dtype", f"{mc.dtype} ({dtype})" if mc.dtype == "auto" else mc.dtype, m["dtype"])
    schedule = len(out)
    if s.get("resolution") not in (None, mc.resolution):
        differ("model.resolution", mc.resolution, s["resolution"])
    d = cfg.draft
    if s.get("num_steps") not in (None, d.num_steps):
        differ("draft.num_steps", d.num_steps, s["num_steps"])
    if "guidance_scale" in s and not math.isclose(float(s["guidance_scale"]), d.guidance_scale, abs_tol=1e-9):
        differ("draft.guidance_scale", d.guidance_scale, s["guidance_scale"])
    if "shift" in s:
        mine = d.shift if d.shift is not None else default_shift
        theirs = s["shift"] if s["shift"] is not None else default_shift
        if mine is not None and theirs is not None and not math.isclose(float(mine), float(theirs), abs_tol=1e-9):
            differ("draft.shift", d.shift, s["shift"])
    stored = s.get("sigmas")
    if sigmas is not None and stored and len(out) == schedule:
        same = len(stored) == len(sigmas) and all(
            math.isclose(float(a), float(b), abs_tol=1e-6) for a, b in zip(stored, sigmas, strict=True)
        )
        if not same:
            out.append(
                f"draft.shift: the sampler's sigma schedule ({', '.join(f'{float(x):.4g}' for x in sigmas)}) differs "
                f"from the one of the store {where} ({', '.join(f'{float(x):.4g}' for x in stored)}), although "
                "draft.num_steps, draft.shift and model.resolution agree: the model's scheduler config or diffusers' "
                f"flow-match scheduler changed since the store was built. {fix}"
            )

    names = list(cfg.reward_names)
    theirs_cfg = list(meta.get("rewards") or [])
    theirs = list(meta.get("reward_names") or [r.get("name") for r in theirs_cfg])
    known = known_reward_names()
    if all(n in known for n in names):  # an unknown name is the config check's "did you mean", not a mismatch
        if names != theirs:
            if sorted(names) == sorted(theirs):
                out.append(
                    f"rewards: the config lists {', '.join(names)}, but the store {where} has them in the order "
                    f"{', '.join(theirs)}. Reward columns are positional: list the rewards in the store's order. {fix}"
                )
            else:
                out.append(
                    f"rewards: {', '.join(names) or 'none'} in the config, but the store {where} was computed for "
                    f"rewards {', '.join(map(str, theirs)) or 'none'}. {fix}"
                )
        elif len(theirs_cfg) == len(names):
            for i, (rc, rs) in enumerate(zip(cfg.rewards, theirs_cfg, strict=True)):
                if rc.name in ANALYTIC_REWARDS:  # no weights, no settings that change the scores
                    continue
                if "path" in rs and not _same_path(rs["path"], rc.path):
                    differ(f"rewards.{i}.path", rc.path, rs["path"])
                if "arch" in rs and (rs["arch"] or "") != rc.arch:
                    differ(f"rewards.{i}.arch", rc.arch, rs["arch"])
                if "dtype" in rs and rs["dtype"] != rc.dtype:
                    differ(f"rewards.{i}.dtype", rc.dtype, rs["dtype"])
                builds = (rc.path, rs.get("path"))
                if (
                    "tiny_seed" in rs
                    and any(b in ("tiny", "random") for b in builds)
                    and rs["tiny_seed"] != rc.tiny_seed
                ):
                    differ(f"rewards.{i}.tiny_seed", rc.tiny_seed, rs["tiny_seed"])
    if extend:
        pc = meta.get("precompute") or {}
        for key in ("samples_per_prompt", "seed"):
            if pc.get(key) not in (None, getattr(cfg.precompute, key)):
                differ(f"precompute.{key}", getattr(cfg.precompute, key), pc[key])
    return out
