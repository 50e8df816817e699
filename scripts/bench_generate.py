"""Throughput and peak memory of pgot's DRaFT-K rollout: sample + decode + rewards (+ backward when K > 0).

CPU (default): the tiny random SD3 at 32 and 64 px, batch 4, K = 0, 1, 2, analytic rewards::

    OMP_NUM_THREADS=1 python scripts/bench_generate.py --json bench_cpu.json

CUDA: the full SD3.5-Large MMDiT (38 blocks, width 2432, ~8B parameters) and the real-size SD3 VAE with random
weights built directly on the GPU in bf16 (no CPU init, no text encoders: random prompt embeddings of the
real shapes), 1024 px, batch 1 and 2, K = 0 and 1, LoRA r=32 on the attention projections, gradient
checkpointing of the transformer (and of the VAE decoder, ``--no-vae-checkpointing`` to switch it off)::

    python scripts/bench_generate.py --device cuda --json bench_h100.json

A time guard (``--time-limit``, default 170 s in all) skips the remaining configurations once the next one
would not fit, so the CUDA run ends within 3 minutes on an H100. Prints a markdown table.

K = 0 runs under ``torch.no_grad`` (precompute / evaluation); K > 0 includes ``loss.backward()`` of the mean
reward into the LoRA parameters (a training micro-step without the optimizer). Peak memory: CUDA
``max_memory_allocated`` per configuration; on the CPU the process's peak resident set size (monotone
over the run, so later rows include earlier peaks).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgot.config import ModelConfig, RewardConfig  # noqa: E402
from pgot.embeddings import PromptEmbeds, encode_prompts  # noqa: E402
from pgot.generate import decode, make_noise, sample  # noqa: E402
from pgot.model import SD3Model, add_lora, load_model  # noqa: E402

# stabilityai/stable-diffusion-3.5-large transformer/config.json (Large and Large-Turbo share it)
SD35_LARGE = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
# the SD3 / SD3.5 VAE (vae/config.json)
SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TEXT_LEN = 77 + 256  # CLIP tokens + T5 tokens (max_sequence_length=256)
ANALYTIC = ["colorfulness", "contrast", "saturation", "brightness", "sharpness"]


def _rewards(device: torch.device):
    try:
        from pgot import rewards
    except ImportError as exc:  # pragma: no cover - rewards is a sibling module
        print(f"note: pgot.rewards not importable ({exc}); timing sample + decode only", file=sys.stderr)
        return None, None
    models = rewards.build([RewardConfig(name=n) for n in ANALYTIC], device=device)
    return models, rewards.score


def _peak_cpu_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _step(
    model: SD3Model, embeds: PromptEmbeds, prompts, k: int, seed: int, shape, num_steps: int, reward_models, score
):
    b = len(embeds)
    noise = make_noise(seed, list(range(b)), [0] * b, shape, model.device)
    with torch.set_grad_enabled(k > 0):
        images = decode(model, sample(model, embeds, noise, num_steps=num_steps, k=k))
        if score is not None:
            r = score(reward_models, images, prompts)  # (B, M)
            loss = -r.mean()
        else:
            loss = -images.mean()
        if k > 0:
            loss.backward()
    return loss.detach()


def _run_config(model, embeds, prompts, k, args, shape, reward_models, score, deadline):
    dev = model.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    t0 = time.perf_counter()
    _step(model, embeds, prompts, k, 0, shape, args.steps, reward_models, score)  # warm-up
    if cuda:
        torch.cuda.synchronize(dev)
    warm = time.perf_counter() - t0
    times = []
    for r in range(args.repeats):
        if time.perf_counter() + warm > deadline:
            break
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        _step(model, embeds, prompts, k, r + 1, shape, args.steps, reward_models, score)
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    for p in params:
        p.grad = None
    sec = min(times) if times else warm
    b = len(embeds)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else _peak_cpu_mb() / 1024
    return {
        "batch": b,
        "k": k,
        "s_per_batch": sec,
        "s_per_image": sec / b,
        "images_per_s": b / sec,
        "peak_gb": peak,
        "warmup_s": warm,
        "timed_repeats": len(times),
    }


def _tiny_rows(args, deadline):
    rows = []
    for res in args.resolutions or [32, 64]:
        cfg = ModelConfig(tiny=True, resolution=res, max_sequence_length=8, device="cpu", lora_rank=4, lora_alpha=4.0)
        model = load_model(cfg)
        add_lora(model, cfg)
        prompts = [f"prompt number {i}" for i in range(args.batch)]
        embeds = encode_prompts(model, prompts, negative=False)
        reward_models, score = _rewards(model.device)
        shape = model.latent_shape(res)
        for k in (0, 1, 2):
            row = _run_config(model, embeds, prompts, k, args, shape, reward_models, score, deadline)
            rows.append({"model": "tiny", "resolution": res, **row})
    return rows


def build_random(transformer_config: dict, vae_config: dict, device: torch.device, resolution: int) -> SD3Model:
    """SD3 transformer + VAE with random weights, initialised directly on ``device`` in bf16, LoRA r=32 added."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16: no fp32 copy of 8B weights
    try:
        with device:
            transformer = SD3Transformer2DModel(**transformer_config)
            vae = AutoencoderKL(**vae_config)
    finally:
        torch.set_default_dtype(prev)
    transformer.to(dtype=torch.bfloat16).requires_grad_(False).eval()
    vae.to(dtype=torch.bfloat16).requires_grad_(False).eval()
    model = SD3Model(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        fingerprint="random",
        path="random",
        dtype=torch.bfloat16,
        device=device,
        resolution=resolution,
    )
    add_lora(model, ModelConfig(lora_rank=32, lora_alpha=64.0, gradient_checkpointing=True))
    return model


