"""Inputs of the maths functions: NumPy arrays or torch tensors in, the same kind out; wrong types named.

Every public function of :mod:`pgot.pareto`, :mod:`pgot.ot_loss`, :mod:`pgot.objectives` and :mod:`pgot.metrics`
is wrapped by :func:`accepts_numpy`, which reads the function's annotations:

* **NumPy in.** An argument annotated ``torch.Tensor`` (alone or in a union, also as the values of a mapping)
  also takes a ``numpy.ndarray`` or a NumPy scalar. It is copied into a tensor of the same dtype (float64
  stays float64, bool stays bool), on the device of the call's first torch argument that is not on the CPU
  (else on the CPU).
* **NumPy out.** When at least one array argument is NumPy and none is torch, every tensor of the result
  (alone, or in a tuple, list or dict) comes back as NumPy: ``tensor.detach().cpu().numpy()``, a 0-dim result
  as a NumPy scalar (``numpy.float64``, ``numpy.bool_``, ...). With a torch argument the result is torch, as
  before (gradients flow). pandas frames, Python numbers and the :class:`pgot.metrics.Outcomes` record of
  :func:`pgot.metrics.count_outcomes` (torch counts, Python ints) are returned unchanged.
* **Wrong types.** Every argument is checked against its annotation (tensor or array, number, string, list,
  mapping, ...); a mismatch raises ``TypeError`` naming the function, the argument and the accepted types:
  ``pareto_mask(): scores must be a torch.Tensor or a numpy.ndarray, got list.`` Wrong *values* (shapes,
  ranges, unknown names) stay ``ValueError`` s raised by the functions themselves.

The checks are built once per function, on its first call, and cost a few microseconds per call.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import numbers
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

__all__ = ["accepts_numpy", "table_tensor"]

F = TypeVar("F", bound=Callable[..., Any])


class _Spec:
    """How one annotation checks and converts a value: ``check(value) -> (ok, value, saw_numpy, saw_torch)``."""

    def __init__(self, describe: str, check: Callable[[Any], tuple[bool, Any, bool, bool]], plural: str = ""):
        self.describe = describe
        self.check = check
        self.plural = plural or describe


def table_tensor(values: Any, dtype: Any = None) -> torch.Tensor:
    """A tensor holding a copy of ``values`` (a numpy array, or what ``DataFrame.to_numpy()`` /
    ``Series.to_numpy()`` returns), whatever the array's memory layout.

    The one way pgot turns table columns into tensors: ``to_numpy()`` may return a view of the frame's blocks
    whose layout depends on how the frame was built (transposed, or with negative strides after a reversal),
    and ``torch.tensor`` / ``torch.from_numpy`` refuse negative strides. The values are copied into a new
    C-ordered array first (``np.array(..., order="C", copy=True)``; a 0-dim array stays 0-dim), so the tensor never
    shares memory with the frame.

    Args:
        values: an array-like of any shape, e.g. ``(N, M)`` score columns or ``(N,)`` ids.
        dtype: the numpy dtype to convert to (``"float64"``, ``np.float32``, ...); default: keep the array's.

    Returns:
        A tensor of the same shape, on the CPU.
    """
    return torch.from_numpy(np.array(values, dtype=dtype, order="C", copy=True))


def _ok(value: Any) -> tuple[bool, Any, bool, bool]:
    return True, value, False, False


_ANY = _Spec("anything", _ok)


def _tensor_check(value: Any) -> tuple[bool, Any, bool, bool]:
    if isinstance(value, torch.Tensor):
        return True, value, False, True
    if isinstance(value, (np.ndarray, np.generic)) and not isinstance(value, (np.str_, np.bytes_)):
        if value.dtype.kind not in "biuf":  # bool, int, unsigned, float
            return False, value, False, False
        return True, table_tensor(value), True, False  # any memory layout (a reversed or transposed view)
    return False, value, False, False


_TENSOR = _Spec("a torch.Tensor or a numpy.ndarray", _tensor_check)


def _instance(cls: type | tuple[type, ...], describe: str, exclude: tuple[type, ...] = (), plural: str = "") -> _Spec:
    def check(value: Any) -> tuple[bool, Any, bool, bool]:
        return isinstance(value, cls) and not isinstance(value, exclude), value, False, False

    return _Spec(describe, check, plural)


def _number(cls: type, kinds: str, describe: str, plural: str) -> _Spec:
    """A Python or NumPy number (never a bool), or a 0-dim tensor / array of one of the dtype ``kinds``."""

    def check(value: Any) -> tuple[bool, Any, bool, bool]:
        if isinstance(value, (bool, np.bool_)):
            return False, value, False, False
        if isinstance(value, cls):
            return True, value, False, False
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            kind = "b" if value.dtype == torch.bool else "f" if value.is_floating_point() else "i"
            return kind in kinds and not value.is_complex(), value, False, False
        if isinstance(value, np.ndarray) and value.ndim == 0:
            return value.dtype.kind in kinds, value, False, False
        return False, value, False, False

    return _Spec(describe, check, plural)


_FLOAT = _number(numbers.Real, "iuf", "a number", "numbers")
_INT = _number(numbers.Integral, "iu", "an int", "ints")
_BOOL = _instance((bool, np.bool_), "a bool", plural="bools")
_STR = _instance(str, "a str", plural="strs")
_NONE = _instance(type(None), "None")


def _sequence(item: _Spec, container: str, kinds: tuple[type, ...]) -> _Spec:
    numeric = item is _FLOAT or item is _INT

    def check(value: Any) -> tuple[bool, Any, bool, bool]:
        if numeric and isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf":
            value = value.tolist()
        if not isinstance(value, kinds) or isinstance(value, (str, bytes, collections.abc.Mapping)):
            return False, value, False, False
        if item is _ANY:
            return True, value, False, False
        saw_np = saw_torch = False
        items = []
        for v in value:
            ok, v, n, t = item.check(v)
            if not ok:
                return False, value, False, False
            items.append(v)
            saw_np, saw_torch = saw_np or n, saw_torch or t
        if saw_np:
            value = type(value)(items) if isinstance(value, (list, tuple)) else items
        return True, value, saw_np, saw_torch

    return _Spec(f"a {container} of {item.plural}", check)


def _mapping(key: _Spec, val: _Spec) -> _Spec:
    def check(value: Any) -> tuple[bool, Any, bool, bool]:
        if not isinstance(value, collections.abc.Mapping):
            return False, value, False, False
        saw_np = saw_torch = False
        out = {}
        for k, v in value.items():
            ok_k = key.check(k)[0]
            ok_v, v, n, t = val.check(v)
            if not (ok_k and ok_v):
                return False, value, False, False
            out[k] = v
            saw_np, saw_torch = saw_np or n, saw_torch or t
        return True, (out if saw_np else value), saw_np, saw_torch

    return _Spec(f"a mapping of {key.describe} to {val.describe}", check)


def _union(specs: list[_Spec]) -> _Spec:
    def check(value: Any) -> tuple[bool, Any, bool, bool]:
        for s in specs:
            result = s.check(value)
            if result[0]:
                return result
        return False, value, False, False

    names = list(dict.fromkeys(s.describe for s in specs))
    return _Spec(", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0], check)


def _spec(tp: Any) -> _Spec:
    """The check of one annotation; unknown annotations accept anything."""
    if tp is inspect.Parameter.empty or tp is Any:
        return _ANY
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _union([_spec(a) for a in args])
    if origin is typing.Literal:
        kinds = tuple({type(a) for a in args})
        return _instance(kinds, " or ".join(sorted(f"a {k.__name__}" for k in kinds)))
    if origin in (list, tuple, collections.abc.Sequence):
        item = _spec(args[0]) if args else _ANY
        if origin in (list, tuple):
            return _sequence(item, "list or tuple", (list, tuple))
        return _sequence(item, "sequence", (collections.abc.Collection,))  # also dict keys, pandas Index
    if origin in (dict, collections.abc.Mapping):
        return (
            _mapping(*(_spec(a) for a in args)) if len(args) == 2 else _instance(collections.abc.Mapping, "a mapping")
        )
    if tp is torch.Tensor:
        return _TENSOR
    if tp is float:
        return _FLOAT
    if tp is int:
        return _INT
    if tp is bool:
        return _BOOL
    if tp is str:
        return _STR
    if tp is type(None):
        return _NONE
    if isinstance(tp, type):
        return _instance(
            tp, f"a {tp.__module__.split('.')[0]}.{tp.__name__}" if tp.__module__ != "builtins" else f"a {tp.__name__}"
        )
    return _ANY


_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def _fast_types(tp: Any) -> frozenset[type]:
    """Exact types an annotation accepts as they are (the per-call fast path; anything else takes :func:`_spec`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(_fast_types(a) for a in args))
    if origin is typing.Literal:
        return frozenset(type(a) for a in args)
    fast = {torch.Tensor: _TENSOR_TYPES, float: {float, int}, int: {int}, bool: {bool}, str: {str}}
    if tp is type(None):
        return frozenset({type(None)})
    return frozenset(fast.get(tp, ())) if isinstance(tp, type) else frozenset()


