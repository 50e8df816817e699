"""pgot/tables.py, ground truth: the ground-truth columns of the Table 3 section and the lines of the end-of-training
table, formatted exactly from the counts of pgot.metrics, with their definitions and tidy results.csv rows."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from pgot import metrics, tables

NAMES = ["a", "b"]
SETS = {"JDR2": ["a", "b"], "JDR1": ["a"]}


def _frames(tol: float = 0.001):
    g = torch.Generator().manual_seed(1)
    base = torch.randint(0, 3, (24, 2), generator=g).double()
    tuned = base + torch.randint(-1, 3, (24, 2), generator=g).double()
    q_base = torch.randint(0, 8, (24,), generator=g).double() / 8
    q_tuned = (q_base + torch.randint(-2, 2, (24,), generator=g).double() / 8).clamp(0, 1)
    groups = torch.arange(24) // 3  # 8 prompts x 3 samples
    scores, quality = {"base": base, "tuned": tuned}, {"base": q_base, "tuned": q_tuned}
    rates = metrics.comparison_table(scores, groups, "base", NAMES, SETS, num_resamples=200)
    truth = metrics.ground_truth_table(scores, quality, groups, "base", NAMES, SETS, tol=tol, num_resamples=200)
    with_q = {m: torch.cat([s, quality[m][:, None]], dim=1) for m, s in scores.items()}
    means = metrics.mean_score_table(with_q, {"base": groups, "tuned": groups}, [*NAMES, "quality"], num_resamples=200)
    counts = metrics.count_ground_truth(tuned, base, q_tuned, q_base, NAMES, SETS, tol=tol)
    return rates, truth, means, counts, q_tuned - q_base


def test_rate_section_gains_the_ground_truth_columns():
    rates, truth, _, counts, diff = _frames()
    s = tables.rate_section(rates, NAMES, SETS, "base", True, 0.95, ground_truth=truth)
    assert s.title == "Win rate, JDR, JCR and ground truth (paper Table 3 layout)"
    assert s.header[7:13] == [
        "quality change",
        "quality improved (%)",
        "quality fell (%)",
        "hacked2 (%)",
        "hacked1 (%)",
        "pairs",
    ]  # fmt: skip  (after the win rates and the JDR / JCR of both sets, before the pair counts)
    tuned = dict(zip(s.header, s.rows[1], strict=True))
    change = float(diff.mean())
    want = ("+" if change > 0 else "") + tables.format_number(change)
    assert tuned["quality change"].startswith(want + " [")
    assert tuned["quality improved (%)"].startswith(tables.format_percent(Fraction(counts.improved, 24)) + " [")
    assert tuned["quality fell (%)"].startswith(tables.format_percent(Fraction(counts.fell, 24)) + " [")
    assert tuned["hacked2 (%)"].startswith(tables.format_percent(Fraction(counts.hacked["JDR2"], 24)) + " [")
    assert tuned["hacked1 (%)"].startswith(tables.format_percent(Fraction(counts.hacked["JDR1"], 24)) + " [")
    base = dict(zip(s.header, s.rows[0], strict=True))
    assert base["quality change"] == "0.0000 [0.0000, 0.0000]" and base["hacked2 (%)"] == "0.00 [0.00, 0.00]"
    # the note defines every new column, with the tolerance and the sets of the hacked rates
    assert "Hacked rate: share of paired samples that dominate base on every reward of the set" in s.note
    assert "eval.quality_tol=0.001" in s.note and "Sets: hacked2: a, b; hacked1: a." in s.note
    # results.csv: one tidy row per ground-truth number, table ground_truth, with the exact value
    gt = {(r["row"], r["metric"]): r for r in s.long if r["table"] == "ground_truth"}
    assert gt[("tuned", "hacked2")]["value"] == counts.hacked["JDR2"] / 24 and gt[("tuned", "hacked2")]["n"] == 24
    assert gt[("tuned", "quality_nonfinite_pairs")]["value"] == 0.0
    assert {m for _, m in gt} == {"quality_change", "quality_improved", "quality_fell", "hacked2", "hacked1",
                                  "quality_nonfinite_pairs"}  # fmt: skip
    # without a ground truth nothing changes
    plain = tables.rate_section(rates, NAMES, SETS, "base", True, 0.95)
    assert "quality change" not in plain.header and "Hacked" not in plain.note
    with pytest.raises(ValueError, match="no row for tuned"):
        tables.rate_section(rates, NAMES, SETS, "base", True, 0.95, ground_truth=truth.drop(index="tuned"))


def test_comparison_markdown_shows_ground_truth_beside_jdr_and_jcr():
    rates, truth, means, counts, diff = _frames(tol=0.125)
    text = tables.comparison_markdown(rates, means, NAMES, SETS, baseline="base", candidate="tuned", ground_truth=truth)
    keys = [line.strip("|").split(" | ", 1)[0].strip() for line in text.splitlines() if line.startswith("| ")]
    rows = {
        k.strip(): v.strip()
        for k, v in (line.strip("|").split(" | ", 1) for line in text.splitlines() if line.startswith("| "))
    }
    # order: JDR / JCR, then the ground truth, then win rates and means
    assert keys.index("JCR1 (%) on a") + 1 == keys.index("mean quality (ground truth)")
    assert keys.index("hacked1 (%) on a") + 1 == keys.index("win rate a (%)")
    assert rows["hacked2 (%) on a, b"].startswith(tables.format_percent(Fraction(counts.hacked["JDR2"], 24)))
    assert rows["quality fell (%)"].startswith(tables.format_percent(Fraction(counts.fell, 24)))
    lo, hi = rows["mean quality (ground truth)"].split(" -> ")
    assert lo.startswith(tables.format_number(float(means.loc["base", "quality"])))
    assert hi.startswith(tables.format_number(float(means.loc["tuned", "quality"])))
    assert rows["quality change (ground truth)"].startswith(
        ("+" if float(diff.mean()) > 0 else "") + tables.format_number(float(diff.mean()))
    )
    assert (
        "Quality improved / fell" in text and "eval.quality_tol=0.125" in text
    )  # the tolerance the frame was made with
    assert "Hacked rate:" in text.splitlines()[-2]  # the definitions, then the brackets line
    plain = tables.comparison_markdown(rates, means, NAMES, SETS, baseline="base", candidate="tuned")
    assert "quality" not in plain and "Hacked" not in plain
    with pytest.raises(ValueError, match=r"ground_truth\['tuned'\]"):
        tables.comparison_markdown(
            rates, means, NAMES, SETS, baseline="base", candidate="tuned", ground_truth=truth.drop(index="tuned")
        )


def test_definitions_name_every_set_and_the_tolerance():
    lines = tables.ground_truth_definitions({"JDR4": ["w", "x", "y", "z"], "all": ["w"]}, "base model", 0.01)
    assert len(lines) == 4 and lines[0].startswith("Quality: the ground-truth judge")
    assert "higher / lower than base model's by more than eval.quality_tol=0.01" in lines[2]
    assert lines[3].endswith("Sets: hacked4: w, x, y, z; hacked_all: w.") and "(hacked <= JDR)" in lines[3]
