"""Tests of pgot/metrics.py: hand-worked examples, brute-force oracles, exact counts, non-finite pairs, bootstrap."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from pgot import metrics

# The hand-worked pairs of the docstrings (B=4, M=2).
CAND = torch.tensor([[2.0, 1.0], [1.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
BASE = torch.tensor([[1.0, 1.0], [1.0, 2.0], [2.0, 1.0], [1.0, 4.0]])
F64 = torch.float64


def test_hand_worked_example():
    assert_close(metrics.win_rate(CAND, BASE), torch.tensor([0.5, 0.25], dtype=F64))
    assert_close(metrics.jdr(CAND, BASE), torch.tensor(0.0, dtype=F64))
    assert_close(metrics.jcr(CAND, BASE), torch.tensor(0.0, dtype=F64))
    c = CAND.clone()
    c[1] = torch.tensor([2.0, 3.0])  # 2>1 and 3>2: dominates
    assert_close(metrics.jdr(c, BASE), torch.tensor(0.25, dtype=F64))
    c[3] = torch.tensor([0.0, 3.0])  # 0<1 and 3<4: collapsed
    assert_close(metrics.jcr(c, BASE), torch.tensor(0.25, dtype=F64))
    assert metrics.jdr(c, BASE).dim() == 0 and metrics.win_rate(c, BASE).shape == (2,)


def test_ties_are_neither_and_self_comparison_is_zero():
    x = torch.randn(10, 3)
    assert metrics.jdr(x, x).item() == 0.0 and metrics.jcr(x, x).item() == 0.0
    assert metrics.win_rate(x, x).tolist() == [0.0, 0.0, 0.0]
    # better on two rewards, tied on the third: neither jointly dominating nor collapsed
    c, b = torch.tensor([[2.0, 2.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]])
    assert metrics.jdr(c, b) == 0 and metrics.jcr(c, b) == 0 and metrics.jcr(b, c) == 0


def test_nonfinite_candidate_is_a_collapse_and_stays_in_the_denominator(caplog):
    c = torch.tensor([[2.0, 2.0], [float("nan"), 5.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    with caplog.at_level("WARNING", logger="pgot.metrics"):
        assert metrics.jdr(c, b).item() == 1 / 3
        assert metrics.jcr(c, b).item() == 2 / 3  # pair 1: NaN candidate, finite baseline -> collapse
        assert metrics.win_rate(c, b).tolist() == [1 / 3, 2 / 3]  # reward 1 of pair 1 is finite: 5 > 1 wins
    assert "1 of 3 pairs have a non-finite reward" in caplog.text
    out = metrics.count_outcomes(c, b)  # the docstring example
    assert (out.pairs, out.dominations, out.collapses, out.nonfinite, out.unjudged) == (3, 1, 2, 1, 0)
    assert out.wins.tolist() == [1, 2] and out.losses.tolist() == [2, 1]
    assert out.nonfinite_by_reward.tolist() == [1, 0]
    assert out.wins.dtype == torch.int64 and isinstance(out.collapses, int)


def _oracle(c: list, b: list) -> dict:
    """The rule of the module docstring, from the definitions, on Python floats."""

    def bad(v):
        return not math.isfinite(v)

    def joint(cols):
        n_dom = n_col = n_bad = n_unj = 0
        for cr, br in zip(c, b, strict=True):
            cv, bv = [cr[m] for m in cols], [br[m] for m in cols]
            if any(map(bad, bv)):
                n_bad, n_unj = n_bad + 1, n_unj + 1
            elif any(map(bad, cv)):
                n_bad, n_col = n_bad + 1, n_col + 1
            else:
                n_dom += all(x > y for x, y in zip(cv, bv, strict=True))
                n_col += all(x < y for x, y in zip(cv, bv, strict=True))
        return n_dom, n_col, n_bad, n_unj

    m = len(c[0])
    per = [joint([k]) for k in range(m)]
    return {"win": [p[0] for p in per], "loss": [p[1] for p in per], "bad": [p[2] for p in per], "all": joint(range(m))}


def _sprinkled(gen: torch.Generator, shape: tuple[int, ...], rate: float) -> torch.Tensor:
    """Small integers (many ties) with NaN, +inf and -inf cells, each at ``rate``."""
    x = torch.randint(0, 3, shape, generator=gen).double()
    u = torch.rand(shape, generator=gen, dtype=F64)
    x[u < rate] = float("nan")
    x[(u >= rate) & (u < 2 * rate)] = float("inf")
    x[(u >= 2 * rate) & (u < 3 * rate)] = float("-inf")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3])
def test_counts_and_exact_rates_against_brute_force(dtype, rate):
    """Counts equal the oracle; every rate is float(Fraction(count, pairs)) exactly, in float64."""
    g = torch.Generator().manual_seed(int(rate * 100) + 7)
    for b_pairs in (1, 7, 18, 50):
        c, b = _sprinkled(g, (b_pairs, 4), rate).to(dtype), _sprinkled(g, (b_pairs, 4), rate).to(dtype)
        want = _oracle(c.double().tolist(), b.double().tolist())
        out = metrics.count_outcomes(c, b)
        assert out.wins.tolist() == want["win"] and out.losses.tolist() == want["loss"]
        assert out.nonfinite_by_reward.tolist() == want["bad"]
        assert (out.dominations, out.collapses, out.nonfinite, out.unjudged) == want["all"]
        wr, d, k = metrics.win_rate(c, b), metrics.jdr(c, b), metrics.jcr(c, b)
        assert wr.dtype == d.dtype == k.dtype == F64
        assert wr.tolist() == [float(Fraction(w, b_pairs)) for w in want["win"]]
        assert d.item() == float(Fraction(want["all"][0], b_pairs))
        assert k.item() == float(Fraction(want["all"][1], b_pairs))
        for m in range(4):  # JDR on one column is its win rate; JCR on one column its loss rate
            assert metrics.jdr(c[:, [m]], b[:, [m]]).item() == wr[m].item()
            assert metrics.jcr(c[:, [m]], b[:, [m]]).item() == float(Fraction(want["loss"][m], b_pairs))


def test_issue_example_six_prompts_three_samples_is_exact():
    """6 prompts x 3 samples, 2 of 3 winning: 12/18 exactly (was 0.6666666865348816), and the interval contains it."""
    base = torch.zeros(18, 2, dtype=torch.float32)
    cand = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]] * 6, dtype=torch.float32)
    groups = torch.arange(6).repeat_interleave(3)
    two_thirds = 0.6666666666666666
    assert metrics.win_rate(cand, base).tolist() == [two_thirds, two_thirds]
    assert metrics.jdr(cand, base).item() == two_thirds and metrics.jcr(cand, base).item() == 1 / 3
    t = metrics.comparison_table({"base": base, "cand": cand}, groups, "base", ["x", "y"], {"all": ["x", "y"]})
    for col in ("win_x", "win_y", "JDR_all"):
        assert t.loc["cand", col] == two_thirds and t.loc["cand", f"{col}_count"] == 12
        assert t.loc["cand", f"{col}_low"] <= two_thirds <= t.loc["cand", f"{col}_high"]
    assert t.loc["cand", "JCR_all"] == 1 / 3 and t.loc["cand", "pairs"] == 18
    ind = metrics.comparison_indicators(cand, base, ["x", "y"], {"all": ["x", "y"]})
    lo, hi = metrics.bootstrap_ci(ind, groups, num_resamples=200)
    assert ind.dtype == F64 and (lo <= ind.mean(0)).all() and (ind.mean(0) <= hi).all()
    assert lo[0].item() == hi[0].item() == two_thirds  # every prompt is 2/3: a point interval, on the point


def test_diverged_model_reads_as_collapsed_not_healthy():
    """train.learning_rate=1e6: every reward NaN or inf. Before: JDR 0% / JCR 0%. Now JCR 100%, all pairs non-finite."""
    base = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        cand = torch.full((12, 3), bad)
        out = metrics.count_outcomes(cand, base)
        assert (out.dominations, out.collapses, out.nonfinite, out.unjudged) == (0, 12, 12, 0)
        assert metrics.jcr(cand, base).item() == 1.0 and metrics.jdr(cand, base).item() == 0.0
        assert metrics.win_rate(cand, base).tolist() == [0.0] * 3  # +inf is not a win
        # the baseline broken instead: nothing can be judged, everything is counted
        out = metrics.count_outcomes(base, cand)
        assert (out.dominations, out.collapses, out.nonfinite, out.unjudged) == (0, 0, 12, 12)
        assert metrics.jcr(base, cand).item() == 0.0 and metrics.jdr(base, cand).item() == 0.0
    cand = base.clone()
    cand[:4, 2] = float("nan")  # one reward diverged on a third of the pairs
    sets = {"ab": ["a", "b"], "all": ["a", "b", "c"]}
    t = metrics.comparison_table({"base": base, "cand": cand}, torch.arange(12) // 3, "base", ["a", "b", "c"], sets)
    r = t.loc["cand"]
    assert r["JCR_all"] == 4 / 12 and r["JCR_all_count"] == 4 and r["JCR_all_nonfinite"] == 4
    assert r["JDR_all"] == 0 and r["JCR_ab"] == 0 and r["JCR_ab_nonfinite"] == 0  # a, b untouched (ties)
    assert r["win_c_nonfinite"] == 4 and r["win_a_nonfinite"] == 0 and r["nonfinite"] == 4 and r["pairs"] == 12
    assert t.loc["base", "nonfinite"] == 0 and t.loc["base", "JCR_all"] == 0


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


def test_empty_reward_set_is_an_error():
    with pytest.raises(ValueError, match=r"^jdr\(\): candidate and baseline have no reward column"):
        metrics.jdr(torch.zeros(3, 0), torch.zeros(3, 0))


EMPTY = torch.zeros(0, 2)
NAMES, SETS = ["x", "y"], {"all": ["x", "y"]}
Q0 = torch.zeros(0)


@pytest.mark.parametrize(
    ("fn", "call"),
    [
        ("win_rate", lambda: metrics.win_rate(EMPTY, EMPTY)),
        ("jdr", lambda: metrics.jdr(EMPTY, EMPTY)),
        ("jcr", lambda: metrics.jcr(EMPTY, EMPTY)),
        ("count_outcomes", lambda: metrics.count_outcomes(EMPTY, EMPTY)),
        ("comparison_indicators", lambda: metrics.comparison_indicators(EMPTY, EMPTY, NAMES, SETS)),
        ("comparison_nonfinite", lambda: metrics.comparison_nonfinite(EMPTY, EMPTY, NAMES, SETS)),
        ("comparison_table", lambda: metrics.comparison_table({"a": EMPTY, "b": EMPTY}, Q0, "b", NAMES, SETS)),
        ("count_ground_truth", lambda: metrics.count_ground_truth(EMPTY, EMPTY, Q0, Q0, NAMES, SETS)),
        ("ground_truth_indicators", lambda: metrics.ground_truth_indicators(EMPTY, EMPTY, Q0, Q0, NAMES, SETS)),
        (
            "ground_truth_table",
            lambda: metrics.ground_truth_table({"a": EMPTY, "b": EMPTY}, {"a": Q0, "b": Q0}, Q0, "b", NAMES, SETS),
        ),
    ],
)
def test_every_rate_function_refuses_no_pairs(fn, call):
    """Before: NaN with no message. A rate over no pairs is undefined: ValueError naming the function."""
    with pytest.raises(
        ValueError, match=r"^" + fn + r"\(\)( for model 'a')?: candidate and baseline have no pairs \(B = 0"
    ):
        call()


@pytest.mark.parametrize(
    ("fn", "arg", "call"),
    [
        ("mean_scores", "scores", lambda: metrics.mean_scores(EMPTY)),
        ("bootstrap_ci", "values", lambda: metrics.bootstrap_ci(torch.zeros(0), torch.zeros(0, dtype=torch.long))),
        ("bootstrap_samples", "values", lambda: metrics.bootstrap_samples(EMPTY, torch.zeros(0, dtype=torch.long))),
        ("gaussian_kl", "scores", lambda: metrics.gaussian_kl(EMPTY, torch.ones(3, 2))),
        ("gaussian_kl", "base", lambda: metrics.gaussian_kl(torch.ones(3, 2), EMPTY)),
    ],
)
def test_every_statistic_refuses_no_rows(fn, arg, call):
    """Before: bootstrap_ci raised torch's 'cannot reshape tensor of 0 elements'; the others returned NaN."""
    with pytest.raises(ValueError, match=rf"^{fn}\(\): {arg} has no rows \(shape \(0"):
        call()


