"""pgot-eval with a ground truth (eval.ground_truth=testbed; pgot/evaluate.py and the key in pgot/config.py): every
image judged (a quality column in scores.parquet), ground-truth columns in the tables equal to pgot.metrics on the
scores, a hacked proxy caught on images whose truth is known, and every misuse refused before anything is generated.

Fast world: the tiny random SD3 at 32 px on testbed prompts (its pictures are noise, which the judge scores low:
the plumbing is what is tested here); the shipped testbed model runs in tests/test_testbed_run.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import pgot.model
import pgot.rewards
from pgot import evaluate, metrics
from pgot.cli import eval_main
from pgot.config import ConfigError, load_config
from pgot.images import load_image, save_png
from pgot.testbed import judge
from pgot.testbed.scenes import all_prompts, render

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ROOT / "tests" / "configs" / "tiny_eval.yaml"  # tiny SD3, analytic rewards
REWARDS = ["colorfulness", "contrast", "sharpness"]
SETS = {"sharp": ["sharpness"], "all": REWARDS}


def _overrides(out: Path, *extra: str) -> list[str]:
    return [
        f"eval.output_dir={out}",
        "model.resolution=32",
        "prompts.path=builtin:testbed",
        "prompts.limit=2",
        "eval.samples_per_prompt=2",
        "eval.batch_size=4",
        "eval.bootstrap=100",
        "eval.ground_truth=testbed",
        "eval.reward_sets=" + json.dumps(SETS),
        *extra,
    ]


# --------------------------------------------------------------------------------------------
# The config key
# --------------------------------------------------------------------------------------------


def test_key_default_values_and_the_settings_it_needs():
    assert load_config(TINY_EVAL).eval.ground_truth == "none"
    with pytest.raises(ConfigError, match="eval.ground_truth must be one of"):
        load_config(TINY_EVAL, ["eval.ground_truth=judge"])
    with pytest.raises(ConfigError, match=r"eval.quality_tol must be in \[0, 1\)"):
        load_config(TINY_EVAL, ["eval.quality_tol=-0.1"])
    # the judge reads 32 x 32 pictures: pgot-eval and pgot-train's final table refuse another resolution; precompute
    # (which judges nothing) and a train run without the final table do not care
    for stage in ("eval", "train"):
        with pytest.raises(ConfigError) as err:
            load_config(TINY_EVAL, ["eval.ground_truth=testbed", "model.resolution=64"], stage=stage)
        (line,) = [p for p in err.value.problems if "eval.ground_truth" in p]
        assert "model.resolution=64" in line and "Set model.resolution=32" in line
    load_config(TINY_EVAL, ["eval.ground_truth=testbed", "model.resolution=64"], stage="precompute")
    load_config(
        TINY_EVAL, ["eval.ground_truth=testbed", "model.resolution=64", "train.final_eval=false"], stage="train"
    )


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A LoRA of the tiny model with large random weights: its pictures differ from the base model's."""
    from pgot.model import add_lora, load_model, save_lora

    cfg = load_config(TINY_EVAL, ["model.resolution=32"])
    model = load_model(cfg.model)
    g = torch.Generator().manual_seed(0)
    for p in add_lora(model, cfg.model):
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    folder = tmp_path_factory.mktemp("lora")
    save_lora(model, folder)
    return folder


def _models(lora: Path) -> str:
    return "eval.models=" + json.dumps([{"name": "base"}, {"name": "other", "lora": str(lora)}])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, lora) -> Path:
    out = tmp_path_factory.mktemp("eval_gt")
    assert evaluate.run(load_config(TINY_EVAL, _overrides(out, _models(lora)))) == out
    return out


def test_every_image_is_judged_and_the_tables_are_the_metrics(evaluated):
    df = pd.read_parquet(evaluated / "scores.parquet")
    assert metrics.QUALITY in df.columns and df[metrics.QUALITY].between(0, 1).all()
    assert list(df.columns[: 5 + len(REWARDS) + 1]) == [
        "model",
        "prompt_id",
        "prompt",
        "seed",
        "sample_index",
        *REWARDS,
        "quality",
    ]  # fmt: skip  (next to the rewards)
    key = ["prompt_id", "seed", "sample_index"]
    base = df[df["model"] == "base"].sort_values(key)
    other = df[df["model"] == "other"].sort_values(key)
    cand, bas = torch.tensor(other[REWARDS].to_numpy()), torch.tensor(base[REWARDS].to_numpy())
    q_c, q_b = torch.tensor(other["quality"].to_numpy()), torch.tensor(base["quality"].to_numpy())
    assert not torch.equal(q_c, q_b)  # the LoRA changed the pictures
    counts = metrics.count_ground_truth(cand, bas, q_c, q_b, REWARDS, SETS, tol=0.001)
    res = pd.read_csv(evaluated / "results.csv")
    got = res[(res["table"] == "ground_truth") & (res["row"] == "other")].set_index("metric")
    assert (
        got.loc["quality_fell", "value"] == counts.fell / 4
        and got.loc["hacked_all", "value"] == counts.hacked["all"] / 4
    )
    assert got.loc["quality_change", "value"] == pytest.approx(float((q_c - q_b).mean()), abs=1e-12)
    means = res[(res["table"] == "mean") & (res["metric"] == "quality")].set_index("row")
    assert means.loc["base", "value"] == pytest.approx(base["quality"].mean())
    md = (evaluated / "results.md").read_text()
    assert "## Win rate, JDR, JCR and ground truth (paper Table 3 layout)" in md
    assert "| quality change | quality improved (%) | quality fell (%) | hacked_sharp (%) | hacked_all (%) |" in md
    assert "Ground truth: eval.ground_truth=testbed" in md and "Column quality: the ground-truth quality" in md


