"""Training checkpoints: the trainer state, and save / load / prune / revert, atomic and multi-process safe.

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXX/`` holding

- the accelerate state of every process (optimizer, LR scheduler, each process's RNG states),
- ``lora_state.safetensors``: the trainable LoRA parameters in float32, by position,
- ``pytorch_lora_weights.safetensors``: the same adapter in the diffusers format (loadable on its own),
- ``trainer_state.json``: :class:`TrainerState`.

**Atomic and multi-process safe.** Every process writes its part into ``.tmp-step-XXXXXX/``; all processes meet
at a barrier *after* their writes; only then does the main process add its files and rename the folder to
``step-XXXXXX``, and only a folder with ``trainer_state.json`` (written last) counts as a checkpoint. A run killed
at any point leaves either the previous checkpoints or the new complete one, never a folder missing a process's
RNG state; :func:`list_checkpoints` ignores temporary folders and :func:`save` clears stale ones.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from pgot.agent import AgentState
from pgot.files import atomic_write, atomic_write_json
from pgot.model import SD3Model, save_lora

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

__all__ = [
    "STATE_FILE",
    "TrainerState",
    "checkpoint_name",
    "discard_after",
    "list_checkpoints",
    "load",
    "prune",
    "resume_folder",
    "save",
    "write_state",
]

STATE_FILE = "trainer_state.json"
LORA_STATE = "lora_state.safetensors"


@dataclass
class TrainerState:
    """What a checkpoint holds beyond the accelerate state (``trainer_state.json``)."""

    step: int = 0
    """Optimizer steps done."""
    bad_steps: int = 0
    """Consecutive skipped steps (NaN / inf loss or reward)."""
    skipped_steps: int = 0
    """All skipped steps."""
    metrics_lines: int = 0
    """Lines of metrics.jsonl written up to this state (resume truncates the file to them)."""
    running: list[float] = field(default_factory=list)
    """Online std without a store: [count, sum_1..M, sumsq_1..M] of the gathered reward vectors."""
    probe_means: dict[str, list[float]] = field(default_factory=dict)
    """Per reward, the probe mean at every probe (the heuristic agent reads it)."""
    agent: AgentState = field(default_factory=AgentState)
    """Active rewards, strategy, removals, approved checkpoint, decisions, agent cost."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        """Inverse of :meth:`to_dict`."""
        plain = {k: v for k, v in data.items() if k in {"step", "bad_steps", "skipped_steps", "metrics_lines"}}
        return cls(
            **{k: int(v) for k, v in plain.items()},
            running=[float(v) for v in data.get("running", [])],
            probe_means={k: [float(x) for x in v] for k, v in data.get("probe_means", {}).items()},
            agent=AgentState.from_dict(data.get("agent", {})),
        )


def checkpoint_name(step: int) -> str:
    """``step-XXXXXX``: the folder name of the checkpoint at ``step``."""
    return f"step-{step:06d}"


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (temporary folders of interrupted saves are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=_step_of)


def write_state(folder: str | Path, state: TrainerState) -> None:
    """``folder/trainer_state.json`` (atomic replace)."""
    atomic_write_json(Path(folder) / STATE_FILE, state.to_dict(), indent=1)


def save(
    accelerator: Accelerator,
    folder: str | Path,
    state: TrainerState,
    params: Sequence[torch.nn.Parameter],
    model: SD3Model,
) -> Path:
    """Write ``folder/step-XXXXXX`` for ``state.step`` atomically; a collective (call it on every process).

    Every process saves its accelerate state (optimizer, scheduler, its RNG) into a temporary folder; after a
    barrier that guarantees every process has finished writing, the main process adds the LoRA and the trainer
    state and renames the folder. A second barrier makes the checkpoint visible to all before anyone reads it.

    Returns:
        The checkpoint folder.
    """
    folder = Path(folder)
    name = checkpoint_name(state.step)
    final, tmp = folder / name, folder / f".tmp-{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()  # the folder exists before anyone writes into it
    accelerator.save_state(str(tmp))  # every process: optimizer, scheduler, its own RNG states
    accelerator.wait_for_everyone()  # every process's files are complete before the rename
    if accelerator.is_main_process:
        tensors = {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        atomic_write(tmp / LORA_STATE, lambda t: save_file(tensors, str(t)), fsync=False)
        save_lora(model, tmp)
        write_state(tmp, state)  # last: a folder with trainer_state.json is complete
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()  # the checkpoint exists for everyone before anyone reads or prunes
    return final


def load(accelerator: Accelerator, folder: str | Path, params: Sequence[torch.nn.Parameter]) -> TrainerState:
    """LoRA, optimizer, scheduler and RNG from ``folder`` on every process (a collective); its trainer state."""
    folder = Path(folder)
    accelerator.load_state(str(folder))
    saved = load_file(str(folder / LORA_STATE))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[f"{i}"].to(p.device, p.dtype))
    return TrainerState.from_dict(json.loads((folder / STATE_FILE).read_text()))


def prune(folder: str | Path, keep: int, protect: Sequence[str] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints, never those named in ``protect`` (the approved one)."""
    found = list_checkpoints(folder)
    for p in found[: max(0, len(found) - keep)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def discard_after(folder: str | Path, step: int) -> None:
    """Delete the checkpoints newer than ``step`` (the abandoned branch after a revert)."""
    for p in list_checkpoints(folder):
        if _step_of(p) > step:
            shutil.rmtree(p, ignore_errors=True)


def resume_folder(spec: str, run_dir: str | Path) -> Path | None:
    """The checkpoint ``train.resume`` names: ``latest`` (None when there is none yet), or a folder.

    Raises:
        ValueError: ``spec`` names a folder that is not a pgot checkpoint.
    """
    run_dir = Path(run_dir)
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    folder = Path(spec)
    if not (folder / STATE_FILE).is_file():
        raise ValueError(
            f"train.resume={spec!r} is not a pgot checkpoint folder (no {STATE_FILE}). Use train.resume=latest or a "
            f"folder such as {run_dir / 'checkpoints' / checkpoint_name(100)}."
        )
    return folder