def test_mean_score_table_refuses_a_model_without_samples():
    with pytest.raises(ValueError, match=r"^mean_score_table\(\): scores of 'a' must be \(B, 2\) with B >= 1"):
        metrics.mean_score_table({"a": EMPTY}, {"a": Q0}, NAMES)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("fn", ["bootstrap_ci", "bootstrap_samples"])
def test_bootstrap_refuses_non_finite_values_naming_the_first(bad, fn):
    """Before: bootstrap_ci([1, nan]) read (1, 1), the NaN skipped silently."""
    with pytest.raises(ValueError, match=rf"^{fn}\(\): values\[1\] = {bad} is not finite \(1 of 2 entries"):
        getattr(metrics, fn)(torch.tensor([1.0, bad]), torch.tensor([0, 1]))
    values = torch.ones(4, 3)
    values[2, 1] = values[3, 0] = bad
    with pytest.raises(ValueError, match=rf"values\[2, 1\] = {bad} is not finite \(2 of 12 entries"):
        getattr(metrics, fn)(values, torch.tensor([0, 0, 1, 1]))


def test_mean_scores_skip_nonfinite_in_float64():
    s = torch.tensor([[1.0, float("nan")], [3.0, 2.0], [float("inf"), float("-inf")]])
    assert metrics.mean_scores(s).tolist() == [2.0, 2.0] and metrics.mean_scores(s).dtype == F64
    x = torch.tensor([[0.1], [0.2], [0.7]], dtype=torch.float32)  # the float64 mean of the float32 values
    assert metrics.mean_scores(x).item() == sum(x[:, 0].double().tolist()) / 3
    assert math.isnan(metrics.mean_scores(torch.full((2, 1), float("nan"))).item())


