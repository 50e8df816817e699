"""Time of one training step split into sampling, rewards, objective and backward, for PG-OT and weighted-sum.

The question: does the PG-OT objective (front lookup + Pareto dominance + Sinkhorn OT, paper appendix G.2) add
less than 1% to the step time of the weighted-sum baseline? Both objectives run in the same process on the same
model, prompts and noise, alternating repetition by repetition; the best of ``--repeats`` is reported per phase.

CPU (default): the tiny random SD3 (``model.tiny``) at 32 px, P=2 prompts x N=4 samples, DRaFT-1, analytic
rewards::

    OMP_NUM_THREADS=1 python scripts/bench_step.py --json bench_step_cpu.json

CUDA: the full SD3.5-Large MMDiT (38 blocks, 38 heads of 64, joint attention 4096, caption projection 2432,
pooled 2048, RMS qk-norm, pos_embed_max_size 192) and the real SD3 VAE with random weights built directly on the
GPU in bf16 (no downloads, no text encoders: random prompt embeddings of the real shapes), 1024 px, DRaFT-1,
LoRA r=32, batch 1, rewards: three analytic ones plus a small random CLIP tower (M=4 as in the paper)::

    python scripts/bench_step.py --device cuda --json bench_step_h100.json

Phases: ``sampling`` = noise + 4 Euler steps (gradients in the last K) + VAE decode; ``rewards`` = the reward
forward; ``objective`` = :func:`pgot.objectives.compute` on the (P, N, M) reward vectors, as pgot-train calls it (PG-OT:
front lookup to the device, normalisation, Sinkhorn, the logged diagnostics; online: the pool and its dominating
sets);
``backward`` = ``loss.backward()`` + AdamW step on the LoRA. Peak memory: CUDA ``max_memory_allocated`` per
objective; CPU the process's peak RSS. Prints a markdown table; ``--json PATH`` writes the numbers.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from pgot import objectives, rewards  # noqa: E402
from pgot.config import ModelConfig, OTConfig, RewardConfig  # noqa: E402
from pgot.embeddings import PromptEmbeds, encode_prompts  # noqa: E402
from pgot.generate import decode, make_noise, sample  # noqa: E402
from pgot.model import add_lora, load_model  # noqa: E402
from pgot.pareto import pareto_mask  # noqa: E402

PHASES = ("sampling", "rewards", "objective", "backward")
_ot = OTConfig()  # the shipped defaults
OT = {"epsilon": _ot.epsilon, "max_iter": _ot.max_iter, "tol": _ot.tol}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fronts(base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-prompt Pareto fronts of base-model samples (P, n_base, M), padded, on the CPU, as a store holds them."""
    p, _, m = base.shape
    mask = pareto_mask(base)  # (P, n_base)
    f = int(mask.sum(-1).max())
    front = torch.zeros(p, f, m)
    fmask = torch.zeros(p, f, dtype=torch.bool)
    for i in range(p):
        pts = base[i][mask[i]]
        front[i, : len(pts)] = pts
        fmask[i, : len(pts)] = True
    return front, fmask, base.reshape(-1, m).std(0)


def make_objectives(base: torch.Tensor, world: int, target_form: str = "squared") -> dict:
    """name -> loss(scores (P, N, M)): :func:`pgot.objectives.compute`, the dispatch pgot-train runs, with the inputs
    train.py gives it (fronts from ``base`` (P, n, M) copied to the device per step as ``Frontier.lookup`` does,
    the store's per-reward std as the OT scale, the store's per-reward max as the weighted-sum targets under
    ``target_form`` (``train.target_form``), the pool of ``world`` processes for the online strategy)."""
    front_cpu, fmask_cpu, std = _fronts(base)
    m = base.shape[-1]
    targets_cpu = base.reshape(-1, m).amax(0)

    def weighted_sum(scores: torch.Tensor) -> torch.Tensor:
        targets = targets_cpu.to(scores.device)
        return objectives.compute("weighted_sum", scores, targets=targets, target_form=target_form, **OT)[0]

    def pgot_offline(scores: torch.Tensor) -> torch.Tensor:
        dev = scores.device
        front, fmask = front_cpu.to(dev), fmask_cpu.to(dev)  # Frontier.lookup: a host-to-device copy per step
        return objectives.compute("pgot", scores, front=front, front_mask=fmask, scale=std.to(dev), **OT)[0]

    def pgot_online(scores: torch.Tensor) -> torch.Tensor:
        # the gathered pool of `world` processes: this process's vectors plus (world - 1) shifted copies
        pool = torch.cat([scores.detach() + 0.01 * i for i in range(world)], dim=1)  # (P, world*N, M)
        mask = torch.isfinite(pool).all(-1)
        return objectives.compute(
            "pgot", scores, strategy="online", pool=pool, pool_mask=mask, scale=std.to(scores.device), **OT
        )[0]

    return {"weighted_sum": weighted_sum, "pgot_offline": pgot_offline, "pgot_online": pgot_online}


