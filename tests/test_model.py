"""pgot.model on the tiny random SD3: building, saving and loading, prompt embeddings, LoRA round trips."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file
from sd3_helpers import PROMPTS, RES, TOL, T, noise, randomize_lora_b, sample_latents, tiny_cfg

from pgot.config import ModelConfig
from pgot.embeddings import encode_prompts
from pgot.model import (
    FINGERPRINT_KEY,
    LORA_WEIGHT_NAME,
    add_lora,
    check_lora_file,
    load_lora,
    load_lora_soup,
    load_model,
    lora_base_fingerprint,
    lora_state_dict,
    save_lora,
)
from pgot.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    save_tiny(load_model(tiny_cfg()), folder)
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
    cfg = tiny_cfg()
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
    torch.testing.assert_close(sample_latents(model, e), sample_latents(base, e), rtol=0, atol=0)
    with pytest.raises(ValueError, match="add_lora once"):
        add_lora(model, cfg)


def test_add_lora_bad_targets():
    cfg = tiny_cfg(lora_target_modules=["attn.nonexistent"])
    with pytest.raises(ValueError, match="model.lora_target_modules"):
        add_lora(load_model(cfg), cfg)


def _trained(cfg, seed=1):
    model = load_model(cfg)
    add_lora(model, cfg)
    randomize_lora_b(model, seed=seed)
    return model


def test_save_lora_loads_in_diffusers_and_reproduces_samples(tmp_path, tiny_folder):
    cfg = tiny_cfg()  # r=4, alpha=8: scale 2 must survive the round trip
    model = _trained(cfg)
    e = encode_prompts(model, PROMPTS)
    ours = sample_latents(model, e)
    assert not torch.allclose(ours, sample_latents(load_model(cfg), e), atol=1e-3), "the LoRA matters"
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
        latents=noise(model),
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
    torch.testing.assert_close(sample_latents(loaded, e), ours, **TOL)
    # resume: the trainable adapter initialised from the file
    resumed = load_model(cfg)
    add_lora(resumed, cfg, init_from=f)
    for k, v in lora_state_dict(model).items():
        torch.testing.assert_close(lora_state_dict(resumed)[k], v, rtol=0, atol=0)
    # model.lora_path loads it at load time
    torch.testing.assert_close(sample_latents(load_model(tiny_cfg(lora_path=str(tmp_path / "lora"))), e), ours, **TOL)


def test_lora_scale_and_soup_are_weighted_sums_of_deltas(tmp_path):
    cfg = tiny_cfg()
    m1 = _trained(cfg, seed=1)
    m2 = load_model(cfg)
    add_lora(m2, cfg)
    sd1 = lora_state_dict(m1)
    with torch.no_grad():  # same A as m1, other B: then w1*B1 + w2*B2 is the soup's delta
        for n, p in m2.transformer.named_parameters():
            key = n.replace(".default", "")
            if "lora_A" in n:
                p.copy_(sd1[key])
    randomize_lora_b(m2, seed=2)
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
        return sample_latents(m, e)

    half = load_model(cfg)
    load_lora(half, tmp_path / "a", scale=0.5)
    ref = with_b(lambda k: sd1[k] * 0.5 if "lora_B" in k else sd1[k])
    torch.testing.assert_close(sample_latents(half, e), ref, **TOL)

    soup = load_model(cfg)
    names = load_lora_soup(soup, {str(tmp_path / "a"): 0.3, str(tmp_path / "b"): 0.7})
    assert names == ["soup_0", "soup_1"] and soup.adapter_weights == {"soup_0": 0.3, "soup_1": 0.7}
    ref = with_b(lambda k: 0.3 * sd1[k] + 0.7 * sd2[k] if "lora_B" in k else sd1[k])
    torch.testing.assert_close(sample_latents(soup, e), ref, **TOL)


def test_lora_path_errors(tmp_path):
    model = load_model(tiny_cfg())
    with pytest.raises(ValueError, match="does not exist"):
        load_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=f"LoRA folder that has no {LORA_WEIGHT_NAME}"):
        load_lora(model, tmp_path)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        lora_state_dict(model)


# ------------------------------------------------------------------ LoRA files: every naming, every failure

LORA_KEY = "eval.models.1.lora"


def _deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    """Layer -> scaling * B @ A of ``adapter`` (conv kernels flattened): what the adapter adds to each weight."""
    out = {}
    for name, module in model.transformer.named_modules():
        if hasattr(module, "lora_A") and adapter in getattr(module, "lora_A", {}):
            a = module.lora_A[adapter].weight.detach()
            b = module.lora_B[adapter].weight.detach()
            out[name] = module.scaling[adapter] * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))
    return out


def _peft_config(model) -> dict:
    return getattr(model.transformer, "peft_config", None) or {}


@pytest.fixture(scope="module")
def pgot_lora(tmp_path_factory):
    """A trained adapter saved by save_lora: (file, its tensors, its metadata, the reference deltas)."""
    from safetensors import safe_open

    cfg = tiny_cfg()  # r=4, alpha=8: scale 2
    model = _trained(cfg)
    f = save_lora(model, tmp_path_factory.mktemp("pgot_lora"))
    with safe_open(str(f), framework="pt") as fh:
        meta = fh.metadata()
    return f, load_file(str(f)), meta, _deltas(model, "default")


def _save(path, tensors, metadata=None):
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _layer(k: str) -> tuple[str, str]:
    """'transformer.<layer>.lora_A.weight' -> ('<layer>', 'A')."""
    layer, rest = k.removeprefix("transformer.").rsplit(".lora_", 1)
    return layer, rest[0]


def _naming(kind: str, sd: dict, meta: dict, folder):
    """The same trained weights written in another naming; returns the path to load."""
    if kind == "peft_no_prefix":  # the issue: the transformer. prefix dropped, metadata kept
        return _save(folder / "peft.safetensors", {k.removeprefix("transformer."): v for k, v in sd.items()}, meta)
    if kind == "peft_adapter_name":  # as the model's own parameters are named
        tensors = {f"{layer}.lora_{ab}.default.weight": v for k, v in sd.items() for layer, ab in [_layer(k)]}
        return _save(folder / "named.safetensors", tensors, meta)
    if kind == "peft_folder":  # PeftModel.save_pretrained: adapter_model.safetensors + adapter_config.json
        sub = folder / "peft_model"
        _save(
            sub / "adapter_model.safetensors",
            {f"base_model.model.{k.removeprefix('transformer.')}": v for k, v in sd.items()},
        )
        (sub / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8.0}))
        return sub
    if kind in ("kohya", "kohya_transformer"):  # underscored diffusers layer names, lora_down / lora_up / alpha
        prefix = "lora_unet_" if kind == "kohya" else "lora_transformer_"
        tensors = {}
        for k, v in sd.items():
            layer, ab = _layer(k)
            name = prefix + layer.replace(".", "_")
            tensors[f"{name}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = v
            tensors[f"{name}.alpha"] = torch.tensor(8.0)
        return _save(folder / f"{kind}.safetensors", tensors)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["diffusers", "peft_no_prefix", "peft_adapter_name", "peft_folder", "kohya", "kohya_transformer"]
)
def test_every_lora_naming_loads_completely(pgot_lora, tmp_path, kind):
    f, sd, meta, want = pgot_lora
    path = f if kind == "diffusers" else _naming(kind, sd, meta, tmp_path)
    model = load_model(tiny_cfg())
    load_lora(model, path, key=LORA_KEY)
    got = _deltas(model, "pgot_lora")
    assert set(got) == set(want) and len(got) == 15
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.transformer.parameters())
    assert check_lora_file(path, key=LORA_KEY, fingerprint=model.fingerprint) == []


def test_peft_named_lora_samples_like_the_original(pgot_lora, tmp_path):
    f, sd, meta, _ = pgot_lora
    e = encode_prompts(load_model(tiny_cfg()), PROMPTS)
    a, b = load_model(tiny_cfg()), load_model(tiny_cfg())
    load_lora(a, f)
    load_lora(b, _naming("peft_no_prefix", sd, meta, tmp_path))
    base = sample_latents(load_model(tiny_cfg()), e)
    assert not torch.allclose(sample_latents(b, e), base, atol=1e-3), "the LoRA reached the transformer"
    torch.testing.assert_close(sample_latents(b, e), sample_latents(a, e), rtol=0, atol=0)


def test_lora_without_alpha_assumes_rank_and_says_so(pgot_lora, tmp_path, caplog):
    _, sd, _, want = pgot_lora
    path = _save(tmp_path / "bare.safetensors", {k.removeprefix("transformer."): v for k, v in sd.items()})
    model = load_model(tiny_cfg())
    with caplog.at_level("WARNING", logger="pgot.model"):
        load_lora(model, path)
    assert "records no lora_alpha" in caplog.text and "records no base-model fingerprint" in caplog.text
    got = _deltas(model, "pgot_lora")  # alpha = r: scale 1 where the trained adapter had 2
    for name in want:
        torch.testing.assert_close(got[name], want[name] / 2, rtol=1e-6, atol=0)


def _sai_file(folder, r=2, seed=0, underscored=False):
    """A LoRA in Stability AI's layer names (as kohya sd-scripts writes for SD3) and the deltas it means, computed
    on the Stability AI layers and converted as diffusers converts SD3 checkpoints (qkv rows split in three, the
    adaLN (shift, scale) of AdaLayerNormContinuous swapped)."""
    g = torch.Generator().manual_seed(seed)
    d = 32  # the tiny transformer's width
    layers = {  # SAI layer: (in, out, kernel or None, [(diffusers layer, rows)], swap)
        "joint_blocks.0.x_block.attn.qkv": (
            d,
            3 * d,
            None,
            ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"],
            False,
        ),
        "joint_blocks.0.context_block.attn.qkv": (
            d,
            3 * d,
            None,
            [
                "transformer_blocks.0.attn.add_q_proj",
                "transformer_blocks.0.attn.add_k_proj",
                "transformer_blocks.0.attn.add_v_proj",
            ],
            False,
        ),
        "joint_blocks.1.x_block.attn.proj": (d, d, None, ["transformer_blocks.1.attn.to_out.0"], False),
        "joint_blocks.0.context_block.attn.proj": (d, d, None, ["transformer_blocks.0.attn.to_add_out"], False),
        "joint_blocks.0.x_block.mlp.fc1": (d, 4 * d, None, ["transformer_blocks.0.ff.net.0.proj"], False),
        "joint_blocks.0.context_block.mlp.fc2": (4 * d, d, None, ["transformer_blocks.0.ff_context.net.2"], False),
        "joint_blocks.0.x_block.adaLN_modulation.1": (d, 6 * d, None, ["transformer_blocks.0.norm1.linear"], False),
        "joint_blocks.0.context_block.adaLN_modulation.1": (
            d,
            6 * d,
            None,
            ["transformer_blocks.0.norm1_context.linear"],
            False,
        ),
        "joint_blocks.1.context_block.adaLN_modulation.1": (
            d,
            2 * d,
            None,
            ["transformer_blocks.1.norm1_context.linear"],
            True,
        ),
        "final_layer.adaLN_modulation.1": (d, 2 * d, None, ["norm_out.linear"], True),
        "final_layer.linear": (d, 16 * 2 * 2, None, ["proj_out"], False),
        "x_embedder.proj": (16, d, (2, 2), ["pos_embed.proj"], False),
        "t_embedder.mlp.0": (256, d, None, ["time_text_embed.timestep_embedder.linear_1"], False),
        "y_embedder.mlp.2": (d, d, None, ["time_text_embed.text_embedder.linear_2"], False),
        "context_embedder": (d, d, None, ["context_embedder"], False),
    }
    alpha = 3.0
    tensors, want = {}, {}
    for sai, (fan_in, fan_out, kernel, targets, swap) in layers.items():
        down = torch.randn((r, fan_in, *kernel) if kernel else (r, fan_in), generator=g)
        up = torch.randn((fan_out, r, 1, 1) if kernel else (fan_out, r), generator=g)
        full = alpha / r * (up.reshape(fan_out, r) @ down.reshape(r, -1))  # the delta of the SAI layer
        if swap:
            full = torch.cat(full.chunk(2)[::-1])
        for name, rows in zip(targets, full.chunk(len(targets)), strict=True):
            want[name] = rows
        name = "lora_unet_" + sai.replace(".", "_") if underscored else "model.diffusion_model." + sai
        if underscored:
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        else:
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    return _save(folder / f"sai_{underscored}.safetensors", tensors), want


@pytest.mark.parametrize("underscored", [False, True])
def test_stability_ai_layer_names_split_qkv_and_swap_adaln(tmp_path, underscored):
    path, want = _sai_file(tmp_path, underscored=underscored)
    model = load_model(tiny_cfg())
    load_lora(model, path)
    got = _deltas(model, "pgot_lora")
    assert set(got) == set(want) and len(got) == 19
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    e = encode_prompts(model, PROMPTS)
    assert torch.isfinite(sample_latents(model, e)).all()


def _broken(kind: str, sd: dict, meta: dict, folder):
    """A LoRA file of which nothing, or only part, would reach the transformer."""
    p = folder / f"{kind}.safetensors"
    if kind == "text_encoder_only":
        t = {
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16),
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 4),
        }
        return _save(p, t), "holds only text-encoder LoRA weights", True
    if kind == "kohya_text_encoder_only":
        t = {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 16),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, 4),
        }
        return _save(p, t), "holds only text-encoder LoRA weights", True
    if kind == "text_encoder_too":
        t = dict(sd, **{"text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 16)})
        return _save(p, t, meta), "also holds 1 text-encoder LoRA tensor ", True
    if kind == "not_a_lora":  # a model checkpoint
        t = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(32, 32), "proj_out.bias": torch.zeros(64)}
        return _save(p, t), "holds no LoRA weights", True
    if kind == "extra_tensors":
        return (
            _save(p, dict(sd, **{"transformer.pos_embed.proj.weight": torch.zeros(32, 16, 2, 2)}), meta),
            "1 tensor besides LoRA weights",
            True,
        )
    if kind == "unknown_layers":
        t = {k.replace("transformer_blocks.0.attn.to_q", "blocks.0.attention.query"): v for k, v in sd.items()}
        return _save(p, t, meta), "layers that an SD3 transformer does not have", True
    if kind == "missing_targets":  # trained on a deeper model: blocks this one lacks
        t = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v for k, v in sd.items()}
        return _save(p, t, meta), "7 of its layers do not exist in this transformer", False
    if kind == "shape_mismatch":  # trained on a wider model
        t = {k: torch.zeros(v.shape[0], v.shape[1] + 8) if ".lora_A." in k else v for k, v in sd.items()}
        return _save(p, t, meta), "size mismatch in 15 layers", False
    if kind == "incomplete":
        t = {k: v for k, v in sd.items() if not k.endswith("to_k.lora_B.weight")}
        return _save(p, t, meta), "is incomplete: 2 layers with a LoRA down", True
    if kind == "dora":
        return (
            _save(
                p,
                dict(sd, **{"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(32)}),
                meta,
            ),
            "DoRA",
            True,
        )
    if kind == "nan":
        t = dict(sd)
        k = next(k for k in t if k.endswith("to_q.lora_B.weight"))
        t[k] = torch.full_like(t[k], float("nan"))
        return _save(p, t, meta), "NaN or infinite values", False
    if kind == "empty_file":
        return _save(p, {}), "holds no tensors", True
    if kind == "not_safetensors":
        p.write_bytes(b"\x00" * 64)
        return p, "is not a readable .safetensors file", True
    if kind == "pickle":
        q = folder / "lora.bin"
        torch.save(sd, q)
        return q, "is not a .safetensors file", True
    raise AssertionError(kind)


BROKEN = [
    "text_encoder_only", "kohya_text_encoder_only", "text_encoder_too", "not_a_lora", "extra_tensors", "unknown_layers",
    "missing_targets", "shape_mismatch", "incomplete", "dora", "nan", "empty_file", "not_safetensors", "pickle",
]  # fmt: skip


@pytest.mark.parametrize("kind", BROKEN)
def test_lora_that_would_load_in_part_is_refused_everywhere(pgot_lora, tmp_path, kind):
    f, sd, meta, want = pgot_lora
    path, words, in_header = _broken(kind, sd, meta, tmp_path)
    model = load_model(tiny_cfg())
    e = encode_prompts(model, PROMPTS)
    base = sample_latents(model, e)
    # load_lora: the error names the key and the file; the model is left as it was
    with pytest.raises(ValueError, match=words) as info:
        load_lora(model, path, key=LORA_KEY)
    assert str(info.value).startswith(LORA_KEY) and path.name in str(info.value)
    assert _peft_config(model) == {}
    torch.testing.assert_close(sample_latents(model, e), base, rtol=0, atol=0)
    # a soup: the good LoRA loaded before the bad one is removed again
    with pytest.raises(ValueError, match=words) as info:
        load_lora_soup(model, {str(f): 0.5, str(path): 0.5}, key="eval.models.2.soup")
    assert str(info.value).startswith("eval.models.2.soup") and _peft_config(model) == {}
    # the trainable adapter initialised from it
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match=words):
        add_lora(model, cfg, init_from=path, key="train.init")
    assert _peft_config(model) == {}
    # model.lora_path
    with pytest.raises(ValueError, match=words) as info:
        load_model(tiny_cfg(lora_path=str(path)))
    assert str(info.value).startswith("model.lora_path")
    # the preflight check finds what the header shows, without a model
    problems = check_lora_file(path, key=LORA_KEY)
    if in_header:
        assert len(problems) == 1 and problems[0].startswith(LORA_KEY) and re.search(words, problems[0])
    else:
        assert problems == []
    # the model still takes a good LoRA afterwards
    load_lora(model, f)
    assert set(_deltas(model, "pgot_lora")) == set(want)


def test_init_from_must_fill_the_adapter_exactly(pgot_lora):
    f, _, _, want = pgot_lora
    model = load_model(tiny_cfg())
    add_lora(model, tiny_cfg(), init_from=f)
    for name, delta in _deltas(model, "default").items():
        torch.testing.assert_close(delta, want[name], rtol=0, atol=0)
    for kw, words in [
        ({"lora_rank": 8}, "other ranks than model.lora_rank"),
        ({"lora_alpha": 4.0}, "other alpha than model.lora_alpha=4"),
        ({"lora_target_modules": ["attn.to_q", "attn.to_k"]}, "weights for 11 layers the adapter lacks"),
        (
            {"lora_target_modules": [*tiny_cfg().lora_target_modules, "ff.net.2"]},
            "no weights for 2 layers of the adapter",
        ),
    ]:
        cfg = tiny_cfg(**kw)
        fresh = load_model(cfg)
        with pytest.raises(ValueError, match=words):
            add_lora(fresh, cfg, init_from=f)
        assert _peft_config(fresh) == {}


def test_lora_records_its_base_and_refuses_another(pgot_lora, tmp_path, caplog):
    f, sd, _, want = pgot_lora
    from safetensors import safe_open

    trained_on = load_model(tiny_cfg()).fingerprint
    with safe_open(str(f), framework="pt") as fh:
        assert fh.metadata()[FINGERPRINT_KEY] == trained_on
    assert lora_base_fingerprint(f) == lora_base_fingerprint(f.parent) == trained_on
    other = load_model(tiny_cfg(tiny_seed=1))
    assert other.fingerprint != trained_on
    with pytest.raises(ValueError) as info:
        load_lora(other, f, key=LORA_KEY)
    msg = str(info.value)
    assert msg.startswith(LORA_KEY) and trained_on in msg and other.fingerprint in msg
    assert "eval.models.1.allow_lora_transfer=true" in msg and "\n" not in msg
    assert _peft_config(other) == {}
    with pytest.raises(ValueError, match="model.allow_lora_transfer=true"):
        load_model(tiny_cfg(tiny_seed=1, lora_path=str(f)))
    with pytest.raises(ValueError, match="allow_other_base=True"):
        add_lora(load_model(tiny_cfg(tiny_seed=1)), tiny_cfg(), init_from=f)
    (problem,) = check_lora_file(f, key=LORA_KEY, fingerprint=other.fingerprint)  # the same words, without a model
    assert problem.startswith(LORA_KEY) and trained_on in problem and other.fingerprint in problem
    assert "eval.models.1.allow_lora_transfer=true" in problem
    assert check_lora_file(f, key=LORA_KEY, fingerprint=trained_on) == []
    # a deliberate transfer
    with caplog.at_level("WARNING", logger="pgot.model"):
        load_lora(other, f, key=LORA_KEY, allow_other_base=True)
    assert "as allowed by eval.models.1.allow_lora_transfer=true" in caplog.text
    assert set(_deltas(other, "pgot_lora")) == set(want)
    loaded = load_model(tiny_cfg(tiny_seed=1, lora_path=str(f), allow_lora_transfer=True))
    assert set(_deltas(loaded, "pgot_lora")) == set(want)
    # a LoRA from another tool records no base: one warning per file, then it loads
    bare = _save(tmp_path / "other_tool.safetensors", sd)
    assert lora_base_fingerprint(bare) is None
    caplog.clear()
    with caplog.at_level("WARNING", logger="pgot.model"):
        load_lora(load_model(tiny_cfg(tiny_seed=1)), bare)
        load_lora(load_model(tiny_cfg(tiny_seed=1)), bare)
    assert caplog.text.count("records no base-model fingerprint") == 1


def test_init_from_arrives_exactly_in_a_bfloat16_model(pgot_lora):
    f, _, _, _ = pgot_lora
    want = {k.removeprefix("transformer."): v for k, v in load_file(str(f)).items()}
    cfg = tiny_cfg(dtype="bfloat16")
    model = load_model(cfg)
    assert model.dtype == torch.bfloat16
    params = add_lora(model, cfg, init_from=f)
    assert {p.dtype for p in params} == {torch.float32}  # trainable in float32, filled with the file's exact values
    got = lora_state_dict(model)
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
