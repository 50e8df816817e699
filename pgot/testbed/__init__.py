"""The reward-hacking testbed: a world where reward hacking happens in minutes on a CPU and the truth is known.

- :mod:`pgot.testbed.scenes`: the prompt grammar (108 prompts, ``pgot/data/testbed_prompts.txt``) and the exact
  32 x 32 renderer.
- :mod:`pgot.testbed.judge`: the ground-truth judge (quality in [0, 1] and its fidelity and cleanliness components).
- :mod:`pgot.testbed.basemodel`: the shipped tiny SD3 (:data:`MODEL_DIR`) and its recommended sampler.
- :mod:`pgot.testbed.proxies`: the proxy rewards (weak analytic ones and strong learned preference models, registered
  in :data:`pgot.rewards.REWARDS`), their strengths and collapse signatures.
- :mod:`pgot.testbed.agent`: the diagnosing logic of an agent that can see (judge components + signatures).
- :mod:`pgot.testbed.agent_server`: that agent as a local OpenAI-compatible endpoint for ``agent.backend=openai``
  (``python -m pgot.testbed.agent_server --port N``, or :func:`~pgot.testbed.agent_server.start_server` in a thread).

``import pgot.testbed`` is light: the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""The shipped tiny SD3, a diffusers folder: ``load_model(ModelConfig(path=str(MODEL_DIR), resolution=32, use_t5=False))``."""

_EXPORTS = {
    "Scene": "pgot.testbed.scenes",
    "all_prompts": "pgot.testbed.scenes",
    "parse_prompt": "pgot.testbed.scenes",
    "render": "pgot.testbed.scenes",
    "split": "pgot.testbed.scenes",
    "quality": "pgot.testbed.judge",
    "components": "pgot.testbed.judge",
    "NUM_STEPS": "pgot.testbed.basemodel",
    "GUIDANCE_SCALE": "pgot.testbed.basemodel",
    "SHIFT": "pgot.testbed.basemodel",
    "MAX_SEQUENCE_LENGTH": "pgot.testbed.basemodel",
    "STRENGTHS": "pgot.testbed.proxies",
    "SIGNATURES": "pgot.testbed.proxies",
    "diagnose": "pgot.testbed.agent",
    "start_server": "pgot.testbed.agent_server",
}

__all__ = ["MODEL_DIR", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pgot.testbed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
