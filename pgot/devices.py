"""Devices and dtypes: what ``auto`` means, in one place.

``model.device`` / ``model.dtype`` / ``rewards.<i>.dtype`` accept ``auto``: CUDA when available, else the CPU;
bfloat16 on CUDA, float32 elsewhere.
"""

from __future__ import annotations

import os
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

__all__ = [
    "DTYPES",
    "device_problems",
    "every_process",
    "launch_size",
    "on_cpu",
    "processes",
    "resolve_device",
    "resolve_dtype",
]

_E = TypeVar("_E", bound=BaseException)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtype names accepted by the ``dtype`` config keys."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` / None -> ``cuda`` when available, else ``cpu``; anything else as given (``cpu``, ``cuda:1``)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def on_cpu(device: str | None) -> bool:
    """Whether a run with ``model.device=device`` works on the CPU (gloo between processes) rather than on CUDA
    (NCCL): no CUDA here, ``cpu`` named, or started by ``accelerate launch --cpu`` (``ACCELERATE_USE_CPU``, which
    accelerate reads only when it creates the processes' state: :func:`processes` creates it first)."""
    return not torch.cuda.is_available() or str(device) == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")


def processes(device: str | None) -> PartialState:
    """The processes of this run: this one alone, or those ``accelerate launch`` started (accelerate's
    ``PartialState``, on the CPU or CUDA as :func:`on_cpu` says; the run's ``Accelerator`` then shares it).
    Nothing is loaded: what :func:`pgot.preflight.preflight` needs to check as a collective."""
    return PartialState(cpu=on_cpu(device))


def launch_size() -> int:
    """How many processes ``accelerate launch`` / ``torchrun`` started this one among (``WORLD_SIZE``); 1 when it
    was not started by them (or the variable is not a number)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    except ValueError:
        return 1


def every_process(error: _E) -> _E:
    """Mark ``error`` as raised alike by every process of a launch (from one decision: a broadcast, an all-reduce,
    the same file read by all), and return it. The CLI then prints it once per machine, on the machine's first
    process, and the others leave after it (``pgot.cli._guard``); alone, a process prints it."""
    error.every_process = True
    return error


def device_problems(device: str | None, key: str = "model.device") -> list[str]:
    """Why the device setting ``device`` (config key ``key``) cannot be used on this machine; empty when it can.

    Rule: a device that is named must exist here, in every stage (pgot-train would otherwise run on the CPU
    behind the user's back, pgot-eval would stop with a driver traceback). ``auto`` always can; ``cuda:<i>`` needs
    more than ``i`` CUDA devices; ``mps`` and other accelerators need their backend to say it is available.

    Returns:
        One line naming ``key`` as typed on the command line, or nothing.
    """
    if device is None or str(device) == "auto":
        return []
    fix = f"Set {key}=auto (CUDA when there is one, else the CPU) or {key}=cpu, or run where that device exists."
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        return [f"{key}={device!r} is not a device name. Use auto, cpu, cuda or cuda:<index>."]
    if dev.type == "cpu":
        return []
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return [
                f"{key}={device} but this machine has no usable CUDA device (torch.cuda.is_available() is False). {fix}"
            ]
        if dev.index is not None and dev.index >= count:
            return [f"{key}={device} but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}). {fix}"]
        return []
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        return [f"{key}={device} but this machine has no {dev.type} device. {fix}"]
    return []


def resolve_dtype(
    setting: str | torch.dtype | None,
    device: torch.device | str,
    *,
    default: torch.dtype | None = None,
    key: str = "model.dtype",
) -> torch.dtype:
    """The weights dtype for a ``dtype`` setting.

    Args:
        setting: a ``torch.dtype``, one of :data:`DTYPES`' names, or ``auto`` / None.
        device: where the weights live (``auto`` picks bfloat16 on CUDA, float32 elsewhere).
        default: what ``auto`` means instead (e.g. the caller's explicit dtype).
        key: the config key named in errors.

    Raises:
        ValueError: an unknown dtype name.
    """
    if isinstance(setting, torch.dtype):
        return setting
    if setting is None or setting == "auto":
        if default is not None:
            return default
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if setting not in DTYPES:
        raise ValueError(f"{key} must be one of auto, {', '.join(DTYPES)}; got {setting!r}.")
    return DTYPES[setting]
