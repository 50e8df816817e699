"""SD3 / SD3.5 base models and their LoRA adapters.

:func:`load_model` returns an :class:`SD3Model`: the diffusers modules (MMDiT transformer, VAE, flow-match
scheduler, CLIP-L / CLIP-G / optional T5 text encoders) plus a ``fingerprint`` that frontier stores, runs and saved
LoRAs record. ``model.tiny=true`` builds the small random SD3 of :mod:`pgot.tiny`; prompt embeddings live in
:mod:`pgot.embeddings`.

LoRA goes through peft on the attention projections (``transformer.add_adapter(LoraConfig)``), trainable
parameters in float32. :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` in the diffusers format
(keys ``transformer.<module>.lora_A.weight``, plus the peft ``LoraConfig`` as metadata so ``lora_alpha`` survives),
which ``StableDiffusion3Pipeline.load_lora_weights`` loads unchanged. :func:`load_lora` and
:func:`load_lora_soup` load such files as frozen adapters; a soup activates several adapters at once with
``set_adapters(names, weights)``, which in peft adds ``sum_i w_i * (alpha_i / r_i) * B_i A_i x`` to every target
layer: exactly the weighted sum of the LoRA deltas, without merging them into the base weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from pgot.devices import resolve_device, resolve_dtype
from pgot.files import atomic_write
from pgot.testbed import MODEL_DIR as TESTBED_MODEL_DIR

if TYPE_CHECKING:
    from pgot.config import ModelConfig

__all__ = [
    "FINGERPRINT_KEY",
    "LORA_WEIGHT_NAME",
    "SD3Model",
    "add_lora",
    "check_model_folder",
    "folder_fingerprint",
    "check_lora_file",
    "load_lora",
    "load_lora_soup",
    "load_model",
    "lora_base_fingerprint",
    "lora_state_dict",
    "pipeline",
    "resolve_lora_file",
    "save_lora",
]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"builtin:testbed": TESTBED_MODEL_DIR}
"""``model.path`` names of models shipped with pgot -> their folder (the reward-hacking testbed's tiny SD3)."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""File name of a diffusers LoRA (what ``load_lora_weights`` looks for in a folder)."""

TRAIN_ADAPTER = "default"
"""Name of the trainable peft adapter that :func:`add_lora` creates."""

_GET_WEIGHTS = (
    "Get the weights with `pgot-fetch --config <your config>` (it downloads every checkpoint the config names and "
    "writes the config again with local paths), or `hf download stabilityai/stable-diffusion-3.5-large-turbo "
    "--local-dir <folder>` and set model.path=<folder> (a gated model: accept the Stability AI Community License "
    "on its hub page and `hf auth login` first); or use model.tiny=true for a small random model that needs no weights."
)


@dataclass
class SD3Model:
    """An SD3 / SD3.5 model as pgot uses it (the diffusers modules, frozen, plus bookkeeping).

    Attributes:
        transformer: ``SD3Transformer2DModel`` (gets the LoRA adapters).
        vae: ``AutoencoderKL`` with 16 latent channels.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (only its config is used; see ``pgot.generate.sigmas``).
        text_encoder, text_encoder_2: CLIP-L and CLIP-G ``CLIPTextModelWithProjection`` (None once offloaded).
        text_encoder_3: T5 encoder or None (``model.use_t5=false``, tiny models, or offloaded).
        tokenizer, tokenizer_2, tokenizer_3: the matching tokenizers.
        fingerprint: identifies the base weights (not the LoRA); recorded in frontier stores and runs.
        path: the folder it came from (``tiny`` for a built tiny model).
        dtype: weights dtype of the frozen modules.
        device: where the modules live.
        max_sequence_length: T5 token length used by :func:`encode_prompts`.
        resolution: default image size in pixels (``model.resolution``).
        embed_cache: in-memory prompt-embedding cache, key -> (prompt_embeds (L, D), pooled (D_pool,)) on CPU.
        adapter_weights: the active LoRA adapters and their weights (what ``set_adapters`` was given).
    """

    transformer: Any
    vae: Any
    scheduler: Any
    text_encoder: Any = None
    text_encoder_2: Any = None
    text_encoder_3: Any = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    tokenizer_3: Any = None
    fingerprint: str = ""
    path: str = ""
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_sequence_length: int = 256
    resolution: int = 1024
    embed_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    adapter_weights: dict[str, float] = field(default_factory=dict)

    @property
    def transformer_config(self) -> Any:
        """The transformer's diffusers config, also when the transformer is wrapped (DDP ``.module``, ``torch.compile``)."""
        m = self.transformer
        while not hasattr(m, "config") and (hasattr(m, "module") or hasattr(m, "_orig_mod")):
            m = getattr(m, "module", None) or m._orig_mod
        return m.config

    @property
    def latent_channels(self) -> int:
        """Channels C of the latent (16 for SD3)."""
        return int(self.transformer_config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD3; 4 for the tiny model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latent of a ``resolution`` x ``resolution`` image.

        Raises:
            ValueError: if the resolution is not a multiple of ``vae_scale_factor * patch_size``.
        """
        mult = self.vae_scale_factor * int(self.transformer_config.patch_size)
        if resolution <= 0 or resolution % mult:
            raise ValueError(
                f"model.resolution={resolution} must be a positive multiple of {mult} (VAE scale factor "
                f"{self.vae_scale_factor} x patch size {self.transformer_config.patch_size}) for this model. "
                f"Use e.g. model.resolution={max(mult, round(resolution / mult) * mult)}."
            )
        s = resolution // self.vae_scale_factor
        return (self.latent_channels, s, s)


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def folder_fingerprint(folder: Path) -> str:
    """sha1 of every small config/json file's content and every other file's relative path and size."""
    h = hashlib.sha1()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts and ".git" not in p.parts):
        rel = f.relative_to(folder).as_posix()
        h.update(rel.encode())
        if f.suffix in (".json", ".txt", ".model") and f.stat().st_size < 4_000_000:
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return "sd3-" + h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def _not_sd3(path: str, why: str) -> ValueError:
    return ValueError(f"model.path={path!r} {why}, so it is not an SD3 / SD3.5 diffusers folder. {_GET_WEIGHTS}")


def check_model_folder(path: str) -> Path:
    if path in BUILTIN_MODELS:
        path = str(BUILTIN_MODELS[path])
    if not path:
        raise ValueError(f"model.path is empty and model.tiny is false. {_GET_WEIGHTS}")
    folder = Path(path).expanduser()
    if not folder.exists():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            raise ValueError(f"model.path={path!r} does not exist. {_GET_WEIGHTS}")
        from pgot.hub import resolve

        # the snapshot folder in the local hub cache (never downloaded here), then checked as any folder
        folder = resolve(path, key="model.path", kind="model", hint=_GET_WEIGHTS)
    if not folder.is_dir():
        raise _not_sd3(path, "is a file, not a folder")
    index = folder / "model_index.json"
    if not index.is_file():
        raise _not_sd3(path, "has no model_index.json")
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _not_sd3(path, "has an unreadable model_index.json") from None
    if "StableDiffusion3" not in cls:
        raise _not_sd3(path, f"holds a {cls or 'unknown'} pipeline")
    for sub in ("transformer", "vae", "scheduler"):
        if not (folder / sub).is_dir():
            raise _not_sd3(path, f"has no {sub}/ subfolder")
    return folder


def _finish(model: SD3Model, cfg: ModelConfig) -> SD3Model:
    for m in (model.transformer, model.vae, model.text_encoder, model.text_encoder_2, model.text_encoder_3):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    if cfg.vae_gradient_checkpointing:
        model.vae.enable_gradient_checkpointing()
    if cfg.lora_path:
        load_lora(model, cfg.lora_path, key="model.lora_path", allow_other_base=cfg.allow_lora_transfer)
    return model


def load_model(
    cfg: ModelConfig, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> SD3Model:
    """Load SD3 / SD3.5 from a diffusers folder (``model.path``) or build the tiny random model (``model.tiny``).

    Every module is frozen and in eval mode. The transformer's gradient checkpointing is switched on by
    :func:`add_lora` (``model.gradient_checkpointing``); in diffusers it acts whenever gradients are enabled,
    whatever the train/eval mode.

    Args:
        cfg: the ``model`` section.
        device: overrides ``model.device``.
        dtype: overrides ``model.dtype``.

    Returns:
        The :class:`SD3Model`; ``cfg.lora_path``, when set, is loaded as a frozen adapter.

    Raises:
        ValueError: a missing folder or one that is not an SD3 model (the message says how to get the weights).
    """
    dev = resolve_device(device if device is not None else cfg.device)
    dt = resolve_dtype(dtype if dtype is not None else cfg.dtype, dev)
    if cfg.tiny:
        from pgot.tiny import build_tiny  # pgot.tiny imports this module

        model = build_tiny(
            cfg.tiny_seed, dev, dt, max_sequence_length=cfg.max_sequence_length, resolution=cfg.resolution
        )
        return _finish(model, cfg)

    folder = check_model_folder(cfg.path)
    src = str(folder)
    fp = folder_fingerprint(folder) if folder.is_dir() else "hub-" + hashlib.sha1(src.encode()).hexdigest()[:16]
    logger.info("loading SD3 from %s (%s, %s)", src, dev, dt)
    kw = {"torch_dtype": dt}
    transformer = SD3Transformer2DModel.from_pretrained(src, subfolder="transformer", **kw)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler")
    te = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder", **kw)
    te2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw)
    tok = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2")
    te3 = tok3 = None
    has_t5 = not folder.is_dir() or (folder / "text_encoder_3").is_dir()
    if cfg.use_t5 and has_t5:
        from transformers import T5EncoderModel, T5TokenizerFast

        te3 = T5EncoderModel.from_pretrained(src, subfolder="text_encoder_3", **kw)
        tok3 = T5TokenizerFast.from_pretrained(src, subfolder="tokenizer_3")
    elif cfg.use_t5:
        logger.warning("model.use_t5=true but %s has no text_encoder_3/; encoding prompts without T5", src)
    model = SD3Model(
        transformer=transformer.to(dev),
        vae=vae.to(dev),
        scheduler=scheduler,
        text_encoder=te.to(dev),
        text_encoder_2=te2.to(dev),
        text_encoder_3=None if te3 is None else te3.to(dev),
        tokenizer=tok,
        tokenizer_2=tok2,
        tokenizer_3=tok3,
        fingerprint=fp,
        path=src,
        dtype=dt,
        device=dev,
        max_sequence_length=cfg.max_sequence_length,
        resolution=cfg.resolution,
    )
    return _finish(model, cfg)


def pipeline(model: SD3Model) -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline`` sharing the model's modules (oracle for tests, ``encode_prompt``).

    The text encoders must still be loaded for ``encode_prompt``; sampling from precomputed embeddings works
    without them.
    """
    return StableDiffusion3Pipeline(
        transformer=model.transformer,
        scheduler=model.scheduler,
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        text_encoder_2=model.text_encoder_2,
        tokenizer_2=model.tokenizer_2,
        text_encoder_3=model.text_encoder_3,
        tokenizer_3=model.tokenizer_3,
    )


# --------------------------------------------------------------------------------------------
# LoRA files: every common naming read into one layout, loaded completely or refused
# --------------------------------------------------------------------------------------------

FINGERPRINT_KEY = "pgot_base_fingerprint"
"""safetensors metadata key holding the base model's :attr:`SD3Model.fingerprint` in LoRA files of :func:`save_lora`
(diffusers reads only its own ``lora_adapter_metadata`` key and ignores this one)."""

_PEFT_WEIGHT_NAME = "adapter_model.safetensors"  # peft's PeftModel.save_pretrained
_PEFT_CONFIG_NAME = "adapter_config.json"

# Every linear / conv layer of diffusers' SD3Transformer2DModel ({i}: block index): the layers a LoRA can adapt.
_SD3_LAYERS = (
    "pos_embed.proj",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    "transformer_blocks.{i}.norm1.linear",
    "transformer_blocks.{i}.norm1_context.linear",
    "transformer_blocks.{i}.attn.to_q",
    "transformer_blocks.{i}.attn.to_k",
    "transformer_blocks.{i}.attn.to_v",
    "transformer_blocks.{i}.attn.add_q_proj",
    "transformer_blocks.{i}.attn.add_k_proj",
    "transformer_blocks.{i}.attn.add_v_proj",
    "transformer_blocks.{i}.attn.to_out.0",
    "transformer_blocks.{i}.attn.to_add_out",
    "transformer_blocks.{i}.attn2.to_q",
    "transformer_blocks.{i}.attn2.to_k",
    "transformer_blocks.{i}.attn2.to_v",
    "transformer_blocks.{i}.attn2.to_out.0",
    "transformer_blocks.{i}.ff.net.0.proj",
    "transformer_blocks.{i}.ff.net.2",
    "transformer_blocks.{i}.ff_context.net.0.proj",
    "transformer_blocks.{i}.ff_context.net.2",
    "norm_out.linear",
    "proj_out",
)

# The same layers in Stability AI's naming (SD3 single-file checkpoints; kohya sd-scripts' lora_sd3 and ComfyUI
# write LoRAs in it), as diffusers' convert_sd3_transformer_checkpoint_to_diffusers maps them. A fused qkv layer
# maps to three: its LoRA up rows split in three, its down matrix is shared (B A = [B_q; B_k; B_v] A).
_SAI_LAYERS: dict[str, tuple[str, ...]] = {
    "x_embedder.proj": ("pos_embed.proj",),
    "context_embedder": ("context_embedder",),
    "t_embedder.mlp.0": ("time_text_embed.timestep_embedder.linear_1",),
    "t_embedder.mlp.2": ("time_text_embed.timestep_embedder.linear_2",),
    "y_embedder.mlp.0": ("time_text_embed.text_embedder.linear_1",),
    "y_embedder.mlp.2": ("time_text_embed.text_embedder.linear_2",),
    "joint_blocks.{i}.x_block.attn.qkv": tuple(f"transformer_blocks.{{i}}.attn.to_{c}" for c in "qkv"),
    "joint_blocks.{i}.x_block.attn.proj": ("transformer_blocks.{i}.attn.to_out.0",),
    "joint_blocks.{i}.x_block.attn2.qkv": tuple(f"transformer_blocks.{{i}}.attn2.to_{c}" for c in "qkv"),
    "joint_blocks.{i}.x_block.attn2.proj": ("transformer_blocks.{i}.attn2.to_out.0",),
    "joint_blocks.{i}.x_block.mlp.fc1": ("transformer_blocks.{i}.ff.net.0.proj",),
    "joint_blocks.{i}.x_block.mlp.fc2": ("transformer_blocks.{i}.ff.net.2",),
    "joint_blocks.{i}.x_block.adaLN_modulation.1": ("transformer_blocks.{i}.norm1.linear",),
    "joint_blocks.{i}.context_block.attn.qkv": tuple(f"transformer_blocks.{{i}}.attn.add_{c}_proj" for c in "qkv"),
    "joint_blocks.{i}.context_block.attn.proj": ("transformer_blocks.{i}.attn.to_add_out",),
    "joint_blocks.{i}.context_block.mlp.fc1": ("transformer_blocks.{i}.ff_context.net.0.proj",),
    "joint_blocks.{i}.context_block.mlp.fc2": ("transformer_blocks.{i}.ff_context.net.2",),
    "joint_blocks.{i}.context_block.adaLN_modulation.1": ("transformer_blocks.{i}.norm1_context.linear",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}

# Key endings: which LoRA tensor a key holds; what comes before is the layer's name.
_KINDS = (
    (re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$"), "down"),  # diffusers / peft (optionally with an adapter name)
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.bias$"), "bias"),  # peft lora_bias=True
    (re.compile(r"\.lora_down\.weight$"), "down"),  # kohya
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), "down"),  # older diffusers
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),  # kohya network alpha: scale = alpha / rank
)
_UNSUPPORTED = (
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA"),
    (re.compile(r"lokr_w|\.lokr_"), "LoKr"),
    (re.compile(r"hada_w"), "LoHa"),
    (re.compile(r"\.oft_|oft_blocks|\.boft_"), "OFT"),
    (re.compile(r"lora_embedding_"), "embedding LoRA"),
)
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_TEXT_ENCODER_PREFIXES = (
    "text_encoder",  # diffusers: text_encoder., text_encoder_2., text_encoder_3.
    "lora_te",  # kohya: lora_te1_, lora_te2_, lora_te3_, lora_te_
    "te.",
    "te1.",
    "te2.",
    "te3.",
    "text_model.",
    "clip_l.",
    "clip_g.",
    "t5xxl.",
    "encoder.block.",
)
_MAX_SHOWN = 3  # examples named per problem

_warned: set[tuple[str, str]] = set()  # (file, warning kind) already logged


def _template(template: str, sep: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part.replace(".", sep)) for part in template.split("{i}")))


