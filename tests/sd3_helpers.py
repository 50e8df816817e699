"""Shared helpers of the tests on the tiny random SD3 (tests/test_model.py, test_embeddings.py, test_tiny.py)."""

from __future__ import annotations

import torch

from pgot.config import ModelConfig
from pgot.generate import make_noise, sample

RES = 32
T = 4
PROMPTS = ["a red fox in the snow", "a bowl of ramen"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def tiny_cfg(**kw: object) -> ModelConfig:
    """The tiny random SD3 at 32 px with an 8-token text length and a rank-4 LoRA setting."""
    base = {
        "tiny": True,
        "resolution": RES,
        "max_sequence_length": 8,
        "device": "cpu",
        "lora_rank": 4,
        "lora_alpha": 8.0,
    }
    base.update(kw)
    return ModelConfig(**base)


def noise(model, n: int = 2) -> torch.Tensor:
    return make_noise(3, list(range(n)), [0] * n, model.latent_shape(RES))


def sample_latents(model, embeds) -> torch.Tensor:
    with torch.no_grad():
        return sample(model, embeds, noise(model, len(embeds)), num_steps=T, k=0)


def randomize_lora_b(model, scale: float = 0.2, seed: int = 1) -> None:
    """Give the trainable adapter's B matrices random values (a LoRA that changes the model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n and ".default." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
