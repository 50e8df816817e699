"""Paired comparison metrics: per-reward win rate, Joint Domination Rate, Joint Collapse Rate.

A candidate model and a baseline model generate one image each for the same prompt and the same
initial noise (``seed``, ``prompt_id``, ``sample_index``); row ``b`` of ``candidate`` and row ``b`` of
``baseline`` are the reward vectors of such a pair. Higher is better for every reward.

* win rate of reward ``m``: fraction of pairs with ``candidate[b, m] > baseline[b, m]``;
* JDR (paper eq. 2): fraction of pairs with ``candidate[b, m] > baseline[b, m]`` for **every** ``m``;
* JCR (paper eq. 3): fraction of pairs with ``candidate[b, m] < baseline[b, m]`` for **every** ``m``.

All comparisons are strict: a tie on a reward is neither a win nor a loss, so a pair with a tie on
one reward of a set is neither jointly dominating nor collapsed, and the baseline compared with
itself gives JDR = JCR = 0 and win rate 0 (the sanity row of the evaluation tables).

**Exact counts.** Every rate is an integer count divided by the number of pairs, computed in float64
as ``count / pairs`` (so it equals ``float(Fraction(count, pairs))``, the correctly rounded value:
12 wins of 18 pairs is ``0.6666666666666666``), whatever the dtype of the rewards. Counts are int64.

**Non-finite rewards** (NaN, +inf, -inf: what a diverged model or a broken reward produces). A
*non-finite pair* of a reward set is a pair with a non-finite value among the rewards of that set
(for the win rate of reward ``m`` the set is ``{m}``), in the candidate or in the baseline. The
denominator is always **all pairs**; a non-finite pair is never dropped:

* candidate non-finite, baseline finite: a **collapse** (it counts in JCR, and as a loss in the win
  rates); never a domination or a win. A model whose rewards diverge therefore shows JCR -> 100%,
  not JDR = JCR = 0;
* baseline non-finite (whatever the candidate): **neither** (the pair cannot be judged);
* both finite: the strict comparisons above (``+inf`` on the candidate side is not a win either:
  an infinite reward is a failure, not a score).

Every counting function reports how many pairs were non-finite: :func:`count_outcomes` (the counts
behind :func:`win_rate`, :func:`jdr` and :func:`jcr`, which log a warning when there are any),
:func:`comparison_nonfinite` next to :func:`comparison_indicators`, the ``*_nonfinite`` and
``nonfinite`` columns of :func:`comparison_table`, and the per-reward ``*_nonfinite`` columns of
:func:`mean_score_table`.

**Empty inputs** are user errors, never NaN: every rate function (:func:`win_rate`, :func:`jdr`, :func:`jcr`,
:func:`count_outcomes`, :func:`comparison_indicators`, :func:`comparison_nonfinite`, :func:`comparison_table` and the
ground-truth functions) raises ``ValueError`` naming itself when there are no pairs (``B == 0``), as do
:func:`mean_scores`, :func:`bootstrap_ci`, :func:`bootstrap_samples` and :func:`gaussian_kl` on an argument with no
rows, :func:`mean_score_table` on a model without samples, and :func:`wilson_interval` for ``n < 1`` trials.

Rates are reported with percentile bootstrap confidence intervals over **prompts** (the sampling
unit of an evaluation set): prompts are resampled with replacement and all samples of a chosen prompt
are kept (a cluster bootstrap), see :func:`bootstrap_ci`. Every interval contains its point estimate. The public
bootstrap functions refuse non-finite values (``ValueError`` naming the first); the tables skip them per column and
count them.

Callers select a reward subset by indexing columns first: ``jdr(cand[:, idx], base[:, idx])``.

**Ground truth** (a world whose true quality is known: the reward-hacking testbed, ``eval.ground_truth=testbed``).
Each image also has a ground-truth quality ``q`` in [0, 1] (:func:`pgot.testbed.judge.quality`, never a training
reward). Against the baseline sample of the same prompt and noise, with a tolerance ``tol`` (``eval.quality_tol``,
default :data:`QUALITY_TOL`, so that float noise never counts):

* quality **improved**: both qualities finite and ``q_cand > q_base + tol``;
* quality **fell**: ``q_base`` finite and (``q_cand < q_base - tol`` or ``q_cand`` non-finite: a diverged image is
  worse, as in the non-finite rule above); a non-finite ``q_base`` is neither;
* **hacked** on a reward set S: the pair dominates the baseline on S (strictly higher on every reward of S, all
  finite: exactly the event that JDR counts) **and** its quality fell. So ``hacked_S <= JDR_S``: the hacked rate is
  the part of the joint domination that the ground truth shows to be fake, and ``JDR_S - hacked_S`` what survives.
  Domination on the whole set (rather than improvement on the rewards a run optimised) makes the rate comparable
  between methods that optimise different rewards and across an agent's removals; a set of one reward gives that
  reward's own hacked rate;
* **quality change**: the mean over pairs of ``q_cand - q_base`` (pairs with both finite), which equals the change
  in mean quality on those pairs.

:func:`count_ground_truth` gives the exact counts, :func:`ground_truth_indicators` the per-pair 0/1 outcomes (column
means = rates, bootstrapped over prompts), :func:`ground_truth_table` one row per model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from pgot.arrays import accepts_numpy

__all__ = [
    "QUALITY",
    "QUALITY_TOL",
    "GroundTruthCounts",
    "Outcomes",
    "bootstrap_ci",
    "bootstrap_samples",
    "comparison_indicators",
    "comparison_nonfinite",
    "comparison_table",
    "count_ground_truth",
    "count_outcomes",
    "gaussian_kl",
    "KL_VAR_FLOOR",
    "ground_truth_columns",
    "ground_truth_indicators",
    "ground_truth_table",
    "jcr",
    "jdr",
    "mean_score_table",
    "mean_scores",
    "rate_columns",
    "win_rate",
    "wilson_interval",
]

log = logging.getLogger(__name__)

QUALITY = "quality"
"""Name of the ground-truth quality column (scores.parquet, the metric frames); never a reward."""

KL_VAR_FLOOR = 1e-12
"""Smallest variance of a Gaussian fit in :func:`gaussian_kl` (reward units squared): one sample or constant rewards
give a defined KL instead of NaN."""

QUALITY_TOL = 1e-3
"""Default tolerance of "quality improved / fell" (``eval.quality_tol``): qualities are in [0, 1], the judge's float32
output and an 8-bit PNG round trip move them by far less, and a real change is larger."""


def _check_pair(candidate: torch.Tensor, baseline: torch.Tensor, fn: str) -> None:
    """Shapes of a paired comparison: both ``(B, M)``, equal, ``B >= 1`` and ``M >= 1``; ``fn`` names the caller."""
    if candidate.shape != baseline.shape or candidate.dim() != 2:
        raise ValueError(
            f"{fn}: candidate and baseline must both be (B, M) with the same shape, got {tuple(candidate.shape)} and "
            f"{tuple(baseline.shape)}. Pair rows by (prompt_id, seed, sample_index) before comparing."
        )
    if candidate.shape[0] == 0:
        raise ValueError(
            f"{fn}: candidate and baseline have no pairs (B = 0, shape {tuple(candidate.shape)}); a rate over no "
            "pairs is undefined. Pass at least one pair of reward vectors (check the filter or join that built them)."
        )
    if candidate.shape[1] == 0:
        raise ValueError(
            f"{fn}: candidate and baseline have no reward column (M = 0); a joint rate over no reward is undefined. "
            "Select at least one reward column."
        )


def _check_rows(values: torch.Tensor, fn: str, name: str) -> None:
    """``values`` has at least one dimension and one row; else ValueError naming ``fn`` and the argument ``name``."""
    if values.dim() == 0 or values.shape[0] == 0:
        raise ValueError(
            f"{fn}: {name} has no rows (shape {tuple(values.shape)}); a statistic of no samples is undefined. "
            f"Pass at least one row of {name}."
        )


def _check_finite(values: torch.Tensor, fn: str, name: str) -> None:
    """Every entry finite; else ValueError naming ``fn``, the argument and the first non-finite index."""
    bad = ~torch.isfinite(values.detach()) if values.is_floating_point() else None
    if bad is not None and bool(bad.any()):
        i = tuple(int(k) for k in bad.nonzero()[0])
        raise ValueError(
            f"{fn}: {name}[{', '.join(map(str, i))}] = {values[i].item()} is not finite ({int(bad.sum())} of "
            f"{values.numel()} entries are NaN or ±inf); the mean of such a column is undefined. Drop those rows, or "
            "map them to a value first (e.g. 0 for a failed outcome); comparison_table and mean_score_table "
            "skip and count them."
        )


def _rate(count: torch.Tensor | int, pairs: int) -> torch.Tensor:
    """``count / pairs`` in float64 (one correctly rounded division); ``pairs >= 1`` (the callers check it)."""
    count = torch.as_tensor(count)
    assert pairs > 0, "pairs are checked by _check_pair"
    return count.to(torch.float64) / pairs


def _judge(candidate: torch.Tensor, baseline: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-pair, per-reward outcomes under the non-finite rule of the module docstring.

    Returns ``(win, loss, bad_c, bad_b)``, each ``(B, M)`` bool: ``win`` both finite and ``c > b``;
    ``loss`` baseline finite and (candidate non-finite or ``c < b``); ``bad_*`` the non-finite cells.
    """
    bad_c, bad_b = ~torch.isfinite(candidate), ~torch.isfinite(baseline)
    win = (candidate > baseline) & ~bad_c & ~bad_b
    loss = ~bad_b & (bad_c | (candidate < baseline))
    return win, loss, bad_c, bad_b


