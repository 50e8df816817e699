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
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Sequence

import torch

from pgot.config import RewardConfig
from pgot.rewards.analytic import CONSTRUCTORS as _ANALYTIC
from pgot.rewards.base import Reward, check_inputs
from pgot.rewards.clip import build_aesthetic, build_clip, build_hp, build_ict, build_pickscore
from pgot.rewards.hps import build_hps
from pgot.rewards.imagereward import build_imagereward
from pgot.rewards.preprocessing import preprocess

logger = logging.getLogger(__name__)


def _testbed_preference(
    cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Reward:
    """A testbed preference model (:func:`pgot.testbed.proxies.build_preference`), imported on first use:
    ``pgot.testbed.proxies`` itself imports this package."""
    from pgot.testbed.proxies import build_preference

    return build_preference(cfg, device, dtype)


__all__ = ["REWARDS", "Reward", "build", "preprocess", "score"]

REWARDS: dict[str, Callable[[RewardConfig, torch.device | str, torch.dtype | None], Reward]] = {
    "clip": build_clip,
    "ict": build_ict,
    "hp": build_hp,
    "hps": build_hps,
    "pickscore": build_pickscore,
    "imagereward": build_imagereward,
    "aesthetic": build_aesthetic,
    **_ANALYTIC,
    "tb_align": _testbed_preference,
    "tb_pref": _testbed_preference,
}
"""Reward name -> constructor ``(cfg, device, dtype) -> Reward``."""


def build(
    configs: Sequence[RewardConfig], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> list[Reward]:
    """Build the configured rewards, in order (the columns of :func:`score`).

    Args:
        configs: one :class:`~pgot.config.RewardConfig` per reward.
        device: where the weights live.
        dtype: weights dtype for rewards whose ``dtype`` is ``auto`` (default: bfloat16 on CUDA, float32 elsewhere).

    Raises:
        ValueError: an unknown reward name (listing the known ones), or a bad checkpoint.
    """
    rewards = []
    for i, cfg in enumerate(configs):
        if cfg.name not in REWARDS:
            hint = difflib.get_close_matches(cfg.name, list(REWARDS), n=1)
            raise ValueError(
                f"rewards.{i}.name={cfg.name!r} is not a known reward. Known rewards: {', '.join(REWARDS)}."
                + (f" Did you mean {hint[0]!r}?" if hint else "")
            )
        logger.info("building reward %s from %s", cfg.name, cfg.path or "(analytic)")
        rewards.append(REWARDS[cfg.name](cfg, device, dtype))
    return rewards


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
