"""pgot/arrays.py: every public maths function (pareto, ot_loss, objectives, metrics) takes NumPy arrays where it
takes tensors, returns NumPy for NumPy inputs (the same values as for torch inputs), and names the argument and the
accepted types in a TypeError when an argument has the wrong type."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("ot")  # pgot.ot_loss needs POT

from pgot import metrics, objectives, pareto  # noqa: E402
from pgot.arrays import accepts_numpy  # noqa: E402

ot_loss = importlib.import_module("pgot.ot_loss")  # `from pgot import ot_loss` is the function (pgot/__init__.py)

MODULES = [pareto, ot_loss, objectives, metrics]
OT = {"epsilon": 0.5, "max_iter": 200, "tol": 1e-6}
NAMES = ["a", "b", "c"]
SETS = {"all": NAMES, "ab": ["a", "b"]}


def _scores(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


S = _scores(2, 4, 3)  # (P, N, M)
FRONT = _scores(2, 5, 3, seed=1)
MASK = torch.tensor([[True, True, True, False, False], [True, True, False, False, False]])
CAND, BASE = _scores(6, 3, seed=2), _scores(6, 3, seed=3)
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2])

# public function -> (positional args, keyword args), all arrays as torch tensors
CASES: dict[Callable, tuple[tuple, dict]] = {
    pareto.dominance_matrix: ((S,), {}),
    pareto.pareto_mask: ((S, MASK[:, :4]), {}),
    pareto.dominated_by: ((S, FRONT, MASK), {}),
    pareto.dominating_sets: ((S, FRONT, MASK), {}),
    ot_loss.ot_loss: ((S, FRONT, None, MASK.double()), OT),
    objectives.compute: (("pgot", S), {"front": FRONT, "front_mask": MASK, **OT}),
    objectives.hetero_weighted_sum: ((S, FRONT, MASK, torch.tensor([1.0, 2.0, 1.0])), {}),
    objectives.needs_pool: (("pgot", "online"), {}),
    objectives.needs_store: (("pgot", "offline"), {}),
    objectives.normalize: ((S, torch.tensor([0.5, 1.0, 2.0])), {}),
    objectives.pgot_offline: ((S, FRONT, MASK), OT),
    objectives.pgot_online: ((S, FRONT, MASK), OT),
    objectives.separate_constraints: ((S, FRONT, MASK), {}),
    objectives.single_reward: ((S, 1), {}),
    objectives.target_loss: ((S.sum(-1) - 1.5, "hinge"), {}),
    objectives.weighted_sum: ((S, torch.tensor([1.0, 2.0, 1.0]), torch.ones(3)), {}),
    metrics.bootstrap_ci: ((CAND, GROUPS), {"num_resamples": 50}),
    metrics.bootstrap_samples: ((CAND, GROUPS), {"num_resamples": 20}),
    metrics.comparison_indicators: ((CAND, BASE, NAMES, SETS), {}),
    metrics.comparison_nonfinite: ((CAND, BASE, NAMES, SETS), {}),
    metrics.comparison_table: (({"cand": CAND, "base": BASE}, GROUPS, "base", NAMES, SETS), {"num_resamples": 20}),
    metrics.count_ground_truth: ((CAND, BASE, CAND[:, 0], BASE[:, 0], NAMES, SETS), {}),
    metrics.count_outcomes: ((CAND, BASE), {}),
    metrics.ground_truth_indicators: ((CAND, BASE, CAND[:, 0], BASE[:, 0], NAMES, SETS), {"tol": 0.01}),
    metrics.ground_truth_table: (
        ({"cand": CAND, "base": BASE}, {"cand": CAND[:, 1], "base": BASE[:, 1]}, GROUPS, "base", NAMES, SETS),
        {"num_resamples": 20},
    ),
    metrics.ground_truth_columns: ((SETS,), {}),
    metrics.gaussian_kl: ((CAND, BASE), {}),
    metrics.jcr: ((CAND, BASE), {}),
    metrics.jdr: ((CAND, BASE), {}),
    metrics.mean_score_table: (({"cand": CAND}, {"cand": GROUPS}, NAMES), {"num_resamples": 20}),
    metrics.mean_scores: ((CAND,), {}),
    metrics.rate_columns: ((NAMES, SETS), {}),
    metrics.win_rate: ((CAND, BASE), {}),
    metrics.wilson_interval: ((3, 10), {}),
}


def _public_functions() -> list[Callable]:
    return [getattr(m, n) for m in MODULES for n in m.__all__ if inspect.isfunction(getattr(m, n)) and n[0].islower()]


def _numpy(x: object) -> object:
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {k: _numpy(v) for k, v in x.items()}
    return x


def _has_array(args: tuple, kwargs: dict) -> bool:
    values = [*args, *kwargs.values()]
    values += [v for x in values if isinstance(x, dict) for v in x.values()]
    return any(isinstance(v, torch.Tensor) for v in values)


def _assert_same(got: object, want: object, where: str) -> None:
    """``got`` (from NumPy inputs) equals ``want`` (from torch inputs), converted as the module docstring says."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, (np.ndarray, np.generic)) and not isinstance(got, torch.Tensor), where
        np.testing.assert_array_equal(np.asarray(got), want.detach().numpy(), err_msg=where)
        assert np.asarray(got).dtype == want.detach().numpy().dtype, where
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want), where
        for g, w in zip(got, want, strict=True):
            _assert_same(g, w, where)
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}[{k}]")
    elif isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    elif dataclasses.is_dataclass(want):  # metrics.Outcomes: torch counts either way
        for f in dataclasses.fields(want):
            g, w = getattr(got, f.name), getattr(want, f.name)
            assert torch.equal(g, w) if isinstance(w, torch.Tensor) else g == w, f"{where}.{f.name}"
    else:
        assert got == want, where