def _tiny_cuda_check() -> dict:
    """On the GPU: pgot's sampler against StableDiffusion3Pipeline (tiny model, float32), and a bf16 K=1 backward."""
    from pgot.model import pipeline

    dev = torch.device("cuda")
    cfg = ModelConfig(tiny=True, resolution=32, max_sequence_length=8, lora_rank=4, lora_alpha=4.0)
    model = load_model(cfg, device=dev, dtype=torch.float32)
    prompts = ["a red fox", "a bowl of ramen"]
    e = encode_prompts(model, prompts, negative=False)
    noise = make_noise(0, [0, 1], [0, 0], model.latent_shape(32), dev)
    with torch.no_grad():
        ours = decode(model, sample(model, e, noise, num_steps=4, k=0))
        pipe = pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(
            prompt_embeds=e.prompt_embeds, pooled_prompt_embeds=e.pooled, latents=noise.clone(),
            num_inference_steps=4, guidance_scale=0.0, height=32, width=32, output_type="pt",
        ).images  # fmt: skip
    parity = (ours - ref).abs().max().item()
    model16 = load_model(cfg, device=dev)  # bf16 on CUDA
    params = add_lora(model16, cfg)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)
    img = decode(model16, sample(model16, encode_prompts(model16, prompts, negative=False), noise, num_steps=4, k=1))
    img.mean().backward()
    ok = all(p.grad is not None and torch.isfinite(p.grad).all().item() for p in params)
    return {"tiny_cuda_parity_max_abs": parity, "tiny_bf16_k1_grads_finite": ok}