def test_indicators_and_nonfinite_flags_follow_the_rule():
    names, sets = ["a", "b", "c"], {"JDR2": ["a", "b"], "all": ["a", "b", "c"]}
    g = torch.Generator().manual_seed(4)
    c, b = _sprinkled(g, (60, 3), 0.05), _sprinkled(g, (60, 3), 0.05)
    ind = metrics.comparison_indicators(c, b, names, sets)
    bad = metrics.comparison_nonfinite(c, b, names, sets)
    assert ind.dtype == F64 and not torch.isnan(ind).any() and bad.dtype == torch.bool
    full, two = metrics.count_outcomes(c, b), metrics.count_outcomes(c[:, :2], b[:, :2])
    assert ind.sum(0).tolist() == [
        *full.wins.tolist(),
        two.dominations,
        two.collapses,
        full.dominations,
        full.collapses,
    ]
    assert ind.mean(0)[5].item() == metrics.jdr(c, b).item() and ind.mean(0)[6].item() == metrics.jcr(c, b).item()
    assert bad.sum(0).tolist() == [
        *full.nonfinite_by_reward.tolist(),
        two.nonfinite,
        two.nonfinite,
        full.nonfinite,
        full.nonfinite,
    ]
    assert full.nonfinite > 0 and full.collapses > full.nonfinite - full.unjudged - 1
    with pytest.raises(ValueError, match="one name per column"):
        metrics.comparison_indicators(c, b, ["a", "b"], {})


