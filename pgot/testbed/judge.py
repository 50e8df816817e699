"""The ground-truth judge of the testbed: how good an image of a testbed prompt really is.

The judge plays the human of the paper: it knows exactly what the prompt asks for (:mod:`pgot.testbed.scenes`)
and scores every image in [0, 1]. It is never a training reward (it is not differentiable); it is the truth that
proxies are compared with, and the columns "quality change" and "hacked rate" of testbed tables.

**Fitting** (two passes; the second is blind to colour errors and stripes, which have their own components). For an
image ``x`` (3, 32, 32) of a scene with object colour ``c``, background ``g``, shape and scale ``s``:

1. objectness ``m = clip(|x - g| / |c - g|, 0, 1)`` per pixel (Euclidean RGB norms): the object coverage on an
   exact rendering; ``m' = clip((m - 0.2) / 0.6, 0, 1)``, a dead zone against faint noise;
2. area ``A`` and centroid of ``m`` restricted to the largest 8-connected blob of ``m >= 0.5`` grown by 1 px (exact
   on an exact rendering, blind to noise and speckles elsewhere); fitted scale ``sqrt(A / pi)`` (every shape of
   scale s has area ``pi s^2``, :mod:`pgot.testbed.scenes`);
3. the fitted template ``t``: the prompt's shape rendered (:func:`~pgot.testbed.scenes.coverage`) at that centroid
   and scale, and the blur ``b``: the Gaussian (0 to 3 px, refined by a parabola) that makes ``soft(G_b * t)``
   match ``m'`` best in soft IoU ``sum min / sum max``;
4. colours ``c^`` and ``g^``: per-channel medians over the template's interior (1.5 px inside its edge) and over the
   pixels 2 px or more outside it; the fitted image ``x^ = g^ (1 - t) + c^ t``;
5. the residual ``x - x^`` on the flat pixels (2 px or more from any edge of ``t``), decomposed as
   ``column profile + row profile + eps``;
6. second pass: steps 1-5 again on ``x`` minus those profiles, with objectness measured between ``g^`` and ``c^``.

**Components.** Each is ``exp(-(d / tau)^2)`` of a damage ``d >= 0`` (1 = no damage; ``d = tau`` gives
``exp(-1) = 0.37``):

============== ========================================================================== ========
component      damage d                                                                   tau
============== ========================================================================== ========
shape          ``(1 - IoU) / margin``, IoU of step 3; margin = the same error of an exact   0.5
               rendering of the nearest other shape (so a clean wrong shape gives d = 1)
colour         ``|c^ - c|`` (RGB)                                                         0.25
size           ``|ln(A / (pi s^2))|`` (small vs large: ln 4 = 1.39)                       0.5
background     ``|g^ - g|`` (RGB)                                                         0.25
noise          RMS of eps along the grey axis ``(1, 1, 1) / sqrt 3`` (brightness noise)   0.07
colour_noise   RMS of eps per dimension across the grey axis (chroma noise)               0.07
stripes        RMS of the high-frequency part (period <= 4 px) of the column and row      0.03
               profiles, less the part expected from eps
banding        RMS of their low-frequency part (5-tap binomial smoothing), likewise       0.03
oversaturation mean over pixels of ``relu(chroma(x~) - chroma(i~))``, chroma = max - min    0.1
               of the channels, ``~`` a 3x3 box blur, ``i = g (1 - t) + c t`` the image
               in the prompt's own colours
halo           RMS distance, on the pixels within 2 px of an edge of ``t``, of each pixel  0.06
               (profiles removed) to the RGB segment [g^, c^] on which every antialiased
               edge pixel lies, less the noise's share ``2 sigma^2``
blur           ``b`` of step 3, in pixels                                                  1.0
============== ========================================================================== ========

The first four are **fidelity** (does the image show the prompt), the others **cleanliness** (is the image free of
artefacts). A missing object (less than 1 pixel of ``m'``, or object and background colours closer than 0.1)
scores 0 on shape, colour and size.

**Quality** is the product of all eleven components::

    quality = prod_k component_k = exp(-sum_k (d_k / tau_k)^2)

so every kind of damage costs, a small damage costs a little (quadratically), and one gross failure (a wrong
colour, pure noise) drives the quality to about 0. Exact renderings of the prompt, at any jitter up to
:data:`~pgot.testbed.scenes.JITTER`, score above 0.97 (``tests/test_testbed_judge.py``; in fact 1 up to rounding).

The taus were set on damaged renderings alone, before any model was trained: each is about the damage at which a
person sees a clear defect at 32 px. (Independent RGB noise of standard deviation sigma is both brightness and colour
noise, so together they cost ``exp(-2 (sigma / 0.07)^2) ~ exp(-(sigma / 0.05)^2)``.) The fit costs about 10 ms per
image on one CPU core.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from pgot.rewards.base import RANGE_TOLERANCE
from pgot.testbed.scenes import RESOLUTION, SHAPES, Scene, as_prompt_list, coverage, parse_prompt

__all__ = ["CLEANLINESS", "COMPONENTS", "FIDELITY", "TAUS", "check_images", "components", "quality"]

FIDELITY = ("shape", "colour", "size", "background")
"""Components that measure whether the image shows the prompt."""

CLEANLINESS = ("noise", "colour_noise", "stripes", "banding", "oversaturation", "halo", "blur")
"""Components that measure whether the image is free of artefacts."""

COMPONENTS = FIDELITY + CLEANLINESS
"""Every component, in the order of :func:`components`."""

TAUS: dict[str, float] = {
    "shape": 0.5,
    "colour": 0.25,
    "size": 0.5,
    "background": 0.25,
    "noise": 0.07,
    "colour_noise": 0.07,
    "stripes": 0.03,
    "banding": 0.03,
    "oversaturation": 0.1,
    "halo": 0.06,
    "blur": 1.0,
}
"""Component -> damage scale tau: the component is ``exp(-(d / tau)^2)``."""

_DEAD = 0.2  # dead zone of the objectness map m' (fraction of |c - g|)
_MIN_AREA = 1.0  # pixels of m' below which there is no object
_BLURS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # Gaussian blurs (px) tried when fitting the shape


def _soft(m: np.ndarray) -> np.ndarray:
    """Dead-zone map ``m' = clip((m - 0.2) / 0.6, 0, 1)`` (same on images and templates)."""
    return np.clip((m - _DEAD) / (1.0 - 2 * _DEAD), 0.0, 1.0)


