"""pgot: Pareto-Guided Optimal Transport (PG-OT) for multi-reward alignment of text-to-image models.

``import pgot`` is light: the public functions below are imported on first use, so no model
library (diffusers, transformers, open_clip) loads until it is needed.

Every public name is the documented object whatever was imported before: importing a submodule whose name is
also a public name (``pgot.ot_loss``, the module of the function ``pgot.ot_loss``) does not rebind the name on
the package; reach such a module with ``from pgot.ot_loss import ...`` or ``importlib.import_module``.

    >>> import pgot
    >>> mask = pgot.pareto_mask(scores)          # (..., N, M) -> (..., N); NumPy in, NumPy out
    >>> loss = pgot.ot_loss(source, target, epsilon=0.5, max_iter=1000, tol=1e-4)
    >>> images = pgot.generate_images(model, ["a red fox"], seeds=[0, 1])   # (2, 3, H, W) in [0, 1]

The maths functions (Pareto, OT, objectives, metrics) take torch tensors or NumPy arrays and return NumPy for
NumPy inputs (:mod:`pgot.arrays`); a wrong argument type raises a ``TypeError`` naming the argument.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Config": "pgot.config",
    "ConfigError": "pgot.config",
    "ModelConfig": "pgot.config",
    "load_config": "pgot.config",
    "save_config": "pgot.config",
    "dominance_matrix": "pgot.pareto",
    "pareto_mask": "pgot.pareto",
    "dominated_by": "pgot.pareto",
    "dominating_sets": "pgot.pareto",
    "ot_loss": "pgot.ot_loss",
    "pgot_offline": "pgot.objectives",
    "pgot_online": "pgot.objectives",
    "single_reward": "pgot.objectives",
    "weighted_sum": "pgot.objectives",
    "hetero_weighted_sum": "pgot.objectives",
    "separate_constraints": "pgot.objectives",
    "win_rate": "pgot.metrics",
    "jdr": "pgot.metrics",
    "jcr": "pgot.metrics",
    "REWARDS": "pgot.rewards",
    "build_rewards": ("pgot.rewards", "build"),
    "score": "pgot.rewards",
    "load_model": "pgot.model",
    "generate_images": "pgot.generate",
    "sample": "pgot.generate",
    "decode": "pgot.generate",
    "load_prompts": "pgot.prompts",
    "load_store": "pgot.frontier",
}

__all__ = ["__version__", *_EXPORTS]


class _Package(types.ModuleType):
    """The ``pgot`` module's type: the import system binds a loaded submodule as an attribute of its package
    (``setattr(pgot, "ot_loss", <module>)``); this refuses that binding for public names, which stay functions."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'pgot' has no attribute {name!r}")
    module_name, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
