"""The run folder of ``pgot-train``: what a rerun does with it (start, resume, nothing, refuse).

With ``train.resume`` empty, a folder that holds a run is refused. With ``latest`` or a checkpoint folder:

- no checkpoint yet: a fresh start; what an attempt that stopped before its first checkpoint wrote is deleted;
- a checkpoint: the config must equal the run's ``config.yaml`` up to :data:`RESUMABLE_KEYS`
  (:func:`config_changes`); what the interrupted attempt wrote after that checkpoint is deleted;
- the checkpoint of ``train.max_steps`` and the final LoRA: the run is finished; nothing is written.

:func:`folder_problems` gives the refusals without touching anything (the preflight reports them before any weight
loads); :func:`prepare` applies the rules (main process, under the folder's lock).
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgot import checkpoints
from pgot.agent import prune_records
from pgot.config import Config, ConfigError, config_to_dict, load_config
from pgot.model import LORA_WEIGHT_NAME

log = logging.getLogger(__name__)

__all__ = [
    "RESUMABLE_KEYS",
    "RUN_ITEMS",
    "STAGE_OUTPUTS",
    "Start",
    "config_changes",
    "discard",
    "folder_problems",
    "folder_stage",
    "other_stage_problems",
    "prepare",
]

RUN_ITEMS = ("config.yaml", "sigmas.json", "metrics.jsonl", "probes", "agent", "logs", "final", "checkpoints")
"""What pgot-train writes in a run folder (an attempt that stopped before its first checkpoint leaves some)."""

RESUMABLE_KEYS: tuple[str, ...] = (
    # how long, and where
    "train.max_steps",
    "train.resume",
    "train.output_dir",
    # logging, probe and checkpoint cadence, the end-of-run table, the stop rule
    "train.log_every",
    "train.log_with",
    "train.probe_every",
    "train.reward_sets",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.final_eval",
    "train.max_bad_steps",
    "train.precompute_if_missing",
    # memory and caches: the same numbers, computed with less memory or more reuse
    "model.gradient_checkpointing",
    "model.vae_gradient_checkpointing",
    "model.embedding_cache",
    "rewards.*.gradient_checkpointing",
    "rewards.*.text_cache",
    # how a missing store is built (the store itself is checked against the config on its own)
    "precompute.batch_size",
    "precompute.save_images",
    # the agent's endpoint, credentials, timeouts and budget
    "agent.base_url",
    "agent.model",
    "agent.api_key_env",
    "agent.timeout",
    "agent.max_retries",
    "agent.retry_backoff",
    "agent.max_tokens",
    "agent.cost_limit",
    "agent.price_per_1k_input",
    "agent.price_per_1k_output",
    # not read by pgot-train
    "eval",
)
"""The config keys that may differ between a run and its resume; every other difference is refused.

A resume continues one training: it must run with the settings of the run it continues (its ``config.yaml``),
or its later steps would belong to another experiment on top of the first one's LoRA. These keys change
nothing about what is trained: how long (``train.max_steps``: extending a run; with a ``linear`` or ``cosine``
schedule the remaining steps follow the schedule of the new length), where (``train.output_dir``,
``train.resume``), what is logged and how often (logging, probe and checkpoint cadence, trackers, the final
table, the bad-step limit), how memory is spent (gradient checkpointing, caches), how a missing store would be
built, and how the agent's endpoint is reached (URL, model name, key variable, timeouts, retries, reply
length, budget). Entries are config keys as typed on the command line; ``*`` stands for a list index and an
entry also covers the keys below it (``eval`` covers ``eval.models.0.lora``). Listed in the README's
"Resume and crashes".
"""


STAGE_OUTPUTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "train": ("a pgot-train run", ("config.yaml",), ("metrics.jsonl", "checkpoints", "final")),
    "eval": ("a pgot-eval evaluation", (), ("scores.parquet", "results.md", "results.csv", "results.tex")),
    "precompute": ("a pgot-precompute frontier store", (), ("meta.json", "samples.parquet", "shards")),
}
"""What marks a folder as a stage's output: (description, every one of these, and at least one of these)."""

_OUTPUT_KEYS = {"train": "train.output_dir", "eval": "eval.output_dir", "precompute": "precompute.store"}


