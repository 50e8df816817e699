"""The testbed world: scenes from a prompt grammar, rendered exactly at 32 x 32 pixels.

Every prompt of the world reads ``"a {size} {colour} {shape} on a {background} background"``:

=========== ====================================================================
shape       circle, square, triangle (equilateral, apex up)
colour      chromatic: red, green, blue, yellow; achromatic: white, grey, black
size        small (scale 4 px), large (scale 8 px)
background  white, grey, black (never the object's colour)
=========== ====================================================================

That is 2 * 3 * (7 * 3 - 3) = 108 prompts (:func:`all_prompts`, shipped as ``pgot/data/testbed_prompts.txt``).

**Geometry.** Pixel ``(i, j)`` (row, column) covers ``[j, j + 1] x [i, i + 1]``; the image centre is (16, 16).
A shape of scale ``s`` has the area of a circle of radius ``s`` (``pi s^2``): a circle of radius ``s``, a square
of half-side ``s sqrt(pi) / 2``, an equilateral triangle of circumradius ``s sqrt(4 pi / (3 sqrt 3))`` with its
centroid at the object's position. Equal areas make size and shape independent attributes.

**Rendering** (:func:`render`) is exact up to the supersampling: each pixel's object coverage ``a`` in [0, 1] is
the fraction of ``SUPERSAMPLE x SUPERSAMPLE`` sub-pixel centres inside the shape, and the pixel is
``background * (1 - a) + colour * a``. The position is the centre plus a jitter drawn uniformly in
``[-JITTER, JITTER]^2`` pixels (or none, or given offsets).

**Split.** :func:`split` holds out the prompts whose sha1 is 0 mod 4 (28 of the 108), a rule that needs no seed
and does not change when prompts are added.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ACHROMATIC",
    "BACKGROUNDS",
    "CHROMATIC",
    "COLOURS",
    "JITTER",
    "RESOLUTION",
    "SCALES",
    "SHAPES",
    "SIZES",
    "SUPERSAMPLE",
    "PromptError",
    "Scene",
    "all_prompts",
    "all_scenes",
    "as_prompt_list",
    "coverage",
    "grammar_problems",
    "parse_prompt",
    "render",
    "split",
]

RESOLUTION = 32
"""Image height and width in pixels."""

SHAPES = ("circle", "square", "triangle")
"""Shape words, in the order used for shape ids."""

CHROMATIC = ("red", "green", "blue", "yellow")
"""Colours with a hue (HSV saturation about 0.8)."""

ACHROMATIC = ("white", "grey", "black")
"""Colours without a hue (HSV saturation 0)."""

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.85),
    "yellow": (0.90, 0.80, 0.15),
    "white": (0.95, 0.95, 0.95),
    "grey": (0.50, 0.50, 0.50),
    "black": (0.05, 0.05, 0.05),
}
"""Colour word -> sRGB in [0, 1]. Every channel lies in [0.05, 0.95]: an honest image never clips at 0 or 1,
and there is headroom to over-saturate or over-contrast (what hacked rewards do)."""

BACKGROUNDS = ACHROMATIC
"""Background colours (their RGB is in :data:`COLOURS`)."""

SIZES = ("small", "large")
"""Size words."""

SCALES: dict[str, float] = {"small": 4.0, "large": 8.0}
"""Size word -> shape scale ``s`` in pixels (the radius of the equal-area circle)."""

JITTER = 2.5
"""Largest position offset (pixels, each axis) of a training rendering. The largest triangle stays inside the
image: its apex is ``8 * 1.555 = 12.4`` px above its centroid, so at least 1 px from the top edge."""

SUPERSAMPLE = 8
"""Sub-pixel samples per pixel side used by :func:`render`."""

_SQUARE_HALF = math.sqrt(math.pi) / 2  # half-side of the square of area pi s^2, per unit scale
_TRIANGLE_R = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # circumradius of the triangle of area pi s^2
_PROMPT_RE = re.compile(r"^a (\S+) (\S+) (\S+) on an? (\S+) background$")
_TEMPLATE = "a {size} {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class Scene:
    """One scene of the grammar.

    Attributes:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        size: one of :data:`SIZES`.
        background: one of :data:`BACKGROUNDS`, never equal to ``colour``.
    """

    shape: str
    colour: str
    size: str
    background: str

    @property
    def prompt(self) -> str:
        """The canonical prompt text of the scene."""
        return _TEMPLATE.format(size=self.size, colour=self.colour, shape=self.shape, background=self.background)

    @property
    def rgb(self) -> tuple[float, float, float]:
        """The object's colour."""
        return COLOURS[self.colour]

    @property
    def background_rgb(self) -> tuple[float, float, float]:
        """The background's colour."""
        return COLOURS[self.background]

    @property
    def scale(self) -> float:
        """The shape scale in pixels (:data:`SCALES`)."""
        return SCALES[self.size]


def all_scenes() -> list[Scene]:
    """Every scene of the grammar (108), ordered by size, shape, colour, background."""
    return [
        Scene(shape, colour, size, bg)
        for size in SIZES
        for shape in SHAPES
        for colour in COLOURS
        for bg in BACKGROUNDS
        if colour != bg
    ]


def all_prompts() -> list[str]:
    """The prompt of every scene, in :func:`all_scenes` order (the lines of ``pgot/data/testbed_prompts.txt``)."""
    return [s.prompt for s in all_scenes()]


def split(prompts: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split: a prompt is held out iff ``int(sha1(prompt), 16) % 4 == 0``.

    Args:
        prompts: the prompts to split (default: :func:`all_prompts`).

    Returns:
        ``(train, held_out)``, each in input order.
    """
    prompts = all_prompts() if prompts is None else list(prompts)
    held = [int(hashlib.sha1(p.encode("utf-8")).hexdigest(), 16) % 4 == 0 for p in prompts]
    return [p for p, h in zip(prompts, held, strict=True) if not h], [
        p for p, h in zip(prompts, held, strict=True) if h
    ]


def as_prompt_list(prompts: object, where: str, name: str = "prompts") -> list:
    """The prompts of a testbed function as a list, refusing what is not a list of prompts.

    Every testbed function that takes prompts (:func:`render`, :func:`pgot.testbed.judge.components` and
    :func:`~pgot.testbed.judge.quality`, :func:`pgot.testbed.agent.diagnose`, the preference rewards) reads them
    through this check: a bare string would otherwise be taken as a list of one-character prompts.

    Args:
        prompts: a sequence (list, tuple) of prompt texts or :class:`Scene` objects.
        where: the calling function, for the message.
        name: the argument's name, for the message.

    Returns:
        ``list(prompts)``.

    Raises:
        TypeError: ``prompts`` is a ``str`` (or bytes), or not a sequence; or an item is neither a ``str`` nor a
            :class:`Scene`.
    """
    if isinstance(prompts, (str, bytes)):
        raise TypeError(
            f"{where}: {name} must be a list of prompts, got a single string {prompts[:60]!r}; "
            f"pass [{name}] for one prompt."
        )
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{where}: {name} must be a list of prompts, got {type(prompts).__name__}.")
    items = list(prompts)
    for i, p in enumerate(items):
        if not isinstance(p, (str, Scene)):
            raise TypeError(f"{where}: {name}[{i}] must be a prompt string, got {type(p).__name__}.")
    return items


GRAMMAR_HINT = (
    f"Testbed prompts read {_TEMPLATE!r} (sizes {', '.join(SIZES)}; colours {', '.join(COLOURS)}; shapes "
    f"{', '.join(SHAPES)}; backgrounds {', '.join(BACKGROUNDS)}); pgot.testbed.scenes.all_prompts() lists them all."
)
"""The grammar, as error messages state it (once per message)."""


class PromptError(ValueError):
    """A prompt outside the testbed grammar: ``str(err)`` is the full message (the problem, then the grammar);
    ``err.problem`` the problem alone, for messages that list several prompts and state the grammar once
    (:func:`grammar_problems`)."""

    def __init__(self, problem: str, hint: str = GRAMMAR_HINT):
        super().__init__(f"{problem} {hint}" if hint else problem)
        self.problem = problem


def _unknown(kind: str, word: str, choices: Sequence[str], text: str) -> PromptError:
    hint = difflib.get_close_matches(word, list(choices), n=1)
    more = f" Did you mean {hint[0]!r}?" if hint else ""
    return PromptError(f"prompt {text!r}: {kind} {word!r} is not in the testbed grammar ({', '.join(choices)}).{more}")


def grammar_problems(prompts: Sequence[str], limit: int = 5) -> str | None:
    """One message for every prompt outside the grammar, the grammar stated once; None when every prompt is in it.

    Args:
        prompts: prompt texts (duplicates are reported once).
        limit: most prompts quoted; the rest are counted.

    Returns:
        ``"<n> prompt(s) are outside the testbed grammar: <problem>; <problem> (<k> more). Testbed prompts read ..."``
        or None.

    Raises:
        TypeError: ``prompts`` is a single string (:func:`as_prompt_list`).
    """
    problems = []
    for text in dict.fromkeys(as_prompt_list(prompts, "grammar_problems")):
        if isinstance(text, Scene):
            continue
        try:
            parse_prompt(text)
        except PromptError as exc:
            problems.append(exc.problem)
    if not problems:
        return None
    shown = "; ".join(p.rstrip(".") for p in problems[:limit])
    more = f" ({len(problems) - limit} more)" if len(problems) > limit else ""
    return f"{len(problems)} prompt(s) are outside the testbed grammar: {shown}{more}. {GRAMMAR_HINT}"


def parse_prompt(text: str) -> Scene:
    """The scene of a testbed prompt (case and runs of whitespace are ignored, a final period is allowed).

    Args:
        text: e.g. ``"a small red circle on a grey background"``.

    Returns:
        The :class:`Scene`.

    Raises:
        PromptError: (a ValueError) the text is not a sentence of the grammar (the message names the offending word
            and the allowed ones, then states the grammar) or the object has the background's colour.
    """
    if not isinstance(text, str):
        raise PromptError(f"a testbed prompt must be a string, got {type(text).__name__}.", hint="")
    norm = " ".join(text.lower().split()).rstrip(".")
    m = _PROMPT_RE.match(norm)
    if m is None:
        raise PromptError(f"prompt {text!r} is outside the testbed grammar.")
    size, colour, shape, bg = m.groups()
    if size not in SIZES:
        raise _unknown("size", size, SIZES, text)
    if colour not in COLOURS:
        raise _unknown("colour", colour, tuple(COLOURS), text)
    if shape not in SHAPES:
        raise _unknown("shape", shape, SHAPES, text)
    if bg not in BACKGROUNDS:
        raise _unknown("background", bg, BACKGROUNDS, text)
    if colour == bg:
        raise PromptError(
            f"prompt {text!r}: a {colour} object on a {bg} background would be invisible, so the grammar excludes "
            "it. Pick a background of another colour.",
            hint="",
        )
    return Scene(shape, colour, size, bg)


def coverage(
    shapes: Sequence[str],
    cx: np.ndarray,
    cy: np.ndarray,
    scale: np.ndarray,
    *,
    resolution: int = RESOLUTION,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Fraction of each pixel covered by each shape, by supersampling.

    Args:
        shapes: B shape words.
        cx, cy: (B,) object positions in pixels (x to the right, y down; the image centre is ``resolution / 2``).
        scale: (B,) shape scales ``s`` in pixels (area ``pi s^2``).
        resolution: image side in pixels.
        supersample: sub-pixel samples per pixel side (``supersample^2`` per pixel).

    Returns:
        (B, resolution, resolution) float64 coverage in [0, 1], a multiple of ``1 / supersample^2``.

    Raises:
        ValueError: an unknown shape word.
    """
    n = len(shapes)
    cx = np.asarray(cx, dtype=np.float64).reshape(n, 1, 1)
    cy = np.asarray(cy, dtype=np.float64).reshape(n, 1, 1)
    s = np.asarray(scale, dtype=np.float64).reshape(n, 1, 1)
    t = (np.arange(resolution * supersample, dtype=np.float64) + 0.5) / supersample
    dx = t[None, None, :] - cx  # (B, 1, W*ss)
    dy = t[None, :, None] - cy  # (B, H*ss, 1)
    inside = np.zeros((n, resolution * supersample, resolution * supersample), dtype=bool)
    for kind in set(shapes):
        if kind not in SHAPES:
            raise ValueError(f"unknown shape {kind!r}; testbed shapes are {', '.join(SHAPES)}.")
        idx = np.array([i for i, k in enumerate(shapes) if k == kind])
        x, y, si = dx[idx], dy[idx], s[idx]
        if kind == "circle":
            inside[idx] = x**2 + y**2 <= si**2
        elif kind == "square":
            h = si * _SQUARE_HALF
            inside[idx] = (np.abs(x) <= h) & (np.abs(y) <= h)
        else:  # apex up at (0, -R); base corners at (+-R sin 60, R / 2); y grows downwards
            r = si * _TRIANGLE_R
            sin60 = math.sqrt(3) / 2
            base = y <= r / 2
            # the two slanted sides: points on the inner side of the lines through the apex and each base corner
            right = sin60 * (y + r) - 1.5 * x >= 0  # (y + r) / (1.5 r) >= x / (r sin60)
            left = sin60 * (y + r) + 1.5 * x >= 0
            inside[idx] = base & right & left
    cov = inside.reshape(n, resolution, supersample, resolution, supersample).mean(axis=(2, 4))
    return cov


def render(
    scenes: Sequence[Scene | str],
    *,
    seed: int | None = None,
    jitter: float = JITTER,
    offsets: np.ndarray | None = None,
    resolution: int = RESOLUTION,
) -> torch.Tensor:
    """Render scenes exactly (antialiased by supersampling).

    Args:
        scenes: B :class:`Scene` objects or prompt texts (parsed with :func:`parse_prompt`).
        seed: when given, each object's offset from the centre is drawn uniformly in ``[-jitter, jitter]^2`` from
            ``numpy.random.default_rng(seed)`` (one (dx, dy) per image, in order); None: no jitter.
        jitter: largest offset in pixels when ``seed`` is given.
        offsets: (B, 2) explicit offsets (dx, dy) in pixels; overrides ``seed``. Every offset must be finite.
        resolution: image side in pixels (shape scales are in pixels, so keep the default for the world's sizes).

    Returns:
        (B, 3, resolution, resolution) float32 images in [0, 1]; an empty list of scenes gives (0, 3, resolution,
        resolution).

    Raises:
        TypeError: ``scenes`` is a single string (or not a list of prompts / scenes).
        ValueError: a prompt outside the grammar, ``offsets`` of the wrong shape or not finite, ``jitter`` negative or
            not finite, or ``resolution`` not a positive integer.
    """
    items = [parse_prompt(s) if isinstance(s, str) else s for s in as_prompt_list(scenes, "render", "scenes")]
    n = len(items)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"render: resolution must be a positive number of pixels, got {resolution!r}.")
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float, np.floating, np.integer)):
        raise ValueError(f"render: jitter must be a number of pixels, got {jitter!r}.")
    if not math.isfinite(jitter) or jitter < 0:
        raise ValueError(
            f"render: jitter must be a finite number of pixels >= 0 (the largest offset), got {jitter!r}; "
            f"the training renderings use {JITTER}."
        )
    if offsets is not None:
        try:
            offsets = np.asarray(offsets, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"render: offsets must be a ({n}, 2) array of numbers (dx, dy per scene), got {offsets!r}."
            ) from None
        if offsets.shape != (n, 2):
            raise ValueError(f"render: offsets must have shape ({n}, 2) (dx, dy per scene), got {offsets.shape}.")
        if not np.isfinite(offsets).all():
            bad = [i for i in range(n) if not np.isfinite(offsets[i]).all()]
            raise ValueError(
                f"render: offsets must be finite numbers of pixels, got {offsets[bad[0]].tolist()} for scene {bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + "."
            )
    elif seed is not None:
        offsets = np.random.default_rng(seed).uniform(-jitter, jitter, size=(n, 2))
    else:
        offsets = np.zeros((n, 2))
    if n == 0:
        return torch.zeros((0, 3, resolution, resolution))
    centre = resolution / 2
    cov = coverage(
        [s.shape for s in items],
        centre + offsets[:, 0],
        centre + offsets[:, 1],
        np.array([s.scale for s in items]),
        resolution=resolution,
    )[:, None]  # (B, 1, H, W)
    fg = np.array([s.rgb for s in items])[:, :, None, None]  # (B, 3, 1, 1)
    bg = np.array([s.background_rgb for s in items])[:, :, None, None]
    img = bg * (1.0 - cov) + fg * cov
    return torch.from_numpy(img.astype(np.float32))
