"""The reward contract and the pieces every reward family shares.

A reward is an ``nn.Module`` with a ``name``, frozen weights (``requires_grad=False``, always in eval
mode), called as ``reward(images, prompts) -> (B,)`` with images (B, 3, H, W) float in [0, 1] at any
size. Scores are differentiable w.r.t. the images: nothing on the image path runs under ``no_grad``.
Higher is better.

Also here: input validation with errors that name the reward, a bounded cache of text embeddings,
checkpoint path resolution (local file/folder or hub id), weights-only state-dict loading with strict
key checks, the 5-layer linear MLP head shared by HP, LAION aesthetic and ImageReward, and activation
checkpointing.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pgot.rewards.preprocessing import preprocess

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SIZE",
    "RANGE_TOLERANCE",
    "LinearMLP",
    "Reward",
    "TextCache",
    "check_image_size",
    "check_inputs",
    "load_state_dict_file",
    "nan_for_nonfinite",
    "load_strict",
    "maybe_checkpoint",
    "resolve_path",
]

RANGE_TOLERANCE = 1e-3
"""Images may exceed [0, 1] by this much (bf16 rounding of a clamped VAE output) before it is an error."""

IMAGE_SIZE = 224
"""Pixel size of the one preprocessed tensor :func:`pgot.rewards.score` feeds every learned reward."""


def check_image_size(name: str, size: object, source: str) -> None:
    """Refuse a reward tower built for another input size than :data:`IMAGE_SIZE`, before any weight is read.

    Args:
        name: the reward name.
        size: the tower's image size (an int, or a (height, width) pair as open_clip configs give it).
        source: what gave the size (``arch 'ViT-H-14-378'``, a config.json path), for the message.

    Raises:
        ValueError: the size is not 224 x 224; the message names ``rewards.<i>.arch`` and ``rewards.<i>.path``.
    """
    sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if any(int(s) != IMAGE_SIZE for s in sizes):
        shown = "x".join(str(int(s)) for s in sizes)
        raise ValueError(
            f"reward {name!r}: {source} is a tower for {shown} px images, but pgot scores every reward on the shared "
            f"{IMAGE_SIZE} px CLIP preprocessing (pgot.rewards.preprocess), so its position embeddings would not fit. "
            f"Set rewards.<i>.arch to a {IMAGE_SIZE} px architecture (e.g. ViT-H-14, ViT-L-14), or point "
            f"rewards.<i>.path at a {IMAGE_SIZE} px checkpoint."
        )


def check_inputs(name: str, images: torch.Tensor, prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` (naming reward ``name``) unless images are (B, 3, H, W) in [0, 1] with B prompts.

    NaN and infinite pixels are not range errors: the image scores NaN (:func:`nan_for_nonfinite`), so a diverged
    sample is a bad training step rather than a crash.
    """
    if (
        not isinstance(images, torch.Tensor)
        or images.ndim != 4
        or images.shape[1] != 3
        or not images.is_floating_point()
    ):
        got = (
            f"shape {tuple(images.shape)} dtype {images.dtype}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(
            f"reward {name!r}: images must be a float tensor of shape (B, 3, H, W) with values in [0, 1], got {got}. "
            "Pass a batch of RGB images, e.g. images[None] for a single (3, H, W) image."
        )
    if images.shape[0] == 0 or images.shape[-1] == 0 or images.shape[-2] == 0:
        raise ValueError(f"reward {name!r}: images of shape {tuple(images.shape)} are empty; pass at least one image.")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            f"reward {name!r}: prompts must be a list of strings, one per image, got {type(prompts).__name__}."
        )
    if len(prompts) == 0:
        raise ValueError(f"reward {name!r}: the prompt list is empty; pass one prompt per image (B={images.shape[0]}).")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"reward {name!r}: got {len(prompts)} prompts for {images.shape[0]} images (shape {tuple(images.shape)}); "
            "pass one prompt per image (repeat a prompt for its N samples)."
        )
    finite = torch.isfinite(images.detach())
    lo, hi = torch.aminmax(torch.where(finite, images.detach(), 0.5))  # a non-finite pixel scores NaN, not an error
    lo, hi = float(lo), float(hi)  # one host sync per batch
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"reward {name!r}: images must lie in [0, 1] (tolerance {RANGE_TOLERANCE}), got values in [{lo:.4g}, {hi:.4g}]. "
            "Map a VAE output x in [-1, 1] with (x / 2 + 0.5).clamp(0, 1)."
        )


