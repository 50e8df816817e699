"""Paired comparison metrics: per-reward win rate, Joint Domination Rate, Joint Collapse Rate.

A candidate model and a baseline model generate one image each for the same prompt and the same
initial noise (``seed``, ``prompt_id``, ``sample_index``); row ``b`` of ``candidate`` and row ``b`` of
``baseline`` are the reward vectors of such a pair. Higher is better for every reward.

* win rate of reward ``m``: fraction of pairs with ``candidate[b, m] > baseline[b, m]``;
* JDR (paper eq. 2): fraction of pairs with ``candidate[b, m] > baseline[b, m]`` for **every** ``m``;
* JCR (paper eq. 3): fraction of pairs with ``candidate[b, m] < baseline[b, m]`` for **every** ``m``.

All comparisons are strict: a tie on a reward is neither a win nor a loss, so a pair with a tie on
one reward of a set is neither jointly dominating nor collapsed, and the baseline compared with
itself gives JDR = JCR = 0 and win rate 0 (the sanity row of the evaluation tables). A NaN reward
compares false both ways, so a pair with a NaN in a column counts as neither win nor loss on that
column (and as neither domination nor collapse), but it stays in the denominator: a NaN reward is
reported as a failure to improve, never silently dropped.

Rates are reported with percentile bootstrap confidence intervals over **prompts** (the sampling
unit of an evaluation set): prompts are resampled with replacement and all samples of a chosen prompt
are kept (a cluster bootstrap), see :func:`bootstrap_ci`.

Callers select a reward subset by indexing columns first: ``jdr(cand[:, idx], base[:, idx])``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

__all__ = [
    "bootstrap_ci",
    "bootstrap_samples",
    "comparison_indicators",
    "comparison_table",
    "gaussian_kl",
    "jcr",
    "jdr",
    "mean_score_table",
    "mean_scores",
    "rate_columns",
    "win_rate",
    "wilson_interval",
]

log = logging.getLogger(__name__)


def _check_pair(candidate: torch.Tensor, baseline: torch.Tensor) -> None:
    if candidate.shape != baseline.shape or candidate.dim() != 2:
        raise ValueError(
            f"candidate and baseline must both be (B, M) with the same shape, got {tuple(candidate.shape)} and "
            f"{tuple(baseline.shape)}. Pair rows by (prompt_id, seed, sample_index) before comparing."
        )


def win_rate(candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Per-reward fraction of pairs where the candidate scores strictly higher.

    Example (B=4 pairs, M=2 rewards)::

        candidate = [[2, 1], [1, 1], [3, 0], [0, 5]]
        baseline  = [[1, 1], [1, 2], [2, 1], [1, 4]]
        column 0: 2>1 yes, 1>1 tie, 3>2 yes, 0>1 no  -> 2/4 = 0.50
        column 1: 1>1 tie, 1>2 no,  0>1 no,  5>4 yes -> 1/4 = 0.25

    Args:
        candidate: ``(B, M)`` reward vectors of the candidate model.
        baseline: ``(B, M)`` reward vectors of the baseline on the same prompts and noise.

    Returns:
        ``(M,)`` float tensor in ``[0, 1]``; NaN when ``B == 0``.
    """
    _check_pair(candidate, baseline)
    return (candidate > baseline).float().mean(dim=0)


