"""ImageReward (Xu et al. 2023) in plain torch: BLIP ViT-L/16 + BERT with cross-attention + linear MLP.

The ``image-reward`` package does not install or import on the current stack (transformers 5 removed
the helpers its BLIP "med" BERT needs), so pgot carries the model. Parameter names equal those of the
released ``ImageReward.pt``, which loads strictly after dropping the keys the score never reads
(``blip.text_encoder.embeddings.position_ids``, ``blip.vision_proj.*``, ``blip.text_proj.*``):
620 tensors, 446.2M parameters.

Score (``ImageReward.score_gard``)::

    emb = visual_encoder(px)                                   # (B, 197, 1024), all tokens
    h   = text_encoder(ids, mask, encoder_hidden_states=emb)   # bidirectional self-attn, cross-attn to emb
    r   = (MLP(h[:, 0]) - 0.16717362830052426) / 1.0333394966054072

Text: bert-base-uncased WordPiece, ``[CLS] ... [SEP]``, padded/truncated to 35 tokens. The checkpoint
folder holds ``ImageReward.pt``, ``med_config.json`` (the BERT config, ``vocab_size`` 30524 = BERT's
30522 + ``[DEC]``, ``[ENC]``) and bert-base-uncased's ``vocab.txt``. The ViT shape is read off the
checkpoint (width, depth, patch, image size); its head count is ``med_config["vision_num_heads"]``
when present (pgot's tiny builds), else width / 64 (16 for ViT-L). The text cache does not apply:
text and image are fused by cross-attention in every layer.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pgot.config import RewardConfig
from pgot.devices import resolve_dtype
from pgot.rewards.base import (
    LinearMLP,
    Reward,
    check_image_size,
    load_state_dict_file,
    load_strict,
    maybe_checkpoint,
    resolve_path,
)

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "MED_CONFIG",
    "TINY_MED_CONFIG",
    "TINY_VIT",
    "VIT_L16",
    "BlipTextEncoder",
    "BlipViT",
    "ImageRewardModel",
    "ImageRewardReward",
    "bert_tokenizer",
    "build_imagereward",
    "ignored_key",
    "locate",
    "tiny_vocab",
]

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
"""Token length of ImageReward's prompts (padding="max_length", truncation)."""

MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
"""The released ``med_config.json`` (``encoder_width`` is replaced by the ViT width, 1024)."""
VIT_L16 = dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16)
"""BLIP ``vit='large'``: ViT-L/16 at 224 px."""
TINY_VIT = dict(image_size=224, patch_size=16, width=48, depth=2, heads=4)
TINY_MED_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 0,  # set from the tiny vocabulary
    "encoder_width": TINY_VIT["width"],
    "add_cross_attention": True,
    "vision_num_heads": TINY_VIT["heads"],
}


# ---------------------------------------------------------------------------------------------
# BLIP ViT (models/vit.py of BLIP): pre-norm blocks, qkv with bias, LayerNorm eps 1e-6, exact GELU
# ---------------------------------------------------------------------------------------------


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, W)


class _ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class _ViTMlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = _ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = _ViTMlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipViT(nn.Module):
    """BLIP's ViT: (B, 3, S, S) normalised pixels -> (B, 1 + (S/p)^2, W) tokens after the final norm."""

    def __init__(
        self, image_size: int = 224, patch_size: int = 16, width: int = 1024, depth: int = 24, heads: int = 16
    ):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch_embed = _PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.blocks = nn.ModuleList(_ViTBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, N, W)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = maybe_checkpoint(block, gradient_checkpointing, x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# BLIP "med" BERT (models/med.py): no token types, each layer = self-attn -> cross-attn -> FFN
# ---------------------------------------------------------------------------------------------


class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            cfg["vocab_size"], cfg["hidden_size"], padding_idx=cfg.get("pad_token_id", 0)
        )
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict, kv_width: int):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, w = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, w // self.heads).transpose(1, 2)  # (B, h, L, d)

        out = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(context)), split(self.value(context)), attn_mask=mask
        )
        return out.transpose(1, 2).reshape(b, n, w)


