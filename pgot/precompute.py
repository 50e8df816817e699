"""``pgot-precompute``: the offline Pareto frontier of every prompt under the base model.

For each prompt: N = ``precompute.samples_per_prompt`` samples of the base model (no LoRA training, no
gradient), with the noise of sample i drawn from ``(precompute.seed, prompt_id, i)`` only; their reward
vectors; the prompt's Pareto front among its N samples. Everything goes to a frontier store
(:mod:`pgot.frontier`) that ``pgot-train`` reads for the offline strategy and the per-prompt baselines.

Single process::

    pgot-precompute --config configs/precompute_debug.yaml

Several processes (GPUs, or CPU processes with gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m pgot precompute --config configs/precompute_debug.yaml

Prompts are dealt round-robin to the processes. Each process generates ``precompute.batch_size``
images per pass from a flat list of (prompt, sample) work items and writes a prompt's rows to its own
shard only once all N samples of that prompt are scored, so a killed run loses at most the prompts in
flight: a rerun with the same config skips complete prompts and produces the same ``samples.parquet``.
The main process merges the shards and computes the per-reward statistics at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

import pgot
from pgot import frontier as store_io
from pgot.config import Config, ConfigError
from pgot.generate import generate, sigmas
from pgot.images import save_png
from pgot.model import load_model
from pgot.pareto import pareto_mask
from pgot.preflight import preflight
from pgot.prompts import load_prompts
from pgot.rewards import build as build_rewards
from pgot.rewards import score

log = logging.getLogger(__name__)

__all__ = ["build_store", "run", "store_meta"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_meta(cfg: Config, fingerprint: str, model_path: str, dtype: str, sigmas: list[float]) -> dict[str, Any]:
    """The ``meta.json`` of a store built from ``cfg`` (stats and counts are filled in by the merge).

    Args:
        cfg: the config.
        fingerprint: ``SD3Model.fingerprint``.
        model_path: ``SD3Model.path``.
        dtype: the model's weights dtype, e.g. ``float32``.
        sigmas: (T+1,) the sampler's sigma schedule.
    """
    return {
        "schema_version": store_io.SCHEMA_VERSION,
        "pgot_version": pgot.__version__,
        "created": _now(),
        "completed": None,
        "reward_names": list(cfg.reward_names),
        "rewards": [dataclasses.asdict(r) for r in cfg.rewards],
        "model": {
            "path": model_path,
            "fingerprint": fingerprint,
            "tiny": cfg.model.tiny,
            "dtype": dtype,
            "use_t5": cfg.model.use_t5,
            "max_sequence_length": cfg.model.max_sequence_length,
            "lora_path": cfg.model.lora_path,
        },
        "sampler": {
            "num_steps": cfg.draft.num_steps,
            "guidance_scale": cfg.draft.guidance_scale,
            "resolution": cfg.model.resolution,
            "shift": cfg.draft.shift,
            "sigmas": [float(s) for s in sigmas],
        },
        "precompute": {"samples_per_prompt": cfg.precompute.samples_per_prompt, "seed": cfg.precompute.seed},
        "prompts": {"path": cfg.prompts.path, "column": cfg.prompts.column, "limit": cfg.prompts.limit},
        "num_prompts": None,
        "num_samples": None,
        "front_size": None,
        "stats": None,
    }


def _check_prompt_texts(done: dict[int, str], ids: list[int], prompts: list[str], store: Path) -> None:
    for pid, text in zip(ids, prompts, strict=True):
        if pid in done and done[pid] != text:
            raise ValueError(
                f"prompt id {pid} is {text!r} in prompts.path but {done[pid]!r} in precompute.store={store}: the prompt "
                f"set changed since that store was built. Set precompute.store to a new folder or delete {store}."
            )


def _save_images(store: Path, images: torch.Tensor, prompt_ids: list[int], sample_indices: list[int]) -> None:
    for image, pid, i in zip(images, prompt_ids, sample_indices, strict=True):
        save_png(image, store / store_io.IMAGES_DIR / str(pid) / f"{i}.png")


def run(cfg: Config) -> Path:
    """Precompute the per-prompt Pareto frontiers of the base model into ``precompute.store``.

    Works on one process or under ``accelerate launch`` (prompts dealt round-robin to processes; the
    main process merges the shards after all are done). Resumable: complete prompts already in the
    store are skipped.

    Args:
        cfg: the config (sections model, draft, rewards, prompts, precompute).

    Returns:
        The store folder.

    Raises:
        ValueError: no rewards configured, or the store was built with other settings or prompts.
    """
    preflight(cfg, "precompute")  # every input checked before any weight loads
    accelerator = Accelerator(cpu=not torch.cuda.is_available() or cfg.model.device == "cpu")  # gloo / NCCL
    try:
        return build_store(cfg, accelerator)
    finally:
        accelerator.end_training()  # destroys the process group; without it gloo processes abort at exit


def build_store(cfg: Config, accelerator: Accelerator) -> Path:
    """The work of :func:`run` on an existing accelerator (every process calls it; ``pgot-train`` uses it to
    build a missing store with ``train.precompute_if_missing``).

    Returns:
        The store folder.
    """
    if not cfg.rewards:
        raise ValueError("rewards is empty; list at least one reward, e.g. rewards: [{name: colorfulness}].")
    pc = cfg.precompute
    store = Path(pc.store)
    n = pc.samples_per_prompt
    rank, world = accelerator.process_index, accelerator.num_processes
    prompt_set = load_prompts(cfg.prompts)
    ids, texts = [int(i) for i in prompt_set.ids], list(prompt_set.prompts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"prompts.path={cfg.prompts.path} yields duplicate prompt ids; each prompt must appear once.")

    model = load_model(cfg.model, device=accelerator.device)
    sig = sigmas(model, cfg.draft.num_steps, shift=cfg.draft.shift, resolution=cfg.model.resolution)
    dtype = str(model.dtype).removeprefix("torch.")
    meta = store_meta(cfg, model.fingerprint, model.path, dtype, sig.tolist())
    existing = store_io.read_meta(store)
    done = store_io.completed_prompts(store, n)  # every process reads the same files before anyone writes
    if existing is not None:
        problems = store_io.compare_settings(
            existing, cfg, store=store, fingerprint=model.fingerprint, default_shift=model.scheduler.config.get("shift"),
            sigmas=meta["sampler"]["sigmas"], dtype=dtype, extend=True,
        )  # fmt: skip
        if problems:
            raise ConfigError(
                [f"precompute.store={store} was built with other settings, so it cannot be resumed or extended:"]
                + problems
            )
        meta["created"] = existing.get("created", meta["created"])
    elif done:
        raise ValueError(
            f"precompute.store={store} holds samples but no {store_io.META_FILE}, so their settings are unknown. "
            f"Set precompute.store to a new folder, or delete {store} to rebuild it."
        )
    _check_prompt_texts(done, ids, texts, store)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        store_io.remove_stale_temporaries(store)
        if existing is None:  # an existing meta stays as it is (it describes samples.parquet) until the merge
            store_io.write_meta(store, meta)
    accelerator.wait_for_everyone()  # meta.json exists before any shard

    pending = [j for j, pid in enumerate(ids) if pid not in done]
    mine = pending[rank::world]
    if accelerator.is_main_process:
        log.info(
            "precompute: %d prompts, %d already in %s, %d to do on %d process(es); N=%d, %d images",
            len(ids), len(ids) - len(pending), store, len(pending), world, n, len(pending) * n,
        )  # fmt: skip
    reward_models = build_rewards(cfg.rewards, device=accelerator.device)
    _generate_shards(cfg, model, reward_models, ids, texts, mine, rank, accelerator.is_main_process)

    accelerator.wait_for_everyone()  # every process's shards are complete before the merge reads them
    if accelerator.is_main_process:
        _merge(store, cfg, meta)
    accelerator.wait_for_everyone()  # the merged store exists for everyone before anyone reads it
    return store


def _generate_shards(
    cfg: Config,
    model: Any,
    reward_models: list,
    ids: list[int],
    texts: list[str],
    mine: list[int],
    rank: int,
    is_main: bool,
) -> None:
    """Generate and score this process's prompts; write each batch's completed prompts as one shard."""
    pc = cfg.precompute
    store, n, names = Path(pc.store), pc.samples_per_prompt, cfg.reward_names
    items = [(j, i) for j in mine for i in range(n)]  # flat (prompt index, sample index) work list
    partial: dict[int, dict[int, torch.Tensor]] = {}  # prompt index -> sample index -> (M,) scores
    shard_index = store_io.next_shard_index(store, rank)
    bar = tqdm(total=len(items), unit="img", desc="precompute", disable=not is_main, dynamic_ncols=True)
    start, nan_rows = time.perf_counter(), 0
    for s in range(0, len(items), pc.batch_size):
        batch = items[s : s + pc.batch_size]
        pj = [j for j, _ in batch]
        prompts = [texts[j] for j in pj]
        pids = [ids[j] for j in pj]
        idx = [i for _, i in batch]
        with torch.no_grad():
            images = generate(
                model, prompts, torch.tensor(pids), torch.tensor(idx), pc.seed, **dataclasses.asdict(cfg.draft) | {"k": 0},
                resolution=cfg.model.resolution, cache_dir=cfg.model.embedding_cache or None,
            )  # fmt: skip
            # images: (b, 3, H, W) in [0, 1]
            scores = score(reward_models, images, prompts).float().cpu()  # (b, M)
        nan_rows += int(scores.isnan().any(dim=1).sum())
        if pc.save_images:
            _save_images(store, images, pids, idx)
        for (j, i), row in zip(batch, scores, strict=True):
            partial.setdefault(j, {})[i] = row
        rows = []
        for j in dict.fromkeys(pj):
            if len(partial[j]) == n:
                got = partial.pop(j)
                vals = torch.stack([got[i] for i in range(n)])  # (N, M)
                rows.append(
                    store_io.build_rows(ids[j], texts[j], pc.seed, list(range(n)), vals, pareto_mask(vals), names)
                )
        if rows:
            store_io.write_shard(store, pd.concat(rows, ignore_index=True), rank, shard_index)
            shard_index += 1
        if len(model.embed_cache) > 1024:  # bound host memory on large prompt sets
            model.embed_cache.clear()
        bar.update(len(batch))
    bar.close()
    assert not partial, f"prompts left incomplete: {list(partial)}"
    if nan_rows:
        log.warning("process %d: %d samples have a NaN reward (kept in the store, never on a frontier)", rank, nan_rows)
    elapsed = time.perf_counter() - start
    if is_main and items:
        log.info(
            "process %d: %d images in %.1fs (%.2f img/s)", rank, len(items), elapsed, len(items) / max(elapsed, 1e-9)
        )


def _merge(store: Path, cfg: Config, meta: dict) -> None:
    """Merge the shards, then record counts and per-reward statistics in meta.json (main process)."""
    names, n = cfg.reward_names, cfg.precompute.samples_per_prompt
    df = store_io.merge_shards(store, names, n)
    sizes = df.groupby("prompt_id")["on_frontier"].sum()
    meta = dict(meta)
    meta.update(
        completed=_now(),
        num_prompts=int(df["prompt_id"].nunique()),
        num_samples=len(df),
        front_size={"mean": float(sizes.mean()), "min": int(sizes.min()), "max": int(sizes.max())}
        if len(sizes)
        else None,
        stats=store_io.reward_stats(df, names),
    )
    store_io.write_meta(store, meta)
    for name, st in meta["stats"].items():
        if st["nan_count"]:
            log.warning("reward %s is NaN on %d of %d samples in %s", name, st["nan_count"], len(df), store)
    log.info(
        "frontier store %s: %d prompts x %d samples, front size mean %.2f",
        store, meta["num_prompts"], n, meta["front_size"]["mean"] if meta["front_size"] else 0.0,
    )  # fmt: skip