_SD3_DOTTED = [(_template(t, "."), (t,)) for t in _SD3_LAYERS]
_SD3_UNDERSCORED = [(_template(t, "_"), (t,)) for t in _SD3_LAYERS]
_SAI_DOTTED = [(_template(s, "."), ts) for s, ts in _SAI_LAYERS.items()]
_SAI_UNDERSCORED = [(_template(s, "_"), ts) for s, ts in _SAI_LAYERS.items()]


def _match(name: str, table: list[tuple[re.Pattern, tuple[str, ...]]]) -> tuple[str, ...] | None:
    for rx, targets in table:
        m = rx.fullmatch(name)
        if m:
            return tuple(t.replace("{i}", m.group(1)) if m.groups() else t for t in targets)
    return None


def _layer_names(raw: str) -> tuple[tuple[str, ...] | None, str, bool]:
    """The transformer layers (diffusers names) that a layer name as written in a LoRA file adapts.

    Returns:
        ``(layers, naming, sai)``: layers is None when the name is no layer of an SD3 transformer; naming is
        ``diffusers``, ``peft`` or ``kohya``; sai is True for Stability AI's layer names (``joint_blocks.0.x_block``).
    """
    if raw.startswith(_KOHYA_PREFIXES):
        rest = raw.split("_", 2)[2]
        found = _match(rest, _SD3_UNDERSCORED)
        if found is not None:
            return found, "kohya", False
        return _match(rest, _SAI_UNDERSCORED), "kohya", True
    name, naming = raw, "peft"
    while True:
        stripped = next((name.removeprefix(p) for p in _PREFIXES if name.startswith(p)), name)
        if stripped == name:
            break
        if name.startswith("transformer."):
            naming = "diffusers"
        name = stripped
    found = _match(name, _SD3_DOTTED)
    if found is not None:
        return found, naming, False
    return _match(name, _SAI_DOTTED), naming, True


