"""Differentiable SD3 sampling: the flow-matching Euler loop with gradients in the last K steps (DRaFT-K).

SD3 integrates the probability-flow ODE ``dx/dsigma = v(x, sigma)`` from pure noise (``sigma = 1``) to the
clean latent (``sigma = 0``) with Euler steps on the scheduler's sigma grid ``sigma_0 > ... > sigma_T = 0``::

    x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_theta(x_i, t_i),   t_i = sigma_i * num_train_timesteps

in float32. DRaFT-K (Clark et al. 2024) backpropagates the reward through the VAE decoder and the last K
steps only: steps ``i < T - K`` run under ``no_grad``, so they cost no activation memory. ReFL (Xu et al.
2023, ``method="refl"``) stops at a late step t and returns the one-step clean-latent prediction
``x0 = x_t - sigma_t * v_theta(x_t, t)``, with gradients through that one call.

The sigma grid is computed once per call from the model's scheduler config (``set_timesteps`` via
``retrieve_timesteps``, exactly as ``StableDiffusion3Pipeline`` does) and never through ``scheduler.step``,
whose internal step index and float timestep lookups are fragile. The grid has changed between diffusers
versions (diffusers #13243), so runs record :func:`sigmas`. With gradients off, :func:`sample` +
:func:`decode` reproduce ``StableDiffusion3Pipeline`` on the same latents and prompt embeddings
(``tests/test_generate.py``: float32, tolerance 1e-5).

Initial noise depends only on ``(seed, prompt_id, sample_index)`` (:func:`make_noise`), never on the batch
layout or the number of processes, so base and tuned models see the same noise for JDR / JCR.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import struct
from collections.abc import Sequence
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from pgot.arrays import accepts_numpy
from pgot.config import check_sampler
from pgot.embeddings import PromptEmbeds, encode_prompts
from pgot.model import SD3Model

__all__ = ["decode", "generate", "generate_images", "make_noise", "noise_seed", "sample", "sigmas", "timesteps"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------


def noise_seed(seed: int, prompt_id: int, sample_index: int) -> int:
    """63-bit seed of one sample's noise: ``blake2b(int64 seed, prompt_id, sample_index)``, 8 bytes, top bit cleared."""
    digest = hashlib.blake2b(struct.pack("<qqq", int(seed), int(prompt_id), int(sample_index)), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_noise(
    seed: int,
    prompt_ids: torch.Tensor | list[int],
    sample_indices: torch.Tensor | list[int],
    shape: tuple[int, int, int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal initial latents, one CPU ``torch.Generator`` per sample seeded by :func:`noise_seed`.

    Args:
        seed: run seed (``precompute.seed``, ``train.seed``, ``eval.seed``).
        prompt_ids: (B,) stable prompt ids.
        sample_indices: (B,) sample index within its prompt.
        shape: (C, h, w) latent shape (``model.latent_shape(resolution)``).
        device: where the result goes (drawn on the CPU in float32 first, so it is the same on every device).
        dtype: result dtype.

    Returns:
        (B, C, h, w) noise; row b depends only on ``(seed, prompt_ids[b], sample_indices[b])``.
    """
    pids = torch.as_tensor(prompt_ids).reshape(-1).tolist()
    idxs = torch.as_tensor(sample_indices).reshape(-1).tolist()
    if len(pids) != len(idxs):
        raise ValueError(
            f"make_noise got {len(pids)} prompt ids but {len(idxs)} sample indices; they pair up one to one."
        )
    rows = []
    for pid, idx in zip(pids, idxs, strict=True):
        g = torch.Generator(device="cpu").manual_seed(noise_seed(seed, pid, idx))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    if not rows:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    return torch.stack(rows).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def _schedule(
    model: SD3Model, num_steps: int, shift: float | None = None, resolution: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (T+1,), timesteps (T,)) in float32 on the CPU, as StableDiffusion3Pipeline computes them.

    ``shift=None`` keeps the model's scheduler config (the one place where "None = the model's default" is read).
    """
    if num_steps < 1:
        raise ValueError(f"draft.num_steps must be >= 1, got {num_steps}.")
    overrides = {} if shift is None else {"shift": float(shift)}
    sched = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config, **overrides)
    kwargs = {}
    if sched.config.get("use_dynamic_shifting", False):
        _, h, w = model.latent_shape(resolution or model.resolution)
        p = int(model.transformer_config.patch_size)
        kwargs["mu"] = calculate_shift(
            (h // p) * (w // p),
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.16),
        )
    ts, _ = retrieve_timesteps(sched, num_steps, "cpu", **kwargs)
    return sched.sigmas.detach().to(torch.float32).clone(), ts.detach().to(torch.float32).clone()


def sigmas(model: SD3Model, num_steps: int, shift: float | None = None, resolution: int | None = None) -> torch.Tensor:
    """The sampler's sigma grid ``sigma_0 = 1 > ... > sigma_T = 0``, (T+1,) float32 on the CPU (record it per run).

    Args:
        model: the model (its scheduler config: shift, dynamic shifting).
        num_steps: T.
        shift: override of the scheduler's shift (``draft.shift``; None: the model's).
        resolution: image size for dynamically shifted schedules (default ``model.resolution``).
    """
    return _schedule(model, num_steps, shift, resolution)[0]


def timesteps(
    model: SD3Model, num_steps: int, shift: float | None = None, resolution: int | None = None
) -> torch.Tensor:
    """The transformer's timestep inputs ``t_i = sigma_i * num_train_timesteps``, (T,) float32."""
    return _schedule(model, num_steps, shift, resolution)[1]


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _autocast(model: SD3Model, enabled: bool | None) -> contextlib.AbstractContextManager:
    if enabled is None:
        enabled = model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(model.device.type, dtype=model.dtype if model.dtype != torch.float32 else torch.bfloat16)


def _velocity(
    model: SD3Model,
    x: torch.Tensor,
    t: torch.Tensor,
    embeds: PromptEmbeds,
    guidance_scale: float,
    autocast: bool | None,
) -> torch.Tensor:
    """v_theta(x, t), (B, C, h, w) float32, with classifier-free guidance when ``guidance_scale > 1``."""
    x_in = x.to(model.dtype)
    enc, pooled = embeds.prompt_embeds, embeds.pooled
    cfg = guidance_scale > 1.0
    if cfg:
        x_in = torch.cat([x_in, x_in])
        enc = torch.cat([embeds.negative_prompt_embeds, enc])
        pooled = torch.cat([embeds.negative_pooled, pooled])
    with _autocast(model, autocast):
        v = model.transformer(
            hidden_states=x_in,
            timestep=t.to(x.device).expand(x_in.shape[0]),
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    v = v.float()
    if cfg:
        v_uncond, v_text = v.chunk(2)
        v = v_uncond + guidance_scale * (v_text - v_uncond)
    return v


def sample(
    model: SD3Model,
    embeds: PromptEmbeds,
    noise: torch.Tensor,
    *,
    num_steps: int,
    k: int = 0,
    guidance_scale: float = 0.0,
    method: Literal["draft_k", "refl"] = "draft_k",
    shift: float | None = None,
    refl_min_step: int | None = None,
    refl_step: int | None = None,
    generator: torch.Generator | None = None,
    autocast: bool | None = None,
) -> torch.Tensor:
    """Run the flow-matching Euler sampler from ``noise``; gradients only through the last ``k`` steps.

    ``draft_k``: steps ``i < T - k`` run under ``no_grad``, steps ``i >= T - k`` with gradients (through the
    LoRA parameters; activations recomputed when gradient checkpointing is on). ``k = 0``: no gradient at all.
    ``refl``: steps ``[0, t)`` without gradient, then one transformer call with gradients at step t and the
    clean-latent prediction ``x0 = x_t - sigma_t * v``; ``k`` is ignored. t is ``refl_step`` or, when None,
    uniform in ``[refl_min_step, T - 1]`` (``refl_min_step=None``: ``T // 2``) drawn from ``generator`` once per
    call. The keyword names equal the ``draft`` config keys, so ``sample(..., **asdict(cfg.draft))`` works.

    Args:
        model: the model (transformer on ``model.device``).
        embeds: per-image conditioning, B rows (``embeds.select`` / ``repeat_interleave`` to expand P prompts);
            negatives needed when ``guidance_scale > 1``.
        noise: (B, C, h, w) initial latents (:func:`make_noise`).
        num_steps: T.
        k: number of final steps with gradients, in [0, T].
        guidance_scale: classifier-free guidance (on when > 1, as in diffusers).
        method: ``draft_k`` or ``refl``.
        shift: scheduler shift override (None: the model's).
        refl_min_step: earliest random ReFL step (None: ``T // 2``).
        refl_step: ReFL stopping step (None: random, see above).
        generator: CPU generator for the ReFL step.
        autocast: bf16 autocast (default: on for CUDA models in bf16/fp16).

    Returns:
        (B, C, h, w) float32 latents (the ReFL x0 prediction for ``refl``), differentiable when k > 0 / refl.

    Raises:
        ValueError: settings outside :func:`pgot.config.check_sampler`'s rules, or mismatched shapes.
    """
    T = int(num_steps)
    problems = check_sampler(T, k, method, refl_min_step, shift)
    if problems:
        raise ValueError(" ".join(problems))
    if noise.ndim != 4 or noise.shape[0] != len(embeds):
        raise ValueError(f"noise must be (B, C, h, w) with B = {len(embeds)} embedding rows, got {tuple(noise.shape)}.")
    if guidance_scale > 1.0 and embeds.negative_prompt_embeds is None:
        raise ValueError(
            f"draft.guidance_scale={guidance_scale} needs negative embeddings; call encode_prompts(..., negative=True)."
        )
    sig, ts = _schedule(model, T, shift)
    sig = sig.to(model.device)
    ts = ts.to(model.device)
    embeds = embeds.to(model.device, model.dtype)
    x = noise.to(model.device, torch.float32)

    if method == "refl":
        if refl_step is None:
            lo = T // 2 if refl_min_step is None else int(refl_min_step)
            refl_step = int(torch.randint(lo, T, (1,), generator=generator).item())
        if not 0 <= refl_step <= T - 1:
            raise ValueError(f"ReFL step must be in [0, {T - 1}], got {refl_step}.")
        with torch.no_grad():
            for i in range(refl_step):
                v = _velocity(model, x, ts[i], embeds, guidance_scale, autocast)
                x = x + (sig[i + 1] - sig[i]) * v
        with torch.enable_grad():
            v = _velocity(model, x, ts[refl_step], embeds, guidance_scale, autocast)
            return x - sig[refl_step] * v

    for i in range(T):
        with torch.set_grad_enabled(i >= T - k):
            v = _velocity(model, x, ts[i], embeds, guidance_scale, autocast)
            x = x + (sig[i + 1] - sig[i]) * v
    return x


def decode(
    model: SD3Model, latents: torch.Tensor, *, batch_slice: int = 0, autocast: bool | None = None
) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1], differentiably (gradients follow the caller's grad mode).

    ``z = latents / scaling_factor + shift_factor``, ``img = vae.decode(z)``, ``(img / 2 + 0.5).clamp(0, 1)``.

    Args:
        model: the model.
        latents: (B, C, h, w).
        batch_slice: decode this many images at a time (0: all at once) to bound activation memory.
        autocast: bf16 autocast (default: on for CUDA models in bf16/fp16).

    Returns:
        (B, 3, H, W) float32 images in [0, 1], ``H = h * model.vae_scale_factor``.
    """
    vae = model.vae
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    z = z.to(model.device, vae.dtype)
    step = batch_slice if batch_slice > 0 else max(1, z.shape[0])
    out = []
    with _autocast(model, autocast):
        for s in range(0, z.shape[0], step):
            out.append(vae.decode(z[s : s + step], return_dict=False)[0])
    img = torch.cat(out) if len(out) > 1 else out[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def generate(
    model: SD3Model,
    prompts: list[str],
    prompt_ids: torch.Tensor | list[int],
    sample_indices: torch.Tensor | list[int],
    seed: int,
    *,
    num_steps: int,
    k: int = 0,
    guidance_scale: float = 0.0,
    method: Literal["draft_k", "refl"] = "draft_k",
    shift: float | None = None,
    refl_min_step: int | None = None,
    embeds: PromptEmbeds | None = None,
    resolution: int | None = None,
    cache_dir: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Encode (cached) + noise + sample + decode: images of ``prompts``.

    The sampler keywords are those of :func:`sample` (and the ``draft`` config keys):
    ``generate(model, prompts, ids, idx, seed, **asdict(cfg.draft) | {"k": 0})``.

    Args:
        model: the model.
        prompts: B prompt texts, one per image (repeat a prompt for several samples of it).
        prompt_ids: (B,) stable prompt ids (noise).
        sample_indices: (B,) sample index within its prompt (noise).
        seed: run seed.
        num_steps, k, guidance_scale, method, shift, refl_min_step: the sampler settings (:func:`sample`).
        embeds: precomputed per-image embeddings (B rows); default: :func:`pgot.embeddings.encode_prompts`.
        resolution: image size (default ``model.resolution``).
        cache_dir: disk cache of prompt embeddings.
        generator: CPU generator of the ReFL step.

    Returns:
        (B, 3, H, W) images in [0, 1]; differentiable when ``k > 0`` or ``method="refl"``.
    """
    if embeds is None:
        unique = list(dict.fromkeys(prompts))
        enc = encode_prompts(model, unique, cache_dir, negative=guidance_scale > 1.0)
        pos = {p: i for i, p in enumerate(unique)}
        embeds = enc.select([pos[p] for p in prompts])
    shape = model.latent_shape(resolution or model.resolution)
    noise = make_noise(seed, prompt_ids, sample_indices, shape, model.device, torch.float32)
    latents = sample(
        model,
        embeds,
        noise,
        num_steps=num_steps,
        k=k,
        guidance_scale=guidance_scale,
        method=method,
        shift=shift,
        refl_min_step=refl_min_step,
        generator=generator,
    )
    return decode(model, latents)


@accepts_numpy
def generate_images(
    model: SD3Model,
    prompts: str | Sequence[str],
    *,
    seeds: int | Sequence[int] = 0,
    num_steps: int = 4,
    guidance_scale: float = 0.0,
    shift: float | None = None,
    resolution: int | None = None,
    batch_size: int = 4,
) -> torch.Tensor:
    """Images of ``prompts``, one per (prompt, seed), in one call: the library's text-to-image function.

    Encodes the prompts, draws the noise, runs the Euler sampler and decodes, without gradients, ``batch_size``
    images at a time. Image ``i * S + j`` (``S = len(seeds)``) shows ``prompts[i]`` from ``seeds[j]``. Its initial
    noise is :func:`make_noise` ``(seeds[j], 0, 0)``: it depends on the seed only, so a seed starts every prompt from
    the same noise, whatever the batch size or device. (``pgot-precompute``, ``-train`` and ``-eval`` key the noise
    by ``(seed, prompt_id, sample_index)`` instead; :func:`generate` reproduces their samples.) The model's active
    LoRA adapters apply (:func:`pgot.model.load_lora`).

    Example (the tiny random model, on the CPU)::

        import pgot
        model = pgot.load_model(pgot.ModelConfig(tiny=True, resolution=32, device="cpu"))
        images = pgot.generate_images(model, ["a red fox in the snow", "a bowl of ramen"], seeds=[0, 1])
        images.shape  # (4, 3, 32, 32): fox seed 0, fox seed 1, ramen seed 0, ramen seed 1; values in [0, 1]

    Args:
        model: an SD3 / SD3.5 model (:func:`pgot.model.load_model`).
        prompts: one prompt or a list of P prompts.
        seeds: one seed or a list of S seeds (ints; a NumPy integer array works too).
        num_steps: Euler steps (SD3.5-Large-Turbo: 4; SD3 / SD3.5 without Turbo: about 28 with guidance).
        guidance_scale: classifier-free guidance, on when > 1 (Turbo models: 0).
        shift: schedule shift (None: the model's scheduler config).
        resolution: image height and width in pixels (None: ``model.resolution``); a multiple of the VAE scale
            factor times the patch size (16 for SD3).
        batch_size: images per forward pass (memory).

    Returns:
        (P * S, 3, H, W) float32 images in [0, 1], on the CPU (:func:`pgot.images.to_pil` /
        :func:`pgot.images.save_png` turn one into a PIL image / a PNG file).

    Raises:
        TypeError: an argument of the wrong type (e.g. prompts not a str or a list of str).
        ValueError: no prompt or no seed, ``batch_size < 1``, or sampler settings outside
            :func:`pgot.config.check_sampler`'s rules (e.g. ``num_steps < 1``), or a bad ``resolution``.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    seed_list = [int(seeds)] if not isinstance(seeds, Sequence) else [int(x) for x in seeds]
    if not texts or not seed_list:
        raise ValueError(
            f"generate_images needs at least one prompt and one seed, got {len(texts)} and {len(seed_list)}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    rows = [(t, s) for t in texts for s in seed_list]
    shape = model.latent_shape(resolution or model.resolution)
    with torch.no_grad():
        enc = encode_prompts(model, texts, None, negative=guidance_scale > 1.0)  # (P, ...); each prompt encoded once
        row_of = {t: i for i, t in enumerate(texts)}
        out = []
        for b in range(0, len(rows), batch_size):
            chunk = rows[b : b + batch_size]
            noise = torch.cat([make_noise(s, [0], [0], shape, model.device) for _, s in chunk])  # (b, C, h, w)
            latents = sample(
                model, enc.select([row_of[t] for t, _ in chunk]), noise,
                num_steps=num_steps, guidance_scale=guidance_scale, shift=shift,
            )  # fmt: skip
            out.append(decode(model, latents).cpu())
    return torch.cat(out)
