"""pgot/__init__.py: ``import pgot`` is light, and every public name stays the documented object whatever was
imported before (a submodule named like a public function, ``pgot.ot_loss``, must not replace it)."""

from __future__ import annotations

import inspect
import json
import random
import subprocess
import sys
from pathlib import Path

import pgot

ROOT = Path(__file__).resolve().parents[1]
SUBMODULES = sorted(
    f"pgot.{p.stem}" for p in (ROOT / "pgot").glob("*.py") if p.stem not in ("__init__", "__main__")
) + ["pgot.rewards"]


def _probe(order: list[str]) -> dict:
    """In a fresh interpreter: import ``order`` (submodules and public names, interleaved), then describe every
    public name."""
    code = f"""
import importlib, json, types
import pgot
for item in {order!r}:
    if item.startswith("pgot."):
        importlib.import_module(item)
    else:
        getattr(pgot, item)
out = {{}}
for name in pgot.__all__:
    value = getattr(pgot, name)
    out[name] = [type(value).__name__, getattr(value, "__module__", None), isinstance(value, types.ModuleType)]
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_is_light():
    code = "import sys, pgot; print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_public_names_are_never_shadowed_in_any_import_order():
    names = [n for n in pgot.__all__ if n != "__version__"]
    expected = {}
    for name in names:
        value = getattr(pgot, name)
        expected[name] = [type(value).__name__, getattr(value, "__module__", None), False]
        assert not inspect.ismodule(value), name
    assert pgot.ot_loss.__module__ == "pgot.ot_loss" and callable(pgot.ot_loss)
    rng = random.Random(0)
    for _ in range(3):
        order = SUBMODULES + names
        rng.shuffle(order)
        got = _probe(order)
        assert {k: v for k, v in got.items() if k != "__version__"} == expected, order
