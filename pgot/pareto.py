"""Pareto dominance for batches of reward vectors (paper section 3.2, eq. 4, and section 3.4, eq. 7).

All rewards are maximised. For two reward vectors ``a, b`` of length ``M``:

.. math::
    a \\succ b \\iff a_k \\ge b_k \\;\\forall k \\;\\text{and}\\; a_k > b_k \\;\\text{for some}\\; k

Conventions shared by every function here:

- **Duplicates** do not dominate each other, so all copies of a non-dominated vector are on the front
  (``moocore.is_nondominated(..., keep_weakly=True)``).
- **NaN:** a row with any NaN is incomparable: it never dominates, is never dominated and is never on a
  front (pgot's rule for every backend; it is not dominated either, since
  dominance needs every reward compared). A NaN reward is the caller's to report; here it only cannot
  poison the other rows (moocore, pymoo and paretoset silently drop valid front points when a NaN is present).
- **Infinities:** ``+inf`` and ``-inf`` are ordinary ordered values, ``-inf < x < +inf`` for every finite
  ``x`` and ``inf == inf`` (a tie). A row holding ``+inf`` can be on the front; a row holding ``-inf`` can
  dominate. Every backend and dtype gives this same answer: the torch kernels compare infinities natively;
  the moocore backend never sees them (columns with an infinity are replaced by their dense ranks, a strictly
  increasing map that keeps every dominance relation, since moocore 0.3 crashes with SIGSEGV on ``+inf``
  and returns wrong fronts with ``-inf``).
- **Padding:** an optional boolean mask marks the real rows of a padded batch; padding rows behave
  like NaN rows.
- **Memory:** the work is ``O(N^2 M)`` comparisons per set. On CPU the temporaries are a few
  ``(..., N, N)`` booleans built by a loop over the ``M`` rewards, never ``(..., N, N, M)``. On
  accelerators, where kernel launches dominate, one broadcast comparison builds ``(..., rows, N, M)``
  booleans instead (5 kernels instead of ``2M + 3``). Either way the rows are processed in chunks
  above ``max_bytes``, so peak temporaries stay under about ``max_bytes``.

Comparisons run in the input dtype (float32, float16 and bfloat16 stay as they are; integer inputs are compared
as float64; the moocore backend compares in float64, an exact widening of every float dtype), so the answer is
exactly the brute-force one on the given values whatever the backend or device.
Everything is batched over leading dimensions and runs on any device; no function here has a gradient.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from pgot.arrays import accepts_numpy

try:  # optional: the sub-quadratic CPU path of pareto_mask for large sets
    import moocore
except ImportError:  # pragma: no cover
    moocore = None

logger = logging.getLogger(__name__)

__all__ = ["dominance_matrix", "pareto_mask", "dominated_by", "dominating_sets"]

DEFAULT_MAX_BYTES = 1 << 28
"""Byte budget of the boolean temporaries of one call (256 MiB); bigger problems are chunked over rows."""

MOOCORE_MIN_N = 256
"""``pareto_mask(backend="auto")`` hands CPU sets of at least this many rows to moocore's
``O(N log^{M-2} N)`` algorithm (the ``O(N^2)`` torch path is 10x slower at N=256 and 33x at N=1000
on one CPU core)."""

BATCH_INNER_MIN = 8
"""CPU ``pareto_mask`` puts the batch innermost from this many sets on (faster for many small sets)."""

_TEMPORARIES = 3  # bool (..., rows, cols) tensors alive at once in the kernels below


def _prepare(scores: torch.Tensor, valid: torch.Tensor | None, name: str, valid_name: str) -> torch.Tensor:
    """Check shapes; return detached floating scores with the padding rows set to NaN."""
    if scores.ndim < 2:
        raise ValueError(f"{name} must have shape (..., N, M), got {tuple(scores.shape)}.")
    if scores.shape[-1] == 0:
        raise ValueError(f"{name} has no reward column (shape {tuple(scores.shape)}); dominance needs M >= 1.")
    scores = scores.detach()
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)
    if valid is not None:
        if valid.shape != scores.shape[:-1]:
            raise ValueError(
                f"{valid_name} must have shape {tuple(scores.shape[:-1])} (the rows of {name}), "
                f"got {tuple(valid.shape)}."
            )
        valid = valid.to(device=scores.device) if valid.dtype == torch.bool else valid.to(scores.device) != 0
        scores = scores.masked_fill(~valid.unsqueeze(-1), float("nan"))
    return scores


def _fused(x: torch.Tensor) -> bool:
    """One broadcast comparison over (..., A, C, M) on accelerators, where kernel launches dominate;
    a loop over the M rewards on CPU, where memory traffic does (the broadcast is 2-3x slower there)."""
    return x.device.type != "cpu"


def _all_cmp(
    a: torch.Tensor, b: torch.Tensor, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``out[..., i, j] = all_k op(a[..., i, k], b[..., j, k])``: (..., A, M), (..., C, M) -> (..., A, C).

    NaN compares False. On CPU a loop over the M rewards keeps the temporaries at (..., A, C)
    booleans and reads each reward as one contiguous vector (2x faster than strided reads at N=50).
    """
    if _fused(a):
        return op(a[..., :, None, :], b[..., None, :, :]).all(-1)
    at, bt = a.movedim(-1, 0).contiguous(), b.movedim(-1, 0).contiguous()  # (M, ..., A), (M, ..., C)
    out = op(at[0][..., :, None], bt[0][..., None, :])
    for k in range(1, at.shape[0]):
        out &= op(at[k][..., :, None], bt[k][..., None, :])
    return out


