"""pgot.pareto against brute force (a pure-Python double loop) and moocore.

Dominance (maximisation): a dominates b iff a >= b on every reward and a > b on one. Duplicates do
not dominate each other; NaN rows and padding rows never dominate and are never on a front.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgot.pareto import dominance_matrix, dominated_by, dominating_sets, pareto_mask

moocore = pytest.importorskip("moocore")


def _bad(row) -> bool:
    return any(math.isnan(v) for v in row)


def _dominates(a, b) -> bool:
    """Brute-force oracle on Python floats; a row with a NaN never dominates and is never dominated."""
    if _bad(a) or _bad(b):
        return False
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def _brute_matrix(rows, valid=None):
    n = len(rows)
    ok = [True] * n if valid is None else valid
    return [[ok[i] and ok[j] and _dominates(rows[i], rows[j]) for j in range(n)] for i in range(n)]


def _brute_front(rows, valid=None):
    n = len(rows)
    ok = [True] * n if valid is None else valid
    d = _brute_matrix(rows, ok)
    return [ok[j] and not _bad(rows[j]) and not any(d[i][j] for i in range(n)) for j in range(n)]


def _moocore_front(rows: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """moocore on the finite valid rows only (moocore itself lets a NaN wipe out the front)."""
    keep = ~np.isnan(rows).any(-1)
    if valid is not None:
        keep &= valid
    out = np.zeros(len(rows), dtype=bool)
    if keep.any():
        out[np.flatnonzero(keep)] = moocore.is_nondominated(rows[keep], maximise=True, keep_weakly=True)
    return out


def _cases(gen: torch.Generator):
    """Random, tie-heavy (small integers), duplicated and NaN-holding (B, N, M) batches."""
    rand = torch.randn(6, 17, 3, generator=gen, dtype=torch.float64)
    ties = torch.randint(0, 3, (6, 17, 4), generator=gen).to(torch.float32)
    dups = torch.randint(0, 4, (5, 9, 2), generator=gen).to(torch.float64).repeat(1, 2, 1)  # every row twice
    nans = torch.randint(0, 3, (6, 15, 3), generator=gen).to(torch.float64)
    nans[torch.rand(nans.shape, generator=gen) < 0.1] = float("nan")
    return {"random": rand, "ties": ties, "duplicates": dups, "nan": nans}


@pytest.mark.parametrize("case", ["random", "ties", "duplicates", "nan"])
def test_dominance_matrix_and_front_match_brute_force_and_moocore(case):
    scores = _cases(torch.Generator().manual_seed(1))[case]
    dom = dominance_matrix(scores)
    front = pareto_mask(scores, backend="torch")
    for b in range(scores.shape[0]):
        rows = scores[b].tolist()
        assert dom[b].tolist() == _brute_matrix(rows)
        assert front[b].tolist() == _brute_front(rows)
        np.testing.assert_array_equal(front[b].numpy(), _moocore_front(scores[b].double().numpy()))


@pytest.mark.parametrize("case", ["random", "ties", "duplicates", "nan"])
def test_batch_inner_cpu_kernel_matches_brute_force(case, monkeypatch):
    """The CPU kernel for many sets (batch innermost), forced on for these small batches."""
    import pgot.pareto as pareto

    scores = _cases(torch.Generator().manual_seed(10))[case]
    expect = pareto_mask(scores, backend="torch")
    monkeypatch.setattr(pareto, "BATCH_INNER_MIN", 1)
    front = pareto_mask(scores, backend="torch")
    for b in range(scores.shape[0]):
        assert front[b].tolist() == _brute_front(scores[b].tolist())
    torch.testing.assert_close(front, expect)
    valid = torch.rand(scores.shape[:-1], generator=torch.Generator().manual_seed(11)) > 0.3
    torch.testing.assert_close(
        pareto_mask(scores, valid, backend="torch"), pareto_mask(scores, valid, backend="torch", max_bytes=1)
    )


def test_documented_tie_and_nan_semantics():
    """Ties: duplicates of a front point are all kept. NaN: the valid front survives (1 0 1 1 0 0)."""
    ties = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 2], [0, 2], [0.5, 0.5]])
    assert pareto_mask(ties).tolist() == [True, True, False, True, True, False]
    nan = float("nan")
    rows = torch.tensor([[1, 1], [nan, 5], [0, 2], [2, 0], [nan, nan], [0.5, 0.5]])
    assert pareto_mask(rows).tolist() == [True, False, True, True, False, False]
    assert not dominance_matrix(rows)[[1, 4]].any() and not dominance_matrix(rows)[:, [1, 4]].any()


def test_padded_batch_equals_unpadded_sets():
    """Padding rows (garbage values that would dominate everything) never dominate, never on the front."""
    gen = torch.Generator().manual_seed(2)
    sizes = [1, 5, 12, 0]
    scores = torch.full((4, 12, 3), 100.0)  # padding value dominates every real row
    valid = torch.zeros(4, 12, dtype=torch.bool)
    for b, n in enumerate(sizes):
        scores[b, :n] = torch.randint(0, 4, (n, 3), generator=gen).float()
        valid[b, :n] = True
    front = pareto_mask(scores, valid, backend="torch")
    dom = dominance_matrix(scores, valid)
    for b, n in enumerate(sizes):
        assert not front[b, n:].any()
        assert not dom[b, n:].any() and not dom[b, :, n:].any()
        torch.testing.assert_close(front[b, :n], pareto_mask(scores[b, :n]))
        torch.testing.assert_close(dom[b, :n, :n], dominance_matrix(scores[b, :n]))


def test_chunked_paths_equal_unchunked():
    """A tiny byte budget forces the row-chunked code paths; results must not change."""
    scores = torch.randint(0, 4, (3, 40, 3), generator=torch.Generator().manual_seed(3)).float()
    valid = torch.rand(3, 40, generator=torch.Generator().manual_seed(4)) > 0.2
    for v in (None, valid):
        torch.testing.assert_close(dominance_matrix(scores, v, max_bytes=1), dominance_matrix(scores, v))
        torch.testing.assert_close(
            pareto_mask(scores, v, backend="torch", max_bytes=1), pareto_mask(scores, v, backend="torch")
        )
    queries, pool = scores[:, :13], scores[:, 13:]
    torch.testing.assert_close(dominating_sets(queries, pool, max_bytes=1), dominating_sets(queries, pool))


@pytest.mark.parametrize("n", [300, 1200])
def test_moocore_backend_equals_torch_backend(n):
    """The CPU dispatch for large sets keeps the torch semantics (NaN rows, padding, duplicates)."""
    gen = torch.Generator().manual_seed(n)
    scores = torch.randint(0, 30, (2, n, 3), generator=gen).float()
    scores[0, :5] = float("nan")
    valid = torch.rand(2, n, generator=gen) > 0.1
    torch.testing.assert_close(
        pareto_mask(scores, valid, backend="moocore"), pareto_mask(scores, valid, backend="torch")
    )
    torch.testing.assert_close(pareto_mask(scores, valid), pareto_mask(scores, valid, backend="torch"))  # auto


def test_unbatched_and_integer_inputs():
    scores = torch.tensor([[3, 1], [1, 3], [1, 1], [3, 1]])  # int64
    assert pareto_mask(scores).tolist() == [True, True, False, True]
    assert dominance_matrix(scores).tolist() == [
        [False, False, True, False],
        [False, False, True, False],
        [False, False, False, False],
        [False, False, True, False],
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dominating_sets_and_dominated_by_match_brute_force(dtype):
    gen = torch.Generator().manual_seed(5)
    queries = (torch.randint(0, 3, (3, 7, 3), generator=gen) - 1).to(dtype)  # negative, zero and positive ties
    pool = torch.cat([queries, (torch.randint(0, 3, (3, 6, 3), generator=gen) - 1).to(dtype)], dim=1)  # holds queries
    queries[0, 0, 1] = float("nan")  # a NaN query is dominated by nothing
    pool[1, 9, 0] = float("nan")  # a NaN pool row dominates nothing
    pool_mask = torch.rand(3, 13, generator=gen) > 0.2
    sets = dominating_sets(queries, pool, pool_mask)
    flags = dominated_by(queries, pool, pool_mask)
    assert sets.shape == (3, 7, 13) and flags.shape == (3, 7)
    for b in range(3):
        for q in range(7):
            expect = [
                bool(pool_mask[b, g]) and _dominates(pool[b, g].tolist(), queries[b, q].tolist()) for g in range(13)
            ]
            assert sets[b, q].tolist() == expect
            assert bool(flags[b, q]) == any(expect)
    assert not sets[0, 0].any()
    assert not sets[1, :, 9].any()


def test_dominating_sets_random_float32_matches_float64():
    """float32 on CPU takes the integer-sum shortcut; float64 the plain comparisons."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(40, 3, generator=gen)
    p = torch.cat([q, torch.randn(60, 3, generator=gen), -q.abs(), torch.nextafter(q, q + 1)])
    torch.testing.assert_close(dominating_sets(q, p), dominating_sets(q.double(), p.double()))


