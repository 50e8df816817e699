"""Training checkpoints: the trainer state, and save / load / prune / revert, atomic and multi-process safe.

A checkpoint is a folder ``<run>/checkpoints/step-XXXXXX/`` holding

- the accelerate state: ``optimizer.bin``, ``scheduler.bin`` and every process's RNG states
  (``random_states_<rank>.pkl``, one per process),
- ``lora_state.safetensors``: the trainable LoRA parameters in float32, by position,
- ``pytorch_lora_weights.safetensors``: the same adapter in the diffusers format (loadable on its own),
- ``trainer_state.json``: :class:`TrainerState` (step, counters, agent state, the metrics.jsonl line count).

**Atomic and multi-process safe.** Every process writes its part into ``.tmp-step-XXXXXX/``; all processes meet
at a barrier *after* their writes; only then does the main process add its files and rename the folder to
``step-XXXXXX``, and only a folder with ``trainer_state.json`` (written last) counts as a checkpoint. A barrier
after the rename makes it visible to every process before anyone reads, prunes or replaces it. A run killed at
any point leaves either the previous checkpoints or the new complete one, never a folder missing a process's RNG
state; :func:`list_checkpoints` ignores temporary folders and :func:`clear_temporaries` removes them.
:func:`load` refuses a checkpoint that lacks a file (a rank's RNG state included), since accelerate would skip a
missing RNG file with an INFO line and the resume would silently stop being exact.

**Resume is exact**: the prompts and noise of step s are functions of ``(train.seed, s)`` only, and the
checkpoint holds everything else the next step reads (LoRA, AdamW moments, schedule, RNG, trainer state), so a
run resumed from the checkpoint at step s on the same number of processes continues bit for bit as if it had
never stopped (tested on CPU).

**Stopping** (:class:`StopSignals`, :class:`Interrupted`): ``pgot-train`` turns SIGINT and SIGTERM into a stop
at the end of the step in flight, with a checkpoint of that step (see :mod:`pgot.train`); ``pgot-precompute`` into
a stop after the batch in flight, its shard written (see :mod:`pgot.precompute`). Every process of a launch agrees
on the stop through a collective it runs anyway, so all stop at the same point with the same message.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from pgot.agent import AgentState
from pgot.devices import every_process
from pgot.files import atomic_write, atomic_write_json
from pgot.model import SD3Model, save_lora

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

__all__ = [
    "STATE_FILE",
    "Interrupted",
    "StopSignals",
    "TrainerState",
    "checkpoint_name",
    "clear_temporaries",
    "discard_after",
    "list_checkpoints",
    "load",
    "process_count_problem",
    "prune",
    "read_state",
    "resume_folder",
    "save",
    "step_of",
    "write_state",
]

STATE_FILE = "trainer_state.json"
LORA_STATE = "lora_state.safetensors"
_TMP_PREFIX = ".tmp-"


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal (SIGINT: Ctrl-C; SIGTERM: what schedulers send on preemption or time-out).

    A ``KeyboardInterrupt``, so ``except Exception`` never swallows it. The CLI prints its message and exits
    with :attr:`exit_code`.

    Attributes:
        signum: the signal number.
        checkpoint: the checkpoint written before stopping, or None.
    """

    def __init__(self, message: str, signum: int = signal.SIGINT, checkpoint: Path | None = None):
        super().__init__(message)
        self.signum = int(signum)
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        """``128 + signum``, the shell convention: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StopSignals:
    """SIGINT and SIGTERM inside the block: the first one is remembered (:attr:`signum`) for the caller to stop at
    its next safe point; every process agrees on it through a collective (``pgot-train``: after the step in flight,
    with a checkpoint, the flag riding in the gradient all-reduce; ``pgot-precompute``: after the batch in flight,
    its shard written, through one all-reduce per round of batches), then raises :class:`Interrupted`.

    A repeat within :attr:`repeat_s` seconds is the same request: schedulers and terminals signal every process of
    a job, and ``accelerate launch`` forwards the signal it gets to each worker as well. A signal after that stops
    at once: a ``KeyboardInterrupt`` with the signal's number as ``signum``, which the caller turns into an
    :class:`Interrupted` saying what a rerun does. Outside the main thread (where Python cannot install handlers)
    signals keep their meaning. The handlers in place before the block are restored when it ends.

    Args:
        when: when the caller stops, for the warning logged on the first signal, e.g. ``after the step in flight,
            with a checkpoint``.

    Attributes:
        signum: the first signal's number, 0 while none came.
        repeat_s: seconds (monotonic clock) after the first signal during which another one is the same request.
    """

    repeat_s = 5.0

    def __init__(self, when: str = "at the next safe point") -> None:
        self.when = when
        self.signum = 0
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum and time.monotonic() - self._first < self.repeat_s:
            return  # the same request, delivered twice (scheduler or terminal, and the launcher)
        if self.signum:
            stop = KeyboardInterrupt()
            stop.signum = signum  # the caller turns it into Interrupted, saying what a rerun does
            raise stop
        self.signum, self._first = signum, time.monotonic()
        log.warning(
            "%s received: stopping %s (send it again after %g s to stop at once)",
            signal.Signals(signum).name, self.when, self.repeat_s,
        )  # fmt: skip


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
    """Lines of metrics.jsonl written up to this state (resume truncates the file to them); the next line's
    ``log_index``."""
    steps_run: int = 0
    """Optimizer steps executed so far, those of branches an agent revert abandoned included: never goes back.
    The trackers' x axis (TensorBoard, W&B)."""
    decided_at: int = 0
    """``steps_run`` at the agent's last decision. The checkpoint an agent decides on is written before the decision;
    a resume from a checkpoint whose decision is missing (the run stopped in between) makes that decision first."""
    num_processes: int = 0
    """Processes of the run that wrote this state (each wrote its ``random_states_<rank>.pkl``); set by :func:`save`."""
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
            steps_run=int(data.get("steps_run", data.get("step", 0))),  # states written before the field: no reverts
            decided_at=int(data.get("decided_at", data.get("steps_run", data.get("step", 0)))),
            num_processes=int(data.get("num_processes", 0)),
            running=[float(v) for v in data.get("running", [])],
            probe_means={k: [float(x) for x in v] for k, v in data.get("probe_means", {}).items()},
            agent=AgentState.from_dict(data.get("agent", {})),
        )


