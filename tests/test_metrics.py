"""Tests of pgot/metrics.py: hand-worked examples, brute-force oracles, bootstrap behaviour."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from pgot import metrics

# The hand-worked pairs of the docstrings (B=4, M=2).
CAND = torch.tensor([[2.0, 1.0], [1.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
BASE = torch.tensor([[1.0, 1.0], [1.0, 2.0], [2.0, 1.0], [1.0, 4.0]])


def test_hand_worked_example():
    assert_close(metrics.win_rate(CAND, BASE), torch.tensor([0.5, 0.25]))
    assert_close(metrics.jdr(CAND, BASE), torch.tensor(0.0))
    assert_close(metrics.jcr(CAND, BASE), torch.tensor(0.0))
    c = CAND.clone()
    c[1] = torch.tensor([2.0, 3.0])  # 2>1 and 3>2: dominates
    assert_close(metrics.jdr(c, BASE), torch.tensor(0.25))
    c[3] = torch.tensor([0.0, 3.0])  # 0<1 and 3<4: collapsed
    assert_close(metrics.jcr(c, BASE), torch.tensor(0.25))
    assert metrics.jdr(c, BASE).dim() == 0 and metrics.win_rate(c, BASE).shape == (2,)


def test_ties_are_neither_and_self_comparison_is_zero():
    x = torch.randn(10, 3)
    assert_close(metrics.jdr(x, x), torch.tensor(0.0))
    assert_close(metrics.jcr(x, x), torch.tensor(0.0))
    assert_close(metrics.win_rate(x, x), torch.zeros(3))
    # better on two rewards, tied on the third: neither jointly dominating nor collapsed
    c, b = torch.tensor([[2.0, 2.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    assert metrics.jdr(c, b) == 0 and metrics.jcr(c, b) == 0 and metrics.jcr(b, c) == 0


def test_nan_rows_count_as_neither_but_stay_in_the_denominator():
    c = torch.tensor([[2.0, 2.0], [float("nan"), 5.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    assert_close(metrics.jdr(c, b), torch.tensor(1 / 3))
    assert_close(metrics.jcr(c, b), torch.tensor(1 / 3))
    assert_close(metrics.win_rate(c, b), torch.tensor([1 / 3, 2 / 3]))


def test_against_brute_force_loops():
    g = torch.Generator().manual_seed(3)
    c = torch.randint(0, 3, (50, 4), generator=g).float()  # small integers: many ties
    b = torch.randint(0, 3, (50, 4), generator=g).float()
    wins = [sum(c[i, m] > b[i, m] for i in range(50)) / 50 for m in range(4)]
    dom = sum(all(c[i, m] > b[i, m] for m in range(4)) for i in range(50)) / 50
    col = sum(all(c[i, m] < b[i, m] for m in range(4)) for i in range(50)) / 50
    assert_close(metrics.win_rate(c, b), torch.tensor(wins, dtype=torch.float32))
    assert metrics.jdr(c, b).item() == pytest.approx(float(dom))
    assert metrics.jcr(c, b).item() == pytest.approx(float(col))
    # subsets by indexing columns; JDR on one column is its win rate
    for m in range(4):
        assert metrics.jdr(c[:, [m]], b[:, [m]]).item() == pytest.approx(metrics.win_rate(c, b)[m].item())


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        metrics.jdr(torch.zeros(3, 2), torch.zeros(4, 2))


def test_indicator_columns_match_the_functions():
    names = ["a", "b", "c"]
    sets = {"JDR2": ["a", "b"], "all": ["a", "b", "c"]}
    assert metrics.rate_columns(names, sets) == ["win_a", "win_b", "win_c", "JDR2", "JCR2", "JDR_all", "JCR_all"]
    g = torch.Generator().manual_seed(0)
    c, b = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    ind = metrics.comparison_indicators(c, b, names, sets).mean(0)
    assert_close(ind[:3], metrics.win_rate(c, b))
    assert_close(ind[3], metrics.jdr(c[:, :2], b[:, :2]))
    assert_close(ind[4], metrics.jcr(c[:, :2], b[:, :2]))
    assert_close(ind[5], metrics.jdr(c, b))
    assert_close(ind[6], metrics.jcr(c, b))
    with pytest.raises(ValueError, match=r"eval.reward_sets.bad names 'zz'"):
        metrics.comparison_indicators(c, b, names, {"bad": ["a", "zz"]})


def test_mean_scores_skip_nan():
    s = torch.tensor([[1.0, float("nan")], [3.0, 2.0]])
    assert_close(metrics.mean_scores(s), torch.tensor([2.0, 2.0]))


def test_bootstrap_replicates_match_exhaustive_enumeration():
    # P=3 prompts (ids 7, 9, 4) with 1, 2 and 1 rows. Oracle: the 27 equally likely draws of 3 prompts
    # with replacement, each keeping all rows of the drawn prompts.
    values = torch.tensor([1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([7, 9, 9, 4])
    per = {7: (1.0, 1), 9: (1.0, 2), 4: (0.0, 1)}  # (sum, rows)
    exact: dict[float, float] = {}
    for draw in itertools.product(per, repeat=3):
        stat = round(sum(per[d][0] for d in draw) / sum(per[d][1] for d in draw), 9)
        exact[stat] = exact.get(stat, 0.0) + 1 / 27
    reps = metrics.bootstrap_samples(values, groups, num_resamples=40000, seed=1)[:, 0]
    got: dict[float, float] = {}
    for v in reps.tolist():
        got[round(v, 9)] = got.get(round(v, 9), 0.0) + 1 / len(reps)
    assert set(got) == set(exact)  # whole prompts only: e.g. no replicate 1/3 from a row bootstrap
    for k, p in exact.items():
        assert got[k] == pytest.approx(p, abs=0.01)


def test_bootstrap_keeps_whole_prompts_docstring_example():
    values = torch.tensor([1.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1])
    reps = metrics.bootstrap_samples(values, groups, num_resamples=20000, seed=0)[:, 0]
    assert set(reps.tolist()) == {0.0, 0.75, 1.0}
    assert (reps == 0.75).double().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (reps == 0.0).double().mean().item() == pytest.approx(0.25, abs=0.02)


def test_bootstrap_contains_point_and_shrinks_with_more_prompts():
    g = torch.Generator().manual_seed(0)
    widths = []
    for p in (20, 80, 320):
        groups = torch.arange(p).repeat_interleave(2)
        values = (torch.rand(2 * p, 2, generator=g) < torch.tensor([0.3, 0.6])).float()
        point = values.mean(0).double()
        lo, hi = metrics.bootstrap_ci(values, groups, num_resamples=400, confidence=0.95, seed=0)
        assert (lo <= point).all() and (point <= hi).all()
        widths.append((hi - lo).mean().item())
    assert widths[0] > widths[1] > widths[2]
    # roughly 1/sqrt(P): quadrupling prompts halves the width
    assert 0.35 < widths[2] / widths[1] < 0.7


def test_bootstrap_is_seeded_and_handles_edge_cases():
    values, groups = torch.rand(30), torch.arange(30) // 3
    a = metrics.bootstrap_ci(values, groups, num_resamples=50, seed=5)
    b = metrics.bootstrap_ci(values, groups, num_resamples=50, seed=5)
    assert a[0].item() == b[0].item() and a[1].item() == b[1].item()
    lo, hi = metrics.bootstrap_ci(values, groups, num_resamples=0)
    assert math.isnan(lo.item()) and math.isnan(hi.item())
    with pytest.raises(ValueError, match="eval.confidence"):
        metrics.bootstrap_ci(values, groups, confidence=1.5)


def test_wilson_interval_against_closed_form():
    lo, hi = metrics.wilson_interval(8, 10, 0.95)
    assert lo == pytest.approx(0.4901624715, abs=1e-6) and hi == pytest.approx(0.9433178485, abs=1e-6)
    lo, hi = metrics.wilson_interval(0, 10, 0.95)
    assert lo == 0.0 and 0.25 < hi < 0.35
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_tables():
    a = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 2.0], [3.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    groups = torch.tensor([0, 0, 1, 1])
    t = metrics.comparison_table({"a": a, "b": b}, groups, "a", ["x", "y"], {"JDR2": ["x", "y"]}, num_resamples=100)
    assert t.loc["a", "JDR2"] == 0 and t.loc["a", "JCR2"] == 0 and t.loc["a", "win_x"] == 0
    assert t.loc["b", "win_x"] == pytest.approx(0.5)  # x: 2>1 yes, 3>2 yes, 0=0 tie, 0<1 no
    assert t.loc["b", "win_y"] == pytest.approx(0.5)  # y: 2>1 yes, 1>0 yes, 2<3 no, 0<1 no
    # JDR: rows 0 and 1 better on both; JCR: row 3 worse on both (row 2 ties on x)
    assert t.loc["b", "JDR2"] == pytest.approx(0.5) and t.loc["b", "JCR2"] == pytest.approx(0.25)
    assert t.loc["b", "JDR2_low"] <= 0.5 <= t.loc["b", "JDR2_high"]
    m = metrics.mean_score_table({"a": a}, {"a": groups}, ["x", "y"], num_resamples=10)
    assert m.loc["a", "x"] == pytest.approx(1.0) and m.loc["a", "y"] == pytest.approx(1.25) and m.loc["a", "nan"] == 0