def test_dominated_by_broadcasts_one_front_over_a_batch():
    front = torch.tensor([[2.0, 2.0], [3.0, 0.0]])
    points = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 0.0]], [[2.5, 0.0], [0.0, 3.0], [2.0, 1.0]]])
    assert dominated_by(points, front).tolist() == [[True, False, False], [True, False, True]]


def test_shape_errors():
    with pytest.raises(ValueError, match="valid must have shape"):
        pareto_mask(torch.zeros(2, 3, 2), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same number of rewards"):
        dominating_sets(torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="backend"):
        pareto_mask(torch.zeros(3, 2), backend="numba")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_signed_zero_and_infinity(dtype):
    """-0.0 equals 0.0 (a duplicate, not a dominator); inf is larger than every finite value."""
    queries = torch.tensor([[-0.0, 1.0], [3e38, 0.0]], dtype=dtype)
    pool = torch.tensor([[0.0, 1.0], [float("inf"), 0.0], [3e38, 0.0]], dtype=dtype)
    assert dominating_sets(queries, pool).tolist() == [[False, False, False], [False, True, False]]
    assert pareto_mask(torch.cat([queries, pool])).tolist() == [True, False, True, True, False]


def test_fused_accelerator_path_equals_cpu_path(monkeypatch):
    """The broadcast (..., A, C, M) path used on GPUs, forced on CPU, gives the same results."""
    import pgot.pareto as pareto

    scores = _cases(torch.Generator().manual_seed(6))["nan"]
    valid = torch.rand(scores.shape[:-1], generator=torch.Generator().manual_seed(7)) > 0.2
    expect = (
        pareto_mask(scores, valid, backend="torch"),
        dominance_matrix(scores, valid),
        dominating_sets(scores[:, :5], scores, valid),
    )
    monkeypatch.setattr(pareto, "_fused", lambda x: True)
    got = (
        pareto_mask(scores, valid, backend="torch"),
        dominance_matrix(scores, valid),
        dominating_sets(scores[:, :5], scores, valid),
    )
    for e, g in zip(expect, got, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    scores = _cases(torch.Generator().manual_seed(8))["nan"]
    torch.testing.assert_close(pareto_mask(scores.cuda()).cpu(), pareto_mask(scores))
    torch.testing.assert_close(dominating_sets(scores.cuda(), scores.cuda()).cpu(), dominating_sets(scores, scores))


# --------------------------------------------------------------------------------------------
# Non-finite rewards: NaN rows are incomparable, ±inf are ordinary ordered values, on every path
# --------------------------------------------------------------------------------------------

_CRASH_CASES = r"""
import json, sys
import torch
from pgot.pareto import pareto_mask
inf = float("inf")
x = torch.randint(0, 3, (256, 3), generator=torch.Generator().manual_seed(0)).double()
x[5, 1] = inf  # issue 10: SIGSEGV inside moocore on the default backend (N >= MOOCORE_MIN_N)
small = torch.tensor([[-inf, 1.0, 0.0], [2.0, 0.0, 2.0], [1.0, 0.0, 1.0]])
out = {
    "default_256": pareto_mask(x).tolist(),
    "torch_256": pareto_mask(x, backend="torch").tolist(),
    "moocore_small": pareto_mask(small, backend="moocore").tolist(),
    "moocore_small_f64": pareto_mask(small.double(), backend="moocore").tolist(),
}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def moocore_survives_infinity():
    """Run the reported crashing cases in a child process first: a regression fails here, and the in-process
    moocore tests below are not run (they would take pytest down with a segmentation fault)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_CASES], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )
    if proc.returncode != 0:
        pytest.fail(f"pareto_mask on infinities exited with {proc.returncode} (139 = SIGSEGV):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def test_reported_infinity_cases_in_a_subprocess(moocore_survives_infinity):
    out = moocore_survives_infinity
    x = torch.randint(0, 3, (256, 3), generator=torch.Generator().manual_seed(0)).double()
    x[5, 1] = float("inf")
    expect = _oracle_front(x.numpy()).tolist()
    assert out["default_256"] == expect and out["torch_256"] == expect
    assert expect[5]  # (.., inf, ..) with a 0..2 elsewhere is not dominated
    assert out["moocore_small"] == [True, True, False]  # was [False, True, False]
    assert out["moocore_small_f64"] == [True, True, False]


def _oracle_dominates(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Brute force from the definition: ``out[i, j]`` iff ``x_i >= y_j`` everywhere and ``>`` somewhere, neither NaN.

    x (A, M), y (C, M) float64 (every float dtype widens to float64 exactly) -> (A, C) bool.
    """
    ge = (x[:, None, :] >= y[None, :, :]).all(-1)
    gt = (x[:, None, :] > y[None, :, :]).any(-1)
    comparable = ~np.isnan(x).any(-1)[:, None] & ~np.isnan(y).any(-1)[None, :]
    return ge & gt & comparable


def _oracle_front(x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    keep = ~np.isnan(x).any(-1) if valid is None else valid & ~np.isnan(x).any(-1)
    return keep & ~(_oracle_dominates(x, x) & keep[:, None]).any(0)


def _sprinkled(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, rate: float = 0.06) -> torch.Tensor:
    """Tie-heavy small integers with NaN, +inf and -inf cells, each at ``rate``."""
    x = (torch.randint(0, 4, shape, generator=gen) - 1).to(torch.float64)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    x[u < rate] = float("nan")
    x[(u >= rate) & (u < 2 * rate)] = float("inf")
    x[(u >= 2 * rate) & (u < 3 * rate)] = float("-inf")
    return x.to(dtype)


_PATHS = ["cpu", "batch_inner", "chunked", "fused", "fused_chunked"]
_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _force_path(path: str, monkeypatch) -> dict:
    """Select a torch kernel on CPU: the per-reward loop, the batch-innermost kernel, the (..., A, C, M) broadcast
    that runs on accelerators (``_fused``), and their row-chunked forms. Returns the keyword arguments to pass."""
    import pgot.pareto as pareto

    if path == "batch_inner":
        monkeypatch.setattr(pareto, "BATCH_INNER_MIN", 1)
    if path.startswith("fused"):
        monkeypatch.setattr(pareto, "_fused", lambda x: True)
    return {"max_bytes": 1} if path.endswith("chunked") else {}


# max_bytes=1 at N=300 would be 300 kernel calls: the chunked paths are tried up to N=40, which covers them
_NONFINITE_CASES = [
    (path, dtype, n)
    for path in _PATHS
    for dtype in _DTYPES
    for n in (1, 7, 40, 300)
    if not (n == 300 and path.endswith("chunked"))
]


@pytest.mark.parametrize(("path", "dtype", "n"), _NONFINITE_CASES)
def test_torch_paths_match_brute_force_on_nonfinite(path, dtype, n, monkeypatch):
    """pareto_mask(backend='torch'), dominance_matrix, dominating_sets and dominated_by on every torch path."""
    gen = torch.Generator().manual_seed(n * 31 + _DTYPES.index(dtype))
    b, m = (3, 3) if n < 300 else (2, 4)
    scores = _sprinkled(gen, (b, n, m), dtype)
    valid = torch.rand(b, n, generator=gen) > 0.25
    queries = _sprinkled(gen, (b, 9, m), dtype)
    kw = _force_path(path, monkeypatch)
    x, xq = scores.double().numpy(), queries.double().numpy()
    for v in (None, valid):
        ok = np.ones((b, n), dtype=bool) if v is None else v.numpy()
        front = pareto_mask(scores, v, backend="torch", **kw)
        dom = dominance_matrix(scores, v, **kw)
        sets = dominating_sets(queries, scores, v, **kw)
        flags = dominated_by(queries, scores, v, **kw)
        for i in range(b):
            d = _oracle_dominates(x[i], x[i]) & ok[i][:, None] & ok[i][None, :]
            assert dom[i].numpy().tolist() == d.tolist()
            assert front[i].numpy().tolist() == _oracle_front(x[i], ok[i]).tolist()
            s = (_oracle_dominates(x[i], xq[i]) & ok[i][:, None]).T  # (Q, G): pool row g dominates query q
            assert sets[i].numpy().tolist() == s.tolist()
            assert flags[i].numpy().tolist() == s.any(-1).tolist()
    cells = torch.cat([scores.flatten(), queries.flatten()])
    assert torch.isnan(cells).any() and (cells == float("inf")).any() and (cells == float("-inf")).any()


@pytest.mark.parametrize("n", [1, 7, 40, 255, 256, 300])
@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("backend", ["moocore", "auto"])
def test_moocore_and_auto_match_brute_force_on_nonfinite(backend, dtype, n, moocore_survives_infinity):
    gen = torch.Generator().manual_seed(1000 + n * 7 + _DTYPES.index(dtype))
    for shape in ((n, 3), (2, n, 3), (2, n, 1)):
        scores = _sprinkled(gen, shape, dtype)
        valid = torch.rand(shape[:-1], generator=gen) > 0.25
        for v in (None, valid):
            got = pareto_mask(scores, v, backend=backend).numpy().reshape(-1, n)
            x = scores.double().numpy().reshape(-1, n, shape[-1])
            ok = np.ones(x.shape[:2], dtype=bool) if v is None else v.numpy().reshape(-1, n)
            for i in range(x.shape[0]):
                assert got[i].tolist() == _oracle_front(x[i], ok[i]).tolist()


def test_infinite_only_columns_and_rows(moocore_survives_infinity):
    """Whole columns of ±inf, a row of +inf (dominates every row with something finite), duplicated ±inf rows."""
    inf, nan = float("inf"), float("nan")
    rows = torch.tensor(
        [[inf, inf], [inf, inf], [-inf, -inf], [3.0, -inf], [3.0, 2.0], [nan, inf], [-inf, inf], [inf, nan]]
    )
    expect = [True, True, False, False, False, False, False, False]  # [inf, inf] beats [-inf, inf] on reward 0
    for backend in ("torch", "moocore"):
        assert pareto_mask(rows, backend=backend).tolist() == expect
        assert pareto_mask(rows.repeat(40, 1), backend=backend).tolist() == expect * 40
    col = torch.tensor([[inf, 1.0], [inf, 2.0], [inf, 0.0]])
    assert pareto_mask(col, backend="moocore").tolist() == [False, True, False]
    d = dominance_matrix(rows)
    assert d[0, 2] and d[0, 3] and d[0, 4] and d[0, 6] and not d[0, 1] and not d[1, 0] and d[4, 3] and d[6, 2]
    assert not d[5].any() and not d[:, 5].any() and not d[7].any() and not d[:, 7].any()


def test_finite_ranks_keep_every_relation():
    """The moocore guard: dense ranks per infinite column give the same dominance matrix, and are finite."""
    from pgot.pareto import _finite_ranks

    gen = torch.Generator().manual_seed(12)
    x = _sprinkled(gen, (60, 4), torch.float64, rate=0.1)
    x = x[~torch.isnan(x).any(-1)].numpy()
    x[0, 0], x[1, 0] = -0.0, 0.0  # equal, must share a rank
    r = _finite_ranks(x)
    assert np.isfinite(r).all() and r[0, 0] == r[1, 0]
    np.testing.assert_array_equal(_oracle_dominates(r, r), _oracle_dominates(x, x))
    finite = np.arange(12.0).reshape(4, 3)
    assert _finite_ranks(finite) is finite  # finite inputs are passed through, not copied
