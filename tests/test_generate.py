"""pgot.generate against diffusers' StableDiffusion3Pipeline on the tiny random SD3 (CPU, float32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgot.config import DraftConfig, ModelConfig
from pgot.embeddings import encode_prompts
from pgot.generate import decode, generate, make_noise, noise_seed, sample, sigmas, timesteps
from pgot.model import add_lora, load_model, pipeline

RES = 32
T = 4
PROMPTS = ["a red fox in the snow", "a bowl of ramen", "a lighthouse at dusk"]
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32, same modules, same op order as the pipeline


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(tiny=True, resolution=RES, max_sequence_length=8, device="cpu", **kw)


@pytest.fixture(scope="module")
def model():
    return load_model(_cfg())


@pytest.fixture(scope="module")
def embeds(model):
    return encode_prompts(model, PROMPTS)


def _noise(model, n=3):
    return make_noise(7, list(range(n)), [0] * n, model.latent_shape(RES))


def _pipe_latents(model, embeds, noise, guidance=0.0, output_type="latent"):
    pipe = pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt_embeds=embeds.prompt_embeds,
        pooled_prompt_embeds=embeds.pooled,
        negative_prompt_embeds=embeds.negative_prompt_embeds,
        negative_pooled_prompt_embeds=embeds.negative_pooled,
        latents=noise.clone(),
        num_inference_steps=T,
        guidance_scale=guidance,
        height=RES,
        width=RES,
        output_type=output_type,
    )
    return out.images, pipe


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_sample_matches_pipeline(model, embeds, guidance):
    noise = _noise(model)
    ref_latents, pipe = _pipe_latents(model, embeds, noise, guidance, "latent")
    ours = sample(model, embeds, noise, num_steps=T, k=0, guidance_scale=guidance)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, ref_latents, **TOL)
    # the pipeline's scheduler holds the grid it used: ours is the same
    torch.testing.assert_close(sigmas(model, T), pipe.scheduler.sigmas.cpu())
    torch.testing.assert_close(timesteps(model, T), pipe.scheduler.timesteps.cpu())
    ref_images, _ = _pipe_latents(model, embeds, noise, guidance, "pt")
    images = decode(model, ours)
    assert images.shape == (3, 3, RES, RES)
    torch.testing.assert_close(images, ref_images, **TOL)


def test_sigmas_shape_and_shift(model):
    s = sigmas(model, T)
    assert s.shape == (T + 1,) and s.dtype == torch.float32
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    s1 = sigmas(model, T, shift=1.0)
    # shift 1: the unshifted grid from sigma_max = 1 to sigma_min = 1 / num_train_timesteps
    torch.testing.assert_close(s1[:-1], torch.linspace(1.0, 1.0 / 1000, T))
    assert not torch.allclose(s, s1), "a shift override changes the grid"


def _count_grad_calls(model, fn):
    flags: list[bool] = []
    h = model.transformer.register_forward_pre_hook(lambda mod, args: flags.append(torch.is_grad_enabled()))
    try:
        out = fn()
    finally:
        h.remove()
    return out, flags


@pytest.mark.parametrize("k", [0, 1, 2, T])
def test_exactly_k_steps_with_gradients(k):
    m = load_model(_cfg(gradient_checkpointing=False))
    add_lora(m, _cfg())
    e = encode_prompts(m, PROMPTS[:2])
    out, flags = _count_grad_calls(m, lambda: sample(m, e, _noise(m, 2), num_steps=T, k=k))
    assert len(flags) == T
    assert flags == [False] * (T - k) + [True] * k
    assert out.requires_grad == (k > 0)


def test_refl_one_grad_step_and_x0(model, embeds):
    noise = _noise(model)
    for t in range(T):
        out, flags = _count_grad_calls(
            model, lambda t=t: sample(model, embeds, noise, num_steps=T, k=0, method="refl", refl_step=t)
        )
        assert flags == [False] * t + [True]
    # at the last step the x0 prediction x - sigma v equals the final Euler step (sigma_T = 0)
    x0 = sample(model, embeds, noise, num_steps=T, k=0, method="refl", refl_step=T - 1)
    torch.testing.assert_close(x0, sample(model, embeds, noise, num_steps=T, k=0), **TOL)
    # random step: from the generator, within [refl_min_step, T-1], reproducible
    steps = set()
    for s in range(20):
        _, flags = _count_grad_calls(
            model,
            lambda s=s: sample(
                model,
                embeds,
                noise,
                num_steps=T,
                k=0,
                method="refl",
                refl_min_step=1,
                generator=torch.Generator().manual_seed(s),
            ),
        )
        steps.add(len(flags) - 1)
    assert steps <= {1, 2, 3} and len(steps) > 1
    a = sample(model, embeds, noise, num_steps=T, k=0, method="refl", generator=torch.Generator().manual_seed(3))
    b = sample(model, embeds, noise, num_steps=T, k=0, method="refl", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def test_lora_receives_gradients_and_base_does_not():
    cfg = _cfg()
    m = load_model(cfg)
    params = add_lora(m, cfg)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    with torch.no_grad():
        for n, p in m.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    e = encode_prompts(m, PROMPTS[:2])
    img = decode(m, sample(m, e, _noise(m, 2), num_steps=T, k=2))
    img.mean().backward()
    named = dict(m.transformer.named_parameters())
    grads = {n: p.grad for n, p in named.items() if p.requires_grad}
    # the last block's add_q_proj only shapes context tokens that are discarded: its gradient is exactly 0
    live = {n: g for n, g in grads.items() if "add_q_proj" not in n or ".0." in n}
    assert all(g is not None and g.abs().sum() > 0 for g in live.values()), [
        n for n, g in live.items() if g is None or g.abs().sum() == 0
    ]
    assert all(p.grad is None for n, p in named.items() if "lora_" not in n)
    assert all(p.grad is None for p in m.vae.parameters())


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        cfg = _cfg(gradient_checkpointing=ckpt)
        m = load_model(cfg)
        torch.manual_seed(0)
        params = add_lora(m, cfg)
        assert m.transformer.gradient_checkpointing == ckpt
        with torch.no_grad():
            for n, p in m.transformer.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).reshape(p.shape))
        e = encode_prompts(m, PROMPTS[:2])
        decode(m, sample(m, e, _noise(m, 2), num_steps=T, k=2)).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_noise_depends_only_on_seed_prompt_and_index(model):
    shape = model.latent_shape(RES)
    pids, idx = [3, 3, 5, 9], [0, 1, 0, 2]
    full = make_noise(11, pids, idx, shape)
    assert full.shape == (4, *shape)
    for b in range(4):
        torch.testing.assert_close(full[b], make_noise(11, [pids[b]], [idx[b]], shape)[0], rtol=0, atol=0)
    perm = [2, 0, 3, 1]
    torch.testing.assert_close(
        make_noise(11, [pids[i] for i in perm], [idx[i] for i in perm], shape), full[perm], rtol=0, atol=0
    )
    assert not torch.equal(full[0], full[1]) and not torch.equal(full[0], make_noise(12, [3], [0], shape)[0])
    assert noise_seed(1, 2, 3) == noise_seed(1, 2, 3) < 2**63
    assert make_noise(0, torch.tensor([1]), torch.tensor([0]), shape, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_samples_independent_of_batch_layout(model, embeds):
    noise = _noise(model)
    together = sample(model, embeds, noise, num_steps=T, k=0)
    for b in range(3):
        alone = sample(model, embeds.select([b]), noise[b : b + 1], num_steps=T, k=0)
        torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=1e-5)


def test_generate_is_encode_noise_sample_decode(model):
    draft = DraftConfig(num_steps=T, k=0)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    images = generate(model, prompts, [0, 0, 1], [0, 1, 0], 5, **dataclasses.asdict(draft))  # config keys = kwargs
    assert images.shape == (3, 3, RES, RES) and images.min() >= 0 and images.max() <= 1
    e = encode_prompts(model, PROMPTS[:2]).select([0, 0, 1])
    noise = make_noise(5, [0, 0, 1], [0, 1, 0], model.latent_shape(RES))
    torch.testing.assert_close(images, decode(model, sample(model, e, noise, num_steps=T, k=0)))
    assert not torch.allclose(images[0], images[1]), "two samples of one prompt differ"


def test_bad_arguments(model, embeds):
    noise = _noise(model)
    with pytest.raises(ValueError, match=r"draft\.k must be in \[0, draft\.num_steps=4\], got 5"):
        sample(model, embeds, noise, num_steps=T, k=5)
    with pytest.raises(ValueError, match="B = 3"):
        sample(model, embeds, noise[:2], num_steps=T, k=0)
    with pytest.raises(ValueError, match="negative"):
        sample(model, encode_prompts(model, PROMPTS, negative=False), noise, num_steps=T, k=0, guidance_scale=4.0)
    with pytest.raises(ValueError, match="model.resolution=30"):
        model.latent_shape(30)
    with pytest.raises(ValueError, match=r"draft\.shift must be > 0 or null"):
        sample(model, embeds, noise, num_steps=T, shift=-1.0)
    with pytest.raises(ValueError, match=r"draft\.refl_min_step must be in \[0, draft\.num_steps - 1 = 3\]"):
        sample(model, embeds, noise, num_steps=T, method="refl", refl_min_step=4)


def test_shift_none_is_the_models_own_and_a_value_overrides_it(model):
    own = sigmas(model, T)
    assert torch.equal(sigmas(model, T, shift=None), own)
    assert torch.equal(sigmas(model, T, shift=float(model.scheduler.config.shift)), own)
    assert not torch.equal(sigmas(model, T, shift=1.0), own)