@dataclass
class _Layer:
    """Where one adapted transformer layer's tensors are in a LoRA file (keys; empty: absent)."""

    down: str = ""
    up: str = ""
    bias: str = ""
    alpha: str = ""
    part: tuple[int, int] = (0, 1)
    """(index, count): the rows of ``up`` (and ``bias``) that are this layer's, when the file fuses q, k and v."""
    sai: bool = False
    """Named in Stability AI's layout, whose adaLN modulation orders (shift, scale) where diffusers has (scale, shift)."""


@dataclass
class _LoraFile:
    """What a LoRA file holds, read from its safetensors header alone (no tensor data)."""

    path: Path
    where: str
    """How errors name it: ``"eval.models.1.lora: LoRA '/runs/x/final/pytorch_lora_weights.safetensors'"``."""
    layers: dict[str, _Layer] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """The ``LoraConfig`` recorded with the file (diffusers metadata or peft's adapter_config.json); {} when none."""
    naming: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str | None:
        return self.metadata.get(FINGERPRINT_KEY) or None


def _where(path: str | Path, key: str | None, label: str = "") -> str:
    return f"{key}: LoRA {str(path)!r}{label}" if key else f"LoRA {str(path)!r}{label}"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(repr(x) for x in list(items)[:_MAX_SHOWN])
    return shown + (f" and {len(items) - _MAX_SHOWN} more" if len(items) > _MAX_SHOWN else "")


def _override(key: str | None) -> str:
    """The setting that allows loading a LoRA trained on another base model, as typed on the command line."""
    m = re.match(r"(eval\.models\.\d+)\.", key or "")
    if m:
        return f"{m.group(1)}.allow_lora_transfer=true"
    if key == "model.lora_path":
        return "model.allow_lora_transfer=true"
    return "allow_other_base=True"


