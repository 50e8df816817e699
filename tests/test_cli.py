"""Tests of pgot/cli.py: user errors give one line per problem on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pgot.cli import eval_main, precompute_main, train_main

MAINS = [precompute_main, train_main, eval_main]


@pytest.mark.parametrize("main", MAINS, ids=lambda f: f.__name__)
def test_missing_config_file(main, tmp_path, capsys):
    code = main(["--config", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == f"error: config file {str(tmp_path / 'nope.yaml')!r} does not exist."


@pytest.mark.parametrize(
    "text, override, expected",
    [
        ("model: [unclosed\n", None, "is not valid YAML"),
        (
            "model: {tiny: true}\nrewards: [{name: contrast}]\ntrain: {max_stepz: 3}\n",
            None,
            "unknown key 'train.max_stepz'. Did you mean 'max_steps'?",
        ),
        (
            "model: {tiny: true}\nrewards: [{name: contrast}]\n",
            "train.max_steps=many",
            "train.max_steps must be an integer, got 'many'.",
        ),
        (
            "model: {tiny: true}\nrewards: [{name: contrast}]\n",
            "draft.k=9",
            "draft.k must be in [0, draft.num_steps=4], got 9.",
        ),
    ],
    ids=["bad-yaml", "unknown-key", "wrong-type", "out-of-range"],
)
def test_config_problems_are_one_line_each(tmp_path, capsys, text, override, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code = train_main(["--config", str(cfg), *([override] if override else [])])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, as a user runs it: exit code 2 and no Python traceback."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {tiny: true}\not: {epsilon: 0}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pgot.cli import train_main; sys.exit(train_main())",
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "error: ot.epsilon must be > 0, got 0.0." in proc.stderr


def test_import_pgot_is_light():
    """`import pgot` must not import torch model libraries (diffusers, transformers, open_clip)."""
    code = "import sys, pgot; heavy = [m for m in ('diffusers', 'transformers', 'open_clip', 'torch') if m in sys.modules]; print(','.join(heavy))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert out == ""


def test_python_m_pgot_dispatches(tmp_path):
    """`python -m pgot STAGE` is the form `accelerate launch -m pgot train ...` uses."""
    bad = subprocess.run([sys.executable, "-m", "pgot", "nonsense"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "usage: python -m pgot {precompute,train,eval}" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "pgot", "eval", "--config", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
