"""pgot.ot_loss against POT's per-problem log-domain Sinkhorn.

Oracle: ``T = ot.sinkhorn(a, b, C, reg, method="sinkhorn_log")`` for each problem on its own, value
``<T, C>`` with ``C_ij = |x_i - y_j|^2`` and envelope gradient ``dL/dx_i = sum_j T_ij 2 (x_i - y_j)``.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

ot = pytest.importorskip("ot")  # before pgot: pgot.ot_loss needs POT

from pgot.ot_loss import OTConvergenceWarning, ot_loss  # noqa: E402

EPS = 0.5


def _pot_reference(x, y, a=None, b=None, reg=EPS):
    """Value and envelope gradient of one problem from POT's single-problem sinkhorn_log (float64)."""
    x, y = x.detach().double(), y.detach().double()
    a = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64) if a is None else a.double() / a.sum()
    b = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64) if b is None else b.double() / b.sum()
    diff = x[:, None, :] - y[None, :, :]
    cost = diff.square().sum(-1)
    plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=100_000, stopThr=1e-15)
    return (plan * cost).sum(), 2 * (plan[..., None] * diff).sum(1)


def _batch(dtype, gen, shape=(6, 7, 4), f=5, m=3):
    x = torch.randn(*shape[:-2], shape[-2], m, generator=gen, dtype=torch.float64)
    y = torch.randn(*shape[:-2], f, m, generator=gen, dtype=torch.float64) + 1.0
    return x.to(dtype).requires_grad_(True), y.to(dtype)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_values_and_envelope_gradients_match_pot(dtype, atol):
    x, y = _batch(dtype, torch.Generator().manual_seed(0), shape=(6, 7, 3))
    loss = ot_loss(x, y, epsilon=EPS, max_iter=5000, tol=1e-6 if dtype == torch.float32 else 1e-12)
    assert loss.shape == (6,) and loss.dtype == dtype
    loss.sum().backward()
    for i in range(6):
        value, grad = _pot_reference(x[i], y[i])
        torch.testing.assert_close(loss[i].double(), value, atol=atol, rtol=0)
        torch.testing.assert_close(x.grad[i].double(), grad, atol=atol, rtol=0)


def test_target_gets_no_gradient_and_batch_dims_are_kept():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = ot_loss(x, y, epsilon=EPS, max_iter=2000, tol=1e-12)
    assert loss.shape == (2, 3)
    loss.sum().backward()
    assert y.grad is None
    value, grad = _pot_reference(x[1, 2], y[1, 2])
    torch.testing.assert_close(loss[1, 2], value, atol=1e-8, rtol=0)
    torch.testing.assert_close(x.grad[1, 2], grad, atol=1e-8, rtol=0)


def test_ragged_problems_in_one_call_equal_separate_problems():
    """Zero weights mark padding: padded coordinates (here huge and NaN) must not matter."""
    gen = torch.Generator().manual_seed(2)
    sizes = [(3, 2), (7, 5), (1, 1), (5, 3)]
    x = torch.full((4, 7, 3), 1e6, dtype=torch.float64)
    y = torch.full((4, 5, 3), float("nan"), dtype=torch.float64)
    wx, wy = torch.zeros(4, 7, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64)
    for i, (n, f) in enumerate(sizes):
        x[i, :n] = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        y[i, :f] = torch.randn(f, 3, generator=gen, dtype=torch.float64)
        wx[i, :n] = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5  # non-uniform, unnormalised
        wy[i, :f] = 1.0
    x.requires_grad_(True)
    loss = ot_loss(x, y, wx, wy, epsilon=EPS, max_iter=5000, tol=1e-12)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    for i, (n, f) in enumerate(sizes):
        value, grad = _pot_reference(x[i, :n], y[i, :f], wx[i, :n], wy[i, :f])
        torch.testing.assert_close(loss[i], value, atol=1e-8, rtol=0)
        torch.testing.assert_close(x.grad[i, :n], grad, atol=1e-8, rtol=0)
        assert (x.grad[i, n:] == 0).all()