def _chunk_rows(x: torch.Tensor, batch_numel: int, rows: int, cols: int, max_bytes: int) -> int:
    """Rows per chunk so that the boolean temporaries of one chunk stay under ``max_bytes``."""
    per_pair = x.shape[-1] + _TEMPORARIES if _fused(x) else _TEMPORARIES
    per_row = max(1, batch_numel * cols * per_pair)
    return max(1, min(rows, max_bytes // per_row))


@accepts_numpy
def dominance_matrix(
    scores: torch.Tensor, valid: torch.Tensor | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> torch.Tensor:
    """Pairwise Pareto dominance within each set (maximisation).

    ``D[..., i, j]`` is true iff row ``i`` dominates row ``j``: ``s_i >= s_j`` on every reward and
    ``s_i > s_j`` on at least one. The diagonal is false, duplicates do not dominate each other, and
    rows with a NaN or outside ``valid`` neither dominate nor are dominated. ``±inf`` are ordinary values
    (``[inf, 0]`` dominates ``[5, 0]``; ``[-inf, 1]`` is dominated by ``[0, 1]``).

    Args:
        scores: Reward vectors, shape (..., N, M), any float or integer dtype; higher is better.
        valid: Optional bool mask (..., N) of real rows in a padded batch.
        max_bytes: Byte budget of the temporaries; bigger sets are processed in row chunks.

    Returns:
        Bool tensor (..., N, N).

    Raises:
        ValueError: ``scores`` is not (..., N, M) with M >= 1, or ``valid`` does not have shape (..., N).
    """
    s = _prepare(scores, valid, "scores", "valid")
    n = s.shape[-2]
    batch_numel = math.prod(s.shape[:-2])
    chunk = _chunk_rows(s, batch_numel, n, n, max_bytes)
    if chunk >= n:
        ge = _all_cmp(s, s, torch.ge)  # (..., N, N): ge[i, j] = s_i >= s_j everywhere
        return ge > ge.mT  # bool ">" is "and not": i >= j everywhere, and not j >= i everywhere
    out = torch.empty(s.shape[:-1] + (n,), dtype=torch.bool, device=s.device)
    for r0 in range(0, n, chunk):
        sr = s[..., r0 : r0 + chunk, :]
        out[..., r0 : r0 + chunk, :] = _all_cmp(sr, s, torch.ge) > _all_cmp(sr, s, torch.le)
    return out


def _finite_ranks(x: np.ndarray) -> np.ndarray:
    """(n, M) float64 without NaN -> a finite (n, M) with the same dominance relations.

    Each column holding an infinity is replaced by its dense ranks (0, 1, ... in increasing order, equal values
    sharing a rank, -0.0 equal to 0.0). A strictly increasing map of each column keeps every ``>=`` and ``>``
    between two rows, so the front does not change; moocore only ever sees finite numbers (it crashes with
    SIGSEGV on some +inf inputs and returns wrong fronts with -inf). Finite columns are passed through.
    """
    inf_cols = np.flatnonzero(np.isinf(x).any(0))
    if inf_cols.size:
        x = x.copy()
        for k in inf_cols:
            x[:, k] = np.unique(x[:, k], return_inverse=True)[1].reshape(-1)
    return x


def _pareto_mask_moocore(s: torch.Tensor) -> torch.Tensor:
    """The same front as the torch path, from moocore, one set at a time (CPU, large N).

    Nothing non-finite reaches moocore: NaN rows are left out of its call (they are never on a front, and moocore
    lets one NaN row wipe out the front) and columns with an infinity are replaced by their dense ranks
    (:func:`_finite_ranks`). Finite inputs skip both steps (one ``isfinite`` pass).
    """
    if moocore is None:
        raise ValueError("pareto_mask(backend='moocore') needs the moocore package: pip install moocore.")
    # float32 -> float64 is exact; numpy's cast is a few µs cheaper than torch's here
    x = s.numpy().astype(np.float64, copy=False) if s.dtype in (torch.float32, torch.float64) else s.double().numpy()
    n, m = s.shape[-2], s.shape[-1]
    if n == 0:
        return torch.zeros(s.shape[:-1], dtype=torch.bool)
    finite = bool(np.isfinite(x).all())
    if s.ndim == 2 and finite:  # one set: no batch bookkeeping
        return torch.from_numpy(moocore.is_nondominated(x, maximise=True, keep_weakly=True))
    flat = x.reshape(-1, n, m)  # (B, N, M)
    if finite:  # common case: one call per set, no row selection
        out = np.stack([moocore.is_nondominated(x, maximise=True, keep_weakly=True) for x in flat])
        return torch.from_numpy(out).reshape(s.shape[:-1])
    comparable = ~np.isnan(flat).any(-1)  # (B, N)
    out = np.zeros(flat.shape[:2], dtype=bool)
    for b in range(flat.shape[0]):
        rows = np.flatnonzero(comparable[b])
        if rows.size:
            out[b, rows] = moocore.is_nondominated(_finite_ranks(flat[b, rows]), maximise=True, keep_weakly=True)
    return torch.from_numpy(out).reshape(s.shape[:-1])


def _pareto_mask_batch_inner(s: torch.Tensor) -> torch.Tensor:
    """CPU kernel for many sets: the batch is the innermost, contiguous axis of every comparison.

    Same maths as the (..., N, N) path; at B=64, N=50 it is 15% faster, since every vectorised
    inner loop runs over B sets instead of N rows.
    """
    n, m = s.shape[-2], s.shape[-1]
    st = s.reshape(-1, n, m).permute(2, 1, 0).contiguous()  # (M, N, B)
    ge = st[0][:, None, :] >= st[0][None, :, :]  # (N, N, B): ge[i, j, b] = s_bi >= s_bj everywhere
    for k in range(1, m):
        ge &= st[k][:, None, :] >= st[k][None, :, :]
    dominated = (ge > ge.transpose(0, 1)).any(0)  # (N, B): some i with ge[i, j] and not ge[j, i]
    front = torch.diagonal(ge, dim1=0, dim2=1) > dominated.T  # (B, N); ge[i, i] is false iff NaN
    return front.reshape(s.shape[:-1])


@accepts_numpy
def pareto_mask(
    scores: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Non-dominated rows of each set: the Pareto front (paper eq. 4, maximisation).

    A row is on the front iff no other row dominates it, it has no NaN and it is ``valid``. All
    copies of a duplicated front point are kept; this equals
    ``moocore.is_nondominated(scores, maximise=True, keep_weakly=True)`` on the finite valid rows.
    ``±inf`` are ordinary values on every backend: ``[[-inf, 1, 0], [2, 0, 2], [1, 0, 1]]`` gives
    ``[True, True, False]`` (nothing beats the second reward of row 0).

    Args:
        scores: Reward vectors, shape (..., N, M), any float or integer dtype; higher is better.
        valid: Optional bool mask (..., N) of real rows in a padded batch; padding rows are never
            on the front and never dominate.
        backend: ``"torch"`` (batched dominance matrix, any device), ``"moocore"`` (CPU, one set at a
            time, sub-quadratic) or ``"auto"``: moocore for CPU sets with ``N >= MOOCORE_MIN_N`` when
            moocore is installed, torch otherwise. The result does not depend on the backend.
        max_bytes: Byte budget of the torch path's temporaries; bigger sets are chunked over rows.

    Returns:
        Bool tensor (..., N), on the device of ``scores``.

    Raises:
        ValueError: unknown ``backend``, ``backend="moocore"`` without moocore installed, or bad shapes
            (see :func:`dominance_matrix`).
    """
    if backend not in ("auto", "torch", "moocore"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'moocore', got {backend!r}.")
    s = _prepare(scores, valid, "scores", "valid")
    n = s.shape[-2]
    use_moocore = backend == "moocore" or (
        backend == "auto" and s.device.type == "cpu" and n >= MOOCORE_MIN_N and moocore is not None
    )
    if use_moocore:
        return _pareto_mask_moocore(s.cpu()).to(s.device)
    batch_numel = math.prod(s.shape[:-2])
    chunk = _chunk_rows(s, batch_numel, n, n, max_bytes)
    if chunk >= n and not _fused(s) and batch_numel >= BATCH_INNER_MIN:
        return _pareto_mask_batch_inner(s)
    if chunk >= n:
        ge = _all_cmp(s, s, torch.ge)  # (..., N, N): ge[i, j] = s_i >= s_j everywhere
        dominated = (ge.mT > ge).any(-1)  # [j, i] = ge[i, j] and not ge[j, i]: i dominates j
        return ge.diagonal(dim1=-2, dim2=-1) > dominated  # ge[i, i] is false iff row i has a NaN
    dominated = torch.empty(s.shape[:-1], dtype=torch.bool, device=s.device)
    for j0 in range(0, n, chunk):
        sj = s[..., j0 : j0 + chunk, :]
        # [j, i]: s_i >= s_j everywhere and not s_j >= s_i everywhere
        dominated[..., j0 : j0 + chunk] = (_all_cmp(sj, s, torch.le) > _all_cmp(sj, s, torch.ge)).any(-1)
    return ~torch.isnan(s).any(-1) & ~dominated


def _order_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over rewards of an order-preserving integer map of float32 values: (..., M) -> (...) int64.

    ``phi`` is strictly increasing on float values (-0.0 is mapped with 0.0), so when ``q <= p`` on
    every reward, ``p != q`` somewhere iff ``sum phi(p) > sum phi(q)``, exactly (int64 does not
    overflow for M < 2**32). This replaces the M comparisons of ``q >= p`` by one.
    """
    bits = (x + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    phi = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse the magnitude order
    return phi.sum(-1, dtype=torch.int64)


@accepts_numpy
def dominating_sets(
    queries: torch.Tensor,
    pool: torch.Tensor,
    pool_mask: torch.Tensor | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Which pool vectors dominate each query: the targets of the online strategy (paper eq. 7).

    ``S[..., q, g]`` is true iff ``pool[..., g]`` dominates ``queries[..., q]``. A query that is also
    in the pool is not dominated by its own copy. NaN pool rows and rows outside ``pool_mask`` never
    dominate; a query with a NaN is dominated by nothing (its dominating set is empty). ``±inf`` are
    ordinary values: a pool row ``[inf, 0]`` dominates a query ``[7, 0]``, and nothing dominates ``[inf, inf]``.

    Args:
        queries: Reward vectors, shape (..., Q, M).
        pool: Reward vectors, shape (..., G, M) (e.g. the gathered vectors of all processes for the
            same prompts); batch dimensions broadcast against those of ``queries``.
        pool_mask: Optional bool mask (..., G) of real pool rows.
        max_bytes: Byte budget of the temporaries; bigger problems are chunked over queries.

    Returns:
        Bool tensor (..., Q, G).

    Raises:
        ValueError: bad shapes, or ``queries`` and ``pool`` with different M.
    """
    q = _prepare(queries, None, "queries", "")
    p = _prepare(pool, pool_mask, "pool", "pool_mask")
    if q.shape[-1] != p.shape[-1]:
        raise ValueError(f"queries and pool need the same number of rewards M, got {q.shape[-1]} and {p.shape[-1]}.")
    batch = torch.broadcast_shapes(q.shape[:-2], p.shape[:-2])
    n_q, n_g = q.shape[-2], p.shape[-2]
    chunk = _chunk_rows(q, batch.numel(), n_q, n_g, max_bytes)
    if chunk >= n_q:
        # le[q, g] = q <= p everywhere (p weakly dominates q); then drop the exact duplicates (q >= p too)
        if not _fused(q) and q.dtype == p.dtype == torch.float32:
            # strictly better somewhere, given le: one integer comparison instead of M float ones
            return _all_cmp(q, p, torch.le) & (_order_sum(q)[..., :, None] < _order_sum(p)[..., None, :])
        return _all_cmp(q, p, torch.le) > _all_cmp(q, p, torch.ge)
    out = torch.empty(batch + (n_q, n_g), dtype=torch.bool, device=q.device)
    for r0 in range(0, n_q, chunk):
        qr = q[..., r0 : r0 + chunk, :]
        out[..., r0 : r0 + chunk, :] = _all_cmp(qr, p, torch.le) > _all_cmp(qr, p, torch.ge)
    return out


@accepts_numpy
def dominated_by(
    points: torch.Tensor,
    front: torch.Tensor,
    front_mask: torch.Tensor | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """Which points at least one front point dominates (the source set of the offline strategy).

    Args:
        points: Reward vectors, shape (..., Q, M).
        front: Reward vectors, shape (..., F, M); batch dimensions broadcast against ``points``.
        front_mask: Optional bool mask (..., F) of real front rows (padding never dominates).
        max_bytes: Byte budget of the temporaries.

    Returns:
        Bool tensor (..., Q). NaN points are never dominated, NaN front rows never dominate, and ``±inf``
        are ordinary values (the rules of :func:`dominating_sets`, which this reduces).

    Raises:
        ValueError: bad shapes, or ``points`` and ``front`` with different M.
    """
    return dominating_sets(points, front, front_mask, max_bytes=max_bytes).any(-1)
