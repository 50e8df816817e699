"""Training losses: PG-OT (offline and online strategies) and the paper's baselines, one function each.

Every loss takes the differentiable reward vectors ``scores`` of shape (P, N, M) (P prompts, N samples
per prompt, M rewards, higher is better) and returns a scalar to minimise. Fronts, pools and bounds
are constants (detached). ``reduction`` is ``"mean"`` or ``"sum"`` everywhere and combines the
per-prompt (offline) or per-sample costs. Rewards should already be on comparable scales
(:func:`normalize`), since OT costs and weighted sums mix them.

**Targets** (``train.target_form``, :data:`TARGET_FORMS`). The weighted baselines compare the weighted gap
between a target and the rewards, :math:`g = \\sum_k w_k (C_k - r_k)`, through one of the forms used in this
literature (:func:`target_loss`):

- ``linear``: :math:`g` (DRaFT, Clark et al. 2024, maximise the reward): the target is a constant offset and never
  reaches the gradient, so a global target and per-prompt bounds train the same model;
- ``hinge``: :math:`\\max(0, g)` (ReFL, Xu et al. 2023: ``relu(C - r)``, ``C = 2`` on ImageReward): the push stops
  once a sample reaches its target;
- ``squared``: :math:`g^2` (the squared error of the paper's separate constraints, section 4.2): the pull is
  proportional to the distance to the target.

:func:`weighted_sum` applies the form to one global target per reward (paper eq. 1), :func:`hetero_weighted_sum`
to each prompt's weighted bound (paper section 4.2). Under ``hinge`` or ``squared`` they are different methods,
which is the paper's argument (section 2.1, Proposition C.3): a global target above a prompt's reachable bound
keeps pushing that prompt's samples past it. :func:`separate_constraints` is squared per reward by definition.

Paper: "Pareto-Guided Optimal Transport for Multi-Reward Alignment", sections 2.1, 3.2, 3.4 and 4.2.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from pgot.arrays import accepts_numpy
from pgot.ot_loss import ot_loss
from pgot.pareto import dominated_by, dominating_sets

logger = logging.getLogger(__name__)

__all__ = [
    "OBJECTIVES",
    "TARGET_FORMS",
    "compute",
    "hetero_weighted_sum",
    "needs_pool",
    "needs_store",
    "normalize",
    "pgot_offline",
    "pgot_online",
    "separate_constraints",
    "single_reward",
    "target_loss",
    "weighted_sum",
]

OBJECTIVES = ("pgot", "single_reward", "weighted_sum", "hetero_weighted_sum", "separate_constraints")
"""The values of ``train.objective``: PG-OT and the paper's baselines (Table 3)."""


TARGET_FORMS = ("linear", "hinge", "squared")
"""The values of ``train.target_form``: how a target enters :func:`weighted_sum` and :func:`hetero_weighted_sum`."""

_REDUCTIONS = ("mean", "sum")


def _check_scores(scores: torch.Tensor) -> None:
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (P, N, M) (prompts, samples, rewards), got {tuple(scores.shape)}.")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r} (train.reduction).")


def _check_front(scores: torch.Tensor, front: torch.Tensor, front_mask: torch.Tensor, name: str = "front") -> None:
    p, _, m = scores.shape
    if front.ndim != 3 or front.shape[0] != p or front.shape[2] != m:
        raise ValueError(
            f"{name} must have shape (P={p}, F, M={m}) to match scores {tuple(scores.shape)}, got {tuple(front.shape)}. "
            f"Check that the store's reward names match the active rewards (train.active_rewards)."
        )
    if front_mask.shape != front.shape[:2]:
        raise ValueError(f"{name}_mask must have shape {tuple(front.shape[:2])}, got {tuple(front_mask.shape)}.")


def _check_target_form(target_form: str) -> None:
    if target_form not in TARGET_FORMS:
        raise ValueError(
            f"target_form must be one of {', '.join(TARGET_FORMS)}, got {target_form!r} (train.target_form)."
        )


