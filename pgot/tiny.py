"""Tiny random SD3 builds (transformer, VAE, CLIP text encoders, byte-level tokenizers) for tests and benchmarks.

``model.tiny=true`` builds a small random SD3 from ``model.tiny_seed``: no weights needed, a fraction of a second
per sample on the CPU, and the same diffusers classes and code path as a real SD3 / SD3.5 checkpoint.
:func:`save_tiny` writes it as a diffusers folder that :func:`pgot.model.load_model` and
``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`` read back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from pgot.model import SD3Model, pipeline

__all__ = ["TINY_TEXT_LENGTH", "build_tiny", "save_tiny", "tiny_components", "tiny_fingerprint", "tiny_tokenizer"]

TINY_TEXT_LENGTH = 77
"""CLIP token length of the tiny tokenizers (as the real ones; one token per character, so prompts longer than 75 characters are truncated)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes: every byte and every byte + ``</w>`` is a token, no merges.

    514 tokens; any text tokenizes (one token per character), and distinct prompts give distinct ids.
    """
    chars = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TINY_TEXT_LENGTH)


def tiny_components(seed: int) -> dict[str, Any]:
    """Random tiny SD3 modules, deterministic in ``seed`` (float32, CPU).

    Transformer: 2 MMDiT blocks of width 32 (2 heads of 16, RMS qk-norm as SD3.5), patch 2, 16 latent channels.
    VAE: 3 blocks (scale factor 4), 16 latent channels, SD3's scaling and shift factors. Text: two 2-layer CLIP
    encoders of width 16 with 16-d projections (joint width 32 = 16 + 16, pooled 32); no T5.
    """
    tokenizer = tiny_tokenizer()
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=32,
            out_channels=16,
            pos_embed_max_size=32,
            qk_norm="rms_norm",
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
        encoders = []
        for _ in range(2):
            te_cfg = CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=TINY_TEXT_LENGTH,
                projection_dim=16,
                hidden_act="gelu",
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
            encoders.append(CLIPTextModelWithProjection(te_cfg))
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": encoders[0],
        "text_encoder_2": encoders[1],
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_tokenizer(),
    }


def _config_json(module: Any) -> str:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return "null"
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d = {
        k: v
        for k, v in d.items()
        if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")
    }
    return json.dumps(d, sort_keys=True, default=str)


def tiny_fingerprint(parts: dict[str, Any], seed: int) -> str:
    """``tiny-<sha1[:16]>`` of the seed, every module's config and every weight: identifies a tiny model."""
    h = hashlib.sha1(f"tiny:{seed}".encode())
    for name in sorted(parts):
        module = parts[name]
        h.update(name.encode())
        h.update(_config_json(module).encode())
        if isinstance(module, torch.nn.Module):
            for pname, p in sorted(module.state_dict().items()):
                h.update(pname.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
    return "tiny-" + h.hexdigest()[:16]


def build_tiny(
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    *,
    max_sequence_length: int = 256,
    resolution: int = 32,
) -> SD3Model:
    """The tiny random SD3 of ``seed`` as an :class:`~pgot.model.SD3Model` (modules not yet frozen).

    Args:
        seed: ``model.tiny_seed``; the weights and the fingerprint are deterministic in it.
        device: where the modules go.
        dtype: weights dtype.
        max_sequence_length: ``model.max_sequence_length`` (unused without T5; recorded).
        resolution: ``model.resolution``.
    """
    parts = tiny_components(seed)
    fp = tiny_fingerprint(parts, seed)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        parts[name] = parts[name].to(device) if dtype == torch.float32 else parts[name].to(device=device, dtype=dtype)
    return SD3Model(
        **parts,
        fingerprint=fp,
        path="tiny",
        dtype=dtype,
        device=device,
        max_sequence_length=max_sequence_length,
        resolution=resolution,
    )


def save_tiny(model: SD3Model, folder: str | Path) -> Path:
    """Write the model (without LoRA adapters) as a diffusers folder that :func:`load_model` reads.

    The tiny model has no T5, so diffusers loads the folder as it loads any SD3 folder without T5:
    ``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``.

    Args:
        model: normally a tiny model (any model works, but a real one is large).
        folder: destination; created if needed.

    Returns:
        The folder.
    """
    if model.text_encoder is None or model.text_encoder_2 is None:
        raise ValueError("save_tiny needs the text encoders; call it before offload_text_encoders(model).")
    if getattr(model.transformer, "peft_config", None):
        raise ValueError(
            "save_tiny writes the base model only; save it before add_lora / load_lora (use save_lora for adapters)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = pipeline(model)
    pipe.save_pretrained(folder, safe_serialization=True)
    # diffusers leaves absent components (no T5) out of model_index.json; [null, null] entries record them
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):
        if getattr(pipe, name, None) is None:
            index.setdefault(name, [None, None])
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder
