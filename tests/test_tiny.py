"""pgot/tiny.py: the tiny random SD3 is deterministic in its seed and round-trips through a diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from pgot.config import ModelConfig
from pgot.embeddings import encode_prompts
from pgot.generate import decode, make_noise, sample
from pgot.model import (
    load_model,
)
from pgot.tiny import save_tiny

RES = 32
T = 4
PROMPTS = ["a red fox in the snow", "a bowl of ramen"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _cfg(**kw) -> ModelConfig:
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


def _noise(model, n=2):
    return make_noise(3, list(range(n)), [0] * n, model.latent_shape(RES))


def _sample(model, embeds):
    with torch.no_grad():
        return sample(model, embeds, _noise(model, len(embeds)), num_steps=T, k=0)


def _randomize_lora_b(model, scale=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if "lora_B" in n and ".default." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    save_tiny(load_model(_cfg()), folder)
    return folder


def test_tiny_is_deterministic_in_its_seed():
    a, b, c = load_model(_cfg()), load_model(_cfg()), load_model(_cfg(tiny_seed=1))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    sa, sc = a.transformer.state_dict(), c.transformer.state_dict()
    assert all(torch.equal(v, b.transformer.state_dict()[k]) for k, v in sa.items())
    assert not all(torch.equal(v, sc[k]) for k, v in sa.items())
    assert a.latent_channels == 16 and a.vae_scale_factor == 4 and a.latent_shape(RES) == (16, 8, 8)
    assert not any(p.requires_grad for p in a.transformer.parameters())
    # building the tiny model leaves the global RNG alone
    torch.manual_seed(5)
    x = torch.rand(3)
    torch.manual_seed(5)
    load_model(_cfg())
    assert torch.equal(torch.rand(3), x)


def test_save_tiny_round_trip(tiny_folder):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.in_channels == 16
    tiny = load_model(_cfg())
    loaded = load_model(ModelConfig(path=str(tiny_folder), resolution=RES, max_sequence_length=8, device="cpu"))
    assert loaded.fingerprint.startswith("sd3-") and loaded.fingerprint != tiny.fingerprint
    assert load_model(ModelConfig(path=str(tiny_folder), device="cpu")).fingerprint == loaded.fingerprint, "stable"
    e_tiny, e_loaded = encode_prompts(tiny, PROMPTS), encode_prompts(loaded, PROMPTS)
    torch.testing.assert_close(e_loaded.prompt_embeds, e_tiny.prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(e_loaded.pooled, e_tiny.pooled, rtol=0, atol=0)
    torch.testing.assert_close(
        decode(loaded, _sample(loaded, e_loaded)), decode(tiny, _sample(tiny, e_tiny)), rtol=0, atol=0
    )