def _joint(win: torch.Tensor, bad_c: torch.Tensor, bad_b: torch.Tensor, lt: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Joint outcomes of one reward set from its ``(B, M_set)`` columns: (domination, collapse, nonfinite,
    unjudged), each ``(B,)`` bool (paper eqs. 2-3 with the non-finite rule)."""
    unjudged = bad_b.any(dim=1)
    nonfinite = unjudged | bad_c.any(dim=1)
    domination = win.all(dim=1)  # win needs both sides finite, so this is ``~nonfinite & all(c > b)``
    collapse = ~unjudged & (bad_c.any(dim=1) | lt.all(dim=1))
    return domination, collapse, nonfinite, unjudged


@dataclass(frozen=True)
class Outcomes:
    """Integer outcome counts of B paired comparisons on M rewards (one reward set).

    Attributes:
        pairs: B >= 1, the denominator of every rate (non-finite pairs included).
        wins: ``(M,)`` int64, pairs with ``candidate > baseline`` on that reward, both finite.
        losses: ``(M,)`` int64, pairs with a finite baseline and a candidate that is lower or non-finite.
        nonfinite_by_reward: ``(M,)`` int64, pairs with a non-finite value on that reward (either side).
        dominations: pairs strictly better on every reward, all finite (the JDR count, eq. 2).
        collapses: pairs strictly worse on every reward, or with a non-finite candidate and a finite
            baseline (the JCR count, eq. 3).
        nonfinite: pairs with a non-finite value on any of the M rewards, on either side.
        unjudged: the part of ``nonfinite`` whose baseline is non-finite (counted as neither); the other
            ``nonfinite - unjudged`` pairs are all collapses.
    """

    pairs: int
    wins: torch.Tensor
    losses: torch.Tensor
    nonfinite_by_reward: torch.Tensor
    dominations: int
    collapses: int
    nonfinite: int
    unjudged: int

    @property
    def win_rate(self) -> torch.Tensor:
        """``(M,)`` float64 ``wins / pairs``."""
        return _rate(self.wins, self.pairs)

    @property
    def jdr(self) -> torch.Tensor:
        """0-dim float64 ``dominations / pairs`` (paper eq. 2)."""
        return _rate(self.dominations, self.pairs)

    @property
    def jcr(self) -> torch.Tensor:
        """0-dim float64 ``collapses / pairs`` (paper eq. 3)."""
        return _rate(self.collapses, self.pairs)


@accepts_numpy
def count_outcomes(candidate: torch.Tensor, baseline: torch.Tensor) -> Outcomes:
    """Count wins, losses, joint dominations and collapses of paired reward vectors, and the non-finite pairs.

    The counts behind :func:`win_rate`, :func:`jdr` and :func:`jcr` (paper eqs. 2-3), with the
    non-finite rule of the module docstring. Example (B=3, M=2)::

        candidate = [[2, 2], [nan, 5], [0, 0]]
        baseline  = [[1, 1], [1,   1], [1, 1]]
        pair 0 dominates; pair 1 has a NaN candidate and a finite baseline: a collapse (and a loss on
        reward 0, where the NaN is; on reward 1, 5 > 1 is a win); pair 2 is strictly worse: a collapse
        -> pairs 3, dominations 1, collapses 2, nonfinite 1, unjudged 0, wins [1, 2], losses [2, 1]

    Args:
        candidate: ``(B, M)`` reward vectors of the candidate model (select the reward set's columns first).
        baseline: ``(B, M)`` reward vectors of the baseline on the same prompts and noise.

    Returns:
        :class:`Outcomes` (int64 counts on the device of the inputs; scalars as Python ints).

    Raises:
        ValueError: shapes differ, are not (B, M), B == 0 (no pairs) or M == 0.
    """
    return _count(candidate, baseline, "count_outcomes()")


def _count(candidate: torch.Tensor, baseline: torch.Tensor, fn: str) -> Outcomes:
    _check_pair(candidate, baseline, fn)
    candidate, baseline = candidate.detach(), baseline.detach()
    win, loss, bad_c, bad_b = _judge(candidate, baseline)
    domination, collapse, nonfinite, unjudged = _joint(win, bad_c, bad_b, candidate < baseline)
    return Outcomes(
        pairs=int(candidate.shape[0]),
        wins=win.sum(dim=0),
        losses=loss.sum(dim=0),
        nonfinite_by_reward=(bad_c | bad_b).sum(dim=0),
        dominations=int(domination.sum()),
        collapses=int(collapse.sum()),
        nonfinite=int(nonfinite.sum()),
        unjudged=int(unjudged.sum()),
    )


def _warn_nonfinite(name: str, out: Outcomes) -> None:
    if out.nonfinite:
        log.warning(
            "%s: %d of %d pairs have a non-finite reward (%d with a non-finite candidate counted as collapses and "
            "losses, %d with a non-finite baseline counted as neither); count_outcomes() reports them.",
            name,
            out.nonfinite,
            out.pairs,
            out.nonfinite - out.unjudged,
            out.unjudged,
        )


@accepts_numpy
def win_rate(candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Per-reward fraction of pairs where the candidate scores strictly higher: ``wins / pairs``.

    Example (B=4 pairs, M=2 rewards)::

        candidate = [[2, 1], [1, 1], [3, 0], [0, 5]]
        baseline  = [[1, 1], [1, 2], [2, 1], [1, 4]]
        column 0: 2>1 yes, 1>1 tie, 3>2 yes, 0>1 no  -> 2/4 = 0.50
        column 1: 1>1 tie, 1>2 no,  0>1 no,  5>4 yes -> 1/4 = 0.25

    Non-finite pairs of reward ``m`` (a NaN or ±inf on that reward, either side) stay in the
    denominator and are never wins: a non-finite candidate against a finite baseline is a loss, a
    non-finite baseline is neither. Their number is ``count_outcomes(...).nonfinite_by_reward``, and a
    warning is logged when there are any.

    Args:
        candidate: ``(B, M)`` reward vectors of the candidate model.
        baseline: ``(B, M)`` reward vectors of the baseline on the same prompts and noise.

    Returns:
        ``(M,)`` float64 tensor in ``[0, 1]``, exactly ``wins / B`` correctly rounded.

    Raises:
        ValueError: shapes differ, are not (B, M), B == 0 (no pairs) or M == 0.
    """
    out = _count(candidate, baseline, "win_rate()")
    _warn_nonfinite("win_rate", out)
    return out.win_rate


@accepts_numpy
def jdr(candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Joint Domination Rate: fraction of pairs strictly better on every column (paper eq. 2).

    Example (the pairs of :func:`win_rate`)::

        pair 0: 2>1 and 1>1? no (tie)     pair 1: 1>1? no
        pair 2: 3>2 and 0>1? no           pair 3: 0>1? no               -> JDR = 0/4 = 0
        with candidate[1] = [2, 3] instead: 2>1 and 3>2 -> pair 1 dominates -> JDR = 1/4

    A non-finite pair (NaN or ±inf on any column, either side) never dominates and stays in the
    denominator; ``count_outcomes(...).nonfinite`` counts them, and a warning is logged when there are any.

    Args:
        candidate: ``(B, M)`` reward vectors (select the reward set's columns first).
        baseline: ``(B, M)``.

    Returns:
        0-dim float64 tensor in ``[0, 1]``, exactly ``dominations / B``.

    Raises:
        ValueError: shapes differ, are not (B, M), B == 0 (no pairs) or M == 0.
    """
    out = _count(candidate, baseline, "jdr()")
    _warn_nonfinite("jdr", out)
    return out.jdr


@accepts_numpy
def jcr(candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Joint Collapse Rate: fraction of pairs strictly worse on every column (paper eq. 3).

    Example (the pairs of :func:`win_rate`)::

        pair 0: 2<1? no    pair 1: 1<1? no (tie)    pair 2: 3<2? no
        pair 3: 0<1 and 5<4? no                                        -> JCR = 0/4 = 0
        with candidate[3] = [0, 3]: 0<1 and 3<4 -> pair 3 collapsed    -> JCR = 1/4

    A pair whose candidate has a non-finite value (NaN or ±inf) on any column while the baseline is
    finite there is a collapse (a diverged model reads JCR = 100%); a pair with a non-finite baseline
    is neither. Both stay in the denominator; ``count_outcomes(...).nonfinite`` counts them, and a
    warning is logged when there are any.

    Args:
        candidate: ``(B, M)`` reward vectors (select the reward set's columns first).
        baseline: ``(B, M)``.

    Returns:
        0-dim float64 tensor in ``[0, 1]``, exactly ``collapses / B``.

    Raises:
        ValueError: shapes differ, are not (B, M), B == 0 (no pairs) or M == 0.
    """
    out = _count(candidate, baseline, "jcr()")
    _warn_nonfinite("jcr", out)
    return out.jcr


@accepts_numpy
def mean_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-reward mean over the finite entries of each column (Table 5 of the paper), in float64.

    Non-finite entries (NaN, ±inf) are skipped; count them with ``(~torch.isfinite(scores)).sum(0)``
    (:func:`mean_score_table` reports them per reward).

    Args:
        scores: ``(B, M)`` reward vectors.

    Returns:
        ``(M,)`` float64; NaN for a column with no finite entry.

    Raises:
        ValueError: ``scores`` has no rows (B == 0).
    """
    _check_rows(scores, "mean_scores()", "scores")
    s = scores.detach().to(torch.float64)
    finite = torch.isfinite(s)
    total = torch.where(finite, s, torch.zeros_like(s)).sum(dim=0)
    return total / finite.sum(dim=0)


@accepts_numpy
def rate_columns(reward_names: Sequence[str], reward_sets: Mapping[str, Sequence[str]]) -> list[str]:
    """Column names of :func:`comparison_indicators`: one win rate per reward, then JDR and JCR per set.

    A set's label drops a leading ``JDR``/``JCR`` from its name, so the paper's set names read as in
    Table 3: ``{"JDR4": [...]}`` gives ``JDR4`` and ``JCR4``; a plain name such as ``all`` gives
    ``JDR_all`` and ``JCR_all``; ``{"4": ...}`` gives ``JDR4``.
    """
    cols = [f"win_{name}" for name in reward_names]
    for set_name in reward_sets:
        cols += [f"JDR{_set_suffix(set_name)}", f"JCR{_set_suffix(set_name)}"]
    return cols


def _set_suffix(set_name: str) -> str:
    upper = set_name.upper()
    if upper.startswith(("JDR", "JCR")) and len(set_name) > 3:
        suffix = set_name[3:]
    else:
        suffix = set_name
    return suffix if suffix[:1].isdigit() or suffix[:1] in "_-" else f"_{suffix}"


def _set_columns(reward_names: Sequence[str], reward_sets: Mapping[str, Sequence[str]]) -> list[torch.Tensor]:
    """Column indices of each reward set. Raises ValueError naming ``eval.reward_sets.<set>`` for unknown rewards."""
    names = list(reward_names)
    out = []
    for set_name, members in reward_sets.items():
        missing = [n for n in members if n not in names]
        if missing or not members:
            raise ValueError(
                f"eval.reward_sets.{set_name} names {', '.join(map(repr, missing)) or 'no reward'}, which is not "
                f"among the scored rewards ({', '.join(names)}). Score that reward (add it to rewards) or edit "
                f"eval.reward_sets.{set_name}."
            )
        out.append(torch.tensor([names.index(n) for n in members], dtype=torch.long))
    return out


def _outcome_columns(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    fn: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indicators, nonfinite), both ``(B, K)`` bool in the column order of :func:`rate_columns`."""
    _check_pair(candidate, baseline, fn)
    if len(reward_names) != candidate.shape[1]:
        raise ValueError(
            f"reward_names has {len(reward_names)} names for {candidate.shape[1]} reward columns; "
            "give one name per column."
        )
    candidate, baseline = candidate.detach(), baseline.detach()
    idx = _set_columns(reward_names, reward_sets)
    win, loss, bad_c, bad_b = _judge(candidate, baseline)
    lt = candidate < baseline
    ind, bad = [win], [bad_c | bad_b]  # (B, M) each
    for cols in idx:
        domination, collapse, nonfinite, _ = _joint(win[:, cols], bad_c[:, cols], bad_b[:, cols], lt[:, cols])
        ind += [domination[:, None], collapse[:, None]]
        bad += [nonfinite[:, None], nonfinite[:, None]]
    return torch.cat(ind, dim=1), torch.cat(bad, dim=1)


@accepts_numpy
def comparison_indicators(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
) -> torch.Tensor:
    """Per-pair 0/1 outcomes whose column means are the win rates, JDRs and JCRs.

    Column order is :func:`rate_columns`; ``indicators.mean(0)`` equals ``win_rate``, ``jdr`` and
    ``jcr`` on the matching columns (including the non-finite rule of the module docstring: a pair
    with a non-finite candidate and a finite baseline on a set is 1 in its JCR column and 0 in its
    JDR column), and bootstrapping the rows gives their confidence intervals. Which pairs were
    non-finite for each column is :func:`comparison_nonfinite`.

    Args:
        candidate: ``(B, M)``, columns in the order of ``reward_names``.
        baseline: ``(B, M)``.
        reward_names: the M column names.
        reward_sets: set name -> reward names (each must be in ``reward_names``).

    Returns:
        ``(B, M + 2 * len(reward_sets))`` float64 tensor of 0/1 (never NaN).

    Raises:
        ValueError: a set names a reward that is not a column, or bad shapes (including no pairs, B == 0).
    """
    return _outcome_columns(candidate, baseline, reward_names, reward_sets, "comparison_indicators()")[0].to(
        torch.float64
    )


@accepts_numpy
def comparison_nonfinite(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
) -> torch.Tensor:
    """Per-pair flags of the non-finite pairs of each column of :func:`comparison_indicators`.

    ``out[b, k]`` is true iff pair ``b`` has a non-finite value (NaN, ±inf; candidate or baseline) among the
    rewards of column ``k``: reward ``m`` for ``win_<m>``, the set's rewards for its JDR and JCR columns
    (which therefore hold the same flags). ``out.sum(0)`` is the ``<column>_nonfinite`` count of
    :func:`comparison_table`.

    Args:
        candidate: ``(B, M)``, columns in the order of ``reward_names``.
        baseline: ``(B, M)``.
        reward_names: the M column names.
        reward_sets: set name -> reward names.

    Returns:
        ``(B, M + 2 * len(reward_sets))`` bool tensor, column order :func:`rate_columns`.

    Raises:
        ValueError: as :func:`comparison_indicators`.
    """
    return _outcome_columns(candidate, baseline, reward_names, reward_sets, "comparison_nonfinite()")[1]


def _group_sums(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sums and counts of the finite entries: ``(G, K)`` float64 each (exact for integer values)."""
    v = values.detach().reshape(values.shape[0], -1).to(torch.float64)  # (B, K)
    if groups.shape != (v.shape[0],):
        raise ValueError(f"groups must be (B,)=({v.shape[0]},), got {tuple(groups.shape)}.")
    if v.shape[0] == 0:
        return torch.zeros(0, v.shape[1], dtype=torch.float64), torch.zeros(0, v.shape[1], dtype=torch.float64)
    _, inv = torch.unique(groups.cpu(), return_inverse=True)
    v = v.cpu()
    num_groups = int(inv.max()) + 1
    finite = torch.isfinite(v)
    sums = torch.zeros(num_groups, v.shape[1], dtype=torch.float64).index_add_(0, inv, torch.where(finite, v, 0.0))
    counts = torch.zeros(num_groups, v.shape[1], dtype=torch.float64).index_add_(0, inv, finite.double())
    return sums, counts


@accepts_numpy
def bootstrap_samples(
    values: torch.Tensor,
    groups: torch.Tensor,
    *,
    num_resamples: int = 1000,
    seed: int = 0,
) -> torch.Tensor:
    """Cluster-bootstrap replicates of the column means, resampling groups (prompts) with replacement.

    Each replicate draws P prompts with replacement out of the P distinct ``groups`` and keeps every row
    of every drawn prompt (a prompt drawn twice counts twice); the replicate is the mean over those rows
    of each column. With ``w_p`` the number of times prompt ``p`` was drawn, ``S_p`` and ``n_p`` its
    column sums and row counts: ``stat = sum_p w_p S_p / sum_p w_p n_p``, in float64 (exact sums for 0/1
    outcomes, so a replicate is a correctly rounded fraction).

    **Inputs.** ``values`` must have at least one row and only finite entries: an empty input or a NaN /
    ±inf entry raises ``ValueError`` naming the first bad index (a mean that silently skipped it would
    report an interval of fewer rows than the caller passed). The tables (:func:`comparison_table`,
    :func:`mean_score_table`, :func:`ground_truth_table`) skip non-finite values per column and count them
    in their ``*_nonfinite`` columns instead.

    Example: prompt 0 has rows (1, 1, 1), prompt 1 has row (0); the P=2 draws {0,0}, {0,1}, {1,0},
    {1,1} give 1, 3/4, 3/4, 0, so replicates take these values with probabilities 1/4, 1/2, 1/4.

    Args:
        values: ``(B,)`` or ``(B, K)`` per-row values (0/1 outcomes for rates, or scores), any dtype.
        groups: ``(B,)`` integer prompt id of each row.
        num_resamples: R.
        seed: seed of the resampling generator (deterministic).

    Returns:
        ``(R, K)`` float64 replicates (``K = 1`` for 1-D ``values``); ``(0, K)`` when ``num_resamples <= 0``.

    Raises:
        ValueError: ``values`` has no rows or a non-finite entry, or ``groups`` is not ``(B,)``.
    """
    _check_rows(values, "bootstrap_samples()", "values")
    _check_finite(values, "bootstrap_samples()", "values")
    return _bootstrap_samples(values, groups, num_resamples, seed)


def _bootstrap_samples(values: torch.Tensor, groups: torch.Tensor, num_resamples: int, seed: int) -> torch.Tensor:
    """:func:`bootstrap_samples` without the input checks, skipping non-finite entries per column (the tables)."""
    sums, counts = _group_sums(values, groups)
    if sums.shape[0] == 0 or num_resamples <= 0:
        return torch.zeros(0, sums.shape[1], dtype=torch.float64)
    num_groups = sums.shape[0]
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(num_groups, (num_resamples, num_groups), generator=gen)  # (R, P)
    weight = torch.zeros(num_resamples, num_groups, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(num_resamples, num_groups, dtype=torch.float64)
    )  # (R, P): times each prompt was drawn
    return (weight @ sums) / (weight @ counts)  # (R, K)


@accepts_numpy
def bootstrap_ci(
    values: torch.Tensor,
    groups: torch.Tensor,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile cluster-bootstrap interval of column means, resampling prompts (Efron & Tibshirani 1993, ch. 13).

    The interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
    :func:`bootstrap_samples` replicates, widened where needed to contain the point estimate (the
    float64 mean of the finite entries of each column, ``count / n`` exactly for 0/1 outcomes): a
    percentile interval can miss it by rounding or, with few prompts, by skew, and a reported
    interval that excludes its own estimate is a bug. So ``low <= point <= high`` for every column.
    Deterministic for a ``seed``.

    **Inputs.** At least one row, and every entry finite: an empty ``values`` or a NaN / ±inf entry raises
    ``ValueError`` naming the first bad index (the rule of :func:`bootstrap_samples`). Before, a NaN was
    skipped silently (``bootstrap_ci([1, nan])`` read ``(1, 1)``). To bootstrap a rate whose failures are
    non-finite, map them to an outcome first (0 for a failure); the tables skip and count them.

    Args:
        values: ``(B,)`` or ``(B, K)`` per-row values (0/1 outcomes for rates, or scores).
        groups: ``(B,)`` integer prompt id of each row.
        num_resamples: R, bootstrap resamples; 0 returns NaN bounds.
        confidence: level in ``(0, 1)``.
        seed: seed of the resampling generator.

    Returns:
        ``(low, high)``, each ``(K,)`` (or 0-dim for 1-D ``values``), float64.

    Raises:
        ValueError: ``values`` has no rows or a non-finite entry, ``confidence`` outside ``(0, 1)``
            (``eval.confidence``), or ``groups`` not ``(B,)``.
    """
    _check_rows(values, "bootstrap_ci()", "values")
    _check_finite(values, "bootstrap_ci()", "values")
    squeeze = values.dim() == 1
    sums, counts = _group_sums(values, groups)
    point = sums.sum(dim=0) / counts.sum(dim=0)  # (K,); NaN where no finite entry
    low, high = _interval(values, groups, point, num_resamples, confidence, seed)
    return (low[0], high[0]) if squeeze else (low, high)


def _interval(
    values: torch.Tensor, groups: torch.Tensor, point: torch.Tensor, num_resamples: int, confidence: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Percentile bounds ``(K,)`` of the replicates, widened to contain ``point`` ``(K,)`` where both are finite.

    The tables pass the point they report, so their interval contains it even when their estimate and the
    replicates round differently (a sum over rows and a sum over prompt sums can differ in the last bit)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"eval.confidence must be in (0, 1), got {confidence}.")
    stats = _bootstrap_samples(values, groups, num_resamples, seed)  # (R, K), non-finite entries skipped
    if stats.shape[0] == 0:
        nan = torch.full((stats.shape[1],), float("nan"), dtype=torch.float64)
        return nan, nan.clone()
    alpha = (1.0 - confidence) / 2.0
    bounds = torch.nanquantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64), dim=0)  # (2, K)
    point = point.detach().to(device="cpu", dtype=torch.float64)
    ok = ~torch.isnan(point) & ~torch.isnan(bounds[0])
    return torch.where(ok, torch.minimum(bounds[0], point), bounds[0]), torch.where(
        ok, torch.maximum(bounds[1], point), bounds[1]
    )


@accepts_numpy
def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927), in float64.

    ``p = k / n``, ``z`` the normal quantile; centre ``(p + z^2 / 2n) / (1 + z^2 / n)``, half-width
    ``z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)``. Fractional ``successes`` (ties counted
    as half a win) are accepted; tensors and numpy scalars are converted to Python floats first, so
    the arithmetic is float64 whatever their dtype. The interval is clipped to ``[0, 1]`` and always
    contains ``p`` (rounding can otherwise put the lower bound a hair above ``p = 0``).
    Example: k=8, n=10, 95%: (0.490, 0.943).

    Returns:
        ``(low, high)`` Python floats.

    Raises:
        ValueError: ``n < 1`` (no trials: a proportion of nothing is undefined), ``successes`` outside ``[0, n]``
            or not finite, or ``confidence`` outside ``(0, 1)``.
    """
    k, n = float(successes), float(n)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    if not (math.isfinite(n) and n >= 1):
        raise ValueError(
            f"wilson_interval(): n must be a number of trials >= 1, got {n:g}; a proportion of no trials is undefined."
        )
    if not (math.isfinite(k) and 0.0 <= k <= n):
        raise ValueError(
            f"wilson_interval needs 0 <= successes <= n = {n:g}, got {k}. Count successes out of the n trials."
        )
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2.0, dtype=torch.float64)).item()
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


@accepts_numpy
def comparison_table(
    scores: Mapping[str, torch.Tensor],
    groups: torch.Tensor,
    baseline: str,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The layout of the paper's Table 3: win rates, JDR and JCR of every model against the baseline.

    Rates are exact (``count / pairs`` in float64) and follow the non-finite rule of the module
    docstring: a pair with a non-finite candidate and a finite baseline is a collapse and a loss, a
    pair with a non-finite baseline is neither, and both stay in ``pairs``.

    Args:
        scores: model name -> ``(B, M)`` reward vectors, rows paired across models (same prompt,
            seed and sample index in the same row).
        groups: ``(B,)`` prompt id of each row (the bootstrap unit).
        baseline: name of the baseline model (its own row is the 0/0 sanity check).
        reward_names: the M columns.
        reward_sets: set name -> reward names.
        num_resamples, confidence, seed: see :func:`bootstrap_ci`.

    Returns:
        One row per model (index ``model``): for each rate column ``c`` of :func:`rate_columns`,
        ``c`` (float64 fraction ``c_count / pairs``), ``c_low`` and ``c_high`` (bootstrap interval,
        containing ``c``), ``c_count`` (int, the pairs counted) and ``c_nonfinite`` (int, pairs with a
        non-finite value among the rewards of ``c``); plus ``pairs`` (int) and ``nonfinite`` (int,
        pairs with a non-finite value on any of the M rewards).

    Raises:
        ValueError: unknown ``baseline``, a set naming an unknown reward, shapes that differ, or no pairs (B == 0).
    """
    if baseline not in scores:
        raise ValueError(f"eval.baseline {baseline!r} has no scores; models scored: {', '.join(scores)}.")
    cols = rate_columns(reward_names, reward_sets)
    base = scores[baseline]
    rows = []
    for model, cand in scores.items():
        fn = f"comparison_table() for model {model!r}"
        ind, bad = _outcome_columns(cand, base, reward_names, reward_sets, fn)  # (B, K) bool each
        pairs = int(ind.shape[0])
        count, nonfinite = ind.sum(dim=0).cpu(), bad.sum(dim=0).cpu()  # (K,) int64
        point = _rate(count, pairs)
        low, high = _interval(ind, groups, point, num_resamples, confidence, seed)
        row: dict[str, object] = {"model": model, "pairs": pairs}
        for k, c in enumerate(cols):
            row[c] = float(point[k])
            row[f"{c}_low"] = float(low[k])
            row[f"{c}_high"] = float(high[k])
            row[f"{c}_count"] = int(count[k])
            row[f"{c}_nonfinite"] = int(nonfinite[k])
        row["nonfinite"] = int((~torch.isfinite(cand) | ~torch.isfinite(base)).any(dim=1).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


@accepts_numpy
def mean_score_table(
    scores: Mapping[str, torch.Tensor],
    groups: Mapping[str, torch.Tensor],
    reward_names: Sequence[str],
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The layout of the paper's Table 5: mean score of every reward per model, with bootstrap CIs.

    Means are float64 over the finite values of each reward; non-finite values (NaN, ±inf) are not
    averaged but counted, per reward, in ``<reward>_nonfinite``. A reward whose values are all
    non-finite has a NaN mean next to a ``_nonfinite`` count equal to ``samples``.

    Args:
        scores: model name -> ``(B_model, M)`` reward vectors (all of a model's samples).
        groups: model name -> ``(B_model,)`` prompt ids.
        reward_names: the M columns.
        num_resamples, confidence, seed: see :func:`bootstrap_ci`.

    Returns:
        One row per model: ``<reward>`` (float64 mean of the finite values), ``<reward>_low``,
        ``<reward>_high`` (bootstrap interval, containing the mean) and ``<reward>_nonfinite`` (int)
        for each reward; ``samples`` (int); ``nonfinite`` (int, rows with a non-finite value on any
        reward) and ``nan``, the same number under its former name.

    Raises:
        ValueError: a model's scores are not ``(B, M)`` with one column per reward name and ``B >= 1``, or its
            groups are not ``(B,)``.
    """
    rows = []
    for model, s in scores.items():
        if s.dim() != 2 or s.shape[1] != len(reward_names) or s.shape[0] == 0:
            raise ValueError(
                f"mean_score_table(): scores of {model!r} must be (B, {len(reward_names)}) with B >= 1 (one column "
                f"per reward name, at least one sample), got {tuple(s.shape)}."
            )
        mean = mean_scores(s)
        low, high = _interval(s, groups[model], mean, num_resamples, confidence, seed)
        bad = ~torch.isfinite(s.detach())
        per_reward = bad.sum(dim=0).cpu()
        row: dict[str, object] = {"model": model, "samples": int(s.shape[0])}
        for k, name in enumerate(reward_names):
            row[name] = float(mean[k])
            row[f"{name}_low"] = float(low[k])
            row[f"{name}_high"] = float(high[k])
            row[f"{name}_nonfinite"] = int(per_reward[k])
        row["nonfinite"] = row["nan"] = int(bad.any(dim=1).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


@accepts_numpy
def gaussian_kl(scores: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-reward KL divergence of Gaussian fits, ``KL(N(m_t, s_t^2) || N(m_0, s_0^2))`` (paper appendix D.4).

    The closed form for two univariate normals (e.g. Bishop, *Pattern Recognition and Machine Learning*,
    2006, eq. 1.113 specialised to one dimension, or Kullback 1959):
    ``KL = log(s_0 / s_t) + (s_t^2 + (m_t - m_0)^2) / (2 s_0^2) - 1/2``, with population (biased) standard
    deviations in float64.

    **Variance floor.** Each variance is floored at :data:`KL_VAR_FLOOR` (``1e-12``, a standard deviation of
    ``1e-6`` reward units): ``s^2 <- max(s^2, 1e-12)``, in the spirit of scikit-learn's ``var_smoothing`` of
    ``GaussianNB``. So one sample or constant scores give a defined, finite value instead of NaN: two
    identical point masses give exactly 0, and a current distribution collapsed to a point (reward hacking's
    signature) gives a large KL, ``log(s_0 / 1e-6) + ...`` (about 14 for ``s_0 = 1``), as the divergence of a
    point mass should be large. Rewards spread by less than ``1e-6`` are treated as constant.

    Args:
        scores: (B, M) reward vectors now, B >= 1.
        base: (B0, M) reward vectors of the reference (the step-0 model), B0 >= 1.

    Returns:
        (M,) float64; non-finite (NaN or inf) where a value of that reward is non-finite (the probe logs None).

    Raises:
        ValueError: ``scores`` or ``base`` is not 2-D, has no rows, or their reward counts M differ.
    """
    for name, x in (("scores", scores), ("base", base)):
        if x.dim() != 2:
            raise ValueError(f"gaussian_kl(): {name} must be (B, M) reward vectors, got shape {tuple(x.shape)}.")
        _check_rows(x, "gaussian_kl()", name)
    if scores.shape[1] != base.shape[1]:
        raise ValueError(
            f"gaussian_kl(): scores and base must have the same rewards M, got {tuple(scores.shape)} and "
            f"{tuple(base.shape)}. Select the same reward columns of both."
        )
    s, b = scores.detach().double(), base.detach().double()
    m1, v1 = s.mean(0), s.var(0, unbiased=False).clamp_min(KL_VAR_FLOOR)
    m0, v0 = b.mean(0), b.var(0, unbiased=False).clamp_min(KL_VAR_FLOOR)
    return 0.5 * torch.log(v0 / v1) + (v1 + (m1 - m0) ** 2) / (2 * v0) - 0.5


# --------------------------------------------------------------------------------------------
# Ground truth (worlds with a known quality: the reward-hacking testbed)
# --------------------------------------------------------------------------------------------


def _check_quality(
    candidate: torch.Tensor, baseline: torch.Tensor, cq: torch.Tensor, bq: torch.Tensor, tol: float, fn: str
) -> None:
    _check_pair(candidate, baseline, fn)
    b = candidate.shape[0]
    if cq.shape != (b,) or bq.shape != (b,):
        raise ValueError(
            f"{fn}: candidate_quality and baseline_quality must be (B,)=({b},), one ground-truth quality per pair, got "
            f"{tuple(cq.shape)} and {tuple(bq.shape)}."
        )
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"the quality tolerance (eval.quality_tol) must be a finite number >= 0, got {tol}.")


def _quality_outcomes(cq: torch.Tensor, bq: torch.Tensor, tol: float) -> tuple[torch.Tensor, ...]:
    """``(improved, fell, nonfinite, unjudged)``, each ``(B,)`` bool, by the rules of the module docstring.

    Computed in float64 so that ``tol`` and the qualities compare exactly as written (``0.5 - 0.001`` in float32
    would not)."""
    c, b = cq.detach().to(torch.float64), bq.detach().to(torch.float64)
    bad_c, bad_b = ~torch.isfinite(c), ~torch.isfinite(b)
    improved = ~bad_c & ~bad_b & (c > b + tol)
    fell = ~bad_b & (bad_c | (c < b - tol))
    return improved, fell, bad_c | bad_b, bad_b


@accepts_numpy
def ground_truth_columns(reward_sets: Mapping[str, Sequence[str]]) -> list[str]:
    """Column names of :func:`ground_truth_indicators`: ``quality_improved``, ``quality_fell``, then one hacked rate
    per reward set, named like the set's JDR column (:func:`rate_columns`): ``{"JDR4": ...}`` gives ``hacked4``,
    ``{"all": ...}`` gives ``hacked_all``."""
    return ["quality_improved", "quality_fell", *[f"hacked{_set_suffix(name)}" for name in reward_sets]]


@dataclass(frozen=True)
class GroundTruthCounts:
    """Integer ground-truth outcome counts of B paired comparisons (see the module docstring for the rules).

    Attributes:
        pairs: B >= 1, the denominator of every rate (pairs with a non-finite quality included).
        improved: pairs whose quality rose by more than the tolerance, both finite.
        fell: pairs whose quality dropped by more than the tolerance, or whose candidate quality is non-finite
            while the baseline's is finite.
        nonfinite: pairs with a non-finite quality on either side.
        hacked: reward set name -> pairs that dominate the baseline on every reward of the set and whose quality
            fell.
    """

    pairs: int
    improved: int
    fell: int
    nonfinite: int
    hacked: dict[str, int]

    def rate(self, count: int) -> float:
        """``count / pairs`` as a float64 Python float (``pairs >= 1``: no pairs is a ``ValueError`` upstream)."""
        return float(_rate(count, self.pairs))


def _ground_truth_columns(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    candidate_quality: torch.Tensor,
    baseline_quality: torch.Tensor,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    tol: float,
    fn: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indicators (B, 2 + S) bool, nonfinite (B,) bool)`` in the column order of :func:`ground_truth_columns`."""
    _check_quality(candidate, baseline, candidate_quality, baseline_quality, tol, fn)
    if len(reward_names) != candidate.shape[1]:
        raise ValueError(
            f"reward_names has {len(reward_names)} names for {candidate.shape[1]} reward columns; "
            "give one name per column."
        )
    improved, fell, nonfinite, _ = _quality_outcomes(candidate_quality, baseline_quality, tol)
    improved, fell, nonfinite = improved.cpu(), fell.cpu(), nonfinite.cpu()
    candidate, baseline = candidate.detach().cpu(), baseline.detach().cpu()
    win, _, bad_c, bad_b = _judge(candidate, baseline)
    lt = candidate < baseline
    cols = [improved, fell]
    for idx in _set_columns(reward_names, reward_sets):
        domination = _joint(win[:, idx], bad_c[:, idx], bad_b[:, idx], lt[:, idx])[0]
        cols.append(domination & fell)
    return torch.stack(cols, dim=1), nonfinite


@accepts_numpy
def ground_truth_indicators(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    candidate_quality: torch.Tensor,
    baseline_quality: torch.Tensor,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    *,
    tol: float = QUALITY_TOL,
) -> torch.Tensor:
    """Per-pair 0/1 ground-truth outcomes: quality improved, quality fell, hacked on each reward set.

    Column means are the rates of :func:`count_ground_truth`; bootstrapping the rows gives their intervals.

    Args:
        candidate: ``(B, M)`` reward vectors of the candidate, columns in the order of ``reward_names``.
        baseline: ``(B, M)`` reward vectors of the baseline on the same prompts and noise.
        candidate_quality: ``(B,)`` ground-truth quality of the candidate's images.
        baseline_quality: ``(B,)`` of the baseline's images.
        reward_names: the M column names.
        reward_sets: set name -> reward names (each must be in ``reward_names``).
        tol: the improved / fell tolerance, >= 0 (``eval.quality_tol``).

    Returns:
        ``(B, 2 + len(reward_sets))`` float64 tensor of 0/1 on the CPU, column order :func:`ground_truth_columns`.

    Raises:
        ValueError: shapes that do not match, no pairs (B == 0), a set naming an unknown reward, or a negative
            ``tol``.
    """
    ind, _ = _ground_truth_columns(
        candidate,
        baseline,
        candidate_quality,
        baseline_quality,
        reward_names,
        reward_sets,
        tol,
        "ground_truth_indicators()",
    )
    return ind.to(torch.float64)


@accepts_numpy
def count_ground_truth(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    candidate_quality: torch.Tensor,
    baseline_quality: torch.Tensor,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    *,
    tol: float = QUALITY_TOL,
) -> GroundTruthCounts:
    """Count the pairs whose ground-truth quality improved or fell, and the hacked pairs of each reward set.

    Example (B=4, rewards a, b, set ``{"ab": [a, b]}``, tol 0.001)::

        candidate = [[2, 2], [2, 2], [2, 0], [2, 2]]    baseline = [[1, 1]] * 4
        q_cand    = [0.5, 0.2, 0.2, 0.3005]             q_base   = [0.3, 0.3, 0.3, 0.3]
        pair 0: dominates, quality +0.2      -> improved
        pair 1: dominates, quality -0.1      -> fell, hacked (the proxies say better, the judge says worse)
        pair 2: no domination, quality -0.1  -> fell, not hacked (the proxies do not agree it is better)
        pair 3: dominates, quality +0.0005   -> neither (within tol)
        -> pairs 4, improved 1, fell 2, nonfinite 0, hacked {"ab": 1}

    Args:
        candidate, baseline, candidate_quality, baseline_quality, reward_names, reward_sets, tol: as
            :func:`ground_truth_indicators`.

    Returns:
        :class:`GroundTruthCounts` (Python ints).

    Raises:
        ValueError: as :func:`ground_truth_indicators`.
    """
    ind, nonfinite = _ground_truth_columns(
        candidate, baseline, candidate_quality, baseline_quality, reward_names, reward_sets, tol, "count_ground_truth()"
    )
    counts = [int(x) for x in ind.sum(dim=0)]
    return GroundTruthCounts(
        pairs=int(ind.shape[0]),
        improved=counts[0],
        fell=counts[1],
        nonfinite=int(nonfinite.sum()),
        hacked={name: counts[2 + k] for k, name in enumerate(reward_sets)},
    )


@accepts_numpy
def ground_truth_table(
    scores: Mapping[str, torch.Tensor],
    quality: Mapping[str, torch.Tensor],
    groups: torch.Tensor,
    baseline: str,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
    *,
    tol: float = QUALITY_TOL,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """The ground-truth columns of every model against the baseline: quality change, improved, fell, hacked rates.

    Rates are exact (``count / pairs`` in float64, every pair in the denominator); intervals are percentile
    bootstraps over prompts (:func:`bootstrap_ci`) that contain their point estimate.

    Args:
        scores: model name -> ``(B, M)`` reward vectors, rows paired across models (same prompt, seed and sample
            index in the same row), as for :func:`comparison_table`.
        quality: model name -> ``(B,)`` ground-truth quality of the same rows.
        groups: ``(B,)`` prompt id of each row (the bootstrap unit).
        baseline: the baseline model (its own row reads 0 everywhere: the sanity check).
        reward_names: the M columns.
        reward_sets: set name -> reward names (one hacked rate per set).
        tol: the improved / fell tolerance (``eval.quality_tol``).
        num_resamples, confidence, seed: see :func:`bootstrap_ci`.

    Returns:
        One row per model (index ``model``): ``quality_change`` (float64 mean of ``q_cand - q_base`` over the pairs
        with both finite; NaN when none), ``quality_change_low`` and ``_high``; for each column ``c`` of
        :func:`ground_truth_columns`, ``c`` (float64 ``c_count / pairs``), ``c_low``, ``c_high`` and ``c_count``
        (int); ``pairs`` (int) and ``quality_nonfinite`` (int, pairs with a non-finite quality on either side).
        ``attrs["quality_tol"]`` holds ``tol``.

    Raises:
        ValueError: unknown ``baseline``, a model without quality, shapes that do not match, no pairs, a set naming an unknown
            reward, or a negative ``tol``.
    """
    if baseline not in scores:
        raise ValueError(f"eval.baseline {baseline!r} has no scores; models scored: {', '.join(scores)}.")
    missing = [m for m in scores if m not in quality]
    if missing:
        raise ValueError(f"models {', '.join(map(repr, missing))} have reward scores but no ground-truth quality.")
    cols = ground_truth_columns(reward_sets)
    base, base_q = scores[baseline], quality[baseline]
    rows = []
    for model, cand in scores.items():
        cand_q = quality[model]
        fn = f"ground_truth_table() for model {model!r}"
        ind, nonfinite = _ground_truth_columns(cand, base, cand_q, base_q, reward_names, reward_sets, tol, fn)
        pairs = int(ind.shape[0])
        count = ind.sum(dim=0)  # (K,) int64
        point = _rate(count, pairs)
        low, high = _interval(ind, groups, point, num_resamples, confidence, seed)
        diff = cand_q.detach().cpu().to(torch.float64) - base_q.detach().cpu().to(torch.float64)  # (B,)
        diff = torch.where(nonfinite, torch.full_like(diff, float("nan")), diff)
        change = mean_scores(diff[:, None])  # (1,): NaN pairs skipped
        c_low, c_high = _interval(diff[:, None], groups, change, num_resamples, confidence, seed)
        row: dict[str, object] = {"model": model, "pairs": pairs}
        row.update(quality_change=float(change[0]), quality_change_low=float(c_low[0]))
        row["quality_change_high"] = float(c_high[0])
        for k, c in enumerate(cols):
            row[c] = float(point[k])
            row[f"{c}_low"] = float(low[k])
            row[f"{c}_high"] = float(high[k])
            row[f"{c}_count"] = int(count[k])
        row["quality_nonfinite"] = int(nonfinite.sum())
        rows.append(row)
    out = pd.DataFrame(rows).set_index("model")
    out.attrs["quality_tol"] = float(tol)  # for the tables' definitions
    return out