def _what(value: Any) -> str:
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"
    if isinstance(value, np.ndarray):
        return f"{name} of dtype {value.dtype}"
    if isinstance(value, (str, int, float)) and len(repr(value)) <= 40:
        return f"{name} {value!r}"
    return name


def _to_numpy(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        out = result.detach().cpu().numpy()
        return out[()] if out.ndim == 0 else out
    if isinstance(result, tuple) and not hasattr(result, "_fields"):
        return tuple(_to_numpy(r) for r in result)
    if isinstance(result, list):
        return [_to_numpy(r) for r in result]
    if isinstance(result, dict):
        return {k: _to_numpy(v) for k, v in result.items()}
    return result


def _device(values: list[Any]) -> torch.device | None:
    """The device of the first tensor not on the CPU among ``values`` (and the items of their mappings / lists)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.device.type != "cpu":
                return v.device
        elif isinstance(v, collections.abc.Mapping):
            found = _device(list(v.values()))
            if found is not None:
                return found
        elif isinstance(v, (list, tuple)):
            found = _device(list(v))
            if found is not None:
                return found
    return None


def _move(original: Any, converted: Any, device: torch.device) -> Any:
    """``converted`` with the tensors made from NumPy values of ``original`` moved to ``device``."""
    if isinstance(original, (np.ndarray, np.generic)) and isinstance(converted, torch.Tensor):
        return converted.to(device)
    if isinstance(original, collections.abc.Mapping) and isinstance(converted, dict) and converted is not original:
        return {k: _move(original[k], v, device) for k, v in converted.items()}
    if isinstance(original, (list, tuple)) and isinstance(converted, (list, tuple)) and converted is not original:
        return type(converted)(_move(o, c, device) for o, c in zip(original, converted, strict=True))
    return converted


def accepts_numpy(func: F) -> F:
    """Wrap a maths function: NumPy arrays accepted where it takes tensors, NumPy out for NumPy in, and a
    ``TypeError`` naming the argument for a value of the wrong type (see the module docstring).

    Args:
        func: a function whose parameters are annotated (``torch.Tensor``, ``float``, ``Sequence[str]``, ...).

    Returns:
        The wrapped function (same name, docstring and signature).
    """
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    names = [p.name for p in params]
    specs: dict[str, _Spec] = {}
    fast: dict[str, frozenset[type]] = {}

    def build() -> None:
        hints = typing.get_type_hints(func)
        fast.update({p.name: _fast_types(hints.get(p.name, inspect.Parameter.empty)) for p in params})
        specs.update({p.name: _spec(hints.get(p.name, inspect.Parameter.empty)) for p in params})

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not specs:
            build()
        saw_np = saw_torch = False
        new_args, original_kwargs = list(args), dict(kwargs)
        for i, value in enumerate(args[: len(names)]):
            if type(value) in fast[names[i]]:
                saw_torch = saw_torch or type(value) in _TENSOR_TYPES
                continue
            ok, value, n, t = specs[names[i]].check(value)
            if not ok:
                raise TypeError(
                    f"{func.__name__}(): {names[i]} must be {specs[names[i]].describe}, got {_what(value)}."
                )
            new_args[i] = value
            saw_np, saw_torch = saw_np or n, saw_torch or t
        for name, value in kwargs.items():
            spec = specs.get(name)
            if spec is None:
                continue  # the function's own TypeError names an unexpected keyword
            if type(value) in fast[name]:
                saw_torch = saw_torch or type(value) in _TENSOR_TYPES
                continue
            ok, value, n, t = spec.check(value)
            if not ok:
                raise TypeError(f"{func.__name__}(): {name} must be {spec.describe}, got {_what(value)}.")
            kwargs[name] = value
            saw_np, saw_torch = saw_np or n, saw_torch or t
        if saw_np and saw_torch:  # NumPy constants next to torch arguments: on their device
            device = _device([*new_args, *kwargs.values()])
            if device is not None:
                new_args = [_move(o, c, device) for o, c in zip(args, new_args, strict=True)]
                kwargs = {k: _move(original_kwargs[k], v, device) for k, v in kwargs.items()}
        result = func(*new_args, **kwargs)
        return _to_numpy(result) if saw_np and not saw_torch else result

    return typing.cast(F, wrapper)
