"""Tests of scripts/testbed_table3.py: the commands of both settings (dry runs), the pooled table against direct
counts, reading probe grids back, and a --quick smoke run of the whole pipeline."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.testing import assert_close

from pgot import metrics
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
    assert auto["agent.base_url"] == "<agent-url>" and auto["agent.model"] == "pgot-testbed-agent/pgot_auto/seed0"
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


def _frame(model: str, rewards: torch.Tensor, quality: torch.Tensor, prompts: int) -> pd.DataFrame:
    n = rewards.shape[0]
    d = {
        "model": model,
        "prompt_id": [i % prompts for i in range(n)],
        "seed": 0,
        "sample_index": [i // prompts for i in range(n)],
    }
    d.update({f"r{j}": rewards[:, j].numpy() for j in range(rewards.shape[1])})
    d[metrics.QUALITY] = quality.numpy()
    return pd.DataFrame(d)


def test_pooled_comparison_is_every_seeds_pairs_together_and_per_seed(t3):
    g = torch.Generator().manual_seed(0)
    prompts, n, names, sets = 5, 15, ["r0", "r1", "r2"], {"JDR2": ["r0", "r1"], "JDR3": ["r0", "r1", "r2"]}
    base = _frame("base", torch.rand(n, 3, generator=g), torch.rand(n, generator=g), prompts)
    runs = {s: _frame("m", torch.rand(n, 3, generator=g), torch.rand(n, generator=g), prompts) for s in (0, 1, 2)}
    runs[1] = runs[1].sample(frac=1.0, random_state=0)  # row order does not matter: pairs match on their keys
    pooled = t3.pooled_comparison(base, runs, names, sets, ground_truth=True, bootstrap=200, confidence=0.95)
    key = ["prompt_id", "seed", "sample_index"]
    b = base.sort_values(key)
    per_seed = []
    for s in (0, 1, 2):
        r = runs[s].sort_values(key)
        cand, ref = torch.tensor(r[names].to_numpy()), torch.tensor(b[names].to_numpy())
        direct = {
            "win_r2": float((cand[:, 2] > ref[:, 2]).double().mean()),
            "JDR2": float(metrics.jdr(cand[:, :2], ref[:, :2])),
            "JCR3": float(metrics.jcr(cand, ref)),
            "quality_change": float(
                (r[metrics.QUALITY].to_numpy("float64") - b[metrics.QUALITY].to_numpy("float64")).mean()
            ),
        }
        row = pooled.per_seed[pooled.per_seed["seed"] == s].iloc[0]
        for c, v in direct.items():
            assert row[c] == pytest.approx(v, abs=1e-12), (s, c)
        per_seed.append(direct)
    for c in ("win_r2", "JDR2", "JCR3"):  # equal pair counts: the pooled rate is the mean over seeds
        assert pooled.rates[c] == pytest.approx(sum(d[c] for d in per_seed) / 3, abs=1e-12)
        assert pooled.rates[f"{c}_low"] <= pooled.rates[c] <= pooled.rates[f"{c}_high"]
    assert int(pooled.rates["pairs"]) == 3 * n
    assert pooled.truth["quality_change"] == pytest.approx(sum(d["quality_change"] for d in per_seed) / 3, abs=1e-12)
    assert pooled.truth["quality_change_low"] < pooled.truth["quality_change"] < pooled.truth["quality_change_high"]
    hacked = metrics.count_ground_truth(
        torch.tensor(runs[0].sort_values(key)[names].to_numpy()), torch.tensor(b[names].to_numpy()),
        torch.tensor(runs[0].sort_values(key)[metrics.QUALITY].to_numpy()), torch.tensor(b[metrics.QUALITY].to_numpy()),
        names, sets,
    )  # fmt: skip
    row0 = pooled.per_seed[pooled.per_seed["seed"] == 0].iloc[0]
    assert row0["hacked3"] == hacked.rate(hacked.hacked["JDR3"])
    with pytest.raises(ValueError, match="training seed 2: 1 of the 15 evaluation pairs have no row"):
        t3.pooled_comparison(
            base, runs | {2: runs[2].iloc[1:]}, names, sets, ground_truth=True, bootstrap=0, confidence=0.95
        )


def test_quick_run_end_to_end(tmp_path):
    """--quick: precompute, PG-OT auto for 2 steps with the agent server deciding at both (the real openai backend),
    the held-out evaluation with the judge, the table, Figure 4 with ground truth and the scatters; then --table-only
    rebuilds the same table from the folders."""
    out = tmp_path / "q"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    timings = json.loads((out / "timings.json").read_text())
    assert len(timings) == 1 and timings[0]["attempt"] == 1  # one record per attempt
    assert [(c["name"], c["status"]) for c in timings[-1]["commands"]] == [
        ("precompute", "ok"), ("train-pgot_auto-seed0", "ok"), ("eval-seed0", "ok"),
    ]  # fmt: skip
    table = pd.read_csv(out / "table3.csv")
    row = table.set_index(["method", "metric"])
    for metric in ("win_tb_align", "JDR2", "JCR4", "quality_change", "quality_improved", "hacked4"):
        assert ("PG-OT auto (agent)", metric) in row.index, metric
        v = row.loc[("PG-OT auto (agent)", metric)]
        assert v["low"] <= v["value"] <= v["high"] and v["seeds"] == 1
    md = (out / "table3.md").read_text()
    assert "| PG-OT auto (agent) | 1 |" in md and "## Ground truth (the testbed judge)" in md
    assert "on 4 held-out prompts x 1 sample (the same prompts" in md and "trained with seed 0." in md
    for name in ("fig4_ground_truth.png", "quality_vs_jdr4.png", "quality_vs_jdr2.png"):
        assert (out / "figures" / name).read_bytes().startswith(b"\x89PNG")
    rebuilt = subprocess.run([*cmd, "--table-only"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert (out / "table3.md").read_text() == md


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0", "0"], "error: --seeds repeats 0: each would be scheduled twice"),
        (["--methods", "pgot_auto", "pgot_auto"], "error: --methods repeats pgot_auto: each would be scheduled twice"),
        (["--jobs", "0"], "error: argument --jobs: must be a whole number >= 1, got 0"),
        (["--threads", "0"], "error: argument --threads: must be a whole number >= 1, got 0"),
        (["--seeds", "-1"], "error: argument --seeds: must be a whole number >= 0, got -1"),
    ],
)
def test_bad_options_are_one_error_line(args, message):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_rerun_appends_to_logs_and_keeps_every_timings_record(t3, tmp_path):
    """Two attempts of the same plan: each job's log holds both attempts' output under a header line each, and
    timings.json lists both attempts, the latest last; a first-format timings.json (one record) is kept as attempt 1."""
    (tmp_path / "timings.json").write_text(json.dumps({"wall_s": 1.0, "commands": []}))
    counter = tmp_path / "n"
    script = f"import pathlib; p = pathlib.Path({str(counter)!r}); n = int(p.read_text()) + 1 if p.exists() else 1; "
    script += "p.write_text(str(n)); print(f'decision of attempt {n}')"
    job = t3.Job("train-x-seed0", "train", ["train.seed=0"], [sys.executable, "-c", script])
    plan = t3.Plan(
        setting="testbed", out=tmp_path, methods=[], seeds=[0], jobs=[job], soup=False, baseline="base",
        reward_names=[], reward_sets={}, ground_truth=True, bootstrap=10, confidence=0.95,
    )  # fmt: skip
    assert t3._run(plan, 1, None, agent=False) == 0
    assert t3._run(plan, 1, None, agent=False) == 0
    text = (tmp_path / "logs" / "train-x-seed0.log").read_text()
    assert text.count("===== train-x-seed0: attempt started ") == 2
    assert text.index("decision of attempt 1") < text.index("decision of attempt 2")
    attempts = t3.read_timings(tmp_path)
    assert [a.get("attempt") for a in attempts] == [None, 2, 3] and attempts[0]["wall_s"] == 1.0
    assert [c["name"] for c in attempts[-1]["commands"]] == ["train-x-seed0"]


def test_table_header_counts_in_the_singular(t3):
    assert t3._count(1, "sample") == "1 sample" and t3._count(4, "sample") == "4 samples"