def folder_stage(folder: str | Path) -> tuple[str, list[str]] | None:
    """Which stage's output ``folder`` holds: ``(stage, the marking items found)``, or None (missing, empty or
    unknown content). The marks are :data:`STAGE_OUTPUTS` (a training run: ``config.yaml`` with ``metrics.jsonl``,
    ``checkpoints`` or ``final``; an evaluation: ``scores.parquet`` or ``results.*``; a frontier store:
    ``meta.json``, ``samples.parquet`` or ``shards``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return None
    for stage, (_, required, any_of) in STAGE_OUTPUTS.items():
        found = [n for n in any_of if (path / n).exists()]
        if found and all((path / n).exists() for n in required):
            return stage, [*required, *found]
    return None


def other_stage_problems(folder: str | Path, key: str, stage: str) -> list[str]:
    """Rule: a folder that holds another stage's output is refused as the output of ``stage`` (``key``, as typed):
    writing there would overwrite or mix with that output (pgot-eval would replace a run's ``config.yaml``, and the
    run could no longer be resumed; a resumed training would delete an evaluation's files).

    Returns:
        One line naming ``key``, what the folder holds and what to do; empty when the folder holds no other
        stage's output.
    """
    found = folder_stage(folder)
    if found is None or found[0] == stage:
        return []
    other, items = found
    return [
        f"{key}={folder} holds {STAGE_OUTPUTS[other][0]} ({', '.join(items)}; written as {_OUTPUT_KEYS[other]}), not "
        f"the output of pgot-{stage}: writing there would overwrite or mix with it. Set {key} to a folder of its own (a "
        f"new one, or one pgot-{stage} wrote)."
    ]


@dataclass
class Start:
    """How a run starts in its folder: what :func:`prepare` decided (on the main process; pgot.train shares it with every process)."""

    resume: str = ""  # the checkpoint to load; empty: a fresh start
    finished: bool = False  # the run is complete: nothing to train, nothing to write
    problems: list[str] = field(default_factory=list)  # a refusal, raised on every process


def folder_problems(cfg: Config, num_processes: int = 1) -> list[str]:
    """Why ``train.output_dir`` cannot be used with ``cfg`` (the rules of :func:`prepare`, read
    only: the preflight reports them before anything loads). Empty when the run may start or resume.

    A folder that holds a run (or an attempt at one) with ``train.resume`` empty; ``train.resume`` naming no
    checkpoint, or another run's checkpoint while the folder holds one; a config that differs from the run's in keys
    outside :data:`RESUMABLE_KEYS`; ``train.max_steps`` below the checkpoint's step; a checkpoint written by
    another number of processes than ``num_processes`` (:func:`pgot.checkpoints.process_count_problem`).
    """
    t = cfg.train
    run_dir = Path(t.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    present = [n for n in RUN_ITEMS if (run_dir / n).exists()]
    if not t.resume:
        if present:
            what = (
                "a run"
                if checkpoints.list_checkpoints(ckpt_dir)
                else "an attempt at a run that stopped before its first checkpoint"
            )
            return [
                f"train.output_dir={run_dir} already holds {what}. Continue it with train.resume=latest (an attempt "
                "without a checkpoint starts afresh), or choose a new train.output_dir."
            ]
        return []
    try:
        target = checkpoints.resume_folder(t.resume, run_dir)
    except ValueError as exc:
        return [str(exc)]
    if target is None:
        return []
    inside = target.resolve().parent == ckpt_dir.resolve()
    if not inside and present:
        return [
            f"train.resume={t.resume} is a checkpoint of another run, but train.output_dir={run_dir} already holds "
            "one. Continue another run in a new train.output_dir."
        ]
    source = run_dir / "config.yaml" if inside else target.parent.parent / "config.yaml"
    problems = config_changes(cfg, source, target)
    if problems:
        return problems
    state = checkpoints.read_state(target)
    step = state.step
    count = checkpoints.process_count_problem(target, num_processes, state)
    if count:
        return [count]
    if step > t.max_steps:
        return [
            f"train.max_steps={t.max_steps} is below the step of the checkpoint to resume ({step}, {target}): a run "
            f"cannot be shortened. Set train.max_steps>={step}, or resume from an earlier checkpoint with "
            f"train.resume={ckpt_dir / checkpoints.checkpoint_name(t.max_steps)} (the later ones are then deleted)."
        ]
    return []


def prepare(cfg: Config, num_processes: int = 1) -> Start:
    """The rules for a run folder (main process): :func:`folder_problems` refuses; then, with ``train.resume``
    ``latest`` or a checkpoint folder:

    - no checkpoint: a fresh start; what an attempt that stopped before its first checkpoint wrote is deleted;
    - a checkpoint: the records the interrupted attempt wrote after the checkpoint are deleted (checkpoints and the
      final LoRA after an explicitly named older checkpoint, agent records, probe grids; ``metrics.jsonl`` is
      truncated when the log opens);
    - the checkpoint of ``train.max_steps`` and the final LoRA: the run is finished; nothing is written.

    Raises:
        ConfigError: one line per problem of :func:`folder_problems`.
    """
    problems = folder_problems(cfg, num_processes)
    if problems:
        raise ConfigError(problems)
    t = cfg.train
    run_dir = Path(t.output_dir)
    ckpt_dir = run_dir / "checkpoints"
    found = checkpoints.list_checkpoints(ckpt_dir)
    present = [n for n in RUN_ITEMS if (run_dir / n).exists()]
    if not t.resume:
        return Start()
    target = checkpoints.resume_folder(t.resume, run_dir)
    if target is None:
        if present:
            discard(run_dir, present)
            log.warning(
                "train.output_dir=%s held an attempt that stopped before its first checkpoint; starting the run "
                "afresh (removed %s)", run_dir, ", ".join(present),
            )  # fmt: skip
        return Start()
    inside = target.resolve().parent == ckpt_dir.resolve()
    if not inside:
        return Start(resume=str(target))
    step = checkpoints.read_state(target).step
    newer = [p.name for p in found if checkpoints.step_of(p) > step]
    if newer:
        checkpoints.discard_after(ckpt_dir, step)
        shutil.rmtree(run_dir / "final", ignore_errors=True)
        log.warning("resuming from %s: deleted the later checkpoints %s and final/", target, ", ".join(newer))
    if step == t.max_steps and (run_dir / "final" / LORA_WEIGHT_NAME).is_file():
        return Start(resume=str(target), finished=True)
    checkpoints.clear_temporaries(ckpt_dir)
    shutil.rmtree(run_dir / ".tmp-final", ignore_errors=True)
    prune_records(run_dir / "agent", len(checkpoints.read_state(target).agent.history))
    for grid in (run_dir / "probes").glob("step-*.png"):
        if grid.stem.removeprefix("step-").isdigit() and int(grid.stem.removeprefix("step-")) > step:
            grid.unlink()
    return Start(resume=str(target))


def discard(run_dir: Path, items: list[str]) -> None:
    """Delete ``items`` of ``run_dir`` (files or folders)."""
    for name in items:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def config_changes(cfg: Config, saved: str | Path, checkpoint: str | Path | None = None) -> list[str]:
    """How ``cfg`` differs from the config a run was trained with, outside :data:`RESUMABLE_KEYS`.

    Args:
        cfg: the config of the resume.
        saved: the run's ``config.yaml``.
        checkpoint: the checkpoint being resumed, for the messages.

    Returns:
        One line per differing key, named as typed on the command line (``train.objective: weighted_sum here,
        pgot in the run``), then a line saying what to do; empty when the resume may go ahead.
    """
    saved = Path(saved)
    where = f"train.output_dir={saved.parent}"
    if not saved.is_file():
        return [
            f"{where} holds {checkpoint or 'checkpoints'} but no config.yaml, so the settings of that run are unknown "
            "and a resume could mix two trainings. Restore its config.yaml, or choose a new train.output_dir."
        ]
    try:
        old = _typed_keys(config_to_dict(load_config(saved)))
    except ConfigError as exc:
        return [
            f"{saved} does not load with this pgot ({'; '.join(exc.problems)}), so a resume cannot be checked against "
            "it. Continue the run with the pgot that started it, or choose a new train.output_dir."
        ]
    new = _typed_keys(config_to_dict(cfg))
    lines = []
    for key in [*old, *(k for k in new if k not in old)]:
        a, b = new.get(key, _ABSENT), old.get(key, _ABSENT)
        if a != b and not any(fnmatch.fnmatchcase(key, p) or key.startswith(f"{p}.") for p in RESUMABLE_KEYS):
            lines.append(f"{key}: {_show(a)} here, {_show(b)} in the run")
    if not lines:
        return []
    return [
        f"{where} holds a run trained with other settings ({saved}); resuming it with these would mix two trainings:",
        *lines,
        "Resume with the run's settings (drop these overrides), or start a new run with another train.output_dir. "
        "Settings that may change on resume: pgot.run_folder.RESUMABLE_KEYS (README, 'Resume and crashes').",
    ]


_ABSENT = object()


def _typed_keys(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"rewards.0.weight": 2.0, "train.active_rewards": [...], ...}``."""
    if isinstance(obj, dict) and (obj or not prefix):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_typed_keys(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(_typed_keys(v, f"{prefix}.{i}"))
        return out
    return {prefix: obj}


def _show(value: Any) -> str:
    """A value as one would type it in an override."""
    if value is _ABSENT:
        return "(not set)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)
