"""Devices and dtypes: what ``auto`` means, in one place.

``model.device`` / ``model.dtype`` / ``rewards.<i>.dtype`` accept ``auto``: CUDA when available, else the CPU;
bfloat16 on CUDA, float32 elsewhere.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "resolve_device", "resolve_dtype"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Dtype names accepted by the ``dtype`` config keys."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` / None -> ``cuda`` when available, else ``cpu``; anything else as given (``cpu``, ``cuda:1``)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