def test_empty_problems_give_zero_and_zero_gradient():
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 3, 2, dtype=torch.float64)
    wx = torch.tensor([[1.0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    wy = torch.tensor([[0.0, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float64)
    loss = ot_loss(x, y, wx, wy, epsilon=EPS, max_iter=1000, tol=1e-10)
    loss.sum().backward()
    assert loss[0] == 0 and loss[1] == 0 and loss[2] > 0
    assert (x.grad[:2] == 0).all() and torch.isfinite(x.grad).all()
    # every problem empty: still a graph, backward works, all zero
    x2 = torch.randn(2, 3, 2, requires_grad=True)
    loss2 = ot_loss(x2, torch.randn(2, 2, 2), torch.zeros(2, 3), epsilon=EPS, max_iter=10, tol=1e-6)
    loss2.sum().backward()
    assert (loss2 == 0).all() and (x2.grad == 0).all()
    # no target points at all (F = 0), NaN rewards: zeros, a graph, no NaN
    x3 = torch.full((2, 3, 2), float("nan"), requires_grad=True)
    loss3 = ot_loss(x3, torch.zeros(2, 0, 2), epsilon=EPS, max_iter=10, tol=1e-6)
    loss3.sum().backward()
    assert (loss3 == 0).all() and (x3.grad == 0).all()


def test_warning_names_the_knobs_when_not_converged():
    x, y = _batch(torch.float64, torch.Generator().manual_seed(3))
    with pytest.warns(OTConvergenceWarning, match=r"ot\.max_iter.*ot\.epsilon"):
        ot_loss(x, y, epsilon=0.01, max_iter=2, tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ot_loss(x, y, epsilon=EPS, max_iter=3000, tol=1e-9)


def test_small_epsilon_stays_finite_in_float32():
    """Log-domain only: the kernel-space solver underflows to a zero plan at reg <= 0.01 in float32."""
    x, y = _batch(torch.float32, torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OTConvergenceWarning)
        loss = ot_loss(x, y, epsilon=1e-3, max_iter=50, tol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss > 0).all() and torch.isfinite(x.grad).all()


def test_bfloat16_input_is_solved_in_float32():
    x, y = _batch(torch.float64, torch.Generator().manual_seed(5))
    ref = ot_loss(x.float(), y.float(), epsilon=EPS, max_iter=2000, tol=1e-6)
    loss = ot_loss(x.bfloat16(), y.bfloat16(), epsilon=EPS, max_iter=2000, tol=1e-6)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=0.1, rtol=0.05)


def test_bad_arguments_raise():
    x, y = torch.zeros(2, 3, 2), torch.zeros(2, 4, 2)
    with pytest.raises(ValueError, match="ot.epsilon"):
        ot_loss(x, y, epsilon=0.0, max_iter=10, tol=1e-6)
    with pytest.raises(ValueError, match="same number of rewards"):
        ot_loss(x, torch.zeros(2, 4, 3), epsilon=1.0, max_iter=10, tol=1e-6)
    with pytest.raises(ValueError, match="target_weights"):
        ot_loss(x, y, None, torch.ones(2, 3), epsilon=1.0, max_iter=10, tol=1e-6)


@pytest.mark.parametrize(
    ("weights", "where"),
    [
        (torch.full((2, 3), -1.0), r"source_weights\[0, 0\] = -1\.0"),
        (torch.full((2, 3), float("nan")), r"source_weights\[0, 0\] = nan"),
        (torch.tensor([1.0, -0.5, 1.0]), r"source_weights\[1\] = -0\.5"),
        (torch.tensor([1.0, float("inf"), 1.0]), r"source_weights\[1\] = inf"),
        (torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, float("-inf")]]), r"source_weights\[1, 2\] = -inf"),
    ],
)
@pytest.mark.parametrize("side", ["source", "target"])
def test_weights_must_be_finite_and_non_negative(weights, where, side):
    """Before: all -1 or all NaN gave 0 silently, a mixed or infinite weight gave NaN."""
    x, y = torch.randn(2, 3, 2), torch.randn(2, 3, 2)
    kw = {f"{side}_weights": weights}
    with pytest.raises(
        ValueError, match=r"^" + side + r"_weights must be finite and >= 0 .*" + where.replace("source", side)
    ):
        ot_loss(x, y, **kw, epsilon=EPS, max_iter=10, tol=1e-6)
    ok = torch.tensor([0.0, 2.0, 0.5])  # zeros (padding) and unnormalised weights stay accepted
    assert torch.isfinite(ot_loss(x, y, **{f"{side}_weights": ok}, epsilon=EPS, max_iter=500, tol=1e-6)).all()


@pytest.mark.parametrize("key", ["epsilon", "tol"])
@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_epsilon_and_tol_must_be_finite_and_positive(key, bad):
    kw = {"epsilon": EPS, "max_iter": 10, "tol": 1e-6, key: bad}
    with pytest.raises(ValueError, match=rf"^ot\.{key} must be a finite number > 0, got {bad}\."):
        ot_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), **kw)


def test_max_iter_must_be_at_least_one():
    with pytest.raises(ValueError, match=r"^ot\.max_iter must be >= 1, got 0\."):
        ot_loss(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), epsilon=EPS, max_iter=0, tol=1e-6)


def test_batch_shapes_that_do_not_broadcast_name_every_shape():
    """Before: torch's RuntimeError 'Attempting to broadcast'."""
    with pytest.raises(ValueError, match=r"do not broadcast: source \(2, 3, 2\), target \(3, 4, 2\) "):
        ot_loss(torch.zeros(2, 3, 2), torch.zeros(3, 4, 2), epsilon=EPS, max_iter=10, tol=1e-6)
    with pytest.raises(ValueError, match=r"source \(2, 3, 2\), target \(2, 4, 2\), target_weights \(5, 4\)"):
        ot_loss(torch.zeros(2, 3, 2), torch.zeros(2, 4, 2), None, torch.ones(5, 4), epsilon=EPS, max_iter=10, tol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("side", "n"), [("source", 4), ("target", 4), ("source", 1), ("target", 1)])