@pytest.mark.parametrize("seed", range(6))
def test_tables_are_exact_counts_and_intervals_contain_the_point(seed):
    """Random integer tables with NaN/inf: rate == Fraction(count, pairs) exactly; low <= point <= high."""
    g = torch.Generator().manual_seed(seed)
    p, n = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    groups = torch.arange(p).repeat_interleave(n)
    names, sets = ["x", "y", "z"], {"JDR3": ["x", "y", "z"], "xy": ["x", "y"]}
    scores = {m: _sprinkled(g, (p * n, 3), 0.04).float() for m in ("base", "a", "b")}
    t = metrics.comparison_table(scores, groups, "base", names, sets, num_resamples=50, confidence=0.5, seed=seed)
    for model, r in t.iterrows():
        want = metrics.count_outcomes(scores[model], scores["base"])
        assert r["pairs"] == p * n and r["JDR3_count"] == want.dominations and r["JCR3_count"] == want.collapses
        assert r["JDR3_nonfinite"] == r["JCR3_nonfinite"] == r["nonfinite"] == want.nonfinite
        for c in metrics.rate_columns(names, sets):
            assert t[f"{c}_count"].dtype == t[f"{c}_nonfinite"].dtype == np.int64 and t[c].dtype == np.float64
            assert r[c] == float(Fraction(int(r[f"{c}_count"]), p * n))
            assert r[f"{c}_low"] <= r[c] <= r[f"{c}_high"]
    m = metrics.mean_score_table(scores, {k: groups for k in scores}, names, num_resamples=50, confidence=0.5)
    for model, r in m.iterrows():
        s = scores[model]
        for k, name in enumerate(names):
            assert r[f"{name}_nonfinite"] == int((~torch.isfinite(s[:, k])).sum())
            if r[f"{name}_nonfinite"] < len(s):
                assert r[f"{name}_low"] <= r[name] <= r[f"{name}_high"]
            else:
                assert math.isnan(r[name])
        assert r["nonfinite"] == r["nan"] == int((~torch.isfinite(s)).any(1).sum())


