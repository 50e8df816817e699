"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

Score (``hpsv2/img_score.py``): ``cos(encode_image(px), encode_text(ids))`` with both features
L2-normalised and **no** logit scale (a raw cosine, around 0.28 for SD3-class images). The checkpoint
is ``HPS_v2_compressed.pt`` or ``HPS_v2.1_compressed.pt`` from ``xswu/HPSv2``: ``{'state_dict': ...}``
in fp16 with open_clip's ``ViT-H-14`` keys (v2.0 and v2.1 share the architecture; their scores are not
comparable). ``arch`` names another open_clip model config when needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pgot.config import RewardConfig
from pgot.devices import resolve_dtype
from pgot.rewards.base import Reward, TextCache, check_image_size, load_state_dict_file, load_strict, resolve_path
from pgot.rewards.clip import clip_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["HPSReward", "TINY_OPEN_CLIP", "build_hps", "locate", "open_clip_model"]

TINY_OPEN_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=14, image_size=224),
    text_cfg=dict(layers=2, width=32, heads=2, vocab_size=49408, context_length=77),
)
"""open_clip ``CLIP`` keyword arguments of the tiny HPS build (same code path as ViT-H-14)."""


def open_clip_model(name: str, arch: str) -> dict:
    """Model config (``open_clip.CLIP`` keyword arguments) of an open_clip architecture name."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(
            f"reward {name!r}: unknown open_clip arch {arch!r}. Set rewards.<i>.arch to an open_clip model name, e.g. ViT-H-14."
        )
    check_image_size(name, cfg.get("vision_cfg", {}).get("image_size", 224), f"open_clip arch {arch!r}")
    return cfg


def _build(cfg: dict) -> nn.Module:
    import open_clip

    return open_clip.CLIP(**cfg, output_dict=True)


class HPSReward(Reward):
    """``cos(image features, text features)`` of an open_clip CLIP (HPSv2 / HPSv2.1)."""

    def __init__(self, name: str, model: nn.Module, *, gradient_checkpointing: bool = False, text_cache: int = 1024):
        super().__init__(name)
        self.model = model
        self.model.visual.set_grad_checkpointing(gradient_checkpointing)
        self.tokenizer = clip_tokenizer()
        self.text_cache = TextCache(text_cache)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text features (P, D) float32 (no gradient: the text tower is frozen)."""
        return F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)

    def compute(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = F.normalize(self.model.encode_image(pixel_values.to(self.dtype)).float(), dim=-1)  # (B, D)
        txt = self.text_cache.get(prompts, self.encode_text).to(img.device)  # (B, D)
        return (img * txt).sum(-1)


_WHAT = "the HPSv2 checkpoint HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (xswu/HPSv2)"


def locate(cfg: RewardConfig) -> Path | None:
    """The HPS checkpoint file, checked as far as possible without reading weights (path, arch, image size).

    Returns:
        The .pt file, or None for ``tiny`` / ``random``.

    Raises:
        ValueError: as :func:`build_hps` would, before it reads any weight.
    """
    arch = cfg.arch or "ViT-H-14"
    if cfg.path == "tiny":
        return None
    open_clip_model(cfg.name, arch)
    if cfg.path == "random":
        return None
    path = resolve_path(cfg.name, cfg.path, _WHAT)
    if path.is_dir():
        files = sorted(path.glob("*.pt"))
        if len(files) != 1:
            raise ValueError(
                f"reward {cfg.name!r}: {str(path)!r} is a folder with {len(files)} .pt files; point rewards.<i>.path at the HPS_v2*.pt file."
            )
        path = files[0]
    return path


def build_hps(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """HPSv2 / HPSv2.1 from the ``{'state_dict': ...}`` .pt file; ``tiny``/``random`` builds without weights."""
    arch = cfg.arch or "ViT-H-14"
    wdtype = resolve_dtype(cfg.dtype, device, default=dtype, key=f"reward {cfg.name!r} dtype")
    path = locate(cfg)
    if cfg.path == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny_seed)
            model = _build(TINY_OPEN_CLIP)
    elif cfg.path == "random":
        torch.manual_seed(cfg.tiny_seed)
        with torch.device(device):
            model = _build(open_clip_model(cfg.name, arch))
    else:
        assert path is not None
        state = load_state_dict_file(cfg.name, path)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}  # DDP-saved checkpoints
        with torch.device("meta"):
            model = _build(open_clip_model(cfg.name, arch))
        load_strict(cfg.name, model, state, path, ignore=lambda k: k == "attn_mask")
        # The causal text mask is a non-persistent buffer, so it is still on the meta device.
        if isinstance(model.attn_mask, torch.Tensor) and model.attn_mask.is_meta:
            model.register_buffer("attn_mask", _causal_mask(model.attn_mask.shape[-1]), persistent=False)
    model = model.to(device=device, dtype=wdtype)
    return HPSReward(
        cfg.name, model, gradient_checkpointing=cfg.gradient_checkpointing, text_cache=cfg.text_cache
    ).freeze()


def _causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu_(1)
