"""``pgot-precompute``: the offline Pareto frontier of every prompt under the base model.

For each prompt: N = ``precompute.samples_per_prompt`` samples of the base model (no LoRA training, no
gradient), with the noise of sample i drawn from ``(precompute.seed, prompt_id, i)`` only; their reward
vectors; the prompt's Pareto front among its N samples. Everything goes to a frontier store
(:mod:`pgot.frontier`) that ``pgot-train`` reads for the offline strategy and the per-prompt baselines.

Single process::

    pgot-precompute --config configs/precompute_debug.yaml

Several processes (GPUs, or CPU processes with gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m pgot precompute --config configs/precompute_debug.yaml

**Batches.** The (prompt, sample) grid of the whole prompt set, prompt-major, is cut into batches of
``precompute.batch_size`` items once and for all: batch b always holds the items ``[b * B, (b + 1) * B)``,
whatever the number of processes and wherever an earlier run stopped. Pending batches are dealt round-robin to
the processes; each writes every batch it finishes as one shard, atomically. A batch's numbers can depend on the
batch's composition (batched kernels), and the composition never changes, so **a store is bit-identical however
it was built**: in one go, on several processes, or resumed after any number of kills (tested with SIGKILL and
with a batch size that does not divide N). A batch that holds items already in the store (a store extended with
more prompts) is generated whole and only its missing rows are kept. The main process merges the shards, marks
each prompt's front among its N samples and computes the per-reward statistics at the end.

**Stopping** (SIGINT: Ctrl-C; SIGTERM: a scheduler's preemption or time limit). The batches are done in rounds of
one batch per process; after each round every process joins one all-reduce of a stop flag (the signal's number,
a max; none on one process). The first signal is remembered (:class:`pgot.checkpoints.StopSignals`): the process
finishes the batch in flight and writes its shard, and at the end of that round every process raises the same
:class:`~pgot.checkpoints.Interrupted` ("stopped by SIGTERM after k of n batches; ..."), so a signal that only one
process gets stops them all alike (the CLI exits with 128 + the signal number). The merge is not run; a rerun
resumes from the shards. A repeat within ``StopSignals.repeat_s`` seconds is the same request (the launcher
forwards what it gets); a later one stops at once. A signal after the last round's agreement lets the merge finish:
the store is complete. Before the first batch (loading the model and rewards) a signal stops at once, as in
``pgot-train``'s set-up.

**The store's settings are committed with its first shard**: ``meta.json`` is written just before the first
shard, so a precompute that fails before finishing one batch (a missing reward checkpoint, a typo) leaves no
settings behind, and the next run, with any settings, starts the store afresh. A store with samples resumes
only with the settings it was built with. One precompute at a time writes a store (a folder lock,
:func:`pgot.files.hold_folder`); a second one is refused with the holder's name.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

import pgot
from pgot import frontier as store_io
from pgot.checkpoints import Interrupted, StopSignals
from pgot.config import Config, ConfigError
from pgot.devices import every_process, on_cpu, processes
from pgot.files import hold_folder
from pgot.generate import generate, sigmas
from pgot.images import save_png
from pgot.model import load_model
from pgot.preflight import preflight
from pgot.prompts import load_prompts
from pgot.rewards import build as build_rewards
from pgot.rewards import score

log = logging.getLogger(__name__)

__all__ = ["build_store", "run", "store_meta"]

_RERUN = "Run the same command to continue (prompts already sampled are not sampled again)."
"""What a rerun does after a stop: the end of every stop message."""


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
            raise every_process(
                ValueError(
                    f"prompt id {pid} is {text!r} in prompts.path but {done[pid]!r} in precompute.store={store}: the prompt "
                    f"set changed since that store was built. Set precompute.store to a new folder or delete {store}."
                )
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
        Interrupted: SIGINT or SIGTERM (after the batch in flight, its shard written; see the module docstring).
    """
    # every input checked before any weight loads (a collective under accelerate launch)
    preflight(cfg, "precompute", processes(cfg.model.device))
    accelerator = Accelerator(cpu=on_cpu(cfg.model.device))  # gloo / NCCL
    try:
        return build_store(cfg, accelerator)
    finally:
        accelerator.end_training()  # destroys the process group; without it gloo processes abort at exit