def test_non_finite_point_makes_its_problem_nan_without_the_sinkhorn_warning(bad, side, n):
    """Before: the misleading 'did not reach its marginal tolerance ... Raise ot.max_iter' warning."""
    x, y = _batch(torch.float64, torch.Generator().manual_seed(6), shape=(3, n, 3))
    x = x.detach().clone()
    ref = ot_loss(x, y, epsilon=EPS, max_iter=3000, tol=1e-9)
    (x if side == "source" else y)[1, 0, 2] = bad
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = ot_loss(x, y, epsilon=EPS, max_iter=3000, tol=1e-9)
    assert math.isnan(loss[1].item())
    torch.testing.assert_close(loss[[0, 2]], ref[[0, 2]], atol=1e-10, rtol=0)  # the other problems are unaffected
    loss[[0, 2]].sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
    # the same point as padding (weight 0) is ignored
    w = torch.ones(3, x.shape[-2] if side == "source" else y.shape[-2], dtype=torch.float64)
    w[1, 0] = 0.0
    kw = {f"{side}_weights": w}
    if w.shape[-1] > 1:
        assert torch.isfinite(ot_loss(x, y, **kw, epsilon=EPS, max_iter=3000, tol=1e-9)).all()


@pytest.mark.parametrize("side", ["source", "target"])
def test_single_point_side_is_exact_without_iterating(side):
    """With one point on a side the only coupling is a b^T; POT converged agrees, and max_iter=1 does not warn."""
    gen = torch.Generator().manual_seed(3)
    if side == "source":
        x = torch.randn(5, 1, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
        y = torch.randn(5, 6, 3, generator=gen, dtype=torch.float64)
    else:
        x = torch.randn(5, 6, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
        y = torch.randn(5, 1, 3, generator=gen, dtype=torch.float64)
    weights = torch.rand(5, 6, generator=gen, dtype=torch.float64)
    weights[0, :3] = 0.0  # padding on the many-point side
    kw = {"target_weights": weights} if side == "source" else {"source_weights": weights}
    with warnings.catch_warnings():
        warnings.simplefilter("error", OTConvergenceWarning)
        loss = ot_loss(x, y, epsilon=1e-3, max_iter=1, tol=1e-12, **kw)
    loss.sum().backward()
    for i in range(5):
        a = None if side == "source" else weights[i]
        b = weights[i] if side == "source" else None
        value, grad = _pot_reference(x[i], y[i], a=a, b=b, reg=1e-3)
        torch.testing.assert_close(loss[i], value, atol=1e-8, rtol=0)
        torch.testing.assert_close(x.grad[i], grad, atol=1e-8, rtol=0)


@pytest.mark.parametrize("objective", ["pgot_offline", "pgot_online"])
def test_objectives_raise_the_same_errors_through_ot_loss(objective):
    from pgot import objectives

    scores = torch.randn(2, 3, 2)
    front, mask = torch.randn(2, 4, 2) + 3.0, torch.ones(2, 4, dtype=torch.bool)
    fn = getattr(objectives, objective)
    with pytest.raises(ValueError, match=r"^ot\.tol must be a finite number > 0, got -1\.0\."):
        fn(scores, front, mask, epsilon=EPS, max_iter=10, tol=-1.0)
    with pytest.raises(ValueError, match=r"^ot\.epsilon must be a finite number > 0, got nan\."):
        fn(scores, front, mask, epsilon=float("nan"), max_iter=10, tol=1e-6)
    # a -inf sample is dominated by the whole front: its problem is NaN, with no Sinkhorn warning
    scores[0, 0, 0] = float("-inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(fn(scores, front, mask, epsilon=EPS, max_iter=2000, tol=1e-6).item())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ot.epsilon=inf", "ot.epsilon must be a finite number, got inf."),
        ("ot.tol=inf", "ot.tol must be a finite number, got inf."),
        ("ot.tol=nan", "ot.tol must be a finite number, got nan."),
    ],
)
def test_config_refuses_what_ot_loss_refuses(override, message):
    """The config check (pgot.config) applies ot_loss's knob rules before any model loads."""
    from pathlib import Path

    from pgot.config import load_config

    debug = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(debug, [override], "train")


@pytest.mark.parametrize("n", [1, 4])
def test_overflowing_squared_distance_is_nan_without_the_sinkhorn_warning(n):
    """float32 points 3e19 apart: |x - y|^2 overflows to inf; that problem is NaN, the others exact."""
    x, y = _batch(torch.float32, torch.Generator().manual_seed(7), shape=(3, n, 2))
    ref = ot_loss(x, y, epsilon=EPS, max_iter=3000, tol=1e-5)
    x = x.detach().clone()
    x[0, 0, 1] = 3e19
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = ot_loss(x, y, epsilon=EPS, max_iter=3000, tol=1e-5)
    assert math.isnan(loss[0].item())
    torch.testing.assert_close(loss[1:], ref[1:].detach())