def test_every_public_maths_function_has_a_case() -> None:
    assert {f.__qualname__ for f in _public_functions()} == {f.__qualname__ for f in CASES}
    for f in _public_functions():
        assert f.__wrapped__ is not None and f.__module__.startswith("pgot.")  # wrapped by accepts_numpy


@pytest.mark.parametrize("func", list(CASES), ids=lambda f: f.__name__)
def test_numpy_in_numpy_out_with_the_torch_values(func: Callable) -> None:
    args, kwargs = CASES[func]
    want = func(*args, **kwargs)
    if not _has_array(args, kwargs):
        np_args = tuple(np.int64(a) if isinstance(a, int) else a for a in args)  # NumPy scalars as numbers
        _assert_same(func(*np_args, **kwargs), want, func.__name__)
        return
    got = func(*(_numpy(a) for a in args), **{k: _numpy(v) for k, v in kwargs.items()})
    _assert_same(got, want, func.__name__)


@pytest.mark.parametrize("func", list(CASES), ids=lambda f: f.__name__)
def test_wrong_type_names_the_argument_and_the_accepted_types(func: Callable) -> None:
    args, kwargs = CASES[func]
    first = next(iter(inspect.signature(func).parameters))
    bad = 3.5 if isinstance(args[0], str) else "nonsense"
    with pytest.raises(
        TypeError, match=rf"^{func.__name__}\(\): {first} must be .*, got (str 'nonsense'|float 3\.5)\.$"
    ):
        func(bad, *args[1:], **kwargs)