def checkpoint_name(step: int) -> str:
    """``step-XXXXXX``: the folder name of the checkpoint at ``step``."""
    return f"step-{step:06d}"


def step_of(folder: str | Path) -> int:
    """The step of the checkpoint folder ``step-XXXXXX``."""
    return int(Path(folder).name.removeprefix("step-"))


def read_state(folder: str | Path) -> TrainerState:
    """The :class:`TrainerState` of a checkpoint folder, without loading anything else.

    Raises:
        ValueError: no readable ``trainer_state.json``.
    """
    folder = Path(folder)
    try:
        return TrainerState.from_dict(json.loads((folder / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:  # unreadable, not JSON, not a state
        raise ValueError(
            f"checkpoint {folder} has no readable {STATE_FILE} ({exc}). Resume from another checkpoint "
            f"(train.resume=<folder>) or delete {folder}."
        ) from None


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
    return sorted(found, key=step_of)


def clear_temporaries(folder: str | Path) -> list[str]:
    """Remove what interrupted saves left in ``folder``: ``.tmp-step-*`` folders and ``step-*`` folders without
    ``trainer_state.json``; returns their names. Main process only, while no save is running."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    complete = {p.name for p in list_checkpoints(folder)}
    gone = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or (p.name.startswith("step-") and p.name not in complete)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


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
    state.num_processes = accelerator.num_processes
    name = checkpoint_name(state.step)
    final, tmp = folder / name, folder / f"{_TMP_PREFIX}{name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()  # the folder exists before anyone writes into it
    accelerator.save_state(str(tmp))  # every process: optimizer, scheduler, its own RNG states
    accelerator.wait_for_everyone()  # every process's files are complete before the rename
    if accelerator.is_main_process:
        missing = _missing_files(tmp, accelerator.num_processes, with_state=False)
        assert not missing, f"{tmp} lacks {missing} after every process saved its state"
        tensors = {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        atomic_write(tmp / LORA_STATE, lambda t: save_file(tensors, str(t)), fsync=False)
        save_lora(model, tmp)
        write_state(tmp, state)  # last: a folder with trainer_state.json is complete
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()  # the checkpoint exists for everyone before anyone reads or prunes
    return final


def process_count_problem(folder: str | Path, num_processes: int, state: TrainerState | None = None) -> str | None:
    """Why a run of ``num_processes`` processes cannot resume from the checkpoint ``folder``, or None when it can.

    Rule: a checkpoint resumes only in a run of as many processes as wrote it: each process draws its own prompts
    and the batch is ``train.prompts_per_step`` per process, so another count would be another run. (A state
    written before ``num_processes`` was recorded counts its ``random_states_<rank>.pkl`` files.)

    Args:
        folder: a checkpoint folder.
        num_processes: the processes of the run that would resume.
        state: its trainer state when read already.

    Raises:
        ValueError: the state cannot be read (:func:`read_state`).
    """
    folder = Path(folder)
    state = state or read_state(folder)
    written = state.num_processes or len(list(folder.glob("random_states_*.pkl")))
    if written == num_processes:
        return None
    return (
        f"checkpoint {folder} was written by a run of {written} process(es); this one has {num_processes}. Each "
        f"process draws its own prompts and the batch is train.prompts_per_step per process, so this would be another "
        f"run: launch it with {written} process(es) (accelerate launch --num_processes {written}), or choose a new "
        "train.output_dir."
    )


def load(accelerator: Accelerator, folder: str | Path, params: Sequence[torch.nn.Parameter]) -> TrainerState:
    """LoRA, optimizer, scheduler and RNG from ``folder`` on every process (a collective); its trainer state.

    Raises:
        ValueError: the checkpoint lacks a file (an interrupted copy, a file deleted by hand, or a rank's RNG
            state that a pre-fix pgot failed to write), so resuming from it would not be exact.
    """
    folder = Path(folder)
    state = read_state(folder)
    problem = process_count_problem(folder, accelerator.num_processes, state)
    if problem:
        raise every_process(ValueError(problem))  # every process reads the same checkpoint
    missing = _missing_files(folder, accelerator.num_processes)  # as many as wrote it (process_count_problem)
    if missing:
        raise every_process(
            ValueError(
                f"checkpoint {folder} is incomplete: it lacks {', '.join(missing)}, so resuming from it would not be exact. "
                f"Resume from an earlier checkpoint with train.resume=<folder>, or delete {folder} to resume from the one "
                "before it."
            )
        )
    try:
        accelerator.load_state(str(folder))
    except FileNotFoundError as exc:
        raise every_process(
            ValueError(
                f"checkpoint {folder} is incomplete: it lacks {Path(exc.filename or '?').name}, so it cannot be "
                f"resumed. Resume from an earlier checkpoint with train.resume=<folder>, or delete {folder} to resume "
                "from the one before it."
            )
        ) from None
    saved = load_file(str(folder / LORA_STATE))
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[f"{i}"].to(p.device, p.dtype))
    return state


def _missing_files(folder: Path, num_processes: int, *, with_state: bool = True) -> list[str]:
    """The files of a complete checkpoint written by ``num_processes`` processes that ``folder`` lacks: every
    process's RNG state (accelerate skips a missing one silently) and, with ``with_state``, the LoRA and the
    trainer state. (A missing optimizer or scheduler file fails loudly in accelerate; :func:`load` reports it.)"""
    names = [f"random_states_{i}.pkl" for i in range(num_processes)]
    if with_state:
        names += [LORA_STATE, STATE_FILE]
    return [n for n in names if not (folder / n).is_file()]


def prune(folder: str | Path, keep: int, protect: Sequence[str] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints, never those named in ``protect`` (the approved one)."""
    found = list_checkpoints(folder)
    for p in found[: max(0, len(found) - keep)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def discard_after(folder: str | Path, step: int) -> None:
    """Delete the checkpoints newer than ``step`` (the abandoned branch after a revert)."""
    for p in list_checkpoints(folder):
        if step_of(p) > step:
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
