"""The testbed end to end on the shipped model (configs/testbed/*.yaml, shortened): pgot-precompute, pgot-train (PG-OT,
a few steps, its end-of-training table with the ground truth) and pgot-eval with the ground truth; the ground-truth
numbers of both tables against pgot.metrics on the judge's scores of the very images; and the settings the testbed
configs share."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState

from pgot import cli, metrics, probes, tables, train
from pgot.config import load_config
from pgot.testbed import judge, proxies

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "configs" / "testbed"
TINY = ROOT / "tests" / "configs" / "tiny_debug.yaml"
SETS = {"JDR2": ["tb_align", "tb_pref"], "JDR4": ["tb_align", "tb_pref", "saturation", "contrast"]}
SHORT = ["prompts.limit=6", "model.device=cpu"]  # 6 prompts: 4 to train on, 2 held out (prompts.eval_fraction=0.25)


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _rows(printed: str) -> dict[str, str]:
    cells = [line.strip("|").split(" | ", 1) for line in printed.splitlines() if line.startswith("| ")]
    return {k.strip(): v.strip() for k, v in cells if len((k, v)) == 2}


def test_precompute_train_eval_with_the_ground_truth(tmp_path, capsys, monkeypatch):
    store, run, out = tmp_path / "frontier", tmp_path / "pgot", tmp_path / "eval"
    args = [*SHORT, f"precompute.store={store}", "precompute.samples_per_prompt=4"]
    assert cli.precompute_main(["--config", str(TESTBED / "precompute.yaml"), *args, "--log-level", "WARNING"]) == 0
    assert len(pd.read_parquet(store / "samples.parquet")) == 6 * 4

    # training, recording the images of the end-of-training table (tuned first, then the base model)
    recorded: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    sample_and_score, final_table, in_table = probes.sample_and_score, train._final_table, {"now": False}

    def recording(cfg, model, reward_models, texts, ids, idx, seed):
        images, scores = sample_and_score(cfg, model, reward_models, texts, ids, idx, seed)
        if in_table["now"]:
            recorded.append((images, scores, list(texts)))
        return images, scores

    def table(r):
        in_table["now"] = True
        return final_table(r)

    monkeypatch.setattr(train.probes, "sample_and_score", recording)
    monkeypatch.setattr(train, "_final_table", table)
    steps = [f"train.output_dir={run}", f"train.store={store}", f"precompute.store={store}", "train.max_steps=3",
             "train.prompts_per_step=2", "train.samples_per_prompt=2", "train.probe_every=0", "train.checkpoint_every=0",
             "train.final_eval_prompts=2", "train.final_eval_samples=2", "eval.bootstrap=100"]  # fmt: skip
    assert cli.train_main(["--config", str(TESTBED / "train.yaml"), *SHORT, *steps, "--log-level", "WARNING"]) == 0
    printed = capsys.readouterr().out
    (tuned_images, tuned, texts), (base_images, base, _) = recorded
    assert "tuned vs base: 4 pairs, 2 held-out prompts x 2 seeds" in printed
    q_t, q_b = judge.quality(tuned_images, texts), judge.quality(base_images, texts)
    counts = metrics.count_ground_truth(tuned.double(), base.double(), q_t, q_b, list(SETS["JDR4"]), SETS)
    rows = _rows(printed)
    assert rows["quality fell (%)"].startswith(tables.format_percent(counts.rate(counts.fell)))
    assert rows["quality improved (%)"].startswith(tables.format_percent(counts.rate(counts.improved)))
    for name, label in (("JDR2", "hacked2 (%) on tb_align, tb_pref"),
                        ("JDR4", "hacked4 (%) on tb_align, tb_pref, saturation, contrast")):  # fmt: skip
        assert rows[label].startswith(tables.format_percent(counts.rate(counts.hacked[name])))
    mean_b, mean_t = rows["mean quality (ground truth)"].split(" -> ")
    assert mean_b.startswith(tables.format_number(float(q_b.double().mean())))
    assert mean_t.startswith(tables.format_number(float(q_t.double().mean())))

    # evaluation of the base model and the run, on the same held-out prompts and seeds, in the same batches
    models = json.dumps([{"name": "base"}, {"name": "pgot", "lora": str(run)}])
    evals = [f"eval.output_dir={out}", f"eval.models={models}", "eval.samples_per_prompt=2", "eval.batch_size=4",
             "eval.bootstrap=100", "eval.save_images=false"]  # fmt: skip
    assert cli.eval_main(["--config", str(TESTBED / "eval.yaml"), *SHORT, *evals, "--log-level", "WARNING"]) == 0
    printed = capsys.readouterr().out
    assert "hacked4 (%)" in printed and "Hacked rate:" in printed
    df = pd.read_parquet(out / "scores.parquet")
    key = ["prompt_id", "seed", "sample_index"]
    got = {m: g.sort_values(key) for m, g in df.groupby("model")}
    assert got["pgot"]["prompt"].tolist() == texts  # the final table's prompts and seeds
    # the same noise, the same batch layout: pgot-eval's quality of each image is the final table's
    torch.testing.assert_close(torch.tensor(got["pgot"]["quality"].to_numpy()), q_t.double())
    torch.testing.assert_close(torch.tensor(got["base"]["quality"].to_numpy()), q_b.double())
    res = pd.read_csv(out / "results.csv")
    gt = res[(res["table"] == "ground_truth") & (res["row"] == "pgot")].set_index("metric")["value"]
    names = list(SETS["JDR4"])
    again = metrics.count_ground_truth(
        torch.tensor(got["pgot"][names].to_numpy()), torch.tensor(got["base"][names].to_numpy()),
        torch.tensor(got["pgot"]["quality"].to_numpy()), torch.tensor(got["base"]["quality"].to_numpy()), names, SETS,
    )  # fmt: skip
    assert gt["hacked4"] == again.rate(again.hacked["JDR4"]) and gt["quality_fell"] == again.rate(again.fell)


def test_final_table_without_a_readable_world_warns_and_keeps_the_rest(tmp_path, capsys, caplog):
    """eval.ground_truth=testbed with prompts outside the grammar (the tiny world's demo prompts): the table is printed
    without the ground-truth lines, and a warning says why."""
    overrides = [f"train.output_dir={tmp_path / 'run'}", "train.strategy=online", "train.max_steps=1",
                 f"train.store={tmp_path / 'store'}", f"precompute.store={tmp_path / 'store'}",
                 "train.probe_every=0", "train.checkpoint_every=0", "prompts.limit=2", "draft.num_steps=2",
                 "train.final_eval_prompts=2", "train.final_eval_samples=1", "eval.bootstrap=0",
                 "eval.ground_truth=testbed"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pgot"):
        assert cli.train_main(["--config", str(TINY), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "JDR_all (%)" in printed and "quality" not in printed
    (warning,) = [r.getMessage() for r in caplog.records if "eval.ground_truth=testbed" in r.getMessage()]
    assert "outside the testbed grammar" in warning and "has no ground-truth lines" in warning
    assert warning.count("Testbed prompts read") == 1


def test_the_testbed_configs_share_their_world():
    """precompute / train / eval configs of the testbed agree on everything a store or a comparison depends on, and the
    agent's knowledge base is the proxies' collapse signatures."""
    pre, tr, ev = (load_config(TESTBED / f"{n}.yaml") for n in ("precompute", "train", "eval"))
    for a, b in ((pre, tr), (tr, ev)):
        assert a.model.path == b.model.path == "builtin:testbed" and a.model.resolution == b.model.resolution == 32
        assert (a.draft.num_steps, a.draft.guidance_scale, a.draft.shift) == (
            b.draft.num_steps,
            b.draft.guidance_scale,
            b.draft.shift,
        )
        assert a.reward_names == b.reward_names and a.prompts == b.prompts
    assert pre.precompute == tr.precompute and tr.train.store == pre.precompute.store
    assert tr.train.reward_sets == ev.eval.reward_sets == tr.eval.reward_sets
    assert tr.eval.ground_truth == ev.eval.ground_truth == "testbed"
    assert tr.agent.knowledge == {n: proxies.SIGNATURES[n] for n in tr.reward_names}
    debug = yaml.safe_load((ROOT / "configs" / "debug.yaml").read_text())
    assert debug["model"]["path"] == "builtin:testbed" and debug["eval"]["ground_truth"] == "testbed"