class _BertSelfOutput(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: dict, kv_width: int):
        super().__init__()
        self.self = _BertSelfAttention(cfg, kv_width)
        self.output = _BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _BertOutput(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.dense = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class _BertLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attention = _BertAttention(cfg, cfg["hidden_size"])
        self.crossattention = _BertAttention(cfg, cfg["encoder_width"])
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertOutput(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)  # bidirectional over the prompt tokens
        x = self.crossattention(x, image_embeds, None)  # every image token, no image mask
        return self.output(self.intermediate(x), x)


class _BertEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(_BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class BlipTextEncoder(nn.Module):
    """BLIP's multimodal BERT: (B, L) ids, (B, L) mask, (B, T, W_img) image tokens -> (B, L, D)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertEncoder(cfg)

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor,
        gradient_checkpointing: bool = False,
    ) -> torch.Tensor:
        x = self.embeddings(ids)
        mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, L): True = attend
        for layer in self.encoder.layer:
            x = maybe_checkpoint(layer, gradient_checkpointing, x, mask, image_embeds)
        return x


class _Blip(nn.Module):
    def __init__(self, vit: dict, med: dict):
        super().__init__()
        self.visual_encoder = BlipViT(**vit)
        self.text_encoder = BlipTextEncoder({**med, "encoder_width": vit["width"]})


class ImageRewardModel(nn.Module):
    """``blip.visual_encoder``, ``blip.text_encoder``, ``mlp``: the parameter tree of ``ImageReward.pt``."""

    def __init__(self, vit: dict | None = None, med: dict | None = None):
        super().__init__()
        med = dict(MED_CONFIG if med is None else med)
        self.blip = _Blip(dict(VIT_L16 if vit is None else vit), med)
        self.mlp = LinearMLP(med["hidden_size"])

    def forward(
        self,
        pixel_values: torch.Tensor,
        ids: torch.Tensor,
        attention_mask: torch.Tensor,
        gradient_checkpointing: bool = False,
    ) -> torch.Tensor:
        """(B, 3, 224, 224) normalised pixels, (B, L) ids and mask -> normalised rewards (B,) float32."""
        image_embeds = self.blip.visual_encoder(pixel_values, gradient_checkpointing)  # (B, 197, W)
        h = self.blip.text_encoder(ids, attention_mask, image_embeds, gradient_checkpointing)  # (B, L, D)
        return ((self.mlp(h[:, 0].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def ignored_key(key: str) -> bool:
    """Keys of ``ImageReward.pt`` the score never reads: legacy position ids and the ITC projections."""
    return key.endswith("position_ids") or key.startswith(("blip.vision_proj.", "blip.text_proj."))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def tiny_vocab() -> list[str]:
    """A ~190-token WordPiece vocabulary with BERT's special ids (``[PAD]`` 0, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102)."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;()&/")
    words = "a an the of in on with and at photo painting portrait cat dog man woman city tree house red blue green night sunset".split()
    tokens = [
        "[PAD]",
        *(f"[unused{i}]" for i in range(99)),
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *chars,
        *(f"##{c}" for c in chars[:36]),
        *words,
    ]
    return list(dict.fromkeys(tokens))


def bert_tokenizer(name: str, vocab: list[str], expected: int | None = None):
    """``BertTokenizer`` (lower-case WordPiece) over ``vocab``; checks the size (transformers 5 falls back silently)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)
    if tokenizer.vocab_size != len(vocab) or (expected is not None and len(vocab) != expected):
        raise ValueError(
            f"reward {name!r}: BERT tokenizer has {tokenizer.vocab_size} tokens, the vocab.txt {len(vocab)}, expected {expected or len(vocab)}. "
            "Put bert-base-uncased's vocab.txt (30522 lines) next to ImageReward.pt."
        )
    return tokenizer


class ImageRewardReward(Reward):
    """ImageReward: ``(MLP(BLIP(image, prompt)[CLS]) - mean) / std``."""

    def __init__(self, name: str, model: ImageRewardModel, tokenizer, *, gradient_checkpointing: bool = False):
        super().__init__(name)
        self.model = model
        self.tokenizer = tokenizer
        self.gradient_checkpointing = gradient_checkpointing

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 35) ids and attention mask on the model's device."""
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)

    def compute(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        return self.model(pixel_values.to(self.dtype), ids, mask, self.gradient_checkpointing)


def _vit_from_state(name: str, state: dict[str, torch.Tensor], med: dict, path: Path) -> dict:
    prefix = "blip.visual_encoder."
    if f"{prefix}pos_embed" not in state or f"{prefix}patch_embed.proj.weight" not in state:
        raise ValueError(
            f"reward {name!r}: {str(path)!r} is not an ImageReward checkpoint (no {prefix}pos_embed / patch_embed keys). "
            "Point rewards.<i>.path at the folder with ImageReward.pt, med_config.json and vocab.txt."
        )
    width, _, patch, _ = state[f"{prefix}patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k)))
    image_size = int(math.isqrt(state[f"{prefix}pos_embed"].shape[1] - 1)) * patch
    check_image_size(name, image_size, f"the BLIP vision tower of {str(path)!r}")
    return dict(
        image_size=image_size,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=med.get("vision_num_heads", max(1, width // 64)),
    )


def locate(cfg: RewardConfig) -> tuple[Path, Path, Path] | None:
    """(ImageReward.pt, med_config.json, vocab.txt) of the configured folder or file, checked without reading
    weights (None for ``tiny`` / ``random``).

    Raises:
        ValueError: as :func:`build_imagereward` would, before it reads any weight.
    """
    if cfg.path in ("tiny", "random"):
        return None
    root = resolve_path(cfg.name, cfg.path, "the ImageReward folder (ImageReward.pt, med_config.json, vocab.txt)")
    ckpt = root / "ImageReward.pt" if root.is_dir() else root
    folder = ckpt.parent
    for needed in (ckpt, folder / "med_config.json", folder / "vocab.txt"):
        if not needed.is_file():
            raise ValueError(
                f"reward {cfg.name!r}: {str(needed)!r} does not exist. The ImageReward folder needs ImageReward.pt and "
                "med_config.json (THUDM/ImageReward) and bert-base-uncased's vocab.txt; set rewards.<i>.path to it."
            )
    return ckpt, folder / "med_config.json", folder / "vocab.txt"


def build_imagereward(
    cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Reward:
    """ImageReward from ``ImageReward.pt`` + ``med_config.json`` + ``vocab.txt``; ``tiny``/``random`` without weights."""
    wdtype = resolve_dtype(cfg.dtype, device, default=dtype, key=f"reward {cfg.name!r} dtype")
    if cfg.path in ("tiny", "random"):
        if cfg.path == "tiny":
            vocab = tiny_vocab()
            med, vit = {**TINY_MED_CONFIG, "vocab_size": len(vocab) + 2}, TINY_VIT
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.tiny_seed)
                model = ImageRewardModel(vit, med)
        else:
            vocab = tiny_vocab()  # random weights: any tokenizer serves, the full-size embedding table is kept
            torch.manual_seed(cfg.tiny_seed)
            with torch.device(device):
                model = ImageRewardModel(VIT_L16, MED_CONFIG)
        tokenizer = bert_tokenizer(cfg.name, vocab)
    else:
        located = locate(cfg)
        assert located is not None
        ckpt, med_file, vocab_file = located
        med = json.loads(med_file.read_text())
        vocab = vocab_file.read_text(encoding="utf-8").splitlines()
        tokenizer = bert_tokenizer(cfg.name, vocab, expected=med["vocab_size"] - 2)
        state = load_state_dict_file(cfg.name, ckpt)
        vit = _vit_from_state(cfg.name, state, med, ckpt)
        with torch.device("meta"):
            model = ImageRewardModel(vit, med)
        load_strict(cfg.name, model, state, ckpt, ignore=ignored_key)
    model = model.to(device=device, dtype=wdtype)
    model.mlp.float()  # a few MB; float32 keeps the head exact in bf16 runs
    return ImageRewardReward(cfg.name, model, tokenizer, gradient_checkpointing=cfg.gradient_checkpointing).freeze()