@pytest.mark.parametrize(("p", "row"), [(7, [0.2054385934615871]), (7, [0.7629971687438133, 0.2558997317667261])])
def test_bootstrap_interval_contains_point_despite_rounding(p, row):
    """Identical prompts: replicates equal the mean up to the last bit, which raw percentiles missed (found by
    search)."""
    values = torch.tensor(row * p, dtype=F64)
    groups = torch.arange(p).repeat_interleave(len(row))
    reps = metrics.bootstrap_samples(values, groups, num_resamples=100)[:, 0]
    raw = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=F64))
    point = (values.reshape(p, -1).sum(1).sum() / len(values)).item()  # the estimator's own sum order
    assert not raw[0].item() <= point <= raw[1].item()  # the raw percentile interval misses it by a bit
    lo, hi = metrics.bootstrap_ci(values, groups, num_resamples=100)
    assert lo.item() <= point <= hi.item() and hi.item() - lo.item() < 1e-15
    table = metrics.mean_score_table({"m": values[:, None]}, {"m": groups}, ["r"], num_resamples=100)
    assert table.loc["m", "r_low"] <= table.loc["m", "r"] <= table.loc["m", "r_high"]


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
    with pytest.raises(ValueError, match=r"^wilson_interval\(\): n must be a number of trials >= 1, got 0;"):
        metrics.wilson_interval(0, 0)


