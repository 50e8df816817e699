"""Differentiable reward models: ``REWARDS`` (name -> constructor), :func:`build`, :func:`score`.

Contract: a reward is an ``nn.Module`` with ``name`` and frozen weights, called as
``reward(images, prompts) -> (B,)`` with images (B, 3, H, W) float in [0, 1] at any size; scores are
differentiable w.r.t. the images and higher is better. :func:`score` stacks several rewards into
(B, M), computing the shared 224 px CLIP preprocessing once for all learned rewards.

============ ==================================== =========================================
name         model                                family module
============ ==================================== =========================================
clip         CLIP score (cosine), OpenAI ViT-L/14 :mod:`pgot.rewards.clip`
ict          ICT (Ba et al. 2025), cosine         :mod:`pgot.rewards.clip`
hp           HP (Ba et al. 2025), sigmoid(MLP)    :mod:`pgot.rewards.clip`
pickscore    PickScore, 100 * cosine              :mod:`pgot.rewards.clip`
aesthetic    LAION improved aesthetic predictor   :mod:`pgot.rewards.clip`
hps          HPSv2 / HPSv2.1 (open_clip), cosine  :mod:`pgot.rewards.hps`
imagereward  ImageReward (BLIP + MLP)             :mod:`pgot.rewards.imagereward`
brightness, colorfulness, contrast, saturation, sharpness: :mod:`pgot.rewards.analytic`
tb_align, tb_pref: testbed preference models (32 px, testbed prompts only), :mod:`pgot.testbed.proxies`
============ ==================================== =========================================

Every learned reward also builds from ``path: tiny`` (small random weights, seeded by ``tiny_seed``,
same code path) and ``path: random`` (full-size architecture, random weights; benchmarks).

``import pgot.rewards`` loads torch and the analytic rewards only: the learned families (transformers, open_clip)
are imported when one of their rewards is first built, so :data:`STRENGTHS` is cheap to read (the agent does).

**Strengths** (:data:`STRENGTHS`, ``rewards.<i>.strength``; paper section 2.2 and appendix C.4). A *strong* reward
tracks human judgement; a *weak* one is prone to reward hacking. The agent may remove only weak rewards (unless
``agent.allow_remove_strong``), and the online strategy is meant for strong rewards only. ``strength: null`` (the
default) takes the reward's default below:

============ ====== ============================================================================================
name         default why
============ ====== ============================================================================================
ict          strong the paper's strong text-image reward (highest human-preference accuracy, its Table 1)
hp           strong the paper's strong human-preference reward (its Table 1)
clip         weak   the paper's weak text-image reward
hps          weak   the paper's weak human-preference reward
pickscore    weak   not classed by the paper; trained like HPS (CLIP ViT-H-14 on pairwise choices), which it
                    classes as weak
imagereward  weak   not classed by the paper; a pairwise-preference model like HPS
aesthetic    weak   not classed by the paper; it scores the image without the prompt, so a model can raise it
                    while ignoring the text
tb_align,    strong the testbed's learned preference models (:mod:`pgot.testbed.proxies`), trained on pairs ranked
tb_pref             by the testbed's ground-truth judge; they agree with it most (the testbed's Table 1)
brightness,  weak   hand-made image statistics: hackable proxies (a saturated, high-contrast image maximises
colorfulness,       them whatever the prompt)
contrast,
saturation,
sharpness
(other)      weak   :data:`UNKNOWN_STRENGTH`: a reward pgot does not know is treated as hackable until marked
                    strong (``rewards.<i>.strength=strong``, e.g. after measuring its preference accuracy with
                    ``pgot-eval eval.preference_data``)
============ ====== ============================================================================================
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from pgot.config import REWARD_NAMES, RewardConfig, unknown_reward
from pgot.rewards.analytic import CONSTRUCTORS as _ANALYTIC
from pgot.rewards.base import Reward, check_inputs, nan_for_nonfinite
from pgot.rewards.preprocessing import preprocess

logger = logging.getLogger(__name__)

__all__ = [
    "REWARDS",
    "STRENGTHS",
    "UNKNOWN_STRENGTH",
    "Reward",
    "build",
    "check",
    "columns",
    "default_strength",
    "preprocess",
    "score",
    "score_images",
]


def _testbed_preference(
    cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Reward:
    """A testbed preference model (:func:`pgot.testbed.proxies.build_preference`), imported on first use:
    ``pgot.testbed.proxies`` itself imports this package."""
    from pgot.testbed.proxies import build_preference

    return build_preference(cfg, device, dtype)


Constructor = Callable[[RewardConfig, "torch.device | str", "torch.dtype | None"], Reward]


def _lazy(module: str, attr: str, key: str | None = None) -> Callable:
    """``module.attr`` (or ``module.attr[key]``), imported on its first call: the family's libraries (transformers,
    open_clip) load only when one of its rewards is checked or built."""

    def call(*args: object, **kwargs: object) -> object:
        target = getattr(importlib.import_module(module), attr)
        return (target if key is None else target[key])(*args, **kwargs)

    call.__name__ = call.__qualname__ = attr if key is None else f"{attr}[{key!r}]"
    call.__doc__ = f"``{module}.{call.__name__}``, imported on first call."
    return call


_FAMILIES = {
    "clip": "pgot.rewards.clip",
    "ict": "pgot.rewards.clip",
    "hp": "pgot.rewards.clip",
    "hps": "pgot.rewards.hps",
    "pickscore": "pgot.rewards.clip",
    "imagereward": "pgot.rewards.imagereward",
    "aesthetic": "pgot.rewards.clip",
}
"""Learned reward name -> the module that builds it (the registry's order)."""

REWARDS: dict[str, Constructor] = {
    **{name: _lazy(module, f"build_{name}") for name, module in _FAMILIES.items()},
    **_ANALYTIC,
    "tb_align": _testbed_preference,
    "tb_pref": _testbed_preference,
}
"""Reward name -> constructor ``(cfg, device, dtype) -> Reward``."""

assert set(REWARDS) == set(REWARD_NAMES), "pgot.config.REWARD_NAMES must list the names of REWARDS"

_LOCATORS: dict[str, Callable[[RewardConfig], object]] = {
    name: _lazy(module, "LOCATORS", name) if module == "pgot.rewards.clip" else _lazy(module, "locate")
    for name, module in _FAMILIES.items()
}
"""Reward name -> the part of its builder that runs before any weight is read (analytic rewards have none)."""

STRENGTHS: dict[str, Literal["strong", "weak"]] = {
    "ict": "strong",
    "hp": "strong",
    "clip": "weak",
    "hps": "weak",
    "pickscore": "weak",
    "imagereward": "weak",
    "aesthetic": "weak",
    **dict.fromkeys(_ANALYTIC, "weak"),
    "tb_align": "strong",
    "tb_pref": "strong",
}
"""Reward name -> default strength (``rewards.<i>.strength: null``); the table of the module docstring says why."""

UNKNOWN_STRENGTH: Literal["strong", "weak"] = "weak"
"""The default strength of a reward that is not in :data:`STRENGTHS` (one added to :data:`REWARDS` by a user)."""


def default_strength(name: str, strength: str | None = None) -> Literal["strong", "weak"]:
    """The strength of reward ``name``: ``strength`` when given (``rewards.<i>.strength``), else its default.

    Args:
        name: the reward's registry name.
        strength: ``strong``, ``weak`` or None (the default of :data:`STRENGTHS`, :data:`UNKNOWN_STRENGTH` for a
            name not in it).

    Raises:
        ValueError: ``strength`` is neither ``strong``, ``weak`` nor None.
    """
    if strength is None:
        return STRENGTHS.get(name, UNKNOWN_STRENGTH)
    if strength not in ("strong", "weak"):
        raise ValueError(f"the strength of reward {name!r} must be strong, weak or null, got {strength!r}.")
    return strength


def _keyed(message: str, index: int) -> str:
    """A builder's message with the reward's config keys as typed (``rewards.2.path``, not ``rewards.<i>.path``)."""
    return message.replace("rewards.<i>.", f"rewards.{index}.")


def check(configs: Sequence[RewardConfig]) -> list[str]:
    """Every problem of the configured rewards that shows before any weight is read, one line each.

    Unknown names (with a "did you mean"), checkpoint paths that do not exist or are not in the local hub
    cache, folders that lack the files the loader reads, and architectures or checkpoint configs whose tower
    does not take 224 px images. It runs each reward's own path logic (the first half of its builder), so
    it accepts exactly the layouts :func:`build` loads.

    Args:
        configs: one :class:`~pgot.config.RewardConfig` per reward.

    Returns:
        One line per reward with a problem, naming its keys as typed (``rewards.2.path``); empty when all is well.
    """
    problems = []
    for i, cfg in enumerate(configs):
        if cfg.name not in REWARDS:
            problems.append(unknown_reward(i, cfg.name, list(REWARDS)))
            continue
        locate = _LOCATORS.get(cfg.name)
        if locate is None:
            continue
        try:
            locate(cfg)
        except ValueError as err:
            message = _keyed(str(err), i)
            if not message.startswith(f"rewards.{i}."):  # every line starts with the key it is about, as typed
                message = f"rewards.{i}.path={cfg.path!r}: {message.removeprefix(f'reward {cfg.name!r}: ')}"
            problems.append(message)
    return problems


def build(
    configs: Sequence[RewardConfig], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> list[Reward]:
    """Build the configured rewards, in order (the columns of :func:`score`).

    Args:
        configs: one :class:`~pgot.config.RewardConfig` per reward.
        device: where the weights live.
        dtype: weights dtype for rewards whose ``dtype`` is ``auto`` (default: bfloat16 on CUDA, float32 elsewhere).

    Raises:
        ValueError: an unknown reward name (listing the known ones), or a missing or bad checkpoint; the message
            names the reward's config keys with their index (``rewards.2.path``), whatever the builder wrote.
    """
    rewards = []
    for i, cfg in enumerate(configs):
        if cfg.name not in REWARDS:
            raise ValueError(unknown_reward(i, cfg.name, list(REWARDS)))
        logger.info("building reward %s from %s", cfg.name, _source(cfg))
        try:
            rewards.append(REWARDS[cfg.name](cfg, device, dtype))
        except ValueError as exc:
            raise ValueError(_with_index(str(exc), i, cfg)) from None
        except OSError as exc:  # a file the builder opened: missing, unreadable, a folder where a file was expected
            raise ValueError(
                f"rewards.{i}.path={cfg.path!r} (reward {cfg.name!r}): cannot read {exc.filename or cfg.path!r} "
                f"({exc.strerror or exc}). Point rewards.{i}.path at this reward's checkpoint; `pgot-fetch --config "
                "<your config>` downloads every checkpoint a config names."
            ) from None
    return rewards


def _source(cfg: RewardConfig) -> str:
    """Where a reward's weights come from, for the "building reward" log line: the path, a random tiny build, the
    shipped weights of the testbed preference models (``path: ""``), or none for analytic rewards."""
    if cfg.path == "tiny":
        return f"a random tiny build (tiny_seed={cfg.tiny_seed})"
    if cfg.path:
        return cfg.path
    if cfg.name in _ANALYTIC:
        return "its formula (analytic, no weights)"
    if REWARDS.get(cfg.name) is _testbed_preference:
        return f"its shipped weights (pgot/testbed/preference/{cfg.name}.safetensors)"
    return "(no path set)"


def _with_index(message: str, i: int, cfg: RewardConfig) -> str:
    """A builder's message with ``rewards.<i>`` made ``rewards.{i}``; prefixed with the key when it names none."""
    message = _keyed(message, i)
    if f"rewards.{i}" not in message:
        message = f"rewards.{i} ({cfg.name}, path {cfg.path!r}): {message}"
    return message


def score(rewards: Sequence[Reward], images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Score a batch with every reward: (B, 3, H, W) in [0, 1], B prompts -> (B, M) float32.

    The 224 px CLIP preprocessing is computed once and shared by every reward that takes it.
    Differentiable w.r.t. ``images``. An image with any NaN or infinite pixel scores NaN in every column
    (:func:`pgot.rewards.base.nan_for_nonfinite`), never a finite number.

    Raises:
        ValueError: no rewards, or images / prompts that break the contract (:func:`pgot.rewards.base.check_inputs`).
    """
    if len(rewards) == 0:
        raise ValueError("score() got no rewards; configure at least one (rewards.0.name=...).")
    check_inputs(", ".join(r.name for r in rewards), images, prompts)
    prompts = list(prompts)
    pixel_values = preprocess(images) if any(r.uses_pixel_values for r in rewards) else None  # (B, 3, 224, 224)
    columns = []
    for r in rewards:
        x = pixel_values if r.uses_pixel_values else images
        columns.append(r.compute(x.to(r.device) if r.uses_pixel_values else x, prompts).float().to(images.device))
    return nan_for_nonfinite(images, torch.stack(columns, dim=1))


def score_images(
    rewards: Sequence[Reward],
    images: Sequence[torch.Tensor],
    prompts: Sequence[str],
    batch_size: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Score a list of ``(3, H, W)`` images in [0, 1] whose sizes may differ, batching runs of equal size, without
    gradients (evaluation, preference accuracy).

    Args:
        rewards: built reward models (:func:`build`).
        images: B images.
        prompts: B prompts.
        batch_size: most images per forward pass.
        device: where to score.

    Returns:
        ``(B, M)`` float64 on the CPU.
    """
    out: list[torch.Tensor] = []
    i = 0
    while i < len(images):
        j = i + 1
        while j < len(images) and j - i < batch_size and images[j].shape == images[i].shape:
            j += 1
        batch = torch.stack(list(images[i:j])).to(device)
        with torch.no_grad():
            out.append(score(rewards, batch, list(prompts[i:j])).double().cpu())
        i = j
    return torch.cat(out) if out else torch.zeros(0, len(rewards), dtype=torch.float64)


def columns(names: Sequence[str], selected: Sequence[str], key: str = "rewards") -> list[int]:
    """Column indices of the rewards ``selected`` in reward vectors whose columns are ``names``.

    Args:
        names: the M reward names, in column order (``Config.reward_names``, a store's ``reward_names``).
        selected: the rewards wanted, in the order wanted.
        key: the config key that named ``selected``, for the error.

    Raises:
        ValueError: a selected name is not among ``names``.
    """
    names = list(names)
    out = []
    for n in selected:
        if n not in names:
            hint = difflib.get_close_matches(n, names, n=1)
            raise ValueError(
                f"{key} names {n!r}, which is not among the rewards ({', '.join(names) or 'none'})."
                + (f" Did you mean {hint[0]!r}?" if hint else "")
            )
        out.append(names.index(n))
    return out