@functools.cache
def _gauss_kernel(sigma: float) -> np.ndarray:
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1, dtype=np.float64) ** 2) / (2 * sigma**2))
    return k / k.sum()


def _gauss(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (B, H, W) maps with zero padding (templates are 0 outside the image)."""
    if sigma <= 0:
        return a
    from scipy import ndimage

    k = _gauss_kernel(sigma)
    a = ndimage.correlate1d(a, k, axis=1, mode="constant")
    return ndimage.correlate1d(a, k, axis=2, mode="constant")


def _fit(m: np.ndarray, shapes: Sequence[str]) -> dict[str, np.ndarray]:
    """Fit each image's object: position, scale, blur and the shape error of the given shapes.

    The moments come from the objectness ``m`` restricted to the largest blob of ``m >= 0.5`` grown by 1 px (exact
    on an exact rendering, where ``m`` is the coverage; blind to noise and speckles elsewhere): area ``A``, centroid, and
    scale ``sqrt(A / pi)`` (every shape of scale s has area ``pi s^2``). The blur is the Gaussian (from
    ``_BLURS``, refined by a parabola through the best three) whose blurred template best matches ``m'``.

    Args:
        m: (B, H, W) objectness in [0, 1].
        shapes: B shape words to fit.

    Returns:
        Dict of (B,) arrays ``area, cx, cy, s_fit, blur, error, present`` and (B, H, W) ``t`` (the sharp fitted
        template's coverage); ``error = 1 - softIoU(m', soft(G_blur * t))``.
    """
    from scipy import ndimage

    n, h, w = m.shape
    mp = _soft(m)
    present = mp.sum((1, 2)) >= _MIN_AREA
    # support: the largest 8-connected blob of m >= 0.5, grown by 1 px (keeps the antialiased rim, drops speckles)
    support = np.zeros(m.shape, dtype=bool)
    for b in range(n):
        labels, count = ndimage.label(m[b] >= 0.5, structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            support[b] = ndimage.binary_dilation(labels == 1 + int(sizes.argmax()), structure=np.ones((3, 3)))
    mr = m * support
    area = mr.sum((1, 2))
    present &= area >= _MIN_AREA
    safe = np.maximum(area, 1e-9)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx = np.where(present, (mr * xs).sum((1, 2)) / safe, w / 2)
    cy = np.where(present, (mr * ys).sum((1, 2)) / safe, h / 2)
    s_fit = np.clip(np.sqrt(safe / math.pi), 0.5, float(h))
    t = coverage(list(shapes), cx, cy, s_fit)
    ious = []
    for sigma in _BLURS:
        tp = _soft(_gauss(t, sigma))
        ious.append(np.minimum(mp, tp).sum((1, 2)) / np.maximum(np.maximum(mp, tp).sum((1, 2)), 1e-9))
    ious = np.stack(ious, 1)  # (B, len(_BLURS))
    best = ious.argmax(1)
    blur = np.array(_BLURS)[best]
    inner = (best > 0) & (best < len(_BLURS) - 1)
    for i in np.flatnonzero(inner):  # parabolic refinement on the (uneven) grid of blurs
        j = best[i]
        x0, x1, x2 = _BLURS[j - 1], _BLURS[j], _BLURS[j + 1]
        y0, y1, y2 = ious[i, j - 1], ious[i, j], ious[i, j + 1]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / den
        if a < 0:
            blur[i] = float(np.clip(-b / (2 * a), x0, x2))
    error = np.where(present, 1.0 - ious.max(1), 1.0)
    return {
        "area": area,
        "cx": cx,
        "cy": cy,
        "s_fit": s_fit,
        "blur": np.where(present, blur, 0.0),
        "error": error,
        "present": present,
        "t": t,
    }


@functools.cache
def _margin(shape: str, scale: float) -> float:
    """Shape error that an exact rendering of the nearest other shape gets when fitted as ``shape``."""
    c = np.array([RESOLUTION / 2])
    errors = [
        float(_fit(coverage([other], c, c, np.array([scale])), [shape])["error"][0])
        for other in SHAPES
        if other != shape
    ]
    return min(errors)


def _pool(a: np.ndarray, k: int, op: str) -> np.ndarray:
    """k x k max / min / mean filter with stride 1 and replicate padding, (B, H, W) -> (B, H, W)."""
    from scipy import ndimage

    size = (1, k, k)
    if op == "max":
        return ndimage.maximum_filter(a, size=size, mode="nearest")
    if op == "min":
        return ndimage.minimum_filter(a, size=size, mode="nearest")
    return ndimage.uniform_filter(a, size=size, mode="nearest")


def _masked_median(x: np.ndarray, mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Per-image, per-channel median of x (B, 3, H, W) over mask (B, H, W); ``fallback`` (B, 3) where empty."""
    out = fallback.copy()
    for b in range(x.shape[0]):
        sel = mask[b]
        if sel.sum() > 0:
            out[b] = np.median(x[b][:, sel], axis=1)
    return out


def _profiles(r: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, ...]:
    """Two-way decomposition of the residual on the flat pixels: ``r_ij = mean + col_j + row_i + eps_ij``.

    Args:
        r: (B, 3, H, W) residual.
        flat: (B, H, W) bool mask of the pixels used.

    Returns:
        ``(noise_var, lum_var, chroma_var, stripe_energy, band_energy)``, each (B,), and ``structure``
        (B, 3, H, W): the per-channel variance of eps, its variance along the grey axis (brightness) and per
        chroma dimension; the mean squared high- and low-frequency parts of the column and row profiles, noise
        bias removed; and ``col_j + row_i`` on every pixel.
    """
    wgt = flat[:, None].astype(np.float64)  # (B, 1, H, W)
    n_pix = np.maximum(wgt.sum((1, 2, 3)), 1.0)
    mean = (r * wgt).sum((2, 3), keepdims=True) / np.maximum(wgt.sum((2, 3), keepdims=True), 1.0)
    r0 = (r - mean) * wgt
    n_col = wgt.sum(2)  # (B, 1, W)
    n_row = wgt.sum(3)  # (B, 1, H)
    col = r0.sum(2) / np.maximum(n_col, 1.0)  # (B, 3, W)
    r1 = (r0 - col[:, :, None, :]) * wgt
    row = r1.sum(3) / np.maximum(n_row, 1.0)  # (B, 3, H)
    eps = (r1 - row[:, :, :, None]) * wgt
    dof = np.maximum(n_pix - (n_col > 0).sum((1, 2)) - (n_row > 0).sum((1, 2)), 1.0)
    noise_var = (eps**2).sum((1, 2, 3)) / (3 * dof)
    # split along the grey axis u = (1, 1, 1) / sqrt(3): eps . u = sqrt(3) mean_c(eps) (brightness), the rest chroma
    lum_var = (3 * eps.mean(1) ** 2).sum((1, 2)) / dof
    chroma_var = np.maximum(3 * noise_var - lum_var, 0.0) / 2
    kernel = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    stripe = np.zeros(r.shape[0])
    band = np.zeros(r.shape[0])
    for prof, cnt in ((col, n_col), (row, n_row)):
        ok = cnt[:, 0] >= 4  # (B, L): profile entries backed by enough pixels
        p = np.where(ok[:, None], prof, 0.0)
        low = np.stack(
            [np.stack([np.convolve(p[b, ch], kernel, mode="same") for ch in range(3)]) for b in range(p.shape[0])]
        )
        norm = np.stack([np.convolve(ok[b].astype(np.float64), kernel, mode="same") for b in range(p.shape[0])])
        low = np.where(ok[:, None], low / np.maximum(norm[:, None], 1e-9), 0.0)  # renormalised at gaps and ends
        high = np.where(ok[:, None], p - low, 0.0)
        k_ok = np.maximum(ok.sum(1), 1)
        # E[p_j^2] = a_j^2 + sigma^2 / n_j: remove the noise's share before calling it structure
        bias = (noise_var[:, None] / np.maximum(cnt[:, 0], 1.0) * ok).sum(1) / k_ok
        stripe += np.maximum((high**2).sum((1, 2)) / (3 * k_ok) - bias * (1 - 6 / 16) ** 2, 0.0)
        band += np.maximum((low**2).sum((1, 2)) / (3 * k_ok) - bias * (6 / 16) ** 2, 0.0)
    structure = col[:, :, None, :] + row[:, :, :, None]
    return noise_var, lum_var, chroma_var, stripe, band, structure


def _as_scenes(prompts: Sequence[str | Scene]) -> list[Scene]:
    return [p if isinstance(p, Scene) else parse_prompt(p) for p in prompts]


def check_images(images: object, n: int, *, where: str = "judge", name: str = "images") -> None:
    """Refuse what is not a batch of ``n`` testbed images: the rule of :func:`pgot.score`, at the testbed's size.

    A batch is a float tensor of shape (n, 3, 32, 32) with finite values in [0, 1] (tolerance
    :data:`pgot.rewards.base.RANGE_TOLERANCE`). uint8 or 0-255 images are refused, not clamped to a white image.
    ``n = 0`` (an empty batch of the right shape) is allowed.

    Args:
        images: the batch.
        n: the number of prompts it goes with.
        where: the calling function, for the message.
        name: the argument's name, for the message.

    Raises:
        ValueError: not a 4-d tensor of 3 channels, another size than 32 x 32, a non-float dtype, values outside [0, 1]
            or not finite, or a batch size other than ``n``.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"{where}: {name} must be a float tensor of shape (B, 3, {RESOLUTION}, {RESOLUTION}) with values in [0, 1], "
            f"got {got}. Pass a batch of RGB images, e.g. images[None] for one (3, H, W) image."
        )
    if tuple(images.shape[2:]) != (RESOLUTION, RESOLUTION):
        raise ValueError(
            f"{where}: the testbed world is {RESOLUTION} x {RESOLUTION} pixels, got {name} of "
            f"{tuple(images.shape[2:])}. Sample the testbed model at model.resolution={RESOLUTION}."
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{where}: {name} must be float images in [0, 1], got dtype {images.dtype}. Convert 0-255 images with "
            "images.float() / 255."
        )
    if images.shape[0] != n:
        raise ValueError(f"{where}: got {n} prompts for {images.shape[0]} {name}; pass one prompt per image.")
    if n == 0:
        return
    x = images.detach()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{where}: {name} hold NaN or infinite values; images must be finite, in [0, 1].")
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{where}: {name} must lie in [0, 1] (tolerance {RANGE_TOLERANCE}), got values in [{lo:.4g}, {hi:.4g}]. "
            "Divide 0-255 images by 255; map a VAE output x in [-1, 1] with (x / 2 + 0.5).clamp(0, 1)."
        )


def _check(images: torch.Tensor, n: int) -> np.ndarray:
    check_images(images, n)
    return images.detach().float().cpu().clamp(0, 1).numpy().astype(np.float64)


def _colours(x: np.ndarray, shapes: list[str], fit: dict, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Object and background colours (B, 3): medians over the fitted template's interior (1.5 px inside its
    edge; the pixels with coverage >= 0.5 when that leaves fewer than 4) and over the pixels 2 px or more outside."""
    cx, cy, s_fit, t = fit["cx"], fit["cy"], fit["s_fit"], fit["t"]
    inner = coverage(shapes, cx, cy, np.maximum(s_fit - 1.5, 0.5)) >= 0.999
    small = inner.sum((1, 2)) < 4
    inner = np.where(small[:, None, None], t >= 0.5, inner)
    outer = coverage(shapes, cx, cy, s_fit + 2.0) <= 0.0
    g_hat = _masked_median(x, outer, fallback)
    c_hat = _masked_median(x, inner, g_hat)
    return c_hat, g_hat


def _texture(x: np.ndarray, fit: dict, c_hat: np.ndarray, g_hat: np.ndarray):
    """Residual of x against the fitted image ``g^ (1 - t) + c^ t`` on the flat pixels, decomposed by _profiles."""
    t = fit["t"]
    flat = (_pool(t, 5, "max") <= 0.0) | (_pool(t, 5, "min") >= 1.0)
    fitted = g_hat[:, :, None, None] * (1 - t[:, None]) + c_hat[:, :, None, None] * t[:, None]
    return (flat, *_profiles(x - fitted, flat))


def _damages(images: torch.Tensor, prompts: Sequence[str | Scene]) -> dict[str, np.ndarray]:
    """Damage ``d_k`` (B,) of every component (see the module docstring); (0,) arrays for an empty batch."""
    scenes = _as_scenes(as_prompt_list(prompts, "judge"))
    x = _check(images, len(scenes))
    if not scenes:
        return {k: np.zeros(0) for k in COMPONENTS}
    c = np.array([s.rgb for s in scenes])  # (B, 3)
    g = np.array([s.background_rgb for s in scenes])
    shapes = [s.shape for s in scenes]

    def objectness(img: np.ndarray, obj: np.ndarray, bg: np.ndarray) -> np.ndarray:
        span = np.maximum(np.linalg.norm(obj - bg, axis=1), 1e-6)[:, None, None]
        return np.clip(np.linalg.norm(img - bg[:, :, None, None], axis=1) / span, 0.0, 1.0)

    # pass 1: objectness against the prompt's colours; rough fit, colours and row / column structure
    fit = _fit(objectness(x, c, g), shapes)
    c_hat, g_hat = _colours(x, shapes, fit, g.copy())
    structure = _texture(x, fit, c_hat, g_hat)[-1]
    # pass 2: objectness between the observed colours on the destructured image (blind to colour errors and
    # stripes, which have their own components), then the final fit
    x2 = x - structure
    visible = np.linalg.norm(c_hat - g_hat, axis=1) >= 0.1
    fit = _fit(objectness(x2, c_hat, g_hat), shapes)
    present = fit["present"] & visible
    c_hat, g_hat = _colours(x2, shapes, fit, g_hat)
    flat, noise_var, lum_var, chroma_var, stripe_e, band_e, structure = _texture(x, fit, c_hat, g_hat)
    t = fit["t"]

    margins = np.array([_margin(s.shape, s.scale) for s in scenes])
    scale = np.array([s.scale for s in scenes])
    shape = np.where(present, fit["error"] / margins, np.inf)
    size = np.where(present, np.abs(np.log(np.maximum(fit["area"], 1e-9) / (math.pi * scale**2))), np.inf)
    colour = np.where(present, np.linalg.norm(c_hat - c, axis=1), np.inf)
    background = np.linalg.norm(g_hat - g, axis=1)

    # chroma beyond the prompt's own colours, after a 3x3 box blur
    ideal = g[:, :, None, None] * (1 - t[:, None]) + c[:, :, None, None] * t[:, None]

    def box3(a: np.ndarray) -> np.ndarray:
        return np.stack([_pool(a[:, ch], 3, "mean") for ch in range(3)], axis=1)

    xb, ib = box3(x), box3(ideal)
    oversaturation = np.maximum((xb.max(1) - xb.min(1)) - (ib.max(1) - ib.min(1)), 0.0).mean((1, 2))

    # halo: distance of edge-band pixels (row / column structure removed) to the segment [g^, c^]
    edge = ~flat
    seg = (c_hat - g_hat)[:, :, None, None]
    rel = x - structure - g_hat[:, :, None, None]
    lam = np.clip((rel * seg).sum(1, keepdims=True) / np.maximum((seg**2).sum(1, keepdims=True), 1e-9), 0.0, 1.0)
    dist2 = ((rel - lam * seg) ** 2).sum(1)  # (B, H, W)
    n_edge = np.maximum(edge.sum((1, 2)), 1)
    halo = np.sqrt(np.maximum((dist2 * edge).sum((1, 2)) / n_edge - 2 * noise_var, 0.0))

    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "background": background,
        "noise": np.sqrt(lum_var),
        "colour_noise": np.sqrt(chroma_var),
        "stripes": np.sqrt(stripe_e),
        "banding": np.sqrt(band_e),
        "oversaturation": oversaturation,
        "halo": halo,
        "blur": np.where(present, fit["blur"], 0.0),
    }