def build_store(cfg: Config, accelerator: Accelerator, *, wait: bool = False) -> Path:
    """The work of :func:`run` on an existing accelerator (every process calls it; ``pgot-train`` uses it to
    build a missing store with ``train.precompute_if_missing``).

    Args:
        cfg: the config.
        accelerator: the processes that share the work.
        wait: when another process holds the store, wait for it (``pgot-train``: another run building the same
            store) instead of refusing (``pgot-precompute``).

    Returns:
        The store folder.

    Raises:
        ValueError: no rewards; the store is in use by another process; it was built with other settings or
            prompts.
        Interrupted: SIGINT or SIGTERM, on every process alike after the batch in flight (its shard written), or
            at once on a second signal or before the first batch; the message says what a rerun does.
    """
    if not cfg.rewards:
        raise every_process(
            ValueError("rewards is empty; list at least one reward, e.g. rewards: [{name: colorfulness}].")
        )
    try:
        with hold_folder(
            cfg.precompute.store, key="precompute.store", what="pgot-precompute", accelerator=accelerator, wait=wait
        ):
            return _build(cfg, accelerator)
    except Interrupted:
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI, outside the rounds' agreement
        signum = int(getattr(exc, "signum", signal.SIGINT))
        raise Interrupted(
            f"interrupted by {signal.Signals(signum).name}; the store {cfg.precompute.store} keeps every batch "
            f"finished before. {_RERUN}",
            signum,
        ) from None


