"""pgot/devices.py: what ``auto`` means for devices and dtypes."""

from __future__ import annotations

import pytest
import torch

from pgot.devices import resolve_device, resolve_dtype


def test_auto_rules():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype(None, "cuda") == torch.bfloat16 and resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("auto", "cpu", default=torch.bfloat16) == torch.bfloat16
    assert (
        resolve_dtype(torch.float64, "cpu") == torch.float64
        and resolve_dtype("float32", "cuda", default=torch.float16) == torch.float32
    )
    with pytest.raises(
        ValueError, match=r"rewards\.0\.dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"
    ):
        resolve_dtype("fp8", "cpu", key="rewards.0.dtype")


def test_accelerate_launch_cpu_runs_on_the_cpu(monkeypatch):
    """``accelerate launch --cpu`` sets ACCELERATE_USE_CPU, which accelerate reads only when it creates the
    processes' state; pgot creates that state first (pgot.devices.processes), so it must read the flag too."""
    from pgot.devices import on_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert not on_cpu("auto") and on_cpu("cpu")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # what accelerate launch --cpu exports
    assert on_cpu("auto") and on_cpu("cuda")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    assert not on_cpu("auto")
