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
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from pgot.devices import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from pgot.config import ModelConfig

__all__ = [
    "LORA_WEIGHT_NAME",
    "SD3Model",
    "add_lora",
    "load_lora",
    "load_lora_soup",
    "load_model",
    "lora_state_dict",
    "pipeline",
    "resolve_lora_file",
    "save_lora",
]

logger = logging.getLogger(__name__)

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


def _folder_fingerprint(folder: Path) -> str:
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


def _check_folder(path: str) -> Path:
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
        load_lora(model, cfg.lora_path)
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

    folder = _check_folder(cfg.path)
    src = str(folder)
    fp = _folder_fingerprint(folder) if folder.is_dir() else "hub-" + hashlib.sha1(src.encode()).hexdigest()[:16]
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
# LoRA
# --------------------------------------------------------------------------------------------


def add_lora(model: SD3Model, cfg: ModelConfig, init_from: str | Path | None = None) -> list[torch.nn.Parameter]:
    """Add the trainable LoRA adapter (``default``) to the transformer's attention projections.

    ``LoraConfig(r=model.lora_rank, lora_alpha=model.lora_alpha, target_modules=model.lora_target_modules,
    init_lora_weights=model.lora_init)``; B starts at zero with ``gaussian`` init too (peft's gaussian init
    draws A only), so the tuned model starts as the base model. Trainable parameters are cast to float32;
    gradient checkpointing is switched on when ``model.gradient_checkpointing`` (and the transformer put in
    train mode, which changes no output since SD3 has no dropout).

    Args:
        model: the model (modified in place).
        cfg: the ``model`` section.
        init_from: a diffusers LoRA file or folder whose weights initialise the adapter (resume).

    Returns:
        The trainable LoRA parameters (float32).
    """
    if TRAIN_ADAPTER in (getattr(model.transformer, "peft_config", None) or {}):
        raise ValueError("the model already has a trainable LoRA adapter; call add_lora once per model.")
    lcfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        init_lora_weights="gaussian" if cfg.lora_init == "gaussian" else True,
        target_modules=list(cfg.lora_target_modules),
    )
    try:
        model.transformer.add_adapter(lcfg, adapter_name=TRAIN_ADAPTER)
    except ValueError as exc:
        raise ValueError(
            f"model.lora_target_modules={cfg.lora_target_modules} does not match the transformer's modules ({exc}). "
            "Use names such as attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj."
        ) from None
    active = [TRAIN_ADAPTER] + [a for a in _adapter_names(model) if a != TRAIN_ADAPTER and a in _active(model)]
    _set_active(model, active, [1.0] + [_adapter_weight(model, a) for a in active[1:]])
    if init_from is not None:
        sd = _read_lora(init_from)
        res = set_peft_model_state_dict(model.transformer, sd, adapter_name=TRAIN_ADAPTER)
        unexpected = getattr(res, "unexpected_keys", None) or []
        if unexpected:
            raise ValueError(
                f"LoRA {str(init_from)!r} has weights for modules this adapter lacks, e.g. {unexpected[0]!r}; check model.lora_target_modules and model.lora_rank."
            )
    params = []
    for name, p in model.transformer.named_parameters():
        if "lora_" in name and f".{TRAIN_ADAPTER}." in name + ".":
            p.requires_grad_(True)
            p.data = p.data.float()
            params.append(p)
        else:
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
        # diffusers 0.42 checkpoints whenever gradients are on; some versions (and peft wrappers) also require
        # training mode. SD3 has no dropout (p=0 everywhere), so train mode changes no output.
        model.transformer.train()
    return params


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


def save_lora(
    model: SD3Model, folder: str | Path, adapter_name: str = TRAIN_ADAPTER, dtype: torch.dtype | None = None
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in the diffusers SD3 LoRA format.

    Keys are ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``; the peft ``LoraConfig`` is stored as
    safetensors metadata (so ``lora_alpha`` and the target modules survive). ``StableDiffusion3Pipeline
    .load_lora_weights(folder)`` and :func:`load_lora` read it.

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
    meta = model.transformer.peft_config[adapter_name].to_dict()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusion3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=sd,
        transformer_lora_adapter_metadata=meta,
        weight_name=LORA_WEIGHT_NAME,
    )
    return folder / LORA_WEIGHT_NAME