def _build(cfg: Config, accelerator: Accelerator) -> Path:
    pc = cfg.precompute
    store = Path(pc.store)
    n = pc.samples_per_prompt
    world = accelerator.num_processes
    prompt_set = load_prompts(cfg.prompts)
    ids, texts = [int(i) for i in prompt_set.ids], list(prompt_set.prompts)
    if len(set(ids)) != len(ids):
        raise every_process(
            ValueError(f"prompts.path={cfg.prompts.path} yields duplicate prompt ids; each prompt must appear once.")
        )

    model = load_model(cfg.model, device=accelerator.device)
    sig = sigmas(model, cfg.draft.num_steps, shift=cfg.draft.shift, resolution=cfg.model.resolution)
    dtype = str(model.dtype).removeprefix("torch.")
    box = [store_meta(cfg, model.fingerprint, model.path, dtype, sig.tolist())]
    broadcast_object_list(box, from_process=0)  # one meta.json (its timestamp included), whoever commits it
    meta = box[0]
    existing = store_io.read_meta(store)
    rows = store_io.read_rows(store)  # every process reads the same files before anyone writes
    if existing is not None and not len(rows):
        existing = None  # settings of a precompute that never finished a batch: nothing to keep
        if accelerator.is_main_process:
            log.warning("precompute.store=%s holds no finished samples; starting it afresh with this config", store)
    if existing is not None:
        problems = store_io.compare_settings(
            existing, cfg, store=store, fingerprint=model.fingerprint, default_shift=model.scheduler.config.get("shift"),
            sigmas=meta["sampler"]["sigmas"], dtype=dtype, extend=True,
        )  # fmt: skip
        if problems:
            raise every_process(
                ConfigError(
                    [f"precompute.store={store} was built with other settings, so it cannot be resumed or extended:"]
                    + problems
                )
            )
        meta["created"] = existing.get("created", meta["created"])
    elif len(rows):
        raise every_process(
            ValueError(
                f"precompute.store={store} holds samples but no {store_io.META_FILE}, so their settings are unknown. "
                f"Set precompute.store to a new folder, or delete {store} to rebuild it."
            )
        )
    done = set(zip(rows["prompt_id"].tolist(), rows["sample_index"].tolist(), strict=True))
    stored = rows.drop_duplicates("prompt_id") if len(rows) else rows
    _check_prompt_texts(
        dict(zip(stored["prompt_id"].astype(int), stored["prompt"].astype(str), strict=True)), ids, texts, store
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        store_io.remove_stale_temporaries(store)
        if existing is None:  # nothing finished: what a failed attempt left (settings, images) goes
            store_io.reset(store)
    accelerator.wait_for_everyone()  # the store is consistent before any shard

    batches = _batches(len(ids), n, pc.batch_size)
    pending = [b for b in batches if any((ids[j], i) not in done for j, i in b)]
    if accelerator.is_main_process:
        log.info(
            "precompute: %d prompts x %d samples in %s; %d of %d batches of %d to do on %d process(es)",
            len(ids), n, store, len(pending), len(batches), pc.batch_size, world,
        )  # fmt: skip
    reward_models = build_rewards(cfg.rewards, device=accelerator.device)
    with StopSignals("after the batch in flight, its shard written") as signals:
        _generate_shards(cfg, model, reward_models, ids, texts, pending, done, meta, accelerator, signals,
                         finished_before=len(batches) - len(pending), num_batches=len(batches))  # fmt: skip
        accelerator.wait_for_everyone()  # every process's shards are complete before the merge reads them
        if accelerator.is_main_process:
            _merge(store, cfg, meta)
        accelerator.wait_for_everyone()  # the merged store exists for everyone before anyone reads it
    if signals.signum:
        log.warning(
            "%s came after the last batch; the store %s is complete", signal.Signals(signals.signum).name, store
        )
    return store


def _batches(num_prompts: int, n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The fixed tiling of the (prompt index, sample index) grid, prompt-major, into batches of ``batch_size``."""
    items = [(j, i) for j in range(num_prompts) for i in range(n)]
    return [items[s : s + batch_size] for s in range(0, len(items), batch_size)]


def _generate_shards(
    cfg: Config,
    model: Any,
    reward_models: list,
    ids: list[int],
    texts: list[str],
    pending: list[list[tuple[int, int]]],
    done: set[tuple[int, int]],
    meta: dict,
    accelerator: Accelerator,
    signals: StopSignals,
    *,
    finished_before: int,
    num_batches: int,
) -> None:
    """Generate and score this process's share of the ``pending`` batches; write each batch's new rows as one shard
    (``meta.json`` first).

    Rounds of one batch per process: in round r, process ``rank`` does ``pending[r * world + rank]`` (that is,
    ``pending[rank::world]`` in order), then joins the round's stop agreement (:func:`_agree_stop`; a process
    without a batch in the last round only joins it).

    Args:
        pending: every batch still to do (the same list on every process), as (prompt index, sample index) items.
        done: (prompt id, sample index) pairs already in the store; their rows are not written again.
        signals: the stop request of this process (:class:`~pgot.checkpoints.StopSignals`).
        finished_before: batches of the tiling finished before this run (for the stop message).
        num_batches: batches in the whole tiling (for the stop message).

    Raises:
        Interrupted: on every process, after the round in which a process received SIGINT or SIGTERM.
    """
    store = Path(cfg.precompute.store)
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    shard_index = store_io.next_shard_index(store, rank)
    total = sum(len(b) for b in pending[rank::world])
    bar = tqdm(total=total, unit="img", desc="precompute", disable=not is_main, dynamic_ncols=True)
    start, nan_rows = time.perf_counter(), 0
    try:
        for first in range(0, world * math.ceil(len(pending) / world), world):  # one round: a batch per process
            if first + rank < len(pending):
                batch = pending[first + rank]
                nan_rows += _do_batch(cfg, model, reward_models, ids, texts, batch, done, meta, rank, shard_index)
                shard_index += 1
                bar.update(len(batch))
            signum = _agree_stop(accelerator, signals.signum)  # the same on every process
            if signum:
                finished = finished_before + min(len(pending), first + world)
                raise every_process(
                    Interrupted(
                        f"stopped by {signal.Signals(signum).name} after {finished} of {num_batches} batches; the "
                        f"store {store} keeps every finished batch. {_RERUN}",
                        signum,
                    )
                )
    finally:
        bar.close()  # an error or the stop message starts a line of its own
    if nan_rows:
        log.warning("process %d: %d samples have a NaN reward (kept in the store, never on a frontier)", rank, nan_rows)
    elapsed = time.perf_counter() - start
    if is_main and total:
        log.info("process %d: %d images in %.1fs (%.2f img/s)", rank, total, elapsed, total / max(elapsed, 1e-9))


def _do_batch(
    cfg: Config,
    model: Any,
    reward_models: list,
    ids: list[int],
    texts: list[str],
    batch: list[tuple[int, int]],
    done: set[tuple[int, int]],
    meta: dict,
    rank: int,
    shard_index: int,
) -> int:
    """Generate and score one batch and write its new rows as shard ``shard_index`` of this process (``meta.json``
    first, when no process has written it yet). Returns the number of new rows with a NaN reward."""
    pc = cfg.precompute
    store = Path(pc.store)
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
    new = [k for k, (pid, i) in enumerate(zip(pids, idx, strict=True)) if (pid, i) not in done]  # the rest: dups
    if pc.save_images:
        _save_images(store, images[new], [pids[k] for k in new], [idx[k] for k in new])
    if not (store / store_io.META_FILE).is_file():
        store_io.write_meta(store, meta)  # the settings are committed with the first shard, by whoever writes it
    rows = store_io.sample_rows([pids[k] for k in new], [prompts[k] for k in new], pc.seed, [idx[k] for k in new],
                                scores[new], cfg.reward_names)  # fmt: skip
    store_io.write_shard(store, rows, rank, shard_index, key="precompute.store")
    if len(model.embed_cache) > 1024:  # bound host memory on large prompt sets
        model.embed_cache.clear()
    return int(scores[new].isnan().any(dim=1).sum())


def _agree_stop(accelerator: Accelerator, signum: int) -> int:
    """The stop decision of a round, identical on every process: the largest signal number any process received
    (0: none). One all-reduce (max) of one integer under ``accelerate launch``; no collective on one process."""
    if accelerator.num_processes == 1:
        return signum
    flag = torch.tensor([signum], dtype=torch.int64, device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _merge(store: Path, cfg: Config, meta: dict) -> None:
    """Merge the shards (each prompt's front marked among its N samples), then record counts and per-reward
    statistics in meta.json (main process). A store with nothing new is left as it is."""
    names, n = cfg.reward_names, cfg.precompute.samples_per_prompt
    if not store_io.has_new_samples(store, n) and (store / store_io.SAMPLES_FILE).is_file():
        existing = store_io.read_meta(store) or {}
        if existing.get("completed") and existing.get("stats"):
            log.info("frontier store %s holds every finished prompt already; nothing to merge", store)
            return
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