def components(images: torch.Tensor, prompts: Sequence[str | Scene]) -> dict[str, torch.Tensor]:
    """Every component of the judge (see the module docstring), each ``exp(-(d / tau)^2)``.

    Args:
        images: (B, 3, 32, 32) float images in [0, 1] (the rule of :func:`check_images`; values within its tolerance
            outside [0, 1] are clamped).
        prompts: a list of B testbed prompts (or :class:`~pgot.testbed.scenes.Scene` objects).

    Returns:
        Component name (:data:`COMPONENTS` order) -> (B,) float32 tensor in [0, 1]; 1 means undamaged. An empty batch
        (B = 0, with no prompts) gives (0,) tensors.

    Raises:
        TypeError: ``prompts`` is a single string, not a list of prompts.
        ValueError: images that break :func:`check_images` (shape, size, dtype, range), a prompt count that differs
            from the image count, or a prompt outside the grammar.
    """
    d = _damages(images, prompts)
    return {k: torch.from_numpy(np.exp(-((d[k] / TAUS[k]) ** 2))).float() for k in COMPONENTS}


def quality(images: torch.Tensor, prompts: Sequence[str | Scene]) -> torch.Tensor:
    """Ground-truth quality: the product of all components, ``exp(-sum_k (d_k / tau_k)^2)``.

    Args:
        images: (B, 3, 32, 32) float images in [0, 1].
        prompts: a list of B testbed prompts (or scenes).

    Returns:
        (B,) float32 in [0, 1]; above 0.97 for exact renderings of the prompt; shape (0,) for an empty batch.

    Raises:
        TypeError, ValueError: as :func:`components`.
    """
    comps = components(images, prompts)
    return torch.stack(list(comps.values())).prod(0)