def _large_rows(args, deadline, dev: torch.device, tcfg: dict, vcfg: dict, label: str = "sd3.5-large (random)"):
    t = time.perf_counter()
    model = build_random(tcfg, vcfg, dev, args.resolution)
    if args.vae_checkpointing:
        model.vae.enable_gradient_checkpointing()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in model.transformer.parameters())
    n_lora = sum(p.numel() for p in model.transformer.parameters() if p.requires_grad)
    print(
        f"built {label} transformer ({n_params / 1e9:.2f}B params, LoRA {n_lora / 1e6:.1f}M) + VAE in {build_s:.1f}s",
        file=sys.stderr,
    )
    reward_models, score = _rewards(model.device)
    shape = model.latent_shape(args.resolution)
    rows = []
    est = {}
    for b in args.batches or [1, 2]:
        g = torch.Generator(device=dev).manual_seed(b)
        pe = torch.randn(b, TEXT_LEN, tcfg["joint_attention_dim"], generator=g, device=dev, dtype=torch.bfloat16)
        pooled = torch.randn(b, tcfg["pooled_projection_dim"], generator=g, device=dev, dtype=torch.bfloat16)
        embeds = PromptEmbeds(pe, pooled)
        prompts = ["a random prompt"] * b
        for k in (0, 1):
            guess = est.get((b // 2 if b > 1 else b, k), 0) * 2 * (1 + args.repeats)
            if time.perf_counter() + guess > deadline:
                rows.append(
                    {
                        "model": label,
                        "resolution": args.resolution,
                        "batch": b,
                        "k": k,
                        "skipped": "time limit",
                    }
                )
                continue
            try:
                row = _run_config(model, embeds, prompts, k, args, shape, reward_models, score, deadline)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(
                    {
                        "model": label,
                        "resolution": args.resolution,
                        "batch": b,
                        "k": k,
                        "skipped": "out of memory",
                    }
                )
                continue
            est[(b, k)] = row["s_per_batch"]
            rows.append({"model": label, "resolution": args.resolution, **row})
    return rows, {"build_s": build_s, "transformer_params": n_params, "lora_params": n_lora}


def _table(rows) -> str:
    head = "| model | px | batch | K | s/image | images/s | peak GB | note |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['k']} | - | - | - | skipped: {r['skipped']} |"
            )
            continue
        note = "fwd" if r["k"] == 0 else "fwd+bwd"
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['k']} | {r['s_per_image']:.4f} | "
            f"{r['images_per_s']:.2f} | {r['peak_gb']:.2f} | {note}, best of {max(r['timed_repeats'], 1)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=4, help="sampler steps T (SD3.5-Large-Turbo: 4)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions per configuration (the best is reported)")
    ap.add_argument("--batch", type=int, default=4, help="CPU: images per batch")
    ap.add_argument("--resolutions", type=int, nargs="*", help="CPU: tiny-model resolutions (default 32 64)")
    ap.add_argument("--batches", type=int, nargs="*", help="CUDA: batch sizes (default 1 2)")
    ap.add_argument("--resolution", type=int, default=1024, help="CUDA: image size")
    ap.add_argument("--no-vae-checkpointing", dest="vae_checkpointing", action="store_false")
    ap.add_argument("--dry-run", action="store_true", help="CPU: run the CUDA code path on a scaled-down architecture")
    ap.add_argument(
        "--tiny-check", action="store_true", help="CUDA: first check the sampler against diffusers on the GPU"
    )
    ap.add_argument(
        "--time-limit", type=float, default=170.0, help="seconds for the whole run; later configurations are skipped"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.time_limit
    meta = {
        "device": args.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
    }
    import diffusers

    meta["diffusers"] = diffusers.__version__
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
        meta["gpu"] = torch.cuda.get_device_name()
        meta["vae_checkpointing"] = args.vae_checkpointing
        if args.tiny_check:
            meta.update(_tiny_cuda_check())
            print(f"tiny CUDA check: {meta}", file=sys.stderr)
        rows, extra = _large_rows(args, deadline, torch.device("cuda"), SD35_LARGE, SD3_VAE)
        meta.update(extra)
    elif args.dry_run:  # the CUDA code path with a scaled-down architecture, on the CPU
        meta["cpu"] = platform.processor() or platform.machine()
        small_t = dict(SD35_LARGE, num_layers=2, num_attention_heads=2, caption_projection_dim=128)
        small_v = dict(SD3_VAE, block_out_channels=[16, 16, 16, 16], norm_num_groups=8, layers_per_block=1)
        rows, extra = _large_rows(
            args, deadline, torch.device("cpu"), small_t, small_v, "sd3.5-large arch, scaled down"
        )
        meta.update(extra, dry_run=True)
    else:
        meta["cpu"] = platform.processor() or platform.machine()
        rows = _tiny_rows(args, deadline)
    meta["total_s"] = time.perf_counter() - start
    print(_table(rows))
    print(f"\n{meta}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