def _recorded_config(metadata: Mapping[str, str], file: Path) -> dict[str, Any]:
    """The transformer's ``LoraConfig`` fields recorded with a LoRA file ({} when none)."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            prefixed = {k.removeprefix("transformer."): v for k, v in data.items() if k.startswith("transformer.")}
            if prefixed:  # the pipeline's save_lora_weights prefixes each field with its component
                return prefixed
            if not any(k.startswith(("text_encoder", "unet.")) for k in data):  # save_lora_adapter: unprefixed
                return data
        return {}
    side = file.parent / _PEFT_CONFIG_NAME
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def _inspect(path: str | Path, key: str | None, label: str = "") -> _LoraFile:
    """Read a LoRA file's header and map every key to a transformer layer; the problems found are listed.

    Raises:
        ValueError: the path does not name a readable .safetensors file.
    """
    f = resolve_lora_file(path, key or "LoRA path")
    where = _where(f, key, label)
    try:
        with safe_open(str(f), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            metadata = dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for any unreadable file
        raise ValueError(
            f"{where} is not a readable .safetensors file ({type(exc).__name__}: {str(exc)[:200]}). "
            "pgot reads LoRAs from .safetensors files (diffusers, peft or kohya naming)."
        ) from None
    lf = _LoraFile(path=f, where=where, shapes=shapes, metadata=metadata, config=_recorded_config(metadata, f))
    if not shapes:
        lf.problems.append(f"{where} holds no tensors: the file is empty. Save the LoRA again.")
        return lf
    text_encoder, unsupported, not_lora, unknown, duplicate = [], {}, [], [], []
    namings = set()
    for k in shapes:
        kind_name = next((name for rx, name in _UNSUPPORTED if rx.search(k)), None)
        if kind_name is not None:
            unsupported.setdefault(kind_name, []).append(k)
            continue
        found = next(((rx, kind) for rx, kind in _KINDS if rx.search(k)), None)
        if found is None:
            not_lora.append(k)
            continue
        rx, kind = found
        raw = k[: rx.search(k).start()]
        if raw.startswith(_TEXT_ENCODER_PREFIXES) or raw.startswith("base_model.model.text_model."):
            text_encoder.append(k)
            continue
        targets, naming, sai = _layer_names(raw)
        if targets is None:
            unknown.append(k)
            continue
        namings.add(naming + (" (Stability AI layer names)" if sai else ""))
        for i, target in enumerate(targets):
            layer = lf.layers.setdefault(target, _Layer())
            if kind in ("up", "bias") and len(targets) > 1:
                layer.part = (i, len(targets))
            layer.sai = layer.sai or sai
            if getattr(layer, kind):
                duplicate.append(f"{getattr(layer, kind)!r} and {k!r}")
            else:
                setattr(layer, kind, k)
    lf.naming = ", ".join(sorted(namings))
    lora_found = bool(lf.layers)
    if text_encoder and not lora_found and not unknown:
        lf.problems.append(
            f"{where} holds only text-encoder LoRA weights ({_n(len(text_encoder), 'tensor')} such as {text_encoder[0]!r}); "
            "pgot applies LoRAs to the SD3 transformer only. Point it at a LoRA of the transformer."
        )
    elif text_encoder:
        lf.problems.append(
            f"{where} also holds {_n(len(text_encoder), 'text-encoder LoRA tensor')} ({_examples(text_encoder)}), which pgot "
            "cannot apply (it adapts the SD3 transformer only), so the file would load only in part. Save the "
            "transformer's LoRA alone (its keys start with 'transformer.') and use that file."
        )
    for kind_name, keys in unsupported.items():
        lf.problems.append(
            f"{where} holds {kind_name} weights ({_n(len(keys), 'tensor')} such as {keys[0]!r}), which pgot does not load. "
            "Use a plain LoRA (lora_A / lora_B or lora_down / lora_up weights)."
        )
    if not_lora and not lora_found and not text_encoder and not unsupported and not unknown:
        lf.problems.append(
            f"{where} holds no LoRA weights ({_n(len(not_lora), 'tensor')} such as {not_lora[0]!r}): it looks like a model "
            "checkpoint, not a LoRA. Point it at a LoRA file (keys ending in lora_A.weight / lora_B.weight, or "
            "lora_down.weight / lora_up.weight)."
        )
    elif not_lora:
        lf.problems.append(
            f"{where} holds {_n(len(not_lora), 'tensor')} besides LoRA weights ({_examples(not_lora)}), which would "
            "not be loaded. Remove them from the file, or use the LoRA they belong with."
        )
    if unknown:
        lf.problems.append(
            f"{where} has {_n(len(unknown), 'LoRA tensor')} for layers that an SD3 transformer does not have "
            f"({_examples(unknown)}): it is not a LoRA of an SD3 / SD3.5 transformer, or its naming is not one pgot "
            "reads (diffusers 'transformer.<layer>.lora_A.weight', peft '<layer>.lora_A.weight', kohya "
            "'lora_unet_<layer>.lora_down.weight')."
        )
    if duplicate:
        lf.problems.append(
            f"{where} has several tensors for the same weight ({_examples(duplicate)}): it mixes two LoRAs or two "
            "namings. Keep one of them."
        )
    halves = [n for n, layer in lf.layers.items() if not (layer.down and layer.up)]
    if halves:
        lf.problems.append(
            f"{where} is incomplete: {_n(len(halves), 'layer')} with a LoRA down (A) matrix without its up (B) matrix or "
            f"the reverse ({_examples(halves)}). Save the LoRA again."
        )
    ranks = []
    for name, layer in lf.layers.items():
        if not (layer.down and layer.up):
            continue
        down, up = shapes[layer.down], shapes[layer.up]
        i, n = layer.part
        if len(down) < 2 or len(up) < 2 or down[0] != up[1] or up[0] % n:
            ranks.append(f"{name!r} (down {down}, up {up})")
        if layer.alpha and math.prod(shapes[layer.alpha]) != 1:
            ranks.append(f"{name!r} (alpha of shape {shapes[layer.alpha]}, not a number)")
    if ranks:
        lf.problems.append(
            f"{where} has LoRA matrices that do not pair up ({_examples(ranks)}): down must be (rank, in) and up "
            "(out, rank). The file is damaged or not a LoRA."
        )
    if lf.config.get("use_dora"):
        lf.problems.append(f"{where} is a DoRA adapter (use_dora in its LoraConfig), which pgot does not load.")
    return lf


def _base_problem(lf: _LoraFile, fingerprint: str, model_path: str, key: str | None) -> str | None:
    if lf.fingerprint is None or lf.fingerprint == fingerprint:
        return None
    recorded = lf.metadata.get("pgot_base_model", "")
    return (
        f"{lf.where} was trained on the base model with fingerprint {lf.fingerprint}"
        + (f" ({recorded})" if recorded else "")
        + f", but the base model here has fingerprint {fingerprint}"
        + (f" ({model_path})" if model_path else "")
        + ". A LoRA only means something on the weights it was trained on: use that base model (model.path, "
        f"model.tiny_seed), or set {_override(key)} to apply it to this one deliberately."
    )


def _check_base(lf: _LoraFile, model: SD3Model, key: str | None, allow_other_base: bool) -> None:
    """Refuse a LoRA recorded as trained on another base model; warn once when nothing is recorded."""
    if lf.fingerprint is None:
        if (str(lf.path), "base") not in _warned:
            _warned.add((str(lf.path), "base"))
            logger.warning(
                "%s records no base-model fingerprint (it was not saved by pgot), so pgot cannot check that it was "
                "trained on this base model (%s, fingerprint %s).",
                lf.where,
                model.path or "tiny",
                model.fingerprint,
            )
        return
    problem = _base_problem(lf, model.fingerprint, model.path, key)
    if problem is None:
        return
    if not allow_other_base:
        raise ValueError(problem)
    logger.warning(
        "%s was trained on base model %s; applying it to %s (%s) as allowed by %s.",
        lf.where, lf.fingerprint, model.path or "tiny", model.fingerprint, _override(key),
    )  # fmt: skip


def lora_base_fingerprint(path: str | Path) -> str | None:
    """The base model fingerprint a LoRA file records (:func:`save_lora` writes it), read from the header alone.

    Args:
        path: a LoRA file, a folder holding one, or a pgot run folder (as :func:`resolve_lora_file` accepts).

    Returns:
        The :attr:`SD3Model.fingerprint` of the model the LoRA was trained on, or None when the file records none
        (a LoRA saved by another tool).

    Raises:
        ValueError: the path names no readable .safetensors LoRA file.
    """
    return _inspect(path, None).fingerprint


def check_lora_file(path: str | Path, *, key: str, fingerprint: str | None = None) -> list[str]:
    """Every problem of a LoRA file that can be found without loading the model (preflight).

    Reads only the safetensors header: the path resolves to a file; every key is a LoRA weight of an SD3 transformer
    layer in a naming pgot reads (diffusers, peft, kohya, Stability AI layer names); each layer has both matrices and
    their ranks pair up; no text-encoder, DoRA or other non-LoRA tensors that would be left out; and, when
    ``fingerprint`` is given, the base model recorded in the file (if any) is that one. What needs the weights
    (the layers exist in this transformer, their sizes match) is checked when the LoRA loads.

    Args:
        path: a LoRA file, a folder holding one, or a pgot run folder.
        key: the config key that gave the path, named in every problem (``eval.models.1.lora``, ``model.lora_path``,
            ``eval.models.2.soup``).
        fingerprint: the base model's :attr:`SD3Model.fingerprint`; None skips the base check (pass None when the
            transfer is allowed: ``model.allow_lora_transfer`` / ``eval.models.<i>.allow_lora_transfer``).

    Returns:
        One line per problem, each naming ``key`` and the file; empty when the file is fine.
    """
    try:
        lf = _inspect(path, key)
    except ValueError as exc:
        return [str(exc)]
    problems = list(lf.problems)
    if fingerprint is not None:
        problem = _base_problem(lf, fingerprint, "", key)
        if problem is not None:
            problems.append(problem)
    return problems


def _raise(problems: Sequence[str]) -> None:
    if problems:
        raise ValueError("\n".join(problems))


def _layer_alpha(lf: _LoraFile, name: str, layer: _Layer, tensors: Mapping[str, torch.Tensor], rank: int) -> float:
    """lora_alpha of one layer: the file's alpha tensor (kohya), else its recorded LoraConfig, else the rank."""
    if layer.alpha:
        return float(tensors[layer.alpha].reshape(-1)[0])
    config = lf.config
    if config.get("lora_alpha") is not None:
        pattern = config.get("alpha_pattern") or {}
        match = get_pattern_key(list(pattern), name)
        return float(pattern[match]) if match in pattern else float(config["lora_alpha"])
    if (str(lf.path), "alpha") not in _warned:
        _warned.add((str(lf.path), "alpha"))
        logger.warning(
            "%s records no lora_alpha (no LoraConfig metadata, no alpha tensors): assuming lora_alpha = rank "
            "(scale 1), as diffusers does. Save LoRAs with pgot.model.save_lora to keep their alpha.",
            lf.where,
        )
    return float(rank)