def test_wilson_interval_is_float64_and_contains_the_proportion():
    """float32 tensors in, Python floats out, equal to the float64 computation; p inside for every k."""
    exact = metrics.wilson_interval(2, 3)
    got = metrics.wilson_interval(torch.tensor(2.0, dtype=torch.float32), torch.tensor(3, dtype=torch.int32))
    assert got == exact and all(type(v) is float for v in got)
    for n in (1, 2, 3, 7, 10, 1000):
        for k in range(0, n + 1, max(1, n // 10)):
            lo, hi = metrics.wilson_interval(k, n, 0.9)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert metrics.wilson_interval(10, 10)[1] == 1.0 and metrics.wilson_interval(0, 10)[0] == 0.0
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        metrics.wilson_interval(11, 10)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        metrics.wilson_interval(float("nan"), 10)
    with pytest.raises(ValueError, match="n must be a number of trials >= 1, got -1"):
        metrics.wilson_interval(0, -1)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\)"):
        metrics.wilson_interval(1, 2, 1.0)


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
    assert (
        m.loc["a", "x"] == 1.0 and m.loc["a", "y"] == 1.25 and m.loc["a", "nan"] == 0 and m.loc["a", "nonfinite"] == 0
    )
    assert m.loc["a", "x_nonfinite"] == 0 and m.loc["a", "samples"] == 4
    assert t.loc["b", "JDR2_count"] == 2 and t.loc["b", "JCR2_count"] == 1 and t.loc["b", "nonfinite"] == 0
    with pytest.raises(ValueError, match=r"must be \(B, 2\)"):
        metrics.mean_score_table({"a": a[:, :1]}, {"a": groups}, ["x", "y"])


def test_gaussian_kl_matches_the_closed_form():
    """Oracle: KL(N(m1, v1) || N(m0, v0)) = 0.5 log(v0 / v1) + (v1 + (m1 - m0)^2) / (2 v0) - 1/2, population variances."""
    now = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # means 2, 2; variances 1, 4
    base = torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 2.0]])  # means 1, 2; variances 2/3, 2/3
    want = [0.5 * math.log((2 / 3) / v1) + (v1 + dm**2) / (2 * 2 / 3) - 0.5 for v1, dm in ((1.0, 1.0), (4.0, 0.0))]
    got = metrics.gaussian_kl(now, base)
    assert got.dtype == F64
    assert_close(got, torch.tensor(want, dtype=F64), atol=1e-12, rtol=0)
    assert_close(metrics.gaussian_kl(base, base), torch.zeros(2, dtype=F64), atol=1e-15, rtol=0)


def test_gaussian_kl_floors_the_variance_for_one_sample_or_constant_rewards():
    """Before: NaN. With s^2 <- max(s^2, 1e-12): point masses give defined values."""
    floor = metrics.KL_VAR_FLOOR
    assert floor == 1e-12
    same = metrics.gaussian_kl(torch.ones(1, 2), torch.ones(1, 2))  # one sample each, equal: 0
    assert same.tolist() == [0.0, 0.0]
    assert metrics.gaussian_kl(torch.full((4, 1), 2.0), torch.full((3, 1), 2.0)).item() == 0.0
    # a collapsed current distribution against a unit-variance base: 0.5 log(1 / floor) + (floor + 0) / 2 - 1/2
    base = torch.tensor([[-1.0], [1.0]])  # mean 0, variance 1
    got = metrics.gaussian_kl(torch.zeros(5, 1), base).item()
    assert got == pytest.approx(0.5 * math.log(1 / floor) + floor / 2 - 0.5, rel=1e-12)
    assert 13.0 < got < 14.0
    # a constant base and a moving current: finite and large, (v1 + dm^2) / (2 floor) dominates
    got = metrics.gaussian_kl(base, torch.zeros(3, 1)).item()
    assert got == pytest.approx(0.5 * math.log(floor / 1.0) + 1.0 / (2 * floor) - 0.5, rel=1e-12)
    # non-finite rewards stay non-finite (the probe logs None)
    assert not math.isfinite(metrics.gaussian_kl(torch.tensor([[float("nan")], [1.0]]), base).item())


def test_gaussian_kl_checks_shapes():
    with pytest.raises(
        ValueError, match=r"^gaussian_kl\(\): scores and base must have the same rewards M, got \(2, 2\) and \(2, 3\)"
    ):
        metrics.gaussian_kl(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"^gaussian_kl\(\): base must be \(B, M\) reward vectors, got shape \(3,\)"):
        metrics.gaussian_kl(torch.ones(2, 2), torch.ones(3))
