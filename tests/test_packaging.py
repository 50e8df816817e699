"""The wheel: every package of pgot and the shipped configs (the repository's configs/, installed as pgot.configs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    """pyproject.toml lists pgot's packages by hand (pgot.configs maps to configs/): a new subpackage must be added."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = pytest.importorskip("setuptools")

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(setuptools.find_packages(str(ROOT), include=["pgot", "pgot.*"]))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "pgot.configs" in listed


def test_wheel_ships_the_configs_and_finds_them_by_name(tmp_path):
    """Build the wheel from a copy of the sources, install it into a folder, and resolve `--config debug` there."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pgot", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("pgot-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"pgot/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "pgot/data/demo_prompts.txt" in names and "pgot/rewards/__init__.py" in names
    # what `--config debug` (the testbed world) reads: the model, the preference models, the prompts
    testbed = {"pgot/data/testbed_prompts.txt", "pgot/testbed/model/model_index.json",
               "pgot/testbed/model/transformer/diffusion_pytorch_model.safetensors",
               "pgot/testbed/preference/tb_align.safetensors", "pgot/testbed/preference/tb_pref.safetensors"}  # fmt: skip
    assert testbed <= names, sorted(testbed - names)

    target = tmp_path / "site"
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not this checkout
    code = (
        "import pgot.config as c; cfg = c.load_config('debug'); "
        "print(c.__file__); print(c.configs_dir()); print(cfg.model.path, cfg.train.output_dir)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    module, folder, values = run.stdout.strip().splitlines()
    assert module.startswith(str(target)) and folder == str(target / "pgot" / "configs")
    assert values == "builtin:testbed runs/debug"
    listed = subprocess.run(
        [sys.executable, "-m", "pgot", "config", "list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and "baselines/weighted_1111" in listed.stdout, listed.stderr[-3000:]