def jdr(candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Joint Domination Rate: fraction of pairs strictly better on every column (paper eq. 2).

    Example (the pairs of :func:`win_rate`)::

        pair 0: 2>1 and 1>1? no (tie)     pair 1: 1>1? no
        pair 2: 3>2 and 0>1? no           pair 3: 0>1? no               -> JDR = 0/4 = 0
        with candidate[1] = [2, 3] instead: 2>1 and 3>2 -> pair 1 dominates -> JDR = 1/4

    Args:
        candidate: ``(B, M)`` reward vectors (select the reward set's columns first).
        baseline: ``(B, M)``.

    Returns:
        0-dim float tensor in ``[0, 1]``; NaN when ``B == 0``.
    """
    _check_pair(candidate, baseline)
    return (candidate > baseline).all(dim=-1).float().mean()


def jcr(candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Joint Collapse Rate: fraction of pairs strictly worse on every column (paper eq. 3).

    Example (the pairs of :func:`win_rate`)::

        pair 0: 2<1? no    pair 1: 1<1? no (tie)    pair 2: 3<2? no
        pair 3: 0<1 and 5<4? no                                        -> JCR = 0/4 = 0
        with candidate[3] = [0, 3]: 0<1 and 3<4 -> pair 3 collapsed    -> JCR = 1/4

    Args:
        candidate: ``(B, M)`` reward vectors (select the reward set's columns first).
        baseline: ``(B, M)``.

    Returns:
        0-dim float tensor in ``[0, 1]``; NaN when ``B == 0``.
    """
    _check_pair(candidate, baseline)
    return (candidate < baseline).all(dim=-1).float().mean()


def mean_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-reward mean over the finite entries of each column (Table 5 of the paper).

    Args:
        scores: ``(B, M)`` reward vectors.

    Returns:
        ``(M,)``; NaN for a column with no finite entry. Count NaNs separately to report them.
    """
    finite = torch.isfinite(scores)
    total = torch.where(finite, scores, torch.zeros_like(scores)).sum(dim=0)
    return total / finite.sum(dim=0)


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


def comparison_indicators(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    reward_names: Sequence[str],
    reward_sets: Mapping[str, Sequence[str]],
) -> torch.Tensor:
    """Per-pair 0/1 outcomes whose column means are the win rates, JDRs and JCRs.

    Column order is :func:`rate_columns`; ``indicators.mean(0)`` equals ``win_rate``, ``jdr`` and
    ``jcr`` on the matching columns, and bootstrapping the rows gives their confidence intervals.

    Args:
        candidate: ``(B, M)``, columns in the order of ``reward_names``.
        baseline: ``(B, M)``.
        reward_names: the M column names.
        reward_sets: set name -> reward names (each must be in ``reward_names``).

    Returns:
        ``(B, M + 2 * len(reward_sets))`` float tensor of 0/1.

    Raises:
        ValueError: a set names a reward that is not a column.
    """
    _check_pair(candidate, baseline)
    names = list(reward_names)
    out = [(candidate > baseline).float()]  # (B, M)
    for set_name, members in reward_sets.items():
        missing = [n for n in members if n not in names]
        if missing or not members:
            raise ValueError(
                f"eval.reward_sets.{set_name} names {', '.join(map(repr, missing)) or 'no reward'}, which is not "
                f"among the scored rewards ({', '.join(names)}). Score that reward (add it to rewards) or edit "
                f"eval.reward_sets.{set_name}."
            )
        idx = torch.tensor([names.index(n) for n in members])
        c, b = candidate[:, idx], baseline[:, idx]
        out.append((c > b).all(dim=-1, keepdim=True).float())
        out.append((c < b).all(dim=-1, keepdim=True).float())
    return torch.cat(out, dim=1)


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
    of each column, skipping NaN entries per column. With ``w_p`` the number of times prompt ``p`` was
    drawn, ``S_p`` and ``n_p`` its column sums and row counts: ``stat = sum_p w_p S_p / sum_p w_p n_p``.

    Example: prompt 0 has rows (1, 1, 1), prompt 1 has row (0); the P=2 draws {0,0}, {0,1}, {1,0},
    {1,1} give 1, 3/4, 3/4, 0, so replicates take these values with probabilities 1/4, 1/2, 1/4.

    Args:
        values: ``(B,)`` or ``(B, K)`` per-row values (0/1 outcomes for rates, or scores).
        groups: ``(B,)`` integer prompt id of each row.
        num_resamples: R.
        seed: seed of the resampling generator (deterministic).

    Returns:
        ``(R, K)`` float64 replicates (``K = 1`` for 1-D ``values``).
    """
    v = values.reshape(values.shape[0], -1).double()  # (B, K)
    if groups.shape != (v.shape[0],):
        raise ValueError(f"groups must be (B,)=({v.shape[0]},), got {tuple(groups.shape)}.")
    if v.shape[0] == 0 or num_resamples <= 0:
        return torch.zeros(0, v.shape[1], dtype=torch.float64)
    _, inv = torch.unique(groups, return_inverse=True)
    num_groups = int(inv.max()) + 1
    finite = torch.isfinite(v)
    sums = torch.zeros(num_groups, v.shape[1], dtype=torch.float64).index_add_(0, inv, torch.where(finite, v, 0.0))
    counts = torch.zeros(num_groups, v.shape[1], dtype=torch.float64).index_add_(0, inv, finite.double())
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(num_groups, (num_resamples, num_groups), generator=gen)  # (R, P)
    weight = torch.zeros(num_resamples, num_groups, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(num_resamples, num_groups, dtype=torch.float64)
    )  # (R, P): times each prompt was drawn
    return (weight @ sums) / (weight @ counts)  # (R, K)


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
    :func:`bootstrap_samples` replicates. Deterministic for a ``seed``.

    Args:
        values: ``(B,)`` or ``(B, K)`` per-row values (0/1 outcomes for rates, or scores).
        groups: ``(B,)`` integer prompt id of each row.
        num_resamples: R, bootstrap resamples; 0 returns NaN bounds.
        confidence: level in ``(0, 1)``.
        seed: seed of the resampling generator.

    Returns:
        ``(low, high)``, each ``(K,)`` (or 0-dim for 1-D ``values``), float64.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"eval.confidence must be in (0, 1), got {confidence}.")
    squeeze = values.dim() == 1
    stats = bootstrap_samples(values, groups, num_resamples=num_resamples, seed=seed)  # (R, K)
    if stats.shape[0] == 0:
        low = torch.full((stats.shape[1],), float("nan"), dtype=torch.float64)
        high = low.clone()
    else:
        alpha = (1.0 - confidence) / 2.0
        bounds = torch.nanquantile(stats, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64), dim=0)  # (2, K)
        low, high = bounds[0], bounds[1]
    return (low[0], high[0]) if squeeze else (low, high)


