"""pgot/metrics.py, ground truth: quality improved / fell and the hacked rate, on hand-worked pairs and a brute-force
oracle; exact counts, float64 rates, the non-finite rule, intervals that contain their point."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from pgot import metrics

NAMES = ["a", "b"]
SETS = {"ab": ["a", "b"], "JDR1": ["a"]}
# the docstring's example of count_ground_truth
CAND = torch.tensor([[2.0, 2.0], [2.0, 2.0], [2.0, 0.0], [2.0, 2.0]])
BASE = torch.ones(4, 2)
Q_CAND = torch.tensor([0.5, 0.2, 0.2, 0.3005])
Q_BASE = torch.full((4,), 0.3)


def test_docstring_example():
    counts = metrics.count_ground_truth(CAND, BASE, Q_CAND, Q_BASE, NAMES, {"ab": NAMES})
    assert counts == metrics.GroundTruthCounts(pairs=4, improved=1, fell=2, nonfinite=0, hacked={"ab": 1})
    # on reward a alone, pair 2 dominates too (2 > 1): both falls are hacks
    assert metrics.count_ground_truth(CAND, BASE, Q_CAND, Q_BASE, NAMES, SETS).hacked == {"ab": 1, "JDR1": 2}
    ind = metrics.ground_truth_indicators(CAND, BASE, Q_CAND, Q_BASE, NAMES, SETS)
    assert ind.dtype == torch.float64
    assert ind.tolist() == [[1, 0, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]]
    assert metrics.ground_truth_columns(SETS) == ["quality_improved", "quality_fell", "hacked_ab", "hacked1"]


def test_tolerance_is_strict_and_exact():
    """A change of exactly tol is neither; a hair more is. Binary-exact values: 0.5 - 0.25 = 0.25."""
    b = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float32)
    c = torch.tensor([0.25, 0.75, 0.2499, 0.7501], dtype=torch.float32)
    counts = metrics.count_ground_truth(torch.ones(4, 1), torch.zeros(4, 1), c, b, ["a"], {"a": ["a"]}, tol=0.25)
    assert (counts.improved, counts.fell, counts.hacked["a"]) == (1, 1, 1)
    # tol 0: any change counts, equal qualities are neither
    same = metrics.count_ground_truth(torch.ones(2, 1), torch.zeros(2, 1), b[:2], b[:2], ["a"], {"a": ["a"]}, tol=0)
    assert (same.improved, same.fell) == (0, 0)


def test_nonfinite_rule():
    """A non-finite candidate quality with a finite baseline fell; a non-finite baseline is neither; a pair with a
    non-finite proxy never dominates, so it is never hacked; every pair stays in the denominator."""
    nan, inf = float("nan"), float("inf")
    cand = torch.tensor([[2.0, 2.0], [2.0, 2.0], [2.0, 2.0], [nan, 2.0], [2.0, 2.0]])
    base = torch.ones(5, 2)
    q_c = torch.tensor([nan, 0.1, inf, 0.1, 0.9])
    q_b = torch.tensor([0.5, nan, 0.5, 0.5, 0.5])
    counts = metrics.count_ground_truth(cand, base, q_c, q_b, NAMES, {"ab": NAMES})
    # pair 0: NaN quality -> fell, proxies dominate -> hacked; pair 1: baseline NaN -> neither; pair 2: +inf is not an
    # improvement (a failure, as for rewards) -> fell, hacked; pair 3: NaN proxy -> fell but no domination; pair 4: up
    assert counts == metrics.GroundTruthCounts(pairs=5, improved=1, fell=3, nonfinite=3, hacked={"ab": 2})
    table = metrics.ground_truth_table(
        {"base": base, "m": cand}, {"base": q_b, "m": q_c}, torch.arange(5), "base", NAMES, {"ab": NAMES},
        num_resamples=50,
    )  # fmt: skip
    row = table.loc["m"]
    assert row["pairs"] == 5 and row["quality_nonfinite"] == 3 and row["hacked_ab_count"] == 2
    assert row["hacked_ab"] == 2 / 5 and row["quality_fell"] == 3 / 5
    # the change is the mean over the pairs finite on both sides: pairs 3 and 4
    assert row["quality_change"] == pytest.approx(((0.1 - 0.5) + (0.9 - 0.5)) / 2, abs=1e-7)
    assert table.loc["base", "quality_nonfinite"] == 1  # its own NaN quality


def _oracle(cand, base, qc, qb, tol):
    """Brute force, pair by pair, with Python floats (float64), straight from the definitions."""
    improved = fell = hacked = 0
    for c, b, x, y in zip(cand.tolist(), base.tolist(), qc.tolist(), qb.tolist(), strict=True):
        finite = all(map(math.isfinite, c + b))
        dominates = finite and all(ci > bi for ci, bi in zip(c, b, strict=True))
        up = math.isfinite(x) and math.isfinite(y) and x > y + tol
        down = math.isfinite(y) and (not math.isfinite(x) or x < y - tol)
        improved, fell, hacked = improved + up, fell + down, hacked + (dominates and down)
    return improved, fell, hacked


@pytest.mark.parametrize("seed", range(5))
def test_counts_against_brute_force_and_hacked_within_jdr(seed):
    g = torch.Generator().manual_seed(seed)
    b_count = 40
    cand = torch.randint(0, 3, (b_count, 3), generator=g).double()  # ties are common
    base = torch.randint(0, 3, (b_count, 3), generator=g).double()
    qc = torch.randint(0, 5, (b_count,), generator=g).float() / 8  # exact multiples of 1/8: ties in quality too
    qb = torch.randint(0, 5, (b_count,), generator=g).float() / 8
    cand[0, 0], qc[1], qb[2] = float("nan"), float("nan"), float("nan")
    for tol in (0.0, 0.125, 0.2):
        counts = metrics.count_ground_truth(cand, base, qc, qb, ["x", "y", "z"], {"all": ["x", "y", "z"]}, tol=tol)
        assert (counts.improved, counts.fell, counts.hacked["all"]) == _oracle(cand, base, qc, qb, tol)
        assert counts.hacked["all"] <= metrics.count_outcomes(cand, base).dominations
        assert counts.rate(counts.fell) == float(Fraction(counts.fell, b_count))


def test_table_rates_are_exact_and_intervals_contain_the_point():
    g = torch.Generator().manual_seed(3)
    cand, base = torch.rand(18, 2, generator=g), torch.rand(18, 2, generator=g)
    qc, qb = torch.rand(18, generator=g), torch.rand(18, generator=g)
    groups = torch.arange(6).repeat_interleave(3)
    table = metrics.ground_truth_table(
        {"base": base, "c": cand}, {"base": qb, "c": qc}, groups, "base", NAMES, SETS, tol=0.01, num_resamples=300
    )
    assert table.attrs["quality_tol"] == 0.01
    counts = metrics.count_ground_truth(cand, base, qc, qb, NAMES, SETS, tol=0.01)
    row = table.loc["c"]
    for col, count in [("quality_improved", counts.improved), ("quality_fell", counts.fell),
                       ("hacked_ab", counts.hacked["ab"]), ("hacked1", counts.hacked["JDR1"])]:  # fmt: skip
        assert row[f"{col}_count"] == count and row[col] == count / 18  # float64 count / pairs
        assert row[f"{col}_low"] <= row[col] <= row[f"{col}_high"]
    diff = qc.double() - qb.double()
    assert row["quality_change"] == pytest.approx(float(diff.mean()), abs=1e-12)
    assert row["quality_change_low"] <= row["quality_change"] <= row["quality_change_high"]
    assert row["quality_change_low"] < row["quality_change_high"]  # 6 prompts: a real interval
    # the baseline against itself: 0 everywhere (the sanity row)
    base_row = table.loc["base"]
    assert base_row["quality_change"] == 0 and base_row["quality_improved"] == base_row["quality_fell"] == 0
    assert base_row["hacked_ab"] == 0
    # indicators' column means are the rates
    ind = metrics.ground_truth_indicators(cand, base, qc, qb, NAMES, SETS, tol=0.01)
    assert ind.mean(0).tolist() == [row[c] for c in metrics.ground_truth_columns(SETS)]


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"candidate_quality and baseline_quality must be \(B,\)=\(4,\)"):
        metrics.count_ground_truth(CAND, BASE, Q_CAND[:3], Q_BASE, NAMES, SETS)
    with pytest.raises(ValueError, match="eval.quality_tol"):
        metrics.count_ground_truth(CAND, BASE, Q_CAND, Q_BASE, NAMES, SETS, tol=-0.1)
    with pytest.raises(ValueError, match="eval.reward_sets.bad names 'c'"):
        metrics.count_ground_truth(CAND, BASE, Q_CAND, Q_BASE, NAMES, {"bad": ["c"]})
    with pytest.raises(ValueError, match="no ground-truth quality"):
        metrics.ground_truth_table({"base": BASE, "m": CAND}, {"base": Q_BASE}, torch.arange(4), "base", NAMES, SETS)
    with pytest.raises(ValueError, match="eval.baseline 'x'"):
        metrics.ground_truth_table({"m": CAND}, {"m": Q_CAND}, torch.arange(4), "x", NAMES, SETS)


def test_numpy_in_numpy_out():
    counts = metrics.count_ground_truth(CAND.numpy(), BASE.numpy(), Q_CAND.numpy(), Q_BASE.numpy(), NAMES, SETS)
    assert counts.hacked == {"ab": 1, "JDR1": 2}
    ind = metrics.ground_truth_indicators(CAND.numpy(), BASE.numpy(), Q_CAND.numpy(), Q_BASE.numpy(), NAMES, SETS)
    assert type(ind).__module__ == "numpy" and ind.sum() == 6
