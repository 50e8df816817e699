"""Tests of pgot/tables.py: exact rate formatting, sections from metric frames, md / tex / csv rendering,
optional columns, and the tuned-vs-base comparison against metrics computed independently."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch

from pgot import metrics, tables

NAMES = ["a", "b", "c"]
SETS = {"JDR2": ["a", "b"], "all": NAMES}


def test_percent_is_exact_and_rounds_half_up():
    assert tables.format_percent(Fraction(1, 32)) == "3.13"  # f"{3.125:.2f}" would give 3.12
    assert tables.format_percent(0.145) == "14.50"  # the binary value is 0.1449999...
    assert tables.format_percent(2 / 3) == "66.67"
    assert tables.format_percent(Fraction(1, 3), Fraction(0), Fraction(2, 3)) == "33.33 [0.00, 66.67]"
    assert tables.format_percent(0.0, 0.0, 0.0) == "0.00 [0.00, 0.00]"
    assert tables.format_percent(1.0) == "100.00"
    assert tables.format_percent(math.nan) == "–" and tables.format_percent(None) == "–"
    assert tables.format_percent(0.5, math.nan, math.nan) == "50.00"  # no interval (eval.bootstrap=0)
    assert tables.format_percent(0.123456, digits=1) == "12.3"
    assert tables.format_number(0.123456, 0.1, 0.2) == "0.1235 [0.1000, 0.2000]"
    assert tables.format_number(123.456) == "123.46" and tables.format_number(math.nan) == "nan"


def _frames(nonfinite: bool = False, counts: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, dict, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 3, (30, 3), generator=g).double()
    tuned = base + torch.randint(-1, 3, (30, 3), generator=g).double()
    groups = torch.arange(30) // 3  # 10 prompts x 3 samples
    scores = {"base": base, "tuned": tuned}
    rates = metrics.comparison_table(scores, groups, "base", NAMES, SETS, num_resamples=200)
    means = metrics.mean_score_table(scores, {"base": groups, "tuned": groups}, NAMES, num_resamples=200)
    if nonfinite:
        rates["nonfinite"] = [0, 2]
    if counts:
        for c in metrics.rate_columns(NAMES, SETS):
            rates[f"{c}_count"] = [0, 7]
    return rates, means, scores, groups


def test_rate_section_matches_the_metrics_and_shows_optional_columns():
    rates, _, scores, _ = _frames()
    s = tables.rate_section(rates, NAMES, SETS, "base", True, 0.95)
    assert s.header == ["Model", "a win (%)", "b win (%)", "c win (%)", "JDR2 (%)", "JCR2 (%)", "JDR_all (%)"] + [
        "JCR_all (%)",
        "pairs",
        "non-finite pairs",  # metrics always count them: every table says how many (0 here)
    ]
    assert s.rows[0][0] == "base (baseline)" and s.rows[0][1] == "0.00 [0.00, 0.00]"
    cand, base = scores["tuned"], scores["base"]
    jdr2 = float((cand[:, :2] > base[:, :2]).all(1).double().mean())
    row = dict(zip(s.header, s.rows[1], strict=True))
    assert row["JDR2 (%)"].startswith(tables.format_percent(jdr2) + " [")
    assert row["pairs"] == "30" and row["non-finite pairs"] == "0"
    assert "95% percentile bootstrap" in s.note
    # without the column (an older metrics frame), nothing is shown
    s0 = tables.rate_section(rates.drop(columns=["nonfinite"]), NAMES, SETS, "base", True, 0.95)
    assert "non-finite pairs" not in s0.header and "Non-finite" not in s0.note
    long = tables.results_csv([s])
    got = long[(long["row"] == "tuned") & (long["metric"] == "JDR2")].iloc[0]
    assert got["value"] == pytest.approx(jdr2, abs=1e-7) and got["n"] == 30
    # metrics may report non-finite pairs: a column (and a results.csv metric) appears
    rates, *_ = _frames(nonfinite=True)
    s = tables.rate_section(rates, NAMES, SETS, "base", False, 0.95)
    assert s.header[-1] == "non-finite pairs" and [r[-1] for r in s.rows] == ["0", "2"]
    assert "[" not in s.rows[1][1] and "Non-finite pairs" in s.note
    nf = tables.results_csv([s]).query("metric == 'nonfinite_pairs'")
    assert nf["value"].tolist() == [0.0, 2.0] and nf["n"].tolist() == [30, 30]


def test_rates_from_counts_are_exact_float64():
    rates, *_ = _frames(counts=True)
    s = tables.rate_section(rates, NAMES, SETS, "base", True, 0.95)
    row = dict(zip(s.header, s.rows[1], strict=True))
    assert row["JDR2 (%)"].startswith("23.33 [")  # 7 / 30
    long = tables.results_csv([s])
    v = long[(long["row"] == "tuned") & (long["metric"] == "JDR2")]["value"].iloc[0]
    assert v == 7 / 30 and v != float(np.float32(7 / 30))


def test_mean_section_nan_column_only_when_needed():
    _, means, _, _ = _frames()
    s = tables.mean_section(means, NAMES, True, 0.9)
    assert s.header == ["Model", "a", "b", "c", "samples"] and "90% bootstrap" in s.note
    assert s.rows[0][1].startswith(tables.format_number(means.loc["base", "a"]))
    means.loc["tuned", "nan"] = 3
    s = tables.mean_section(means, NAMES, False, 0.9)
    assert s.header[-1] == "rows with NaN" and s.rows[1][-1] == "3" and "[" not in s.rows[1][1]


def test_render_and_write(tmp_path):
    rates, means, _, _ = _frames()
    sections = [
        tables.rate_section(rates, NAMES, SETS, "base", True, 0.95),
        tables.mean_section(means, NAMES, True, 0.95),
    ]
    tables.write_tables(tmp_path, sections, "Models: base, tuned.")
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# pgot evaluation\n\nModels: base, tuned.\n\n## Win rate, JDR and JCR (paper Table 3 layout)")
    assert "| base (baseline) | 0.00 [0.00, 0.00]" in md and "## Mean reward scores (paper Table 5 layout)" in md
    tex = (tmp_path / "results.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2 and "JDR\\_all" in tex and r"\toprule" in tex
    csv = pd.read_csv(tmp_path / "results.csv")
    assert list(csv.columns) == tables.LONG_COLUMNS and set(csv["table"]) == {"joint", "mean"}
    assert len(csv) == 2 * (7 + 1) + 2 * 3  # 7 rates + the non-finite count per model, 3 means per model
    assert not list(tmp_path.glob(".*.tmp"))


def test_preference_and_study_sections():
    acc = pd.DataFrame(
        {"accuracy": [0.8, 0.5], "low": [0.6, 0.3], "high": [1.0, 0.7], "pairs": [5, 5]},
        index=pd.Index(["colorfulness", "contrast"], name="reward"),
    )
    s = tables.preference_section(acc, num_pairs=5, source="prefs.parquet", ci=True)
    assert s.rows[0] == ["colorfulness", "80.00 [60.00, 100.00]", "5"] and "5 human-labelled pairs of prefs" in s.note
    assert s.long[0]["table"] == "preference" and s.long[0]["metric"] == "accuracy"
    tally = pd.DataFrame(
        [
            {
                "votes": 6,
                "wins": 4,
                "ties": 1,
                "losses": 1,
                "win_rate": 4.5 / 6,
                "low": 0.4,
                "high": 0.9,
                "annotators": 2,
            }
        ],
        index=pd.Index(["cand"], name="candidate"),
    )
    s = tables.study_section(tally, "base", confidence=0.95, num_files=2)
    assert s.title == "User study: win rate against base (paper Table 6 layout)"
    assert s.rows[0] == ["cand", "75.00 [40.00, 90.00]", "6", "4", "1", "1", "2"] and "2 vote files" in s.note


def test_summary_has_table_definitions_and_sets():
    rates, *_ = _frames()
    s = tables.rate_section(rates, NAMES, SETS, "base", True, 0.95)
    text = tables.summary_markdown(s, "base", SETS, note="[low, high]: 95% bootstrap.")
    lines = text.splitlines()
    assert lines[0] == "## Win rate, JDR and JCR (paper Table 3 layout)" and "| tuned |" in text
    assert any(x.startswith("JDR (joint domination rate):") and "strictly higher than base" in x for x in lines)
    assert any(x.startswith("JCR (joint collapse rate):") and "strictly lower than base" in x for x in lines)
    assert "Reward sets: JDR2/JCR2: a, b; JDR_all/JCR_all: a, b, c." in lines and lines[-1].startswith("[low, high]")


def test_comparison_markdown_agrees_with_metrics():
    rates, means, scores, _ = _frames(nonfinite=True)
    text = tables.comparison_markdown(rates, means, NAMES, SETS, baseline="base", candidate="tuned")
    cand, base = scores["tuned"], scores["base"]
    rows = dict(
        line.strip("|").split(" | ", 1) for line in text.splitlines() if line.startswith("| ") and " | " in line
    )
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    for set_name, members in SETS.items():
        jdr_col, jcr_col = metrics.rate_columns([], {set_name: members})
        idx = [NAMES.index(n) for n in members]
        jdr = float(metrics.jdr(cand[:, idx], base[:, idx]))
        jcr = float(metrics.jcr(cand[:, idx], base[:, idx]))
        what = f"on {', '.join(members)}"
        assert rows[f"{jdr_col} (%) {what}"].startswith(tables.format_percent(jdr) + " [")
        assert rows[f"{jcr_col} (%) {what}"].startswith(tables.format_percent(jcr) + " [")
    wins = metrics.win_rate(cand, base)
    for j, n in enumerate(NAMES):
        assert rows[f"win rate {n} (%)"].startswith(tables.format_percent(float(wins[j])) + " [")
        lo, hi = rows[f"mean {n}"].split(" -> ")
        assert lo.startswith(tables.format_number(float(base[:, j].mean())) + " [")
        assert hi.startswith(tables.format_number(float(cand[:, j].mean())) + " [")
    assert rows["pairs"] == "30" and rows["non-finite pairs"] == "2"
    assert text.splitlines()[0] == "tuned vs base: 30 pairs"
    assert "JDR (joint domination rate):" in text and "95% percentile bootstrap intervals over prompts" in text
    plain = tables.comparison_markdown(
        rates.drop(columns="nonfinite"), means, NAMES, SETS, baseline="base", candidate="tuned", ci=False, title="T"
    )
    assert plain.startswith("T\n") and "[" not in plain and "non-finite" not in plain and "bootstrap" not in plain
    with pytest.raises(ValueError, match=r"needs the rows rates\['x'\], means\['x'\]"):
        tables.comparison_markdown(rates, means, NAMES, SETS, baseline="base", candidate="x")