def test_rerun_skips_judged_rows_and_judges_rows_scored_without(evaluated, lora, tmp_path):
    before = pd.read_parquet(evaluated / "scores.parquet")
    cfg = load_config(TINY_EVAL, _overrides(evaluated, _models(lora)))
    evaluate.run(cfg)
    pd.testing.assert_frame_equal(pd.read_parquet(evaluated / "scores.parquet"), before)  # nothing scored again
    # a folder scored without the ground truth gets judged when it is turned on
    out = tmp_path / "eval"
    evaluate.run(load_config(TINY_EVAL, _overrides(out, "eval.ground_truth=none")))
    assert "quality" not in pd.read_parquet(out / "scores.parquet").columns
    evaluate.run(load_config(TINY_EVAL, _overrides(out)))
    again = pd.read_parquet(out / "scores.parquet")
    assert again["quality"].notna().all() and len(again) == 4


# --------------------------------------------------------------------------------------------
# Rescoring images whose truth is known: a hacked proxy is caught
# --------------------------------------------------------------------------------------------


def test_manifest_noise_hacks_the_proxies_and_the_ground_truth_says_so(tmp_path, capsys):
    """Exact renderings (quality ~1) against the same renderings plus pixel noise: every proxy (sharpness, contrast,
    colourfulness) goes up on these grey backgrounds, the true quality goes down, so every pair dominates and every
    pair is hacked."""
    prompts = [p for p in all_prompts() if "grey background" in p][::9]  # small and large, circles and squares
    clean = render(prompts, seed=0)
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    rows = []
    for model, images in (("clean", clean), ("noisy", noisy)):
        for i, (p, im) in enumerate(zip(prompts, images, strict=True)):
            save_png(im, tmp_path / model / f"{i}.png")
            rows.append({"model": model, "prompt": p, "seed": 0, "path": f"{model}/{i}.png"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "eval"
    args = ["--config", str(TINY_EVAL), *_overrides(out), f"eval.manifest={tmp_path / 'manifest.csv'}"]
    assert eval_main(args) == 0
    printed = capsys.readouterr().out
    df = pd.read_parquet(out / "scores.parquet")
    for r in df.itertuples():  # the judge saw the files: quality of the image on disk, exactly
        assert r.quality == float(judge.quality(load_image(r.path)[None], [r.prompt])[0])
    assert (df[df["model"] == "clean"]["quality"] > 0.9).all()
    res = pd.read_csv(out / "results.csv")
    got = res[(res["table"] == "ground_truth") & (res["row"] == "noisy")].set_index("metric")["value"]
    joint = res[(res["table"] == "joint") & (res["row"] == "noisy")].set_index("metric")["value"]
    assert joint["JDR_all"] == 1.0 and got["hacked_all"] == 1.0 and got["hacked_sharp"] == 1.0
    assert got["quality_fell"] == 1.0 and got["quality_improved"] == 0.0 and got["quality_change"] < -0.5
    assert "hacked_all (%)" in printed and "Hacked rate: share of paired samples" in printed


# --------------------------------------------------------------------------------------------
# Refused before anything is generated
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model or a reward was loaded before the ground truth's prompts were checked")

    monkeypatch.setattr(pgot.evaluate, "load_model", forbidden)
    monkeypatch.setattr(pgot.model, "load_model", forbidden)
    monkeypatch.setattr(pgot.rewards, "build", forbidden)


def test_prompts_outside_the_grammar_are_one_error_before_any_weight(tmp_path, capsys, no_weights):
    args = ["--config", str(TINY_EVAL), *_overrides(tmp_path / "eval"), "prompts.path=builtin:demo"]
    assert eval_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: eval.ground_truth=testbed judges prompts of the testbed grammar")
    assert "prompts.path=builtin:demo" in err[0] and "eval.ground_truth=none" in err[0]
    assert not (tmp_path / "eval" / "scores.parquet").exists()
    # a manifest's prompts likewise, named by eval.manifest
    save_png(torch.zeros(3, 32, 32), tmp_path / "x.png")
    (tmp_path / "m.csv").write_text("model,prompt,seed,path\nm,a photo of a cat,0,x.png\n")
    assert (
        eval_main(["--config", str(TINY_EVAL), *_overrides(tmp_path / "e2"), f"eval.manifest={tmp_path / 'm.csv'}"])
        == 2
    )
    err = capsys.readouterr().err
    assert "eval.manifest=" in err and "'a photo of a cat'" in err


def test_ground_truth_problems_and_quality_helper():
    cfg = load_config(TINY_EVAL, ["eval.ground_truth=testbed", "model.resolution=32"])
    assert evaluate.ground_truth_problems(cfg, ["a small red circle on a white background"]) == []
    (line,) = evaluate.ground_truth_problems(cfg, ["a small red circle on a white background", "a big dog"] * 3)
    assert "1 prompt(s)" in line and "'a big dog'" in line  # each prompt once
    assert evaluate.ground_truth_problems(load_config(TINY_EVAL), ["a big dog"]) == []  # ground truth off
    images = render(["a large blue square on a grey background"] * 2, seed=1)
    q = evaluate.ground_truth_quality("testbed", images, ["a large blue square on a grey background"] * 2)
    assert q.dtype == torch.float64 and (q > 0.9).all()
    with pytest.raises(ValueError, match="eval.ground_truth=testbed: judge: the testbed world is 32 x 32"):
        evaluate.ground_truth_quality(
            "testbed", torch.zeros(1, 3, 64, 64), ["a large blue square on a grey background"]
        )
    with pytest.raises(ValueError, match="several sizes"):
        evaluate.ground_truth_quality("testbed", [torch.zeros(3, 32, 32), torch.zeros(3, 16, 16)], ["x", "y"])
