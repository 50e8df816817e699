"""pgot/__init__.py: ``import pgot`` is light, and every public name stays the documented object whatever was
imported before (a submodule named like a public function, ``pgot.ot_loss``, must not replace it)."""

from __future__ import annotations

import inspect
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

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


def test_generate_images_is_the_one_call_from_prompts_to_images():
    """pgot.generate_images (not the submodule pgot.generate): prompts x seeds -> images in [0, 1], noise from the
    seed only, wrong types named."""
    assert "generate_images" in pgot.__all__ and callable(pgot.generate_images)
    model = pgot.load_model(pgot.ModelConfig(tiny=True, resolution=16, device="cpu"))
    images = pgot.generate_images(model, ["a red fox", "a bowl of ramen"], seeds=[3, 4], num_steps=2, batch_size=3)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and images.device.type == "cpu"
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    one = pgot.generate_images(model, "a bowl of ramen", seeds=np.array([4]), num_steps=2)  # image 3 again
    torch.testing.assert_close(one[0], images[3], atol=1e-5, rtol=0)
    assert not torch.equal(images[2], images[3])  # another seed, another image
    with pytest.raises(TypeError, match=r"generate_images\(\): prompts must be a str or a sequence of strs, got int"):
        pgot.generate_images(model, 3)
    with pytest.raises(TypeError, match=r"seeds must be an int or a sequence of ints, got str"):
        pgot.generate_images(model, "a red fox", seeds="0")
    with pytest.raises(ValueError, match="at least one prompt"):
        pgot.generate_images(model, [])
    with pytest.raises(ValueError, match="draft.num_steps must be >= 1"):
        pgot.generate_images(model, "a red fox", num_steps=0)


def test_readme_library_example_runs(tmp_path):
    """The first code block of README's "Using pgot as a library" runs as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using pgot as a library", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_reward_strength_defaults_load_without_the_model_libraries():
    """pgot.rewards.STRENGTHS (read by the agent) imports neither transformers nor open_clip; the paper's strong
    rewards are ICT and HP (the testbed's learned preference models are its strong ones), every other known reward
    (and an unknown one) is weak."""
    code = (
        "import sys, json; from pgot.rewards import STRENGTHS, default_strength; import pgot.agent; "
        "print(json.dumps([sorted(m for m in ('transformers', 'open_clip', 'diffusers') if m in sys.modules), "
        "STRENGTHS, default_strength('my_reward'), default_strength('ict', 'weak')]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy, table, unknown, explicit = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert {n for n, s in table.items() if s == "strong"} == {"ict", "hp", "tb_align", "tb_pref"}  # + testbed
    from pgot.rewards import REWARDS

    assert set(table) == set(REWARDS) and unknown == "weak" and explicit == "weak"