def _adapter_tensors(
    lf: _LoraFile, model: SD3Model, fits: str
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """The file's tensors as a peft state dict of the transformer, checked against its layers.

    Returns:
        ``(state_dict, ranks, alphas)``: keys ``<layer>.lora_A.weight`` / ``.lora_B.weight`` (/ ``.lora_B.bias``);
        rank and lora_alpha per layer.

    Raises:
        ValueError: layers this transformer lacks, layers that are not linear / conv, size mismatches, non-finite
            values (every one listed).
    """
    tensors = load_file(str(lf.path))
    transformer = model.transformer
    sd: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    absent, wrong_type, mismatch, non_finite = [], [], [], []
    for name, layer in sorted(lf.layers.items()):
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            absent.append(name)
            continue
        base = getattr(module, "base_layer", module)
        down, up = tensors[layer.down], tensors[layer.up]
        bias = tensors[layer.bias] if layer.bias else None
        i, n = layer.part
        if n > 1:
            up = up.chunk(n, dim=0)[i]
            bias = bias.chunk(n, dim=0)[i] if bias is not None else None
        parent = transformer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else transformer
        if layer.sai and type(parent).__name__ == "AdaLayerNormContinuous":
            # Stability AI's final adaLN layers output (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)
            up = torch.cat(up.chunk(2, dim=0)[::-1])
            bias = torch.cat(bias.chunk(2, dim=0)[::-1]) if bias is not None else None
        r = int(down.shape[0])
        if isinstance(base, torch.nn.Linear):
            want_down, want_up = (r, base.in_features), (base.out_features, r)
        elif isinstance(base, torch.nn.Conv2d):
            want_down, want_up = (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)
        else:
            wrong_type.append(f"{name!r} is a {type(base).__name__}")
            continue
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            mismatch.append(
                f"{name!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, the layer needs {want_down} and "
                f"{want_up}"
            )
            continue
        for t, k in ((down, layer.down), (up, layer.up), (bias, layer.bias)):
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                non_finite.append(k)
        sd[f"{name}.lora_A.weight"] = down
        sd[f"{name}.lora_B.weight"] = up.contiguous()
        if bias is not None:
            sd[f"{name}.lora_B.bias"] = bias.contiguous()
        ranks[name] = r
        alphas[name] = _layer_alpha(lf, name, layer, tensors, r)
    details = []
    if absent:
        details.append(f"{len(absent)} of its layers do not exist in this transformer ({_examples(absent)})")
    if wrong_type:
        details.append(f"LoRA on layers that are not linear or conv layers ({_examples(wrong_type)})")
    if mismatch:
        details.append(f"size mismatch in {_n(len(mismatch), 'layer')} (e.g. {mismatch[0]})")
    if details:
        raise ValueError(
            f"{lf.where} does not fit the base {fits}: {'; '.join(details)}. Use the base model it was trained on "
            "(model.path, model.tiny_seed)."
        )
    if non_finite:
        raise ValueError(f"{lf.where} holds NaN or infinite values ({_examples(non_finite)}); the LoRA is broken.")
    return sd, ranks, alphas


def _scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _lora_config(lf: _LoraFile, ranks: Mapping[str, int], alphas: Mapping[str, float], bias: bool) -> LoraConfig:
    """A LoraConfig that targets exactly the file's layers, with each layer's rank and alpha."""

    def pattern(name: str) -> str:
        return "^" + re.escape(name)  # anchored: transformer_blocks.1 must not match transformer_blocks.11

    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    return LoraConfig(
        r=r0,
        lora_alpha=a0,
        rank_pattern={pattern(n): r for n, r in ranks.items() if r != r0},
        alpha_pattern={pattern(n): a for n, a in alphas.items() if a != a0},
        target_modules="^(?:" + "|".join(re.escape(n) for n in sorted(ranks)) + ")$",
        use_rslora=bool(lf.config.get("use_rslora", False)),
        lora_bias=bias,
        init_lora_weights=False,  # every weight is loaded from the file (checked below)
    )


def _verify_received(
    model: SD3Model,
    lf: _LoraFile,
    adapter_name: str,
    sd: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    rslora: bool,
) -> None:
    """Compare the file's tensors with what the adapter holds now: every tensor arrived, unchanged, and nothing else.

    Raises:
        ValueError: a file tensor that reached no adapter weight or arrived changed, an adapter weight the file did
            not fill, or a layer whose scale is not the file's alpha / rank.
    """
    tag = f".{adapter_name}."
    have = {n: p for n, p in model.transformer.named_parameters() if ".lora_" in n and tag in n}
    want = {}
    for k, t in sd.items():
        layer, rest = k.rsplit(".lora_", 1)  # "A.weight", "B.weight", "B.bias"
        which, kind = rest.split(".")
        want[f"{layer}.lora_{which}{tag}{kind}"] = t
    missed = sorted(set(want) - set(have))
    unfilled = sorted(set(have) - set(want))
    # compared where the weight lives, in its dtype (a bfloat16 adapter holds the file's values rounded once)
    changed = [n for n in sorted(set(want) & set(have)) if not torch.equal(have[n].detach(), want[n].to(have[n]))]
    wrong_scale = []
    for name, r in ranks.items():
        module = model.transformer.get_submodule(name)
        scale = getattr(module, "scaling", {}).get(adapter_name)
        want_scale = _scaling(alphas[name], r, rslora)
        if scale is None or not math.isclose(float(scale), want_scale, rel_tol=1e-6):
            wrong_scale.append(f"{name!r} ({scale} instead of {want_scale:g})")
    details = []
    if missed:
        details.append(f"{len(missed)} tensors reached no adapter weight ({_examples(missed)})")
    if unfilled:
        details.append(f"{len(unfilled)} adapter weights got nothing from the file ({_examples(unfilled)})")
    if changed:
        details.append(f"{len(changed)} adapter weights differ from the file after loading ({_examples(changed)})")
    if wrong_scale:
        details.append(f"{len(wrong_scale)} layers have another scale than alpha / rank ({_examples(wrong_scale)})")
    if details:
        raise ValueError(f"{lf.where} did not load completely: {'; '.join(details)}.")


def _fits(model: SD3Model) -> str:
    return f"model {model.path or 'tiny'!r} (fingerprint {model.fingerprint})"


def _load_adapter(
    model: SD3Model, path: str | Path, name: str, *, key: str | None, label: str, allow_other_base: bool
) -> None:
    """The one loading path of every LoRA file: inspect, check the base, check the layers, load, verify."""
    if name in _adapter_names(model):
        raise ValueError(f"a LoRA adapter named {name!r} is already loaded; pass another adapter_name.")
    lf = _inspect(path, key, label)
    _raise(lf.problems)
    _check_base(lf, model, key, allow_other_base)
    sd, ranks, alphas = _adapter_tensors(lf, model, _fits(model))
    bias = any(k.endswith(".lora_B.bias") for k in sd)
    config = _lora_config(lf, ranks, alphas, bias)
    trainable = _trainable_state(model)
    before = (_active(model), dict(model.adapter_weights))
    try:
        with warnings.catch_warnings():
            # peft warns when a model gets a second adapter; several adapters (soups, train + eval) are intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model.transformer.add_adapter(config, adapter_name=name)
        try:
            set_peft_model_state_dict(model.transformer, sd, adapter_name=name)
        except RuntimeError as exc:  # size mismatches were checked above; anything else is named here
            raise ValueError(f"{lf.where} could not be loaded: {str(exc).strip()[:300]}") from None
        _verify_received(model, lf, name, sd, ranks, alphas, config.use_rslora)
    except BaseException:
        if name in _adapter_names(model):
            model.transformer.delete_adapters([name])
        if before[0]:
            _set_active(model, before[0], [before[1].get(a, 1.0) for a in before[0]])
        raise
    finally:
        _restore_trainable(model, trainable)
    logger.info("loaded %s (%s naming, %d layers, rank %s)", lf.where, lf.naming, len(ranks), _rank_text(ranks))


def _rank_text(ranks: Mapping[str, int]) -> str:
    values = sorted(set(ranks.values()))
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


# --------------------------------------------------------------------------------------------
# LoRA adapters
# --------------------------------------------------------------------------------------------


def add_lora(
    model: SD3Model,
    cfg: ModelConfig,
    init_from: str | Path | None = None,
    *,
    key: str | None = None,
    allow_other_base: bool = False,
) -> list[torch.nn.Parameter]:
    """Add the trainable LoRA adapter (``default``) to the transformer's attention projections.

    ``LoraConfig(r=model.lora_rank, lora_alpha=model.lora_alpha, target_modules=model.lora_target_modules,
    init_lora_weights=model.lora_init)``; B starts at zero with ``gaussian`` init too (peft's gaussian init
    draws A only), so the tuned model starts as the base model. Trainable parameters are cast to float32;
    gradient checkpointing is switched on when ``model.gradient_checkpointing`` (and the transformer put in
    train mode, which changes no output since SD3 has no dropout).

    Args:
        model: the model (modified in place).
        cfg: the ``model`` section.
        init_from: a LoRA file or folder (any naming :func:`load_lora` reads) whose weights initialise the adapter
            (resume). It must fill every layer of the adapter, with the same ranks and scale (alpha / rank).
        key: the config key that gave ``init_from``, for errors.
        allow_other_base: accept an ``init_from`` recorded as trained on another base model.

    Returns:
        The trainable LoRA parameters (float32).

    Raises:
        ValueError: bad target modules; an ``init_from`` that does not load completely into the adapter (layers
            missing on either side, other ranks or scale, sizes), or trained on another base model.
    """
    if TRAIN_ADAPTER in (getattr(model.transformer, "peft_config", None) or {}):
        raise ValueError("the model already has a trainable LoRA adapter; call add_lora once per model.")
    lf = None
    if init_from is not None:  # checked before the adapter exists, so a bad file leaves the model as it was
        lf = _inspect(init_from, key)
        _raise(lf.problems)
        _check_base(lf, model, key, allow_other_base)
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights="gaussian" if cfg.lora_init == "gaussian" else True,
        target_modules=list(cfg.lora_target_modules),
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model.transformer.add_adapter(lcfg, adapter_name=TRAIN_ADAPTER)
    except ValueError as exc:
        raise ValueError(
            f"model.lora_target_modules={cfg.lora_target_modules} does not match the transformer's modules ({exc}). "
            "Use names such as attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj."
        ) from None
    active = [TRAIN_ADAPTER] + [a for a in _adapter_names(model) if a != TRAIN_ADAPTER and a in _active(model)]
    _set_active(model, active, [1.0] + [_adapter_weight(model, a) for a in active[1:]])
    params = []
    for name, p in model.transformer.named_parameters():
        if "lora_" in name and f".{TRAIN_ADAPTER}." in name + ".":
            p.requires_grad_(True)
            p.data = p.data.float()  # before init_from is loaded: its float32 values arrive exactly
            params.append(p)
        else:
            p.requires_grad_(False)
    if lf is not None:
        try:
            _init_adapter(model, lf)
        except BaseException:
            model.transformer.delete_adapters([TRAIN_ADAPTER])
            if active[1:]:
                _set_active(model, active[1:], [_adapter_weight(model, a) for a in active[1:]])
            raise
    if cfg.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
        # diffusers 0.42 checkpoints whenever gradients are on; some versions (and peft wrappers) also require
        # training mode. SD3 has no dropout (p=0 everywhere), so train mode changes no output.
        model.transformer.train()
    return params


def _init_adapter(model: SD3Model, lf: _LoraFile) -> None:
    """Fill the trainable adapter from a LoRA file: the same layers, ranks and scales, every weight verified."""
    sd, ranks, alphas = _adapter_tensors(lf, model, _fits(model))
    layers = {
        n.rsplit(".lora_A.", 1)[0] for n, _ in model.transformer.named_parameters() if f".lora_A.{TRAIN_ADAPTER}." in n
    }
    config = model.transformer.peft_config[TRAIN_ADAPTER]
    details = []
    lacking, extra = sorted(layers - set(ranks)), sorted(set(ranks) - layers)
    if lacking:
        details.append(f"it has no weights for {len(lacking)} layers of the adapter ({_examples(lacking)})")
    if extra:
        details.append(f"it has weights for {len(extra)} layers the adapter lacks ({_examples(extra)})")
    other_rank, other_scale = [], []
    for name in sorted(layers & set(ranks)):
        module = model.transformer.get_submodule(name)
        if module.r[TRAIN_ADAPTER] != ranks[name]:
            other_rank.append(f"{name!r} rank {ranks[name]} instead of {module.r[TRAIN_ADAPTER]}")
        elif not math.isclose(
            float(module.scaling[TRAIN_ADAPTER]), _scaling(alphas[name], ranks[name], config.use_rslora), rel_tol=1e-6
        ):
            other_scale.append(f"{name!r} alpha {alphas[name]:g}")
    if other_rank:
        details.append(f"other ranks than model.lora_rank ({_examples(other_rank)})")
    if other_scale:
        details.append(f"other alpha than model.lora_alpha={config.lora_alpha:g} ({_examples(other_scale)})")
    if details:
        raise ValueError(
            f"{lf.where} does not match the trainable adapter: {'; '.join(details)}. Set model.lora_rank, "
            "model.lora_alpha and model.lora_target_modules as when it was trained."
        )
    try:
        set_peft_model_state_dict(model.transformer, sd, adapter_name=TRAIN_ADAPTER)
    except RuntimeError as exc:
        raise ValueError(f"{lf.where} could not be loaded: {str(exc).strip()[:300]}") from None
    _verify_received(model, lf, TRAIN_ADAPTER, sd, ranks, alphas, config.use_rslora)


def _adapter_names(model: SD3Model) -> list[str]:
    return list((getattr(model.transformer, "peft_config", None) or {}).keys())


def _active(model: SD3Model) -> list[str]:
    if not _adapter_names(model):
        return []
    return list(model.transformer.active_adapters())


def _adapter_weight(model: SD3Model, name: str) -> float:
    return float(model.adapter_weights.get(name, 1.0))


def lora_state_dict(model: SD3Model, adapter_name: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft naming (``transformer_blocks.0.attn.to_q.lora_A.weight``), detached."""
    if adapter_name not in _adapter_names(model):
        raise ValueError(
            f"the model has no LoRA adapter {adapter_name!r} (it has: {', '.join(_adapter_names(model)) or 'none'}); call add_lora first."
        )
    sd = get_peft_model_state_dict(model.transformer, adapter_name=adapter_name)
    return {k: v.detach() for k, v in sd.items()}


def _json_ready(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


def save_lora(
    model: SD3Model, folder: str | Path, adapter_name: str = TRAIN_ADAPTER, dtype: torch.dtype | None = None
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in the diffusers SD3 LoRA format.

    Keys are ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``. The safetensors metadata holds the peft
    ``LoraConfig`` under diffusers' ``lora_adapter_metadata`` key (so ``lora_alpha`` and the target modules survive;
    ``StableDiffusion3Pipeline.load_lora_weights(folder)`` reads it) and pgot's own keys, which diffusers ignores:
    ``pgot_base_fingerprint`` (the base model's :attr:`SD3Model.fingerprint`, checked by :func:`load_lora`) and
    ``pgot_base_model`` (its path). The file is written atomically.

    Args:
        model: a model with the adapter.
        folder: destination folder (created).
        adapter_name: which adapter (default: the trainable one).
        dtype: cast the weights (default: as stored, float32 for the trainable adapter).

    Returns:
        The path of the written file.
    """
    sd = lora_state_dict(model, adapter_name)
    sd = {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in sd.items()}
    config = _json_ready(model.transformer.peft_config[adapter_name].to_dict())
    header = {
        "format": "pt",
        # as diffusers' write_lora_layers stores it: each field prefixed with the component
        LORA_ADAPTER_METADATA_KEY: json.dumps(
            {f"transformer.{k}": v for k, v in config.items()}, indent=2, sort_keys=True, default=str
        ),
    }
    if model.fingerprint:
        header[FINGERPRINT_KEY] = model.fingerprint
        header["pgot_base_model"] = str(model.path)

    def write(weights: dict[str, torch.Tensor], filename: str) -> None:
        atomic_write(filename, lambda tmp: save_file(weights, str(tmp), metadata=header))

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=sd, weight_name=LORA_WEIGHT_NAME, save_function=write
    )
    return folder / LORA_WEIGHT_NAME


def resolve_lora_file(path: str | Path, key: str = "model.lora_path") -> Path:
    """The LoRA file behind ``path``: the file itself; or, in a folder, ``pytorch_lora_weights.safetensors``
    (diffusers), ``adapter_model.safetensors`` (peft), ``final/pytorch_lora_weights.safetensors`` (a pgot run
    folder) or its only ``.safetensors`` file. ``key`` names the config key in errors.

    Raises:
        ValueError: nothing there, a folder without a LoRA file, or a file that is not .safetensors.
    """
    hint = f"Point {key} at a LoRA .safetensors file, a folder holding one, or a finished pgot run folder."
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / LORA_WEIGHT_NAME, p / _PEFT_WEIGHT_NAME, p / "final" / LORA_WEIGHT_NAME):
            if cand.is_file():
                return cand
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        what = f"several .safetensors files ({', '.join(f.name for f in found[:4])})" if found else "no LoRA file"
        raise ValueError(
            f"{key}={str(path)!r} is a LoRA folder that has no {LORA_WEIGHT_NAME} (nor {_PEFT_WEIGHT_NAME}, nor "
            f"final/{LORA_WEIGHT_NAME}) and {what}. {hint}"
        )
    if not p.is_file():
        raise ValueError(f"{key}={str(path)!r} does not exist. {hint}")
    if p.suffix != ".safetensors":
        raise ValueError(
            f"{key}={str(path)!r} is not a .safetensors file; pgot reads LoRAs from .safetensors only (pickled "
            f".bin / .pt files can run code when loaded). Convert it with safetensors.torch.save_file. {hint}"
        )
    return p