def test_messages_list_the_accepted_types() -> None:
    with pytest.raises(TypeError, match=r"pareto_mask\(\): scores must be a torch.Tensor or a numpy.ndarray, got list"):
        pareto.pareto_mask([[1.0, 2.0]])
    with pytest.raises(TypeError, match=r"valid must be a torch.Tensor or a numpy.ndarray or None, got str"):
        pareto.pareto_mask(S, "all")
    with pytest.raises(TypeError, match=r"epsilon must be a number, got str '0.5'"):
        ot_loss.ot_loss(S, FRONT, epsilon="0.5", max_iter=10, tol=1e-3)
    with pytest.raises(TypeError, match=r"max_iter must be an int, got float 10.0"):
        ot_loss.ot_loss(S, FRONT, epsilon=0.5, max_iter=10.0, tol=1e-3)
    with pytest.raises(TypeError, match=r"weights must be .* or a list or tuple of numbers, got list"):
        objectives.weighted_sum(S, ["1", "2", "3"], [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match=r"reward_names must be a sequence of strs, got str 'abc'"):
        metrics.rate_columns("abc", SETS)
    with pytest.raises(TypeError, match=r"scores must be a mapping of a str to a torch.Tensor or a numpy.ndarray"):
        metrics.comparison_table({"a": [1.0]}, GROUPS, "a", NAMES, SETS)
    with pytest.raises(
        TypeError, match=r"scores must be a torch.Tensor or a numpy.ndarray, got numpy.ndarray of dtype"
    ):
        metrics.mean_scores(np.array([["a", "b"]]))
    with pytest.raises(TypeError, match=r"candidate must be .*, got bool"):
        metrics.jdr(True, BASE)


def test_mixed_inputs_give_torch_and_keep_gradients() -> None:
    """A torch argument makes the result torch (gradients flow); NumPy constants are moved next to it."""
    x = S.clone().requires_grad_(True)
    loss = objectives.pgot_offline(x, FRONT.numpy(), MASK.numpy(), **OT)
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(loss.detach(), objectives.pgot_offline(S, FRONT, MASK, **OT))


def test_dtypes_and_scalars() -> None:
    """float32 stays float32, bool stays bool, integer arrays work where tensors of them do; 0-dim results are
    NumPy scalars."""
    s32 = S.float().numpy()
    mask = pareto.pareto_mask(s32)
    assert isinstance(mask, np.ndarray) and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, pareto.pareto_mask(torch.from_numpy(s32)).numpy())
    ints = np.array([[3, 1], [1, 3], [0, 0]])
    np.testing.assert_array_equal(pareto.pareto_mask(ints), [True, True, False])
    rate = metrics.jdr(CAND.numpy(), BASE.numpy())
    assert isinstance(rate, np.float64) and rate == float(metrics.jdr(CAND, BASE))
    loss = objectives.weighted_sum(S.float().numpy(), [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert isinstance(loss, np.float32)


def test_the_decorator_on_a_new_function() -> None:
    @accepts_numpy
    def f(x: torch.Tensor, k: int = 1, names: list[str] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Doc."""
        return x * k, {"sum": x.sum()}

    out, extra = f(np.arange(3.0), 2)
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])
    assert isinstance(extra["sum"], np.float64) and extra["sum"] == 3.0
    assert f.__name__ == "f" and f.__doc__ == "Doc." and "k" in inspect.signature(f).parameters
    with pytest.raises(TypeError, match=r"f\(\): names must be a list or tuple of strs or None, got list"):
        f(torch.ones(1), names=[1, 2])
    with pytest.raises(TypeError, match=r"k must be an int, got bool"):
        f(torch.ones(1), True)


def test_numpy_constants_go_to_the_device_of_the_torch_arguments() -> None:
    """(The meta device stands in for a GPU: no CUDA in CI.)"""

    @accepts_numpy
    def devices(x: torch.Tensor, y: torch.Tensor, named: dict[str, torch.Tensor]) -> list[str]:
        return [x.device.type, y.device.type, named["z"].device.type]

    meta = torch.empty(2, device="meta")
    assert devices(meta, np.ones(2), {"z": np.ones(2)}) == ["meta", "meta", "meta"]
    assert devices(np.ones(2), np.ones(2), {"z": meta}) == ["meta", "meta", "meta"]
    assert devices(torch.ones(2), np.ones(2), {"z": np.ones(2)}) == ["cpu", "cpu", "cpu"]