def nan_for_nonfinite(images: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with NaN in the rows of images that hold any NaN or infinite pixel: the rule every reward follows.

    A reward never turns a broken image into a finite number (an analytic statistic would map NaN to 0, a learned
    head may saturate), so a diverged sample shows as NaN in the scores and training skips the step.

    Args:
        images: (B, 3, H, W) the images that were scored.
        scores: (B,) or (B, M) their scores.

    Returns:
        ``scores`` (same shape and dtype) with rows of non-finite images set to NaN; differentiable elsewhere.
    """
    bad = ~torch.isfinite(images.detach()).flatten(1).all(1)  # (B,)
    bad = bad.to(scores.device).view(-1, *([1] * (scores.ndim - 1)))
    return torch.where(bad, torch.full_like(scores, float("nan")), scores)


def resolve_path(name: str, path: str, what: str) -> Path:
    """A local checkpoint file/folder, or a hub id (``org/repo`` or ``org/repo/file``) read from the local hub cache.

    Hub ids resolve through :func:`pgot.hub.resolve`: only the local hub cache is read (nothing is
    downloaded at run time; ``pgot-fetch`` downloads). ``what`` describes the expected checkpoint for the
    error message.
    """
    from pgot import hub

    if not path:
        raise ValueError(
            f"reward {name!r}: no checkpoint path. Set the reward's path (rewards.<i>.path=...) to {what}, or to `tiny` for a random test build."
        )
    local = Path(path).expanduser()
    if local.exists():
        return local
    if hub.is_hub_id(path):
        return hub.resolve(
            path, key="rewards.<i>.path", kind=name, subject=f"reward {name!r}: checkpoint path {path!r}"
        )
    raise ValueError(
        f"reward {name!r}: checkpoint path {path!r} does not exist. "
        f"Set the reward's path (rewards.<i>.path=...) to {what}, or to `tiny` for a random test build; "
        "`pgot-fetch --config <your config>` downloads every checkpoint a config names."
    )


def load_state_dict_file(name: str, path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle (``weights_only=True``, never arbitrary code)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) pickle format
    except Exception as err:
        raise ValueError(
            f"reward {name!r}: cannot read checkpoint {str(path)!r} as a weights-only state dict: {err}"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"reward {name!r}: checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict.")
    return state


def load_strict(
    name: str,
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    path: Path | str,
    *,
    ignore: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load ``state_dict`` into ``module`` (built on the meta device) with no missing or unexpected keys.

    Keys for which ``ignore(key)`` is true are dropped first (legacy ``position_ids`` buffers, unused heads).
    Tensors are assigned, not copied, so a module built on the meta device gets real storage.

    Raises:
        ValueError: naming the reward, the path and a few offending keys when the checkpoint belongs to
            another architecture.
    """
    state_dict = {k: v for k, v in state_dict.items() if not ignore(k)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")

        problems = []
        if missing:
            problems.append(f"missing keys: {few(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches: {few(shapes)}")
        raise ValueError(
            f"reward {name!r}: checkpoint {str(path)!r} does not fit the {type(module).__name__} architecture ({'; '.join(problems)}). "
            "Check that the path holds this reward's checkpoint and that the reward's arch (rewards.<i>.arch) matches it."
        )
    module.load_state_dict(state_dict, strict=True, assign=True)


class LinearMLP(nn.Module):
    """``Linear(d, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64) Dropout Linear(64, 16) Linear(16, 1)``.

    The head of the LAION improved aesthetic predictor (linearMSE), HP and ImageReward: no activations
    (they are commented out in all three originals), keys ``layers.{0,2,4,6,7}.*``.
    """

    def __init__(self, in_dim: int, hidden: int = 1024):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.Dropout(0.2),
            nn.Linear(hidden, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B, 1)."""
        return self.layers(x)


def maybe_checkpoint(layer: Callable[..., torch.Tensor], enabled: bool, *args: object) -> torch.Tensor:
    """``layer(*args)``, recomputed in the backward pass when ``enabled`` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class TextCache:
    """Bounded LRU map prompt text -> text embedding (detached).

    The text towers are frozen and only image gradients matter, so a prompt's embedding is a constant:
    it is computed once under ``no_grad`` and reused across training steps.
    """

    def __init__(self, size: int):
        self.size = size
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get(self, prompts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Embeddings (B, D) of ``prompts``; ``encode(list of P unique prompts) -> (P, D)`` fills the gaps."""
        with torch.no_grad():
            if self.size <= 0:
                return encode(list(prompts)).detach()
            missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
            fresh = dict(zip(missing, encode(missing).detach(), strict=True)) if missing else {}
            rows = []
            for p in prompts:
                if p in fresh:
                    rows.append(fresh[p])
                else:
                    self._store.move_to_end(p)
                    rows.append(self._store[p])
            for p, e in fresh.items():
                self._store[p] = e
            while len(self._store) > self.size:
                self._store.popitem(last=False)
            return torch.stack(rows)


class Reward(nn.Module):
    """Base of every reward: ``reward(images (B, 3, H, W) in [0, 1], prompts (B,)) -> (B,)`` float32.

    Subclasses implement :meth:`compute` on the shared 224 px CLIP-normalised tensor when
    ``uses_pixel_values`` (every learned reward), or on the raw images otherwise (analytic rewards).
    Weights are frozen and the module stays in eval mode whatever ``train()`` is called with.
    """

    uses_pixel_values: bool = True

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], pixel_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Validate, preprocess (unless ``pixel_values`` (B, 3, 224, 224) is given) and score: (B,) float32.

        An image with any NaN or infinite pixel scores NaN (:func:`nan_for_nonfinite`).
        """
        check_inputs(self.name, images, prompts)
        if self.uses_pixel_values:
            x = preprocess(images) if pixel_values is None else pixel_values
        else:
            x = images
        return nan_for_nonfinite(images, self.compute(x, list(prompts)).float())

    def compute(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores (B,) of validated input ``x`` (pixel values or images, see ``uses_pixel_values``)."""
        raise NotImplementedError

    def freeze(self) -> Reward:
        """No parameter requires grad; eval mode (no dropout)."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Reward:
        """Rewards are frozen models: always eval mode (dropout off), whatever ``mode`` says."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            return t.dtype
        return torch.float32
