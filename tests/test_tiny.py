"""pgot/tiny.py: the tiny random SD3 is deterministic in its seed and round-trips through a diffusers folder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from sd3_helpers import PROMPTS, RES, sample_latents, tiny_cfg

from pgot.config import ModelConfig
from pgot.embeddings import encode_prompts
from pgot.generate import decode
from pgot.model import (
    load_model,
)
from pgot.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    save_tiny(load_model(tiny_cfg()), folder)
    return folder


def test_tiny_is_deterministic_in_its_seed():
    a, b, c = load_model(tiny_cfg()), load_model(tiny_cfg()), load_model(tiny_cfg(tiny_seed=1))
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
    load_model(tiny_cfg())
    assert torch.equal(torch.rand(3), x)


def test_save_tiny_round_trip(tiny_folder):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.transformer.config.in_channels == 16
    tiny = load_model(tiny_cfg())
    loaded = load_model(ModelConfig(path=str(tiny_folder), resolution=RES, max_sequence_length=8, device="cpu"))
    assert loaded.fingerprint.startswith("sd3-") and loaded.fingerprint != tiny.fingerprint
    assert load_model(ModelConfig(path=str(tiny_folder), device="cpu")).fingerprint == loaded.fingerprint, "stable"
    e_tiny, e_loaded = encode_prompts(tiny, PROMPTS), encode_prompts(loaded, PROMPTS)
    torch.testing.assert_close(e_loaded.prompt_embeds, e_tiny.prompt_embeds, rtol=0, atol=0)
    torch.testing.assert_close(e_loaded.pooled, e_tiny.pooled, rtol=0, atol=0)
    torch.testing.assert_close(
        decode(loaded, sample_latents(loaded, e_loaded)), decode(tiny, sample_latents(tiny, e_tiny)), rtol=0, atol=0
    )
