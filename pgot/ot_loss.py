"""Entropic optimal transport cost for many small, padded problems at once (paper section 3.2, eq. 5-6).

For each problem, with source points :math:`x_i` (weights :math:`a_i`) and target points :math:`y_j`
(weights :math:`b_j`), the squared Euclidean ground cost :math:`C_{ij} = \\|x_i - y_j\\|_2^2` and the
entropic plan

.. math::
    T^\\star = \\mathop{\\arg\\min}_{T \\ge 0,\\; T\\mathbf{1} = a,\\; T^\\top\\mathbf{1} = b}
        \\langle T, C \\rangle_F + \\varepsilon \\sum_{ij} T_{ij} (\\log T_{ij} - 1),

the loss is the transport cost :math:`\\langle T^\\star, C \\rangle_F` (the linear part of eq. 6,
POT's ``value_linear``; the entropy term is not included). The plan comes from the log-domain
Sinkhorn solver of POT's ``ot.batch`` (torch backend) [Cuturi 2013]; the gradient treats the plan as a
constant (envelope / Danskin), :math:`\\partial L / \\partial x_i = \\sum_j T^\\star_{ij}\\, 2 (x_i - y_j)`.
Targets (Pareto fronts, dominating sets) are constants and get no gradient.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from ot.batch import solve_batch

from pgot.arrays import accepts_numpy

logger = logging.getLogger(__name__)

__all__ = ["ot_loss", "OTConvergenceWarning"]


class OTConvergenceWarning(RuntimeWarning):
    """Sinkhorn stopped at ``ot.max_iter`` with a marginal error above ``ot.tol``."""


def _check_weights(weights: torch.Tensor | None, n: int, name: str) -> None:
    """Weights are finite and >= 0, with one per point; else ValueError naming ``name`` and the first bad index."""
    if weights is None:
        return
    if weights.ndim == 0 or weights.shape[-1] != n:
        raise ValueError(f"{name} must have shape (..., {n}) to match the points, got {tuple(weights.shape)}.")
    w = weights.detach()
    bad = ~(torch.isfinite(w) & (w >= 0)) if w.is_floating_point() else w < 0
    if bool(bad.any()):
        i = tuple(int(k) for k in bad.nonzero()[0])
        raise ValueError(
            f"{name} must be finite and >= 0 (0 marks padding), got {name}[{', '.join(map(str, i))}] = {w[i].item()}. "
            "Give each point a non-negative mass; drop a point by giving it weight 0."
        )


def _weights(weights: torch.Tensor | None, batch: torch.Size, n: int, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return like.new_ones(batch + (n,))
    return weights.detach().to(dtype=like.dtype, device=like.device).expand(batch + (n,))


def _check_knobs(epsilon: float, max_iter: int, tol: float) -> None:
    """The solver settings, named as the config keys that feed them (``ot.epsilon`` -> ``epsilon=``)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(
            f"ot.epsilon must be a finite number > 0, got {epsilon}. Set ot.epsilon to a positive value such as 0.5."
        )
    if max_iter < 1:
        raise ValueError(f"ot.max_iter must be >= 1, got {max_iter}. Set ot.max_iter to a positive count such as 1000.")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(
            f"ot.tol must be a finite number > 0, got {tol}. Set ot.tol to a small positive value such as 1e-4."
        )


