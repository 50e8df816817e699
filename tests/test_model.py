"""pgot.model on the tiny random SD3: building, saving and loading, prompt embeddings, LoRA round trips."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from pgot.config import ModelConfig
from pgot.embeddings import encode_prompts
from pgot.generate import make_noise, sample
from pgot.model import (
    LORA_WEIGHT_NAME,
    add_lora,
    load_lora,
    load_lora_soup,
    load_model,
    lora_state_dict,
    save_lora,
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


# ------------------------------------------------------------------ building and loading


@pytest.mark.parametrize("kind", ["missing", "file", "no_index", "other_pipeline", "empty", "hub_id"])
def test_bad_model_path_errors(tmp_path, kind):
    if kind == "missing":
        path = str(tmp_path / "nope")
    elif kind == "file":
        path = str(tmp_path / "weights.bin")
        (tmp_path / "weights.bin").write_bytes(b"x")
    elif kind == "no_index":
        path = str(tmp_path)
    elif kind == "other_pipeline":
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        path = str(tmp_path)
    elif kind == "hub_id":
        path = "pgot-test/no-such-model"  # HF_HUB_OFFLINE=1 (conftest): unreachable
    else:
        path = ""
    with pytest.raises(ValueError) as info:
        load_model(ModelConfig(path=path, device="cpu"))
    msg = str(info.value)
    assert "hf download stabilityai/stable-diffusion-3.5-large-turbo" in msg
    assert "model.tiny=true" in msg
    if path:
        assert repr(path) in msg
    expected = {
        "missing": "does not exist",
        "file": "is a file",
        "no_index": "no model_index.json",
        "other_pipeline": "FluxPipeline",
        "empty": "model.path is empty",
        "hub_id": "is not in the local hub cache",
    }
    assert expected[kind] in msg


# ------------------------------------------------------------------ LoRA


def test_add_lora_trains_only_fp32_lora_params():
    cfg = _cfg()
    model = load_model(cfg)
    params = add_lora(model, cfg)
    trainable = [p for p in model.transformer.parameters() if p.requires_grad]
    assert len(params) == len(trainable) > 0 and {id(p) for p in params} == {id(p) for p in trainable}
    assert all(p.dtype == torch.float32 for p in params)
    named = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    assert all("lora_A" in n or "lora_B" in n for n in named)
    assert any("attn.add_k_proj" in n for n in named) and any("attn.to_out.0" in n for n in named)
    # B starts at zero: the tuned model starts as the base model
    base = load_model(cfg)
    e = encode_prompts(model, PROMPTS)
    torch.testing.assert_close(_sample(model, e), _sample(base, e), rtol=0, atol=0)
    with pytest.raises(ValueError, match="add_lora once"):
        add_lora(model, cfg)


def test_add_lora_bad_targets():
    cfg = _cfg(lora_target_modules=["attn.nonexistent"])
    with pytest.raises(ValueError, match="model.lora_target_modules"):
        add_lora(load_model(cfg), cfg)


def _trained(cfg, seed=1):
    model = load_model(cfg)
    add_lora(model, cfg)
    _randomize_lora_b(model, seed=seed)
    return model


def test_save_lora_loads_in_diffusers_and_reproduces_samples(tmp_path, tiny_folder):
    cfg = _cfg()  # r=4, alpha=8: scale 2 must survive the round trip
    model = _trained(cfg)
    e = encode_prompts(model, PROMPTS)
    ours = _sample(model, e)
    assert not torch.allclose(ours, _sample(load_model(cfg), e), atol=1e-3), "the LoRA matters"
    f = save_lora(model, tmp_path / "lora")
    assert f.name == LORA_WEIGHT_NAME and f.is_file()
    keys = list(load_file(str(f)))
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    # stock diffusers: pipeline from the saved tiny folder + load_lora_weights, on the same latents
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    ref = pipe(
        prompt_embeds=e.prompt_embeds,
        pooled_prompt_embeds=e.pooled,
        latents=_noise(model),
        num_inference_steps=T,
        guidance_scale=0.0,
        height=RES,
        width=RES,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, ref, **TOL)
    # pgot's own loader, as a frozen adapter
    loaded = load_model(cfg)
    load_lora(loaded, tmp_path / "lora")
    assert not any(p.requires_grad for p in loaded.transformer.parameters())
    torch.testing.assert_close(_sample(loaded, e), ours, **TOL)
    # resume: the trainable adapter initialised from the file
    resumed = load_model(cfg)
    add_lora(resumed, cfg, init_from=f)
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(lora_state_dict(resumed)[k], v, rtol=0, atol=0)
    # model.lora_path loads it at load time
    torch.testing.assert_close(_sample(load_model(_cfg(lora_path=str(tmp_path / "lora"))), e), ours, **TOL)


def test_lora_scale_and_soup_are_weighted_sums_of_deltas(tmp_path):
    cfg = _cfg()
    m1 = _trained(cfg, seed=1)
    m2 = load_model(cfg)
    add_lora(m2, cfg)
    sd1 = lora_state_dict(m1)
    with torch.no_grad():  # same A as m1, other B: then w1*B1 + w2*B2 is the soup's delta
        for n, p in m2.transformer.named_parameters():
            key = n.replace(".default", "")
            if "lora_A" in n:
                p.copy_(sd1[key])
    _randomize_lora_b(m2, seed=2)
    sd2 = lora_state_dict(m2)
    save_lora(m1, tmp_path / "a")
    save_lora(m2, tmp_path / "b")
    e = encode_prompts(m1, PROMPTS)

    def with_b(fn):
        m = load_model(cfg)
        add_lora(m, cfg)
        with torch.no_grad():
            for n, p in m.transformer.named_parameters():
                key = n.replace(".default", "")
                if "lora_" in n:
                    p.copy_(fn(key))
        return _sample(m, e)

    half = load_model(cfg)
    load_lora(half, tmp_path / "a", scale=0.5)
    ref = with_b(lambda k: sd1[k] * 0.5 if "lora_B" in k else sd1[k])
    torch.testing.assert_close(_sample(half, e), ref, **TOL)

    soup = load_model(cfg)
    names = load_lora_soup(soup, {str(tmp_path / "a"): 0.3, str(tmp_path / "b"): 0.7})
    assert names == ["soup_0", "soup_1"] and soup.adapter_weights == {"soup_0": 0.3, "soup_1": 0.7}
    ref = with_b(lambda k: 0.3 * sd1[k] + 0.7 * sd2[k] if "lora_B" in k else sd1[k])
    torch.testing.assert_close(_sample(soup, e), ref, **TOL)


def test_lora_path_errors(tmp_path):
    model = load_model(_cfg())
    with pytest.raises(ValueError, match="does not exist"):
        load_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=f"LoRA folder that has no {LORA_WEIGHT_NAME}"):
        load_lora(model, tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora_state_dict(model)