@accepts_numpy
def target_loss(gap: torch.Tensor, target_form: str = "squared") -> torch.Tensor:
    """The loss of a weighted gap to a target, elementwise: ``linear`` g, ``hinge`` max(0, g), ``squared`` g^2.

    With :math:`g = \\sum_k w_k (C_k - r_k)` (a target minus the rewards, weighted):

    - ``linear`` (DRaFT, Clark et al. 2024): :math:`g`; :math:`\\partial L / \\partial r_k = -w_k` whatever the
      target;
    - ``hinge`` (ReFL, Xu et al. 2023, ``relu(C - r)``): :math:`\\max(0, g)`; gradient :math:`-w_k` below the
      target, 0 at or above it;
    - ``squared`` (the paper's separate constraints, section 4.2, on the weighted gap): :math:`g^2`; gradient
      :math:`-2 g w_k`, proportional to the distance to the target (and pulling back a sample above it).

    Args:
        gap: weighted gaps, any shape (e.g. (P, N)).
        target_form: ``linear``, ``hinge`` or ``squared`` (``train.target_form``).

    Returns:
        The per-element loss, the shape of ``gap``.

    Raises:
        ValueError: an unknown ``target_form``.
    """
    _check_target_form(target_form)
    if target_form == "linear":
        return gap
    if target_form == "hinge":
        return torch.relu(gap)
    return gap.square()


def _reward_vector(
    values: torch.Tensor | list[float] | tuple[float, ...], m: int, like: torch.Tensor, name: str
) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.shape != (m,):
        raise ValueError(f"{name} must have one entry per reward (M={m}), got shape {tuple(values.shape)}.")
    return values


def _reduce(per_item: torch.Tensor, count: torch.Tensor | int, reduction: str) -> torch.Tensor:
    """Sum, or sum divided by ``count`` (at least 1, so an all-empty batch gives 0, not NaN)."""
    total = per_item.sum()
    if reduction == "sum":
        return total
    if isinstance(count, torch.Tensor):
        return total / count.clamp_min(1).to(total.dtype)
    return total / max(count, 1)


