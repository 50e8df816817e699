"""Tests of scripts/testbed_table3.py: the commands of both settings (dry runs), the pooled table against direct
counts, reading probe grids back, and a --quick smoke run of the whole pipeline."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from pgot.images import labelled_grid, save_png, to_uint8

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "testbed_table3.py"


@pytest.fixture(scope="module")
def t3():
    spec = importlib.util.spec_from_file_location("testbed_table3", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["testbed_table3"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("testbed_table3", None)


def _dry_run(*args: str) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    lines = [line.split("   # ")[0] for line in out.splitlines() if line and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _keys(cmd: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))


def test_paper_dry_run_every_method_three_seeds_through_the_launcher():
    launcher = "accelerate launch --config_file configs/accelerate/2node_8gpu.yaml"
    cmds = _dry_run("--setting", "paper", "--launcher", launcher, "--out", "runs/t3p")
    pre, *rest = cmds
    assert pre[:8] == [*shlex.split(launcher), "-m", "pgot", "precompute", "--config"]
    assert pre[8] == "configs/precompute_sd35_turbo.yaml" and _keys(pre)["precompute.store"] == "runs/t3p/frontier"
    trains = [c for c in rest if c[5:7] == ["pgot", "train"]]
    evals = [c for c in rest if c[:4] == ["python", "-m", "pgot", "eval"]]
    assert len(trains) + len(evals) == len(rest)
    assert all(c[:4] == shlex.split(launcher) for c in trains)
    configs = {c[c.index("--config") + 1] for c in trains}
    shipped = {f"configs/baselines/{p.name}" for p in (ROOT / "configs" / "baselines").glob("*.yaml")}
    assert configs == shipped | {"configs/sd35_turbo_pgot.yaml"}  # every baseline of the paper and PG-OT
    runs = {}
    for c in trains:
        k = _keys(c)
        runs[k["train.output_dir"]] = (c[c.index("--config") + 1], k)
    assert len(runs) == len(trains) == 13 * 3  # 10 baselines + PG-OT offline, online, auto; unique folders
    assert {k["train.seed"] for _, k in runs.values()} == {"0", "1", "2"}
    for folder, (config, k) in runs.items():
        single = "single_" in config
        assert k["train.store"] == ("" if single else "runs/t3p/frontier"), folder  # singles load no store
        assert k["precompute.store"] == "runs/t3p/frontier"
    pgot = {f.split("/")[-2]: k for f, (cfg, k) in runs.items() if cfg.endswith("sd35_turbo_pgot.yaml")}
    assert pgot["pgot_offline"]["train.strategy"] == "offline" and pgot["pgot_offline"]["agent.backend"] == "none"
    assert pgot["pgot_online"]["train.strategy"] == "online"
    assert "train.strategy" not in pgot["pgot_auto"] and "agent.backend" not in pgot["pgot_auto"]  # as shipped: GPT-4o
    assert len(evals) == 3
    for s, c in enumerate(evals):
        k = _keys(c)
        assert c[c.index("--config") + 1] == "configs/eval_parti.yaml"
        assert k["eval.output_dir"] == f"runs/t3p/eval/seed{s}" and k["eval.baseline"] == "SD3.5-Turbo"
        models = json.loads(k["eval.models"])
        assert models[0] == {"name": "SD3.5-Turbo"} and len(models) == 1 + 13 + 1
        loras = {m["lora"] for m in models if "lora" in m}
        assert loras == {f for f in runs if f.endswith(f"seed{s}")}  # this seed's runs, every one
        (soup,) = [m["soup"] for m in models if "soup" in m]
        assert soup == {f"runs/t3p/runs/single_{r}/seed{s}": 0.25 for r in ("ict", "hp", "clip", "hps")}
        assert len(json.loads(k["eval.runs"])) == 13


def test_paper_default_launcher_is_accelerate_and_commands_wait_for_their_inputs(t3):
    args = t3._parser().parse_args(["--setting", "paper", "--out", "runs/x"])
    plan = t3.build_plan(args)
    names = [j.name for j in plan.jobs]
    for i, job in enumerate(plan.jobs):
        assert all(names.index(a) < i for a in job.after), job.name  # scheduling order respects every dependency
        if job.stage != "eval":
            assert job.launcher == ["accelerate", "launch", "--config_file", "configs/accelerate/8gpu.yaml"]
    (eval0,) = [j for j in plan.jobs if j.name == "eval-seed0"]
    assert sorted(eval0.after) == sorted(f"train-{m.key}-seed0" for m in plan.methods)
    single = [j for j in plan.jobs if j.name.startswith("train-single_")]
    assert single and all(j.after == [] for j in single)  # no store: they run while the fronts are computed
    assert all(j.after == ["precompute"] for j in plan.jobs if j.stage == "train" and j not in single)


def test_testbed_dry_run_methods_settings_and_agent_endpoint():
    cmds = _dry_run("--out", "runs/t3t")
    assert all(c[:3] == ["python", "-m", "pgot"] for c in cmds)
    trains = [_keys(c) | {"config": c[c.index("--config") + 1]} for c in cmds if c[3] == "train"]
    assert len(trains) == 12 * 3 and {t["config"] for t in trains} == {"configs/testbed_table3/train.yaml"}
    assert all(t["prompts.path"] == "runs/t3t/prompts/train.txt" for t in trains)
    by_run = {t["train.output_dir"].split("/")[-2]: t for t in trains if t["train.seed"] == "0"}
    assert by_run["single_saturation"]["train.active_rewards"] == "[saturation]"
    assert by_run["single_saturation"]["train.objective"] == "single_reward"
    assert [by_run["weighted_2233"][f"rewards.{i}.weight"] for i in range(4)] == ["2", "2", "3", "3"]
    assert by_run["hetero_weighted_sum"]["train.objective"] == "hetero_weighted_sum"
    assert by_run["pgot_online"]["train.strategy"] == "online"
    auto = by_run["pgot_auto"]
    assert auto["train.strategy"] == "auto" and auto["agent.backend"] == "openai"
    assert auto["agent.base_url"] == "http://127.0.0.1:<agent-port>/v1"
    assert sum("agent.base_url" in t for t in trains) == 3  # only the agent's runs talk to it
    evals = [_keys(c) for c in cmds if c[3] == "eval"]
    assert [e["prompts.path"] for e in evals] == ["runs/t3t/prompts/heldout.txt"] * 3
    names = [m["name"] for m in json.loads(evals[0]["eval.models"])]
    assert names[0] == "base" and names[-1] == "Reward soup" and len(names) == 14


def test_unknown_method_is_one_error_line():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--methods", "pgot_ofline"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: --methods names pgot_ofline, which the testbed setting does not have")


def test_read_grid_returns_the_probe_images_as_saved(t3, tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=g)
    grid = labelled_grid(images, 2, row_labels=["a", "b", "c"], column_labels=["s0", "s1"], title="step 10")
    path = save_png(grid, tmp_path / "step-000010.png")
    back = t3.read_grid(path)
    expected = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2).float() / 255
    assert_close(back, expected, rtol=0, atol=0)
    save_png(images[0], tmp_path / "plain.png")
    with pytest.raises(ValueError, match="no 'tiles' text chunk"):
        t3.read_grid(tmp_path / "plain.png")