def resolve_lora_file(path: str | Path, key: str = "model.lora_path") -> Path:
    """The diffusers LoRA file behind ``path``: the file itself, or ``pytorch_lora_weights.safetensors``
    in the folder or in its ``final/`` (a pgot run folder). ``key`` names the config key in errors."""
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / LORA_WEIGHT_NAME, p / "final" / LORA_WEIGHT_NAME):
            if cand.is_file():
                return cand
        raise ValueError(
            f"{key}={str(path)!r} is a LoRA folder that has no {LORA_WEIGHT_NAME} (nor final/{LORA_WEIGHT_NAME}). "
            f"Point {key} at a diffusers LoRA file, a folder holding one, or a finished pgot run folder."
        )
    if not p.is_file():
        raise ValueError(
            f"{key}={str(path)!r} does not exist. Point {key} at a diffusers LoRA file, a folder holding one, "
            "or a finished pgot run folder."
        )
    return p


def _read_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """A diffusers SD3 LoRA file as a peft state dict of the transformer (``transformer.`` prefix removed)."""
    f = resolve_lora_file(path)
    sd = load_file(str(f))
    out = {k.removeprefix("transformer."): v for k, v in sd.items() if k.startswith("transformer.")}
    if not out:
        raise ValueError(
            f"LoRA {str(f)!r} holds no transformer weights (keys start with {next(iter(sd), 'nothing')!r}); pgot loads SD3 transformer LoRAs only."
        )
    return out


def _load_adapter(model: SD3Model, path: str | Path, name: str) -> None:
    if name in _adapter_names(model):
        raise ValueError(f"a LoRA adapter named {name!r} is already loaded; pass another adapter_name.")
    f = resolve_lora_file(path)
    trainable = _trainable_state(model)
    # read through the pipeline's loader, as load_lora_weights does: it returns the LoraConfig metadata
    # (lora_alpha, targets) that load_lora_adapter(path) alone would ignore (alpha would default to r)
    sd, metadata = StableDiffusion3Pipeline.lora_state_dict(str(f), return_lora_metadata=True)
    model.transformer.load_lora_adapter(sd, prefix="transformer", adapter_name=name, metadata=metadata)
    _restore_trainable(model, trainable)


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


def load_lora(model: SD3Model, path: str | Path, scale: float = 1.0, adapter_name: str = "pgot_lora") -> str:
    """Load a diffusers LoRA (file, folder, or pgot run folder) as a frozen adapter and activate it with ``scale``.

    Other loaded adapters are deactivated (the trainable ``default`` adapter, when present, stays active).

    Returns:
        The adapter name.
    """
    _load_adapter(model, path, adapter_name)
    names, weights = [adapter_name], [float(scale)]
    if TRAIN_ADAPTER in _adapter_names(model):
        names, weights = [TRAIN_ADAPTER, *names], [1.0, *weights]
    _set_active(model, names, weights)
    return adapter_name


def load_lora_soup(model: SD3Model, loras: dict[str, float], prefix: str = "soup") -> list[str]:
    """Reward soup: load several LoRAs and activate them together with weights.

    peft sums active adapters, so every target layer computes ``W x + sum_i w_i (alpha_i / r_i) B_i A_i x``:
    the weighted sum of the LoRA deltas (weights need not sum to one). Adapters may differ in rank.

    Args:
        model: the model.
        loras: LoRA path -> weight.
        prefix: adapter names are ``<prefix>_<i>``.

    Returns:
        The adapter names, in the order of ``loras``.
    """
    if not loras:
        raise ValueError("eval.models.*.soup is empty; give at least one LoRA path: weight.")
    names = []
    for i, path in enumerate(loras):
        name = f"{prefix}_{i}"
        _load_adapter(model, path, name)
        names.append(name)
    _set_active(model, names, [float(w) for w in loras.values()])
    return names