def _trainable_state(model: SD3Model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.transformer.named_parameters()}


def _restore_trainable(model: SD3Model, before: dict[str, bool]) -> None:
    """peft marks loaded / activated adapters trainable: keep only what was trainable before (the add_lora adapter)."""
    for n, p in model.transformer.named_parameters():
        p.requires_grad_(before.get(n, False))


def _set_active(model: SD3Model, names: list[str], weights: list[float]) -> None:
    trainable = _trainable_state(model)
    model.transformer.set_adapters(names, weights)
    _restore_trainable(model, trainable)
    model.adapter_weights = dict(zip(names, weights, strict=True))


def load_lora(
    model: SD3Model,
    path: str | Path,
    scale: float = 1.0,
    adapter_name: str = "pgot_lora",
    *,
    key: str | None = None,
    label: str = "",
    allow_other_base: bool = False,
) -> str:
    """Load a LoRA (file, folder, or pgot run folder) as a frozen adapter and activate it with ``scale``.

    Reads diffusers (``transformer.<layer>.lora_A.weight``), peft (``<layer>.lora_A.weight``, also with
    ``base_model.model.`` prefixes and adapter names such as ``.lora_A.default.weight``), kohya
    (``lora_unet_<layer>.lora_down.weight`` / ``lora_up`` / ``alpha``, with diffusers or Stability AI layer names,
    fused qkv split into q, k, v) and Stability AI dotted names. The file loads completely or not at all: every
    tensor must reach an adapter weight of this transformer unchanged (verified against the adapter afterwards),
    and the adapter scale is the file's alpha / rank per layer (alpha from its alpha tensors, its recorded
    LoraConfig, or else the rank, with a warning). A LoRA recorded as trained on another base model (its
    ``pgot_base_fingerprint``) is refused unless ``allow_other_base``; one that records no base loads with a
    one-time warning. Other loaded adapters are deactivated (the trainable ``default`` adapter, when present,
    stays active).

    Args:
        model: the model.
        path: the LoRA.
        scale: adapter weight.
        adapter_name: name of the new adapter.
        key: the config key that gave ``path`` (``model.lora_path``, ``eval.models.1.lora``), named in errors.
        label: words after the file in errors (``" of eval model 'tuned'"``).
        allow_other_base: load a LoRA recorded as trained on another base model (``model.allow_lora_transfer``,
            ``eval.models.<i>.allow_lora_transfer``).

    Returns:
        The adapter name.

    Raises:
        ValueError: the file does not exist or is not a LoRA of this transformer (text-encoder-only, DoRA, unknown
            layers, incomplete, size mismatches, non-finite values), or was trained on another base model; the model
            is left as it was.
    """
    _load_adapter(model, path, adapter_name, key=key, label=label, allow_other_base=allow_other_base)
    names, weights = [adapter_name], [float(scale)]
    if TRAIN_ADAPTER in _adapter_names(model):
        names, weights = [TRAIN_ADAPTER, *names], [1.0, *weights]
    _set_active(model, names, weights)
    return adapter_name