def one_step(model, embeds, prompts, reward_models, loss_fn, opt, params, shape, p, n, k, steps, seed) -> dict:
    dev = model.device
    times = {}
    _sync(dev)
    t = time.perf_counter()
    noise = make_noise(seed, [i // n for i in range(p * n)], [i % n for i in range(p * n)], shape, dev)
    images = decode(model, sample(model, embeds, noise, num_steps=steps, k=k))  # (B, 3, H, W)
    _sync(dev)
    times["sampling"], t = time.perf_counter() - t, time.perf_counter()
    scores = rewards.score(reward_models, images, prompts).float().view(p, n, -1)  # (P, N, M)
    _sync(dev)
    times["rewards"], t = time.perf_counter() - t, time.perf_counter()
    loss = loss_fn(scores)
    _sync(dev)
    times["objective"], t = time.perf_counter() - t, time.perf_counter()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(dev)
    times["backward"] = time.perf_counter() - t
    times["total"] = sum(times[ph] for ph in PHASES)
    return times


def bench(model, embeds, prompts, reward_models, p, n, args, names) -> list[dict]:
    dev = model.device
    params = [q for q in model.transformer.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)  # tiny lr: the model barely moves between the compared objectives
    shape = model.latent_shape(args.resolution)
    with torch.no_grad():  # the precompute: n_base base-model samples per prompt, their fronts and std
        nb = args.base_samples
        base = []
        for i in range(nb):
            noise = make_noise(10_000, list(range(p)), [i] * p, shape, dev)
            emb = PromptEmbeds(*(None if t is None else t[::n] for t in vars(embeds).values()))
            img = decode(model, sample(model, emb, noise, num_steps=args.steps, k=0))
            base.append(rewards.score(reward_models, img, prompts[::n]).float().cpu())
        base = torch.stack(base, dim=1)  # (P, n_base, M)
    fns = make_objectives(base, args.world, args.target_form)
    fns = {k: v for k, v in fns.items() if k in names}
    runs: dict[str, list[dict]] = {k: [] for k in fns}
    peaks: dict[str, float] = {}
    deadline = time.perf_counter() + args.time_limit
    for rep in range(args.warmup + args.repeats):
        for name, fn in fns.items():  # alternate objectives, so drift (clocks, caches) hits both alike
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = one_step(
                model, embeds, prompts, reward_models, fn, opt, params, shape, p, n, args.k, args.steps, rep
            )
            if dev.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(dev) / 2**30)
            else:
                peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            if rep >= args.warmup:
                runs[name].append(times)
        if time.perf_counter() > deadline and all(runs.values()):
            break
    rows = []
    for name, ts in runs.items():
        best = {ph: min(t[ph] for t in ts) for ph in (*PHASES, "total")}
        rows.append({"name": name, **best, "peak_gb": peaks[name], "repeats": len(ts)})
    ws = next(r for r in rows if r["name"] == "weighted_sum")
    for r in rows:
        r["objective_overhead_pct"] = 100 * (r["objective"] - ws["objective"]) / ws["total"]
        r["step_overhead_pct"] = 100 * (r["total"] - ws["total"]) / ws["total"]
    return rows


def table(rows: list[dict], label: str) -> str:
    lines = [
        f"**{label}**",
        "",
        "| objective | sampling s | rewards s | objective ms | backward s | step s | peak GB | objective vs WS step | step vs WS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['sampling']:.4f} | {r['rewards']:.4f} | {1000 * r['objective']:.2f} | "
            f"{r['backward']:.4f} | {r['total']:.4f} | {r['peak_gb']:.2f} | {r['objective_overhead_pct']:+.2f}% | "
            f"{r['step_overhead_pct']:+.2f}% |"
        )
    return "\n".join(lines)


def tiny_setup(args):
    cfg = ModelConfig(
        tiny=True, resolution=args.resolution, device="cpu", lora_rank=4, lora_alpha=4.0, gradient_checkpointing=False
    )
    model = load_model(cfg)
    torch.manual_seed(0)
    add_lora(model, cfg)
    p, n = args.prompts, args.samples
    prompts = [f"prompt number {i}" for i in range(p) for _ in range(n)]
    embeds = encode_prompts(model, [f"prompt number {i}" for i in range(p)], negative=False).repeat_interleave(n)
    reward_models = rewards.build([RewardConfig(name=x) for x in ("colorfulness", "contrast", "sharpness")])
    return model, embeds, prompts, reward_models, p, n


def large_setup(args):
    from bench_generate import SD3_VAE, SD35_LARGE, TEXT_LEN, build_random  # the generation helper's builder

    tcfg, vcfg, dev = SD35_LARGE, SD3_VAE, torch.device("cuda")
    if args.dry_run:  # the same code path, scaled down, on the CPU
        tcfg = dict(SD35_LARGE, num_layers=2, num_attention_heads=2, caption_projection_dim=128)
        vcfg = dict(SD3_VAE, block_out_channels=[16, 16, 16, 16], norm_num_groups=8, layers_per_block=1)
        dev = torch.device("cpu")
    t = time.perf_counter()
    model = build_random(tcfg, vcfg, dev, args.resolution)  # bf16 on the GPU, LoRA r=32, checkpointing
    model.vae.enable_gradient_checkpointing()
    _sync(dev)
    print(f"built random SD3.5-Large + VAE in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    p, n = args.prompts, args.samples
    g = torch.Generator(device=dev).manual_seed(0)
    pe = torch.randn(p, TEXT_LEN, tcfg["joint_attention_dim"], generator=g, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(p, tcfg["pooled_projection_dim"], generator=g, device=dev, dtype=torch.bfloat16)
    embeds = PromptEmbeds(pe, pooled).repeat_interleave(n)
    prompts = ["a photo of a cat"] * (p * n)
    cfgs = [RewardConfig(name=x) for x in ("colorfulness", "contrast", "sharpness")]
    try:
        reward_models = rewards.build([*cfgs, RewardConfig(name="clip", path="tiny")], device=dev)
    except Exception as exc:  # noqa: BLE001 - the analytic rewards alone still answer the question
        print(f"note: random CLIP tower unavailable ({exc}); analytic rewards only", file=sys.stderr)
        reward_models = rewards.build(cfgs, device=dev)
    return model, embeds, prompts, reward_models, p, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--resolution", type=int, help="image size (default: 32 on CPU, 1024 on CUDA)")
    ap.add_argument("--prompts", type=int, help="P (default: 2 on CPU, 1 on CUDA)")
    ap.add_argument("--samples", type=int, help="N per prompt (default: 4 on CPU, 1 on CUDA)")
    ap.add_argument("--k", type=int, default=1, help="DRaFT-K: steps with gradients")
    ap.add_argument("--steps", type=int, default=4, help="sampler steps")
    ap.add_argument("--world", type=int, default=8, help="processes whose vectors form the online pool")
    ap.add_argument("--base-samples", type=int, help="base samples per prompt for the fronts (default: 16 CPU, 8 CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--objectives", nargs="*", default=["weighted_sum", "pgot_offline", "pgot_online"])
    ap.add_argument(
        "--target-form", default="squared", choices=["linear", "hinge", "squared"], help="train.target_form"
    )
    ap.add_argument("--time-limit", type=float, default=120.0, help="stop repeating after this many seconds")
    ap.add_argument("--dry-run", action="store_true", help="CPU: the CUDA code path on a scaled-down architecture")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    large = cuda or args.dry_run
    if cuda and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    args.resolution = args.resolution or (1024 if cuda else 64 if large else 32)
    args.prompts = args.prompts or (1 if large else 2)
    args.samples = args.samples or (1 if large else 4)
    args.base_samples = args.base_samples or (8 if large else 16)
    start = time.perf_counter()
    model, embeds, prompts, reward_models, p, n = large_setup(args) if large else tiny_setup(args)
    rows = bench(model, embeds, prompts, reward_models, p, n, args, set(args.objectives) | {"weighted_sum"})
    label = (
        f"{'SD3.5-Large (random, bf16) on ' + torch.cuda.get_device_name() if cuda else 'scaled-down SD3.5-Large arch on CPU' if large else 'tiny SD3 on CPU'}, "
        f"{args.resolution}px, P={p} x N={n}, DRaFT-{args.k}, {args.steps} steps, M={len(reward_models)} rewards, "
        f"online pool = {args.world} processes"
    )
    print(table(rows, label))
    meta = {
        "device": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rewards": [r.name for r in reward_models],
        "total_s": time.perf_counter() - start,
    }
    print(f"\n{meta}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
