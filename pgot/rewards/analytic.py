"""Analytic rewards: no weights, differentiable, prompt-free. For the CPU demo and tests.

All act on the raw images (B, 3, H, W) in [0, 1] at their own size (no resize), RGB, and return (B,).
Luminance is Rec. 601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (PIL's ``convert("L")``).

============ ===================================================================================
name         formula (means and standard deviations over the pixels of one image)
============ ===================================================================================
brightness   ``mean(Y)``                                                           in [0, 1]
contrast     RMS contrast ``std(Y) = sqrt(mean((Y - mean Y)^2))``                  in [0, 0.5]
saturation   mean HSV saturation ``(max(R,G,B) - min(R,G,B)) / max(R,G,B)`` (0 for black)  in [0, 1]
colorfulness Hasler & Suesstrunk (2003) ``sqrt(s_rg^2 + s_yb^2) + 0.3 sqrt(m_rg^2 + m_yb^2)``,
             ``rg = R - G``, ``yb = (R + G) / 2 - B``; on [0, 1] pixels (the paper's 8-bit value / 255)
sharpness    mean absolute 3x3 Laplacian ``[[0,1,0],[1,-4,1],[0,1,0]]`` of Y over the interior pixels
             (depends on resolution: compare images of one size)
============ ===================================================================================

Square roots and divisions are guarded (value 0 and gradient 0 where the argument is 0), so flat or
black images get exact values and finite gradients. The guards let NaN through: an image with a NaN pixel
scores NaN, never 0 (and :func:`pgot.rewards.score` sets NaN for any non-finite pixel, infinities included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pgot.config import RewardConfig
from pgot.rewards.base import Reward

__all__ = [
    "ANALYTIC",
    "AnalyticReward",
    "brightness",
    "colorfulness",
    "contrast",
    "luminance",
    "saturation",
    "sharpness",
]

_TINY = 1e-30


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0; NaN stays NaN (``clamp_min`` propagates it)."""
    return torch.where(v <= 0, torch.zeros_like(v), v.clamp_min(_TINY).sqrt())


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H, W) Rec. 601 luma."""
    r, g, b = images.unbind(1)
    return 0.299 * r + 0.587 * g + 0.114 * b


def brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean luminance (B,)."""
    return luminance(images).mean((-2, -1))


def contrast(images: torch.Tensor) -> torch.Tensor:
    """RMS contrast: population standard deviation of the luminance (B,)."""
    y = luminance(images).flatten(1)
    return _sqrt(y.var(dim=1, correction=0))


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (B,)."""
    mx, mn = images.amax(1), images.amin(1)
    sat = torch.where(mx <= 0, torch.zeros_like(mx), (mx - mn) / mx.clamp_min(_TINY))  # NaN stays NaN
    return sat.mean((-2, -1))


def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler-Suesstrunk colourfulness M^(3) on [0, 1] pixels (B,)."""
    r, g, b = images.flatten(2).unbind(1)  # (B, HW) each
    rg, yb = r - g, 0.5 * (r + g) - b
    std = _sqrt(rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0))
    mean = _sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)
    return std + 0.3 * mean


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian of the luminance over interior pixels (B,); needs H, W >= 3."""
    kernel = _LAPLACIAN.to(images.device, images.dtype).view(1, 1, 3, 3)
    return F.conv2d(luminance(images)[:, None], kernel).abs().mean((-3, -2, -1))


ANALYTIC = {
    "brightness": brightness,
    "colorfulness": colorfulness,
    "contrast": contrast,
    "saturation": saturation,
    "sharpness": sharpness,
}
"""Name -> function (B, 3, H, W) -> (B,)."""


class AnalyticReward(Reward):
    """A weight-free reward computed from the pixels; ignores the prompts."""

    uses_pixel_values = False

    def __init__(self, name: str, fn):
        super().__init__(name)
        self.fn = fn

    def compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.fn is sharpness and min(images.shape[-2:]) < 3:
            raise ValueError(
                f"reward {self.name!r}: needs images of at least 3x3 pixels, got shape {tuple(images.shape)}."
            )
        return self.fn(images.float())


def _constructor(fn_name: str):
    def build(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
        if cfg.path not in ("", "tiny"):
            raise ValueError(
                f"reward {cfg.name!r} is analytic and has no weights; leave its path empty (got {cfg.path!r})."
            )
        return AnalyticReward(cfg.name, ANALYTIC[fn_name]).freeze()

    build.__name__ = f"build_{fn_name}"
    build.__doc__ = f"Analytic reward {fn_name!r} (no weights)."
    return build


CONSTRUCTORS = {name: _constructor(name) for name in ANALYTIC}
