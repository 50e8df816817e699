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
============ ==================================== =========================================

Every learned reward also builds from ``path: tiny`` (small random weights, seeded by ``tiny_seed``,
same code path) and ``path: random`` (full-size architecture, random weights; benchmarks).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Sequence

import torch

from pgot.config import REWARD_NAMES, RewardConfig, unknown_reward
from pgot.rewards import hps, imagereward
from pgot.rewards.analytic import CONSTRUCTORS as _ANALYTIC
from pgot.rewards.base import Reward, check_inputs
from pgot.rewards.clip import LOCATORS as _CLIP_LOCATORS
from pgot.rewards.clip import build_aesthetic, build_clip, build_hp, build_ict, build_pickscore
from pgot.rewards.hps import build_hps
from pgot.rewards.imagereward import build_imagereward
from pgot.rewards.preprocessing import preprocess

logger = logging.getLogger(__name__)

__all__ = ["REWARDS", "Reward", "build", "check", "columns", "preprocess", "score", "score_images"]

REWARDS: dict[str, Callable[[RewardConfig, torch.device | str, torch.dtype | None], Reward]] = {
    "clip": build_clip,
    "ict": build_ict,
    "hp": build_hp,
    "hps": build_hps,
    "pickscore": build_pickscore,
    "imagereward": build_imagereward,
    "aesthetic": build_aesthetic,
    **_ANALYTIC,
}
"""Reward name -> constructor ``(cfg, device, dtype) -> Reward``."""

assert set(REWARDS) == set(REWARD_NAMES), "pgot.config.REWARD_NAMES must list the names of REWARDS"

_LOCATORS: dict[str, Callable[[RewardConfig], object]] = {
    **_CLIP_LOCATORS,
    "hps": hps.locate,
    "imagereward": imagereward.locate,
}
"""Reward name -> the part of its builder that runs before any weight is read (analytic rewards have none)."""


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
        logger.info("building reward %s from %s", cfg.name, cfg.path or "(analytic)")
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


def _with_index(message: str, i: int, cfg: RewardConfig) -> str:
    """A builder's message with ``rewards.<i>`` made ``rewards.{i}``; prefixed with the key when it names none."""
    message = _keyed(message, i)
    if f"rewards.{i}" not in message:
        message = f"rewards.{i} ({cfg.name}, path {cfg.path!r}): {message}"
    return message


def score(rewards: Sequence[Reward], images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Score a batch with every reward: (B, 3, H, W) in [0, 1], B prompts -> (B, M) float32.

    The 224 px CLIP preprocessing is computed once and shared by every reward that takes it.
    Differentiable w.r.t. ``images``.
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
    return torch.stack(columns, dim=1)


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