def wilson_interval(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927).

    ``p = k / n``, ``z`` the normal quantile; centre ``(p + z^2 / 2n) / (1 + z^2 / n)``, half-width
    ``z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)``. Fractional ``successes`` (ties counted
    as half a win) are accepted. Example: k=8, n=10, 95%: (0.490, 0.943).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``n == 0``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + confidence / 2.0, dtype=torch.float64)).item()
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


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
        ``c`` (a fraction), ``c_low`` and ``c_high``; plus ``pairs``.
    """
    if baseline not in scores:
        raise ValueError(f"eval.baseline {baseline!r} has no scores; models scored: {', '.join(scores)}.")
    cols = rate_columns(reward_names, reward_sets)
    base = scores[baseline]
    rows = []
    for model, cand in scores.items():
        ind = comparison_indicators(cand, base, reward_names, reward_sets)  # (B, K)
        point = ind.mean(dim=0) if ind.shape[0] else torch.full((len(cols),), float("nan"))
        low, high = bootstrap_ci(ind, groups, num_resamples=num_resamples, confidence=confidence, seed=seed)
        row: dict[str, object] = {"model": model, "pairs": int(ind.shape[0])}
        for k, c in enumerate(cols):
            row[c] = float(point[k])
            row[f"{c}_low"] = float(low[k])
            row[f"{c}_high"] = float(high[k])
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


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

    Args:
        scores: model name -> ``(B_model, M)`` reward vectors (all of a model's samples).
        groups: model name -> ``(B_model,)`` prompt ids.
        reward_names: the M columns.

    Returns:
        One row per model: ``<reward>``, ``<reward>_low``, ``<reward>_high`` for each reward,
        ``samples`` and ``nan`` (rows with at least one NaN reward).
    """
    rows = []
    for model, s in scores.items():
        mean = mean_scores(s)
        low, high = bootstrap_ci(s, groups[model], num_resamples=num_resamples, confidence=confidence, seed=seed)
        row: dict[str, object] = {"model": model, "samples": int(s.shape[0])}
        for k, name in enumerate(reward_names):
            row[name] = float(mean[k])
            row[f"{name}_low"] = float(low[k])
            row[f"{name}_high"] = float(high[k])
        row["nan"] = int((~torch.isfinite(s)).any(dim=1).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def gaussian_kl(scores: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-reward KL divergence of Gaussian fits, ``KL(N(m_t, s_t^2) || N(m_0, s_0^2))`` (paper appendix D.4).

    ``KL = log(s_0 / s_t) + (s_t^2 + (m_t - m_0)^2) / (2 s_0^2) - 1/2`` with population standard deviations.

    Args:
        scores: (B, M) reward vectors now.
        base: (B0, M) reward vectors of the reference (the step-0 model).

    Returns:
        (M,) float64; non-finite where a spread is zero or a value is non-finite.
    """
    s, b = scores.double(), base.double()
    m1, s1 = s.mean(0), s.std(0, unbiased=False)
    m0, s0 = b.mean(0), b.std(0, unbiased=False)
    return torch.log(s0 / s1) + (s1**2 + (m1 - m0) ** 2) / (2 * s0**2) - 0.5