@accepts_numpy
def normalize(scores: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Divide each reward by its scale, so that OT costs and sums weigh the rewards comparably.

    Args:
        scores: Reward vectors (..., M).
        scale: Per-reward scale (M,), e.g. the per-reward standard deviation stored with the frontier
            (``ot.normalize=frontier``); ``None`` returns ``scores`` unchanged. Must be positive.

    Returns:
        ``scores / scale`` (..., M). Dominance is unchanged by a positive per-reward scale.
    """
    if scale is None:
        return scores
    scale = torch.as_tensor(scale, device=scores.device)
    if scale.shape != scores.shape[-1:]:
        raise ValueError(
            f"scale must have one entry per reward (M={scores.shape[-1]}), got shape {tuple(scale.shape)}."
        )
    if not (scale > 0).all():
        raise ValueError(
            f"scale must be positive, got {scale.tolist()}. A reward with zero spread in the frontier store "
            f"cannot be normalised: drop it from train.active_rewards or set ot.normalize=none."
        )
    return scores / scale.to(scores.dtype)


@accepts_numpy
def pgot_offline(
    scores: torch.Tensor,
    front: torch.Tensor,
    front_mask: torch.Tensor,
    *,
    epsilon: float,
    max_iter: int,
    tol: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """PG-OT offline strategy (paper section 3.2, eq. 5-6): transport dominated samples onto the front.

    For prompt ``p`` the source is the uniform distribution over its samples that **at least one**
    valid front point dominates (the paper says "dominated by all frontier points" in one sentence
    and "dominated samples" elsewhere; pgot follows the design and uses "by at least one"). The
    target is the uniform distribution over the prompt's valid front points. The per-prompt cost is
    :math:`L_p = \\langle T^\\star_p, C_p\\rangle` with :math:`C_{ij} = \\|r_i - f_j\\|^2`
    (:func:`pgot.ot_loss.ot_loss`), and

    - ``reduction="mean"``: :math:`\\sum_p L_p / |\\{p : \\text{p has a dominated sample}\\}|`;
    - ``reduction="sum"``: :math:`\\sum_p L_p`.

    A prompt with no dominated sample (or an empty front) contributes 0; if no prompt has one the loss
    is 0 with a zero gradient (never NaN, and backward still works). Samples with a NaN reward are
    never dominated, so they never enter the source: report them separately.

    Args:
        scores: Reward vectors (P, N, M), differentiable.
        front: Precomputed Pareto front per prompt (P, F, M), padded; a constant.
        front_mask: Bool (P, F), true on real front points.
        epsilon: Entropic regularisation (``ot.epsilon``).
        max_iter: Sinkhorn iterations at most (``ot.max_iter``).
        tol: Sinkhorn marginal tolerance (``ot.tol``).
        reduction: ``"mean"`` or ``"sum"`` over prompts.

    Returns:
        Scalar loss.
    """
    _check_scores(scores)
    _check_front(scores, front, front_mask)
    _check_reduction(reduction)
    front = front.detach().to(device=scores.device)
    front_mask = front_mask.to(device=scores.device, dtype=torch.bool)
    source = dominated_by(scores, front, front_mask)  # (P, N) bool
    costs = ot_loss(
        scores,
        front,
        source.to(scores.dtype),
        front_mask.to(scores.dtype),
        epsilon=epsilon,
        max_iter=max_iter,
        tol=tol,
    )  # (P,), 0 for prompts without a dominated sample
    return _reduce(costs, source.any(-1).sum(), reduction)


@accepts_numpy
def pgot_online(
    scores: torch.Tensor,
    pool: torch.Tensor,
    pool_mask: torch.Tensor,
    *,
    epsilon: float,
    max_iter: int,
    tol: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """PG-OT online strategy (paper section 3.4, eq. 7): transport each sample onto what dominates it.

    For sample ``(p, n)`` the target is the uniform distribution over the pool vectors of prompt
    ``p`` that dominate it (:func:`pgot.pareto.dominating_sets`); the source is the single point
    ``scores[p, n]``. With one source point the plan is the target weights, so the cost is
    :math:`L_{pn} = \\frac{1}{|D_{pn}|} \\sum_{g \\in D_{pn}} \\|r_{pn} - r_g\\|^2` (computed by
    :func:`pgot.ot_loss.ot_loss`, which converges after one iteration here).

    - ``reduction="sum"`` (the paper): :math:`\\sum_{p,n} L_{pn}`;
    - ``reduction="mean"``: the sum divided by the number of samples with a non-empty dominating set.

    The pool is typically the gathered, detached reward vectors of all processes for the same
    prompts, so it may contain the sample itself (a vector does not dominate itself). Samples that
    nothing dominates contribute 0.

    Args:
        scores: Reward vectors (P, N, M), differentiable.
        pool: Pool of reward vectors per prompt (P, G, M); a constant.
        pool_mask: Bool (P, G), true on real pool entries.
        epsilon: Entropic regularisation (``ot.epsilon``).
        max_iter: Sinkhorn iterations at most (``ot.max_iter``).
        tol: Sinkhorn marginal tolerance (``ot.tol``).
        reduction: ``"mean"`` or ``"sum"`` over samples.

    Returns:
        Scalar loss.
    """
    _check_scores(scores)
    _check_front(scores, pool, pool_mask, name="pool")
    _check_reduction(reduction)
    pool = pool.detach().to(device=scores.device)
    pool_mask = pool_mask.to(device=scores.device, dtype=torch.bool)
    targets = dominating_sets(scores, pool, pool_mask)  # (P, N, G) bool
    costs = ot_loss(
        scores.unsqueeze(-2),  # (P, N, 1, M): one source point per problem
        pool.unsqueeze(1),  # (P, 1, G, M), broadcast over the N samples
        None,
        targets.to(scores.dtype),
        epsilon=epsilon,
        max_iter=max_iter,
        tol=tol,
    )  # (P, N), 0 where nothing dominates the sample
    return _reduce(costs, targets.any(-1).sum(), reduction)


@accepts_numpy
def single_reward(scores: torch.Tensor, index: int, *, reduction: str = "mean") -> torch.Tensor:
    """Single-reward fine-tuning (paper table 2): maximise reward ``index`` alone.

    Loss :math:`-\\frac{1}{PN}\\sum_{p,n} r_{pn,k}` with ``k = index`` (``"sum"``: no division).

    Args:
        scores: Reward vectors (P, N, M).
        index: Column of the reward to maximise.
        reduction: ``"mean"`` or ``"sum"`` over samples.
    """
    _check_scores(scores)
    _check_reduction(reduction)
    m = scores.shape[-1]
    if not -m <= index < m:
        raise ValueError(f"index must select one of the M={m} rewards, got {index}.")
    per_sample = -scores[..., index]
    return _reduce(per_sample, per_sample.numel(), reduction)


@accepts_numpy
def weighted_sum(
    scores: torch.Tensor,
    weights: torch.Tensor | list[float] | tuple[float, ...],
    targets: torch.Tensor | list[float] | tuple[float, ...],
    *,
    target_form: str = "squared",
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted multi-reward loss with one global target per reward (paper eq. 1, section 2.1).

    The paper's eq. 1 subtracts the rewards from "a global constant ... upper bound on the aggregated reward"
    (Clark et al. 2024; Xu et al. 2023). With the weighted gap :math:`g_{pn} = \\sum_k w_k (C_k - r_{pn,k})`
    (equivalently :math:`W (\\bar C - \\bar r_{pn})` with the weighted averages and :math:`W = \\sum_k w_k`)
    and :math:`f` the target form (:func:`target_loss`):

    .. math::
        L = \\frac{1}{PN} \\sum_{p,n} f(g_{pn})

    (``"sum"``: no division). ``linear`` is DRaFT's loss (the targets do not change the gradient), ``hinge``
    ReFL's, ``squared`` a regression to the target. The global target is the same for every prompt: where it is
    above a prompt's reachable bound, ``hinge`` and ``squared`` keep pushing that prompt's samples past the bound
    (the paper's Proposition C.3); compare :func:`hetero_weighted_sum`.

    Example (P=1, N=1, M=2, w=(1, 2), C=(5, 5), r=(1, 2)): g = 4 + 6 = 10; linear 10, hinge 10, squared 100;
    gradient w.r.t. r: linear and hinge (-1, -2), squared -2 * 10 * (1, 2) = (-20, -40).

    Args:
        scores: Reward vectors (P, N, M).
        weights: Per-reward weights (M,), e.g. the paper's ratios 1:1:1:1 or 2:3:2:3 (``rewards.<i>.weight``).
        targets: Global per-reward targets C_k (M,) (``rewards.<i>.target``; pgot-train's default: the store's
            maximum of each reward).
        target_form: ``linear``, ``hinge`` or ``squared`` (``train.target_form``).
        reduction: ``"mean"`` or ``"sum"`` over samples.

    Returns:
        Scalar loss.

    Raises:
        ValueError: shapes that do not match, an unknown ``target_form`` or ``reduction``.
    """
    _check_scores(scores)
    _check_reduction(reduction)
    _check_target_form(target_form)
    m = scores.shape[-1]
    w = _reward_vector(weights, m, scores, "weights")
    c = _reward_vector(targets, m, scores, "targets")
    gap = ((c - scores) * w).sum(-1)  # (P, N)
    per_sample = target_loss(gap, target_form)
    return _reduce(per_sample, per_sample.numel(), reduction)


def _front_maxima(front: torch.Tensor, front_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt per-reward maxima over the valid front points (P, M), and which prompts have any (P,)."""
    front_mask = front_mask.to(device=front.device, dtype=torch.bool)
    masked = front.detach().masked_fill(~front_mask[..., None], float("-inf"))
    has_front = front_mask.any(-1)
    bound = masked.amax(-2).masked_fill(~has_front[:, None], 0.0)  # (P, M)
    return bound, has_front


@accepts_numpy
def hetero_weighted_sum(
    scores: torch.Tensor,
    front: torch.Tensor,
    front_mask: torch.Tensor,
    weights: torch.Tensor | list[float] | tuple[float, ...],
    *,
    target_form: str = "squared",
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted sum towards per-prompt bounds ("weighted-sum bounds", paper section 4.2).

    The precomputed front approximates each prompt's reachable bounds: :math:`b_{pk} = \\max_{f} f_{pk}` over
    the valid front points. Their weighted average :math:`\\bar b_p = \\sum_k w_k b_{pk} / W` is one target per
    prompt replacing eq. 1's global one; with the weighted gap :math:`g_{pn} = \\sum_k w_k (b_{pk} - r_{pn,k}) =
    W (\\bar b_p - \\bar r_{pn})` and :math:`f` the target form (:func:`target_loss`, the same form
    :func:`weighted_sum` applies to its global target):

    .. math::
        L = \\frac{1}{|S|} \\sum_{(p,n) \\in S} f(g_{pn})

    where :math:`S` are the samples of prompts with a non-empty front (others contribute 0; ``"sum"``: no
    division). Under ``linear`` the bounds do not reach the gradient (it equals :func:`weighted_sum`'s); under
    ``hinge`` a prompt stops being pushed at its own bound, under ``squared`` it is pulled to it.

    Example (one prompt, front (4, 1), (2, 3): b = (4, 3); w = (1, 2); r = (1, 2)): g = 3 + 2 = 5; linear 5,
    hinge 5, squared 25; gradient linear and hinge (-1, -2), squared (-10, -20).

    Args:
        scores: Reward vectors (P, N, M).
        front: Precomputed Pareto front per prompt (P, F, M), padded.
        front_mask: Bool (P, F), true on real front points.
        weights: Per-reward weights (M,).
        target_form: ``linear``, ``hinge`` or ``squared`` (``train.target_form``).
        reduction: ``"mean"`` or ``"sum"`` over samples.

    Returns:
        Scalar loss.

    Raises:
        ValueError: shapes that do not match, an unknown ``target_form`` or ``reduction``.
    """
    _check_scores(scores)
    _check_front(scores, front, front_mask)
    _check_reduction(reduction)
    _check_target_form(target_form)
    w = _reward_vector(weights, scores.shape[-1], scores, "weights")
    bound, has_front = _front_maxima(front.to(device=scores.device, dtype=scores.dtype), front_mask)
    gap = ((bound[:, None, :] - scores) * w).sum(-1)  # (P, N)
    per_sample = torch.where(has_front[:, None], target_loss(gap, target_form), 0.0)
    return _reduce(per_sample, has_front.sum() * scores.shape[1], reduction)


@accepts_numpy
def separate_constraints(
    scores: torch.Tensor,
    front: torch.Tensor,
    front_mask: torch.Tensor,
    weights: torch.Tensor | list[float] | None = None,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Each reward pulled to its own per-prompt bound ("separate constraints", paper section 4.2).

    With :math:`b_{pk} = \\max_f f_{pk}` over the valid front points of prompt ``p``:

    .. math::
        L = \\frac{1}{|S|} \\sum_{(p,n) \\in S} \\sum_k w_k (r_{pn,k} - b_{pk})^2

    where :math:`S` are the samples of prompts with a non-empty front (``"sum"``: no division).

    Args:
        scores: Reward vectors (P, N, M).
        front: Precomputed Pareto front per prompt (P, F, M), padded.
        front_mask: Bool (P, F), true on real front points.
        weights: Per-reward weights (M,); ``None`` weighs every reward 1.
        reduction: ``"mean"`` or ``"sum"`` over samples.
    """
    _check_scores(scores)
    _check_front(scores, front, front_mask)
    _check_reduction(reduction)
    m = scores.shape[-1]
    w = scores.new_ones(m) if weights is None else _reward_vector(weights, m, scores, "weights")
    bound, has_front = _front_maxima(front.to(device=scores.device, dtype=scores.dtype), front_mask)
    per_sample = ((scores - bound[:, None, :]).square() * w).sum(-1)  # (P, N)
    per_sample = torch.where(has_front[:, None], per_sample, 0.0)
    return _reduce(per_sample, has_front.sum() * scores.shape[1], reduction)


# --------------------------------------------------------------------------------------------
# The dispatch: a configured objective -> (loss, diagnostics)
# --------------------------------------------------------------------------------------------


@accepts_numpy
def needs_store(objective: str, strategy: str) -> bool:
    """Whether ``objective`` (with ``strategy`` for PG-OT) reads per-prompt fronts from a frontier store.

    PG-OT offline and auto (which starts offline) and the two heterogeneous-bound baselines do; PG-OT online
    and the global-target baselines do not.
    """
    return (objective == "pgot" and strategy in ("offline", "auto")) or objective in (
        "hetero_weighted_sum",
        "separate_constraints",
    )


@accepts_numpy
def needs_pool(objective: str, strategy: str) -> bool:
    """Whether the loss needs the pool of every process's reward vectors (PG-OT online)."""
    return objective == "pgot" and strategy == "online"


@accepts_numpy
def compute(
    objective: str,
    scores: torch.Tensor,
    *,
    strategy: Literal["offline", "online"] = "offline",
    front: torch.Tensor | None = None,
    front_mask: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    pool_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    target_form: str = "squared",
    scale: torch.Tensor | None = None,
    epsilon: float = 0.5,
    max_iter: int = 1000,
    tol: float = 1e-4,
    reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of a configured objective and its diagnostics: what ``pgot-train`` and the benchmarks run.

    Args:
        objective: ``train.objective``, one of :data:`OBJECTIVES`.
        scores: differentiable reward vectors (P, N, M) of the active rewards.
        strategy: the current PG-OT strategy (``offline`` or ``online``; ``auto`` resolves to one of them).
        front, front_mask: per-prompt fronts (P, F, M) and mask (P, F), needed when :func:`needs_store`.
        pool, pool_mask: gathered reward vectors of the same prompts (P, G, M) and mask (P, G), needed when
            :func:`needs_pool` (detached; the caller gathers them across processes).
        weights: per-reward weights (M,) of the weighted baselines (default: all 1).
        targets: global per-reward targets (M,) of ``weighted_sum``; needed unless ``target_form="linear"``
            (where they do not change the gradient; default there: all 1).
        target_form: how ``weighted_sum`` and ``hetero_weighted_sum`` compare rewards with their target
            (``train.target_form``, :func:`target_loss`); the other objectives ignore it.
        scale: per-reward scale (M,) dividing rewards before the OT cost (``ot.normalize``); None: raw rewards.
        epsilon, max_iter, tol: Sinkhorn settings (``ot.*``).
        reduction: ``train.reduction``.

    Returns:
        ``(loss, diagnostics)``: a scalar to minimise, and detached 0-dim float tensors for logging:
        ``n_dominated`` (samples some front point, or some pool vector, dominates: the OT sources) and
        ``front_size`` (mean valid front points, or pool vectors, per prompt). Global-target baselines have none.

    Raises:
        ValueError: an unknown objective or target form, a front / pool missing for an objective that needs it,
            or ``weighted_sum`` without targets under ``hinge`` / ``squared``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    _check_scores(scores)
    _check_target_form(target_form)
    m = scores.shape[-1]
    weights = scores.new_ones(m) if weights is None else weights.to(scores.device, scores.dtype)
    if needs_pool(objective, strategy):
        if pool is None or pool_mask is None:
            raise ValueError("the online PG-OT strategy needs the gathered pool of reward vectors (pool, pool_mask).")
        loss = pgot_online(
            normalize(scores, scale), normalize(pool, scale), pool_mask,
            epsilon=epsilon, max_iter=max_iter, tol=tol, reduction=reduction,
        )  # fmt: skip
        with torch.no_grad():
            n_dom = dominating_sets(scores.detach(), pool, pool_mask).any(-1).sum()
        return loss, {"n_dominated": n_dom.float(), "front_size": pool_mask.sum(-1).float().mean()}
    if objective == "single_reward":
        return single_reward(scores, 0, reduction=reduction), {}
    if objective == "weighted_sum":
        if targets is None and target_form != "linear":
            raise ValueError(
                f"train.objective=weighted_sum with train.target_form={target_form} needs a global target per reward "
                "(targets): set rewards.<i>.target, or train.store to use the store's maximum of each reward."
            )
        c = scores.new_ones(m) if targets is None else torch.as_tensor(targets).to(scores.device, scores.dtype)
        return weighted_sum(scores, weights, c, target_form=target_form, reduction=reduction), {}
    if front is None or front_mask is None:
        raise ValueError(f"train.objective={objective} needs the per-prompt fronts of a frontier store (front, mask).")
    with torch.no_grad():
        diagnostics = {
            "n_dominated": dominated_by(scores.detach(), front, front_mask).sum().float(),
            "front_size": front_mask.sum(-1).float().mean(),
        }
    if objective == "pgot":
        loss = pgot_offline(
            normalize(scores, scale), normalize(front, scale), front_mask,
            epsilon=epsilon, max_iter=max_iter, tol=tol, reduction=reduction,
        )  # fmt: skip
    elif objective == "hetero_weighted_sum":
        loss = hetero_weighted_sum(scores, front, front_mask, weights, target_form=target_form, reduction=reduction)
    else:
        loss = separate_constraints(scores, front, front_mask, weights, reduction=reduction)
    return loss, diagnostics
