"""pgot.model on the tiny random SD3: building, saving and loading, prompt embeddings, LoRA round trips."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from pgot.config import ModelConfig
from pgot.generate import decode, make_noise, sample
from pgot.model import (
    LORA_WEIGHT_NAME,
    add_lora,
    encode_prompts,
    load_lora,
    load_lora_soup,
    load_model,
    lora_state_dict,
    offload_text_encoders,
    pipeline,
    save_lora,
    save_tiny,
)

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
    assert "huggingface-cli download stabilityai/stable-diffusion-3.5-large-turbo" in msg
    assert "model.tiny=true" in msg
    if path:
        assert repr(path) in msg
    expected = {
        "missing": "does not exist",
        "file": "is a file",
        "no_index": "no model_index.json",
        "other_pipeline": "FluxPipeline",
        "empty": "model.path is empty",
        "hub_id": "could not be fetched from the hub",
    }
    assert expected[kind] in msg


# ------------------------------------------------------------------ prompt embeddings


def test_encode_prompts_matches_pipeline_and_caches(tmp_path):
    model = load_model(_cfg())
    calls = []
    for te in (model.text_encoder, model.text_encoder_2):
        te.register_forward_pre_hook(lambda m, a: calls.append(1))
    e = encode_prompts(model, PROMPTS, cache_dir=tmp_path)
    assert len(calls) == 2  # the prompts and the empty negative prompt in one batch, once per encoder
    pe, npe, pooled, npooled = pipeline(model).encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8
    )
    torch.testing.assert_close(e.prompt_embeds, pe, rtol=0, atol=0)
    torch.testing.assert_close(e.pooled, pooled, rtol=0, atol=0)
    torch.testing.assert_close(e.negative_prompt_embeds, npe, rtol=0, atol=0)
    torch.testing.assert_close(e.negative_pooled, npooled, rtol=0, atol=0)
    assert e.prompt_embeds.shape == (2, 77 + 8, 32) and e.pooled.shape == (2, 32)
    n = len(calls)
    again = encode_prompts(model, list(reversed(PROMPTS)), cache_dir=tmp_path)
    assert len(calls) == n, "memory cache hit: no encoder call"
    torch.testing.assert_close(again.prompt_embeds, e.prompt_embeds.flip(0))
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    # a fresh model (same fingerprint) reads the disk cache, even without text encoders
    fresh = load_model(_cfg())
    offload_text_encoders(fresh)
    assert fresh.text_encoder is None and fresh.text_encoder_2 is None
    from_disk = encode_prompts(fresh, PROMPTS, cache_dir=tmp_path)
    torch.testing.assert_close(from_disk.prompt_embeds, e.prompt_embeds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="offload"):
        encode_prompts(fresh, ["a prompt never encoded"], cache_dir=tmp_path)
    # another tiny seed is another model: its cache keys differ
    other = load_model(_cfg(tiny_seed=2))
    offload_text_encoders(other)
    with pytest.raises(ValueError, match="no cached embedding"):
        encode_prompts(other, PROMPTS, cache_dir=tmp_path)


def test_prompt_embeds_helpers():
    model = load_model(_cfg())
    e = encode_prompts(model, PROMPTS)
    r = e.repeat_interleave(3)
    assert len(r) == 6 and torch.equal(r.prompt_embeds[2], e.prompt_embeds[0]) and torch.equal(r.pooled[3], e.pooled[1])
    s = e.select([1, 1, 0])
    assert torch.equal(s.prompt_embeds[0], e.prompt_embeds[1]) and torch.equal(
        s.negative_pooled[2], e.negative_pooled[0]
    )
    assert len(type(e).cat([e, s])) == 5


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