@accepts_numpy
def ot_loss(
    source: torch.Tensor,
    target: torch.Tensor,
    source_weights: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
    *,
    epsilon: float,
    max_iter: int,
    tol: float,
) -> torch.Tensor:
    """Entropic OT transport cost :math:`\\langle T^\\star, C\\rangle` of a batch of small problems.

    Ragged problems share one call through zero weights: a point with weight 0 is padding (its
    coordinates are ignored, even NaN). Weights default to uniform over the points and are
    normalised per problem. A problem whose source or target has no positive weight returns exactly
    0 with a zero gradient.

    Input rules (the same for every caller, so :func:`pgot.objectives.pgot_offline` and
    :func:`pgot.objectives.pgot_online` raise the same errors through this function):

    * weights must be finite and ``>= 0``: a negative, NaN or infinite weight raises ``ValueError``
      naming the argument and its first bad index (``source_weights[1] = -0.5``);
    * ``epsilon`` and ``tol`` must be finite and ``> 0``, ``max_iter >= 1`` (``ValueError`` naming
      ``ot.epsilon``, ``ot.tol``, ``ot.max_iter``);
    * the batch shapes of ``source``, ``target`` and the weights must broadcast (``ValueError`` stating
      every shape);
    * a **non-finite point** (NaN or ±inf in a coordinate of a point with positive weight, in a problem
      with mass on both sides) makes **that problem's cost NaN**, with a zero gradient; the problem is
      kept out of the solve, so the other problems are unaffected and no :class:`OTConvergenceWarning`
      is raised for it (the training loop counts non-finite losses; a ``ValueError`` there would stop
      one rank of a distributed run and hang the others). The same holds for finite points so far apart
      that a squared distance overflows the dtype. Padding points may hold anything.

    Solver: log-domain Sinkhorn (``ot.batch.solve_batch(method="log_sinkhorn")``), alternating

    .. math::
        u \\leftarrow \\log a - \\mathrm{LSE}_j(-C_{ij}/\\varepsilon + v_j), \\qquad
        v \\leftarrow \\log b - \\mathrm{LSE}_i(-C_{ij}/\\varepsilon + u_i),

    stopping batch-wide once :math:`\\max \\|T\\mathbf{1} - a\\|_2 <` ``tol`` (checked every 10
    iterations) or after ``max_iter`` iterations. Convergence: the number of iterations grows about
    as :math:`1/\\varepsilon` relative to the cost scale; with rewards normalised to unit spread,
    ``epsilon = 0.05`` needs a few hundred iterations for 1e-6, ``epsilon = 0.01`` thousands. If the
    error after the last iteration exceeds ``tol`` an :class:`OTConvergenceWarning` names the knobs
    (``ot.epsilon``, ``ot.max_iter``). When either side has a single point (the online strategy's
    source), the only feasible plan is :math:`a b^\\top`: it is used directly and no iteration runs.

    Args:
        source: Source points, shape (..., N, M); differentiable.
        target: Target points, shape (..., F, M); treated as constants.
        source_weights: Optional finite non-negative weights (..., N); 0 marks padding.
        target_weights: Optional finite non-negative weights (..., F); 0 marks padding.
        epsilon: Entropic regularisation :math:`\\varepsilon > 0` (finite), in units of the squared distances.
        max_iter: Sinkhorn iterations at most, >= 1.
        tol: Marginal-error tolerance of the stopping rule and of the warning, finite and > 0.

    Returns:
        Cost per problem, shape (...) (the broadcast batch shape), in float32 at least (half and
        bfloat16 inputs are solved in float32); NaN for a problem with a non-finite point (see above).

    Raises:
        ValueError: a negative or non-finite weight, weights whose last dimension does not match the
            points, ``epsilon`` / ``tol`` not finite and > 0, ``max_iter < 1``, source and target with
            different M or fewer than 2 dimensions, or batch shapes that do not broadcast.

    References:
        M. Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", NeurIPS 2013.
        R. Flamary et al., "POT: Python Optimal Transport", JMLR 2021 (``ot.batch``).
    """
    epsilon, tol = float(epsilon), float(tol)
    _check_knobs(epsilon, max_iter, tol)
    if source.ndim < 2 or target.ndim < 2:
        raise ValueError(
            f"source and target must have shapes (..., N, M) and (..., F, M), "
            f"got {tuple(source.shape)} and {tuple(target.shape)}."
        )
    if source.shape[-1] != target.shape[-1]:
        raise ValueError(
            f"source and target need the same number of rewards M, got {source.shape[-1]} and {target.shape[-1]}."
        )
    n, f, m = source.shape[-2], target.shape[-2], source.shape[-1]
    _check_weights(source_weights, n, "source_weights")
    _check_weights(target_weights, f, "target_weights")
    named = {"source": source.shape[:-2], "target": target.shape[:-2]}
    for name, w in (("source_weights", source_weights), ("target_weights", target_weights)):
        if w is not None:
            named[name] = w.shape[:-1]
    try:
        batch = torch.broadcast_shapes(*named.values())
    except RuntimeError:
        given = {"source": source, "target": target, "source_weights": source_weights, "target_weights": target_weights}
        given = ", ".join(f"{k} {tuple(v.shape)}" for k, v in given.items() if v is not None)
        raise ValueError(
            f"the batch dimensions of the OT problems do not broadcast: {given} (batch shapes "
            f"{', '.join(f'{k} {tuple(v)}' for k, v in named.items())}). Give source, target and their weights the "
            "same leading dimensions (one problem each), or size 1 where a side is shared."
        ) from None
    dtype = torch.promote_types(source.dtype, target.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        dtype = torch.float32
    bn = math.prod(batch)

    x = source.to(dtype).expand(batch + (n, m)).reshape(bn, n, m)  # (B, N, M)
    y = target.detach().to(dtype).expand(batch + (f, m)).reshape(bn, f, m)  # (B, F, M)
    a = _weights(source_weights, batch, n, x).reshape(bn, n)  # (B, N)
    b = _weights(target_weights, batch, f, x).reshape(bn, f)  # (B, F)
    if x.shape[0] == 0 or n == 0 or f == 0:  # nothing to transport: zeros that still carry a graph (never NaN)
        return torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x.sum((-2, -1)), 0.0).reshape(batch)

    a_sum, b_sum = a.sum(-1), b.sum(-1)
    massive = (a_sum > 0) & (b_sum > 0)  # (B,) problems with mass on both sides
    # A NaN or infinite coordinate on a point with mass makes that problem's cost undefined: NaN, kept out of
    # the solve (Sinkhorn's stopping rule is batch-wide, so one such problem would stall all the others).
    bad = ((~torch.isfinite(x)).any(-1) & (a > 0)).any(-1) | ((~torch.isfinite(y)).any(-1) & (b > 0)).any(-1)
    bad &= massive  # (B,)
    solved = massive & ~bad
    # Empty problems would make the log-sum-exp all -inf (NaN): give them uniform weights and zero
    # coordinates, so the solve stays finite, and zero their cost below.
    keep_x = (a > 0) & solved[:, None]
    keep_y = (b > 0) & solved[:, None]
    a = torch.where(solved[:, None], a / a_sum.clamp_min(torch.finfo(dtype).tiny)[:, None], 1.0 / n)
    b = torch.where(solved[:, None], b / b_sum.clamp_min(torch.finfo(dtype).tiny)[:, None], 1.0 / f)
    # padding coordinates may hold anything: zero them so that 0 * garbage never becomes NaN
    x = torch.where(keep_x[..., None], x, 0.0)
    y = torch.where(keep_y[..., None], y, 0.0)

    cost = (x[:, :, None, :] - y[:, None, :, :]).square().sum(-1)  # (B, N, F), direct difference
    # finite points far enough apart overflow the squared distance (float32: beyond ~1.8e19): NaN as well
    overflow = (~torch.isfinite(cost)).flatten(1).any(-1) & solved  # (B,)
    solved, bad = solved & ~overflow, bad | overflow
    cost = torch.where(overflow[:, None, None], 0.0, cost)
    empty = torch.where(bad, torch.tensor(float("nan"), dtype=dtype, device=x.device), 0.0)  # (B,)
    if n == 1 or f == 1:
        # One point on either side (the online strategy's single source): the only coupling with
        # these marginals is a b^T, exact without iterating, whatever epsilon.
        return torch.where(solved, (a[:, :, None] * b[:, None, :] * cost).sum((-2, -1)), empty).reshape(batch)
    with torch.no_grad():
        # detached cost: POT's iterations record no autograd graph; the envelope gradient needs none
        res = solve_batch(cost.detach(), epsilon, a=a, b=b, max_iter=max_iter, tol=tol, method="log_sinkhorn")
        plan = res.plan  # (B, N, F)
        err = torch.linalg.vector_norm(plan.sum(-1) - a, dim=-1)  # POT's stopping criterion, per problem
        worst = err.max()
    if not worst <= tol:  # one host sync per call; also true when the error is NaN
        warnings.warn(
            f"Sinkhorn did not reach its marginal tolerance ot.tol={tol:g} within ot.max_iter={max_iter} iterations "
            f"(ot.epsilon={epsilon:g}). Raise ot.max_iter or ot.epsilon, or bring the rewards to comparable scales "
            "(ot.normalize=frontier in pgot-train).",
            OTConvergenceWarning,
            stacklevel=3,  # the caller of the public (accepts_numpy-wrapped) ot_loss
        )
    value = (plan * cost).sum((-2, -1))  # (B,) <T, C>; gradient wrt x through the cost only
    return torch.where(solved, value, empty).reshape(batch)
