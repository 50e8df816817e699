"""End-to-end tests of pgot/evaluate.py on the tiny SD3 with analytic rewards (CPU, no weights).

One module-scoped evaluation (base model, the base model again, a LoRA from a run folder, a reward soup)
is shared by the tests: tables are recomputed independently from scores.parquet, reruns are checked to
skip scored models, bad inputs to fail with clear errors that keep computed scores. Rescoring from a
manifest, preference accuracy and the vote tally reuse the images that evaluation saved.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pgot import evaluate
from pgot.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "tests" / "configs" / "tiny_eval.yaml"  # tiny SD3, analytic rewards
REWARDS = ["colorfulness", "contrast", "sharpness"]
SETS = {"JDR2": ["colorfulness", "contrast"], "all": REWARDS}


def _cfg(out: Path, *overrides: str):
    base = [
        f"eval.output_dir={out}",
        "prompts.limit=3",
        "eval.samples_per_prompt=2",
        "eval.batch_size=4",
        "eval.bootstrap=200",
    ]
    base.append("eval.reward_sets=" + json.dumps(SETS))
    return load_config(DEBUG, [*base, *overrides])


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> Path:
    """Two LoRAs with non-zero weights (a in a pgot run-folder layout, b as a plain file) and a misfit."""
    from safetensors.torch import load_file, save_file

    from pgot.model import add_lora, load_model, save_lora

    root = tmp_path_factory.mktemp("loras")
    cfg = load_config(DEBUG)
    model = load_model(cfg.model)
    for i, folder in enumerate([root / "run_a" / "final", root / "b"]):
        params = add_lora(model, cfg.model)
        g = torch.Generator().manual_seed(i)
        for p in params:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
        save_lora(model, folder)
        model.transformer.delete_adapters(["default"])
    sd = load_file(str(root / "b" / "pytorch_lora_weights.safetensors"))
    # as if trained on a wider model: lora_A input dims do not match this transformer
    save_file(
        {k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v for k, v in sd.items()},
        str(root / "misfit.safetensors"),
    )
    run = root / "run_a"
    lines = [{"step": s, "loss": 1.0, "probe/jdr_all": s / 100, "probe/jcr_all": 0.01} for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def _models(loras: Path) -> str:
    soup = {str(loras / "run_a"): 0.5, str(loras / "b" / "pytorch_lora_weights.safetensors"): 0.5}
    models = [
        {"name": "base"},
        {"name": "again"},
        {"name": "tuned", "lora": str(loras / "run_a")},
        {"name": "soup", "soup": soup},
    ]
    return "eval.models=" + json.dumps(models)


@pytest.fixture(scope="module")
def evaluated(loras, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    cfg = _cfg(out, _models(loras), "eval.study_pairs=2", f"eval.runs=[{loras / 'run_a'}]")
    assert evaluate.run(cfg) == out
    return out


def test_scores_layout_and_identical_noise(evaluated):
    df = pd.read_parquet(evaluated / "scores.parquet")
    for col in ["model", "prompt_id", "prompt", "seed", "sample_index", *REWARDS, "path"]:
        assert col in df.columns
    assert df.groupby("model").size().to_dict() == {"base": 6, "again": 6, "tuned": 6, "soup": 6}
    keys = {
        m: sorted(map(tuple, g[["prompt_id", "seed", "sample_index"]].to_numpy().tolist()))
        for m, g in df.groupby("model")
    }
    assert all(k == keys["base"] for k in keys.values())
    by = {m: g.sort_values(["prompt_id", "sample_index"])[REWARDS].to_numpy() for m, g in df.groupby("model")}
    # the same weights with the same noise and batch layout give the same images, bit for bit
    assert (by["again"] == by["base"]).all()
    assert not (by["tuned"] == by["base"]).all() and not (by["soup"] == by["tuned"]).all()
    for path in df["path"]:
        assert (evaluated / path).is_file()
    det = json.loads((evaluated / "determinism.json").read_text())
    assert det == {"model": "base", "images": 4, "max_abs_diff": 0.0, "jdr": 0.0, "jcr": 0.0}
    assert (
        "Determinism check: base's first batch generated again gives max |reward difference| 0"
        in (evaluated / "results.md").read_text()
    )


def test_tables_recomputed_independently(evaluated):
    df = pd.read_parquet(evaluated / "scores.parquet")
    res = pd.read_csv(evaluated / "results.csv")
    base = df[df["model"] == "base"].set_index(["prompt_id", "seed", "sample_index"]).sort_index()
    for model in ["base", "again", "tuned", "soup"]:
        cand = df[df["model"] == model].set_index(["prompt_id", "seed", "sample_index"]).sort_index()
        expected = {f"win_{r}": (cand[r] > base[r]).mean() for r in REWARDS}
        for label, members in [("2", SETS["JDR2"]), ("_all", REWARDS)]:
            expected[f"JDR{label}"] = (cand[members] > base[members]).all(axis=1).mean()
            expected[f"JCR{label}"] = (cand[members] < base[members]).all(axis=1).mean()
        got = res[(res["table"] == "joint") & (res["row"] == model)].set_index("metric")
        for metric, value in expected.items():
            assert got.loc[metric, "value"] == pytest.approx(value), (model, metric)
            assert got.loc[metric, "low"] <= value + 1e-12 <= got.loc[metric, "high"] + 2e-12
        if model in ("base", "again"):  # the sanity rows: 0/0
            assert (got["value"] == 0).all()
        means = res[(res["table"] == "mean") & (res["row"] == model)].set_index("metric")
        for r in REWARDS:
            assert means.loc[r, "value"] == pytest.approx(cand[r].mean())
    md = (evaluated / "results.md").read_text()
    assert "| base (baseline) | 0.00 [0.00, 0.00]" in md and "JDR2 (%)" in md and "JCR_all (%)" in md
    tex = (evaluated / "results.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and "JDR\\_all" in tex


def test_figures_and_study_written(evaluated):
    for name in ["pareto_colorfulness_contrast.png", "prompt_boxplots.png", "training_curves.png"]:
        data = (evaluated / "figures" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    key = json.loads((evaluated / "study" / "key.json").read_text())
    assert sorted(v["candidate"] for v in key["pairs"].values()) == ["again", "again", "soup", "soup", "tuned", "tuned"]
    assert (evaluated / "study" / "study.html").stat().st_size > 1000


def test_run_prints_the_main_table_with_definitions_and_intervals(evaluated, loras, capsys):
    evaluate.run(_cfg(evaluated, _models(loras)))  # every model already scored: tables and figures only
    out = capsys.readouterr().out
    assert "## Win rate, JDR and JCR (paper Table 3 layout)" in out
    for model in ["base (baseline)", "again", "tuned", "soup"]:
        assert f"| {model} |" in out
    assert "| base (baseline) | 0.00 [0.00, 0.00]" in out  # intervals shown
    lines = out.splitlines()
    assert any(x.startswith("JDR (joint domination rate):") and "strictly higher than base" in x for x in lines)
    assert any(x.startswith("JCR (joint collapse rate):") and "strictly lower than base" in x for x in lines)
    assert "Reward sets: JDR2/JCR2: colorfulness, contrast; JDR_all/JCR_all: colorfulness, contrast, sharpness." in out
    assert "[low, high]: 95% percentile bootstrap intervals over the 3 prompts (200 resamples)." in out
    md = (evaluated / "results.md").read_text()
    table = out[out.index("| Model |") : out.index("\n\n", out.index("| Model |"))]
    assert table in md  # the printed table is results.md's


def test_figures_show_every_model(evaluated, loras, monkeypatch):
    figures = {}
    monkeypatch.setattr(evaluate, "_save_figure", lambda fig, path: figures.__setitem__(path.name, fig))
    cfg = _cfg(evaluated, _models(loras), f"eval.runs=[PG-OT={loras / 'run_a'}]")
    scores = pd.read_parquet(evaluated / "scores.parquet")
    models = ["base", "again", "tuned", "soup"]
    evaluate._write_figures(cfg, scores, models, "base", evaluated / "figures")
    assert set(figures) == {"pareto_colorfulness_contrast.png", "prompt_boxplots.png", "training_curves.png"}
    pids = sorted(set(scores["prompt_id"]))
    for ax in [a for a in figures["prompt_boxplots.png"].axes if a.get_visible()]:
        assert sorted(p.get_gid() for p in ax.patches) == sorted(f"{m}|{p}" for m in models for p in pids)
    legend = [t.get_text() for t in figures["pareto_colorfulness_contrast.png"].legends[0].get_texts()]
    assert legend[:4] == models
    curves = figures["training_curves.png"]
    assert [t.get_text() for t in curves.legends[0].get_texts()] == ["PG-OT"]


def test_training_curve_labels(loras, tmp_path):
    from pgot.config import save_config

    run = loras / "run_a"
    other = tmp_path / "x" / "run_a"
    other.mkdir(parents=True)
    (other / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    cfg = load_config(ROOT / "tests" / "configs" / "tiny_debug.yaml", ["train.objective=weighted_sum"])
    save_config(cfg, other / "config.yaml")
    curves = evaluate.read_training_curves([f"mine={run}", str(run), str(other)])
    # a given label; the folder name; what the run trained, from its config.yaml (a taken label gets the parent)
    assert list(curves) == ["mine", "run_a", "run_a (weighted sum)"]
    assert curves["run_a (weighted sum)"].attrs["reward_sets"] == {"all": cfg.reward_names}
    assert curves["mine"]["probe/jdr_all"].tolist() == [0.1, 0.2, 0.3]
    again = evaluate.read_training_curves([str(run), str(run)])
    assert list(again) == ["run_a", f"{loras.name}/run_a"]
    with pytest.raises(ValueError, match=r"eval.runs names 'x=/nonexistent', which has no metrics.jsonl"):
        evaluate.read_training_curves(["x=/nonexistent"])


def test_rerun_skips_scored_models_and_adds_new_ones(evaluated, loras, caplog):
    scores = evaluated / "scores.parquet"
    before = scores.read_bytes()
    with caplog.at_level(logging.INFO, logger="pgot.evaluate"):
        evaluate.run(_cfg(evaluated, _models(loras), "eval.study_pairs=2"))
    text = caplog.text
    assert text.count("already scored") == 4 and "generating" not in text
    assert scores.read_bytes() == before
    caplog.clear()
    models = json.loads(_models(loras).split("=", 1)[1]) + [
        {"name": "half", "lora": str(loras / "run_a"), "lora_scale": 0.5}
    ]
    with caplog.at_level(logging.INFO, logger="pgot.evaluate"):
        evaluate.run(_cfg(evaluated, "eval.models=" + json.dumps(models)))
    assert caplog.text.count("already scored") == 4 and caplog.text.count("generating") == 1
    new = pd.read_parquet(scores)
    old = pd.read_parquet(io.BytesIO(before))
    assert (new["model"] == "half").sum() == 6
    pd.testing.assert_frame_equal(new[new["model"] != "half"].reset_index(drop=True), old.reset_index(drop=True))


def test_misfit_lora_is_a_clear_error_and_keeps_scores(evaluated, loras):
    before = (evaluated / "scores.parquet").read_bytes()
    bad = loras / "misfit.safetensors"
    models = [{"name": "base"}, {"name": "misfit", "lora": str(bad)}]
    with pytest.raises(
        ValueError, match=r"LoRA '.*misfit.safetensors' of eval model 'misfit' does not fit the base model 'tiny'"
    ) as info:
        evaluate.run(_cfg(evaluated, "eval.models=" + json.dumps(models)))
    assert "size mismatch" in str(info.value)
    assert (evaluated / "scores.parquet").read_bytes() == before
    with pytest.raises(ValueError, match=r"eval.models.1.lora='/nonexistent.safetensors' does not exist"):
        evaluate.run(_cfg(evaluated, 'eval.models=[{name: base}, {name: x, lora: "/nonexistent.safetensors"}]'))


def test_reward_set_naming_unscored_reward(evaluated):
    before = (evaluated / "scores.parquet").read_bytes()
    with pytest.raises(ValueError, match=r"eval.reward_sets.JDR4 names 'ict', which is not a scored reward"):
        evaluate.run(
            load_config(DEBUG, [f"eval.output_dir={evaluated}", "eval.reward_sets={JDR4: [colorfulness, ict]}"])
        )
    assert (evaluated / "scores.parquet").read_bytes() == before


def _manifest(evaluated: Path, folder: Path) -> pd.DataFrame:
    df = pd.read_parquet(evaluated / "scores.parquet")
    df = df[df["model"].isin(["base", "tuned"])]
    rows = []
    for r in df.itertuples():
        dest = folder / "imgs" / r.model / Path(r.path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(evaluated / r.path, dest)
        rows.append(
            {
                "model": r.model,
                "prompt": r.prompt,
                "seed": r.seed,
                "sample_index": r.sample_index,
                "path": str(dest.relative_to(folder)),
            }
        )
    man = pd.DataFrame(rows)
    man.to_csv(folder / "manifest.csv", index=False)
    return man


def test_rescoring_a_manifest_and_tallying_votes(evaluated, tmp_path):
    from pgot.rewards import build, score

    man = _manifest(evaluated, tmp_path)
    out = tmp_path / "out"
    cfg = _cfg(out, f"eval.manifest={tmp_path}", "eval.study_pairs=3")
    evaluate.run(cfg)
    got = pd.read_parquet(out / "scores.parquet")
    assert len(got) == len(man) and set(got["model"]) == {"base", "tuned"}
    # oracle: the rewards on the PNG files, computed directly
    rewards = build(cfg.rewards)
    for r in got.itertuples():
        img = torch.from_numpy(np.array(Image.open(r.path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255
        want = score(rewards, img, [r.prompt])[0].double()
        assert torch.allclose(torch.tensor([getattr(r, n) for n in REWARDS], dtype=torch.float64), want, atol=1e-6)
    # prompt ids come from the prompt set when every text is in it
    gen = pd.read_parquet(evaluated / "scores.parquet")
    assert set(got["prompt_id"]) == set(gen["prompt_id"])
    # votes for the page's pairs: the candidate always wins, except one tie
    key = json.loads((out / "study" / "key.json").read_text())
    choices = {p: ("left" if v["left"] == "tuned" else "right") for p, v in key["pairs"].items()}
    first = sorted(choices)[0]
    choices[first] = "tie"
    votes = tmp_path / "votes.json"
    votes.write_text(
        json.dumps(
            {
                "format": "pgot-study-votes",
                "study_id": key["study_id"],
                "annotator": "a",
                "votes": [{"pair": p, "choice": c} for p, c in choices.items()],
            }
        )
    )
    prefs = tmp_path / "prefs.parquet"
    vivid, gray = _png((230, 20, 40)), _png((120, 120, 120))
    pd.DataFrame([{"prompt": "p", "image_0": vivid, "image_1": gray, "label": 0}] * 2).to_parquet(prefs)
    evaluate.run(
        _cfg(
            out,
            f"eval.manifest={tmp_path}",
            "eval.study_pairs=3",
            f"eval.votes=[{votes}]",
            f"eval.preference_data={prefs}",
        )
    )
    res = pd.read_csv(out / "results.csv")
    pref = res[res["table"] == "preference"].set_index("row")
    assert pref.loc["colorfulness", "value"] == 1.0 and pref.loc["colorfulness", "n"] == 2
    study = res[res["table"] == "user_study"].set_index("row")
    assert study.loc["tuned", "value"] == pytest.approx(2.5 / 3) and study.loc["tuned", "n"] == 3
    assert "User study: win rate against base" in (out / "results.md").read_text()


def test_manifest_with_missing_images(tmp_path):
    rows = [{"model": "m", "prompt": "p", "seed": i, "path": f"gone/{i}.png"} for i in range(7)]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ValueError, match=r"7 of 7 images do not exist") as info:
        evaluate.read_manifest(tmp_path / "manifest.csv")
    msg = str(info.value)
    assert (
        str(tmp_path / "gone" / "0.png") in msg and str(tmp_path / "gone" / "4.png") in msg and "gone/5.png" not in msg
    )
    pd.DataFrame([{"model": "m", "seed": 0, "path": "x.png"}]).to_csv(tmp_path / "m2.csv", index=False)
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(or 'prompt_id'\)"):
        evaluate.read_manifest(tmp_path / "m2.csv")


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    im = Image.new("RGB", (16, 16), color)
    im.putpixel((0, 0), (255 - color[0], 255 - color[1], 255 - color[2]))
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_shipped_eval_configs_load():
    for name in ["eval_debug.yaml", "eval_parti.yaml"]:
        cfg = load_config(ROOT / "configs" / name)
        rewards = set(cfg.reward_names)
        assert all(set(v) <= rewards for v in cfg.eval.reward_sets.values()), name
    parti = load_config(ROOT / "configs" / "eval_parti.yaml")
    assert parti.eval.baseline == parti.eval.models[0].name and not parti.eval.models[0].lora
    assert parti.reward_names == ["ict", "hp", "clip", "hps", "pickscore", "imagereward", "aesthetic"]
    assert any(m.soup for m in parti.eval.models) and any(m.lora for m in parti.eval.models)


# --------------------------------------------------------------------------------------------
# LoRA files given to pgot-eval: loaded completely, on their own base, or refused with one line
# --------------------------------------------------------------------------------------------


def _eval_cli(out: Path, models: list[dict], *extra: str) -> int:
    from pgot.cli import eval_main

    args = [f"eval.output_dir={out}", "prompts.limit=2", "eval.samples_per_prompt=1", "eval.bootstrap=0"]
    return eval_main(["--config", str(DEBUG), *args, "eval.models=" + json.dumps(models), *extra])


def test_peft_named_lora_in_pgot_eval_scores_like_the_original(loras, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    f = loras / "b" / "pytorch_lora_weights.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
    peft = tmp_path / "peft.safetensors"  # the same weights without the transformer. prefix (peft naming)
    save_file({k.removeprefix("transformer."): v for k, v in load_file(str(f)).items()}, str(peft), metadata=meta)
    models = [{"name": "base"}, {"name": "diffusers", "lora": str(f)}, {"name": "peft", "lora": str(peft)}]
    assert _eval_cli(tmp_path / "out", models) == 0
    df = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    by = {m: g.sort_values(KEY_COLUMNS)[REWARDS].to_numpy() for m, g in df.groupby("model")}
    assert (by["peft"] == by["diffusers"]).all() and not (by["peft"] == by["base"]).all()


KEY_COLUMNS = ["prompt_id", "seed", "sample_index"]


def test_eval_refuses_a_lora_of_another_base_before_generating(loras, tmp_path, capsys):
    from pgot.model import lora_base_fingerprint

    lora = str(loras / "run_a")
    trained_on = lora_base_fingerprint(lora)
    out = tmp_path / "out"
    models = [{"name": "base"}, {"name": "tuned", "lora": lora}]
    capsys.readouterr()
    assert _eval_cli(out, models, "model.tiny_seed=1") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: eval.models.1.lora: LoRA ") and trained_on in errors[0]
    assert "eval.models.1.allow_lora_transfer=true" in errors[0]
    assert not (out / "scores.parquet").exists()  # nothing was generated, not even the base model
    models[1]["allow_lora_transfer"] = True  # a deliberate transfer
    assert _eval_cli(out, models, "model.tiny_seed=1") == 0
    assert set(pd.read_parquet(out / "scores.parquet")["model"]) == {"base", "tuned"}


def test_eval_lora_that_would_load_in_part_exits_2_naming_the_key(loras, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(loras / "b" / "pytorch_lora_weights.safetensors"))
    te = tmp_path / "with_text_encoder.safetensors"
    save_file({**sd, "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 16)}, str(te))
    out = tmp_path / "out"
    soup = {str(loras / "run_a"): 0.5, str(te): 0.5}
    models = [{"name": "base"}, {"name": "tuned", "lora": str(loras / "run_a")}, {"name": "soup", "soup": soup}]
    capsys.readouterr()
    assert _eval_cli(out, models) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: eval.models.2.soup: LoRA "), errors
    assert "text-encoder LoRA tensor" in errors[0] and not (out / "scores.parquet").exists()


# --------------------------------------------------------------------------------------------
# Manifests and preference data: empty cells, BOM, CRLF, line numbers, every format
# --------------------------------------------------------------------------------------------

FORMATS = ["csv", "csv_bom_crlf", "jsonl", "json", "parquet"]


def _write_table(folder: Path, rows: list[dict], fmt: str, name: str = "manifest") -> Path:
    """Rows as a user's table; None is an empty cell (CSV) / null (JSON, parquet)."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt.startswith("csv"):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r[c]) for c in columns) for r in rows]
        text = "\r\n".join(lines) + "\r\n" if fmt == "csv_bom_crlf" else "\n".join(lines) + "\n"
        path = folder / f"{name}.csv"
        path.write_bytes(("\ufeff" if fmt == "csv_bom_crlf" else "").encode() + text.encode())
    elif fmt == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(rows))
    else:
        path = folder / f"{name}.parquet"
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_empty_prompt_is_the_empty_prompt(tmp_path, fmt):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    rows = [
        {"model": "m", "prompt": "a fox", "seed": 0, "path": "0.png"},
        {"model": "m", "prompt": "" if fmt != "parquet" else "", "seed": 1, "path": "1.png"},
        {"model": "m", "prompt": "a fox", "seed": 2, "path": "2.png"},
    ]
    if fmt.startswith("csv"):
        rows[1]["prompt"] = None  # an empty CSV cell
    man = evaluate.read_manifest(_write_table(tmp_path, rows, fmt), default_seed=5)
    assert man["prompt"].tolist() == ["a fox", "", "a fox"]
    assert man["prompt_id"].tolist() == [0, 1, 0] and man["seed"].tolist() == [0, 1, 2]
    assert list(man.columns) == ["model", "prompt_id", "prompt", "seed", "sample_index", "path"]
    assert man["path"].tolist() == [str(tmp_path / f"{i}.png") for i in range(3)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_empty_model_or_path_names_line_and_column(tmp_path, fmt):
    rows = [
        {"model": "m", "prompt": "a", "seed": 0, "path": "0.png"},
        {"model": None, "prompt": "b", "seed": 1, "path": "1.png"},
        {"model": "m", "prompt": "c", "seed": 2, "path": None},
    ]
    with pytest.raises(ValueError) as info:
        evaluate.read_manifest(_write_table(tmp_path, rows, fmt))
    msg = str(info.value)
    unit = {"json": "record", "parquet": "row"}.get(fmt, "line")
    first = {"json": 2, "parquet": 2, "jsonl": 2}.get(fmt, 3)  # CSV: the header is line 1
    assert "eval.manifest=" in msg
    assert re.search(rf"{unit} {first}\b.*'model'", msg) and re.search(rf"{unit} {first + 1}\b.*'path'", msg), msg


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_errors_name_lines(tmp_path, fmt):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    rows = [
        {"model": "m", "prompt": "a", "seed": 0, "path": "0.png"},
        {"model": "m", "prompt": "a", "seed": 0, "path": "0.png"},
        {"model": "m", "prompt": "b", "seed": 1, "path": "gone.png"},
    ]
    first = 2 if fmt == "csv" else 1
    with pytest.raises(ValueError, match=rf"lines {first}, {first + 1} \(model 'm', prompt_id 0, seed 0"):
        evaluate.read_manifest(_write_table(tmp_path, rows, fmt))
    with pytest.raises(ValueError, match=rf"line {first + 1}: {re.escape(str(tmp_path / 'gone.png'))}"):
        evaluate.read_manifest(_write_table(tmp_path, rows[1:], fmt))


def test_manifest_prompt_ids_from_the_prompt_set(tmp_path):
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    rows = [{"model": "m", "prompt_id": 7, "path": "0.png"}, {"model": "m", "prompt_id": 9, "path": "1.png"}]
    man = evaluate.read_manifest(_write_table(tmp_path, rows, "csv"), prompt_texts={7: "seven", 9: ""})
    assert man["prompt"].tolist() == ["seven", ""]
    with pytest.raises(ValueError, match=r"line 3 \(prompt_id 9\)"):
        evaluate.read_manifest(tmp_path / "manifest.csv", prompt_texts={7: "seven"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_preference_data_empty_cells(tmp_path, fmt):
    from pgot.human_eval import read_preference_data

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    rows = [
        {"prompt": "", "image_0": "a.png", "image_1": "b.png", "label": 1},
        {"prompt": "x", "image_0": "a.png", "image_1": "b.png", "label": 0.5},
        {"prompt": "y", "image_0": "a.png", "image_1": "b.png", "label": 0},
    ]
    if fmt.startswith("csv"):
        rows[0]["prompt"] = None
    data = read_preference_data(_write_table(tmp_path, rows, fmt, "prefs"))
    assert data["prompt"].tolist() == ["", "y"] and data["label"].tolist() == [1, 0]  # the tie is dropped
    assert data["image_0"].tolist() == [str(tmp_path / "a.png")] * 2
    rows[2]["label"], rows[1]["image_1"] = None, None
    with pytest.raises(ValueError) as info:
        read_preference_data(_write_table(tmp_path, rows, fmt, "prefs"))
    msg = str(info.value)
    unit = {"json": "record", "parquet": "row"}.get(fmt, "line")
    first = {"json": 2, "parquet": 2, "jsonl": 2}.get(fmt, 3)
    assert "eval.preference_data=" in msg
    assert re.search(rf"{unit} {first}\b.*'image_1'", msg) and re.search(rf"{unit} {first + 1}\b.*'label'", msg), msg


# --------------------------------------------------------------------------------------------
# Fix round pfe: the base model alone; a refused run leaves no trace
# --------------------------------------------------------------------------------------------


def test_base_model_alone_writes_tables_and_figures(tmp_path):
    """The first --help example (eval.models empty: the base model alone) writes every figure."""
    out = tmp_path / "one"
    assert evaluate.run(_cfg(out, "prompts.limit=2", "eval.samples_per_prompt=2", "eval.bootstrap=0")) == out
    assert (out / "results.md").is_file()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["pareto_colorfulness_contrast.png", "prompt_boxplots.png"]
    assert set(pd.read_parquet(out / "scores.parquet")["model"]) == {"base"}


def _refused_after_the_folder_is_taken(monkeypatch, out: Path):
    """An eval refused inside the run (the preflight bypassed: a check only the run makes)."""
    import pgot.preflight

    monkeypatch.setattr(pgot.preflight, "preflight", lambda cfg, stage: None)
    cfg = _cfg(out, "eval.models=[{name: x}, {name: x}]")
    with pytest.raises(ValueError, match="eval.models has several models named 'x'"):
        evaluate.run(cfg)


def test_refused_eval_removes_the_folder_it_created(tmp_path, monkeypatch):
    out = tmp_path / "new" / "eval"
    _refused_after_the_folder_is_taken(monkeypatch, out)
    assert not (tmp_path / "new").exists()  # the folder and the parent it created: no config.yaml, no .pgot.lock


def test_refused_eval_leaves_a_folder_that_existed_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.yaml").write_text("an older config\n")
    _refused_after_the_folder_is_taken(monkeypatch, out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".pgot.lock")) == ["config.yaml", "notes.txt"]
    assert (out / "config.yaml").read_text() == "an older config\n" and (out / "notes.txt").read_text() == "mine"
    assert not (out / ".pgot.lock.json").exists()


def test_refused_eval_keeps_scores_already_written(tmp_path, monkeypatch):
    """A refusal after scores were written keeps them (nothing lost): only a run with no result is undone."""
    import pgot.preflight

    monkeypatch.setattr(pgot.preflight, "preflight", lambda cfg, stage: None)
    out = tmp_path / "partial"
    votes = tmp_path / "votes.json"
    votes.write_text("[]")
    cfg = _cfg(out, "prompts.limit=1", "eval.samples_per_prompt=1", "eval.bootstrap=0", f"eval.votes=[{votes}]")
    with pytest.raises(ValueError, match="eval.votes is set but"):  # refused after scoring: no study key
        evaluate.run(cfg)
    assert len(pd.read_parquet(out / "scores.parquet")) == 1 and (out / "config.yaml").is_file()