def load_lora_soup(
    model: SD3Model,
    loras: Mapping[str | Path, float],
    prefix: str = "soup",
    *,
    key: str | None = None,
    label: str = "",
    allow_other_base: bool = False,
) -> list[str]:
    """Reward soup: load several LoRAs and activate them together with weights.

    peft sums active adapters, so every target layer computes ``W x + sum_i w_i (alpha_i / r_i) B_i A_i x``:
    the weighted sum of the LoRA deltas (weights need not sum to one). Adapters may differ in rank. Every file
    goes through :func:`load_lora`'s checks; when one fails, the ones already loaded are removed again.

    Args:
        model: the model.
        loras: LoRA path -> weight.
        prefix: adapter names are ``<prefix>_<i>``.
        key: the config key of the soup (``eval.models.2.soup``), named in errors.
        label: words after each file in errors.
        allow_other_base: load LoRAs recorded as trained on another base model.

    Returns:
        The adapter names, in the order of ``loras``.

    Raises:
        ValueError: an empty soup, or a LoRA that :func:`load_lora` refuses.
    """
    if not loras:
        raise ValueError(f"{key or 'the soup'} is empty; give at least one LoRA path: weight.")
    before = (_active(model), dict(model.adapter_weights))
    names: list[str] = []
    try:
        for i, path in enumerate(loras):
            name = f"{prefix}_{i}"
            _load_adapter(model, path, name, key=key, label=label, allow_other_base=allow_other_base)
            names.append(name)
    except BaseException:
        if names:
            model.transformer.delete_adapters(names)
        if before[0]:
            _set_active(model, before[0], [before[1].get(a, 1.0) for a in before[0]])
        raise
    _set_active(model, names, [float(w) for w in loras.values()])
    return names
