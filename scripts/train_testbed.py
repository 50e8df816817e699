"""Train the testbed world's tiny SD3 and its preference models, then measure them against the judge.

    python scripts/train_testbed.py                       # full run: writes pgot/testbed/{model,preference}/, report.json
    python scripts/train_testbed.py --stage eval          # keep the trained SD3, redo sweep, figures, preference models
    python scripts/train_testbed.py --quick --out /tmp/tb # smoke run with tiny step counts (a poor model)

Everything is deterministic: fixed seeds, fixed step counts, one torch thread (``--threads``; a run is reproducible
bit for bit only with the same thread count and software stack). Wall and CPU times of every stage are printed and
recorded in ``report.json``; CPU time is what the run costs on an idle machine.

Stages:

1. **VAE** (``AutoencoderKL``, 32 x 32 -> 16 x 16 x 4): MSE on [-1, 1] pixels + 1e-4 KL, on fresh renderings of
   random prompts with random jitter each step; AdamW, cosine learning rate. Then ``shift_factor`` and
   ``scaling_factor`` are set to the mean and 1 / std of the latents, as SD3 does.
2. **Transformer and both text encoders, jointly**: rectified flow (Esser et al. 2024): ``x_t = (1 - sigma) z +
   sigma n``, target ``n - z``, ``sigma = sigmoid(N(0, 1))`` (logit-normal), timestep ``1000 sigma``; 10% of the
   prompts replaced by the empty prompt (classifier-free guidance). The text encoders are trained jointly because
   with a 16-word vocabulary random frozen ones barely separate prompts that differ in one word, and they cost
   nothing (22 k parameters each). The absent T5 is ``L_t5`` identical zero rows; training uses one such row whose
   attention logit is raised by ``ln L_t5`` in every attention (exactly what ``L_t5`` copies do), with
   ``ln L_t5 ~ U[0, ln 256]``, so the model works at any ``model.max_sequence_length`` up to 256.
3. **Save** as a diffusers SD3 folder in float16 (``pgot.model.save_tiny``) and reload through
   ``pgot.model.load_model`` in float32; everything after this uses the reloaded model.
4. **Sampler sweep**: mean judge quality over the 108 prompts (1 sample each) for several guidance scales, shifts
   and step counts (printed; the recommended constants live in ``pgot.testbed.basemodel``).
5. **Base-model quality** at the recommended sampler: 16 samples per prompt (seed 2), per-prompt means.
6. **Preference models**: 32 samples per prompt (seed 1) ranked within each prompt by the judge (fidelity for
   ``tb_align``, quality for ``tb_pref``); Bradley-Terry loss on every pair that differs by >= 0.01; random
   horizontal flips (every scene, hence the judge, is mirror-symmetric).
7. **Table 1**: each proxy's preference accuracy against the judge's quality on the held-out pairs of stage 5
   (disjoint pairs of samples (0, 1), (2, 3), ... of each prompt; pairs within 0.01 are ties and left out), with
   Wilson 95% intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgot.config import DraftConfig, ModelConfig, RewardConfig  # noqa: E402
from pgot.generate import generate  # noqa: E402
from pgot.model import SD3Model, load_model  # noqa: E402
from pgot.rewards import build as build_rewards  # noqa: E402
from pgot.testbed import basemodel, judge, proxies, scenes  # noqa: E402
from pgot.tiny import save_tiny  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "pgot" / "testbed"

FULL = {"vae_steps": 1000, "vae_batch": 32, "tr_steps": 2600, "tr_batch": 32, "data_per_prompt": 64, "pm_steps": 500}
QUICK = {"vae_steps": 20, "vae_batch": 32, "tr_steps": 30, "tr_batch": 16, "data_per_prompt": 4, "pm_steps": 20}
VAE_LR, TR_LR, PM_LR = 2e-3, 1e-3, 1e-3
VAE_KL = (
    1e-4  # KL weight per latent element: a little smoothness for the diffusion model, little cost in reconstruction
)
PM_PROMPTS_PER_STEP = 16
TRAIN_SAMPLES, EVAL_SAMPLES = 32, 16  # base samples per prompt: preference-model training (seed 1), held out (seed 2)
TIE = 0.01  # judge differences below this are ties (no preference)
CHECK_EVERY = 7  # the report keeps the quality of sample 0 of every 7th prompt (16 images) for the model test


class Clock:
    """Wall and CPU time of each stage."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()
                print(f"[{name}] ...", flush=True)

            def __exit__(self, *exc):
                w, c = time.perf_counter() - self.w, time.process_time() - self.c
                clock.stages[name] = {"wall_s": round(w, 1), "cpu_s": round(c, 1)}
                print(f"[{name}] done: wall {w:.1f} s, cpu {c:.1f} s", flush=True)

        return _Stage()


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------------------------
# 1. VAE
# --------------------------------------------------------------------------------------------


def train_vae(vae, steps: int, batch: int, seed: int) -> list[float]:
    prompts = scenes.all_prompts()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    vae.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, VAE_LR, 20)
        pick = rng.integers(len(prompts), size=batch)
        x = scenes.render([prompts[i] for i in pick], seed=int(rng.integers(2**31))) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + VAE_KL * post.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"  vae step {step:4d} loss {losses[-1]:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    vae.eval()
    return losses


@torch.no_grad()
def encode_dataset(vae, per_prompt: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std (N, 4, 16, 16) of ``per_prompt`` jittered renderings of every prompt."""
    prompts = [p for p in scenes.all_prompts() for _ in range(per_prompt)]
    means, stds = [], []
    for s in range(0, len(prompts), 256):
        x = scenes.render(prompts[s : s + 256], seed=seed + s) * 2 - 1
        post = vae.encode(x).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds), prompts


# --------------------------------------------------------------------------------------------
# 2. Transformer + text encoders
# --------------------------------------------------------------------------------------------


def multiplicity_processor():
    """``JointAttnProcessor2_0`` plus an additive attention mask (B, 1, 1, S) on the keys: a key with logit bias
    ``ln k`` weighs as ``k`` copies of itself, which is how ``k`` identical zero T5 rows act."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class MultiplicityJointAttnProcessor(JointAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            b = hidden_states.shape[0]
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            head = k.shape[-1] // attn.heads

            def heads(t):
                return t.view(b, -1, attn.heads, head).transpose(1, 2)

            q, k, v = heads(q), heads(k), heads(v)
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            out = out.transpose(1, 2).reshape(b, -1, attn.heads * head).to(q.dtype)
            n_img = hidden_states.shape[1]
            out, ctx = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
            out = attn.to_out[1](attn.to_out[0](out))
            return out, ctx

    return MultiplicityJointAttnProcessor()


def multiplicity_mask(log_k: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B, 1, 1, n_tokens) additive mask: 0 everywhere, ``log_k`` on the last key (the one zero T5 row)."""
    mask = torch.zeros(log_k.shape[0], 1, 1, n_tokens)
    mask[:, 0, 0, -1] = log_k
    return mask


@torch.no_grad()
def check_multiplicity(parts: dict, k: int = 7) -> float:
    """Max difference between the transformer with ``k`` zero T5 rows and with one row weighted ``ln k``."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    tr = parts["transformer"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=gen)
    t = torch.tensor([100.0, 500.0, 900.0])
    encs = [parts["text_encoder"], parts["text_encoder_2"]]
    toks = [parts["tokenizer"], parts["tokenizer_2"]]
    prompts = ["a small red circle on a grey background", "", "a large black square on a white background"]
    enc_k, pooled = basemodel.encode_text(encs, toks, prompts, t5_length=k)
    enc_1, _ = basemodel.encode_text(encs, toks, prompts, t5_length=1)
    tr.set_attn_processor(JointAttnProcessor2_0())
    ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=enc_k, pooled_projections=pooled).sample
    tr.set_attn_processor(multiplicity_processor())
    mask = multiplicity_mask(torch.full((3,), math.log(k)), 64 + enc_1.shape[1])
    out = tr(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=enc_1,
        pooled_projections=pooled,
        joint_attention_kwargs={"attention_mask": mask},
    ).sample
    tr.set_attn_processor(JointAttnProcessor2_0())
    return float((out - ref).abs().max())


def train_transformer(parts: dict, mean, std, data_prompts, steps: int, batch: int, seed: int) -> list[float]:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    tr, vae = parts["transformer"], parts["vae"]
    encs = [parts["text_encoder"], parts["text_encoder_2"]]
    toks = [parts["tokenizer"], parts["tokenizer_2"]]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    params = [p for m in (tr, *encs) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=TR_LR, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    tr.set_attn_processor(multiplicity_processor())
    for m in (tr, *encs):
        m.train()
    losses = []
    n_tokens = 64 + basemodel.TEXT_LENGTH + 1
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, TR_LR, 100)
        idx = torch.from_numpy(rng.integers(len(data_prompts), size=batch))
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen) - shift) * scale
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))
        noise = torch.randn(z.shape, generator=gen)
        xt = (1 - sigma[:, None, None, None]) * z + sigma[:, None, None, None] * noise
        drop = rng.random(batch) < 0.1
        prompts = ["" if d else data_prompts[i] for d, i in zip(drop, idx.tolist(), strict=True)]
        enc, pooled = basemodel.encode_text(encs, toks, prompts, t5_length=1)
        log_k = torch.rand(batch, generator=gen) * math.log(256)
        v = tr(
            hidden_states=xt,
            timestep=sigma * 1000,
            encoder_hidden_states=enc,
            pooled_projections=pooled,
            joint_attention_kwargs={"attention_mask": multiplicity_mask(log_k, n_tokens)},
        ).sample
        loss = F.mse_loss(v, noise - z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(
                f"  transformer step {step:5d} loss {losses[-1]:.4f} (mean of last 100: {recent:.4f}, "
                f"{time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    tr.set_attn_processor(JointAttnProcessor2_0())
    for m in (tr, *encs):
        m.eval()
    return losses


# --------------------------------------------------------------------------------------------
# 4-7. Evaluation with the reloaded model
# --------------------------------------------------------------------------------------------


def model_config(folder: Path) -> ModelConfig:
    # one zero T5 row: the model is trained for any count (stage 2), and it samples 4x faster than 256
    return ModelConfig(
        path=str(folder), resolution=32, use_t5=False, max_sequence_length=1, device="cpu", dtype="float32"
    )


@torch.no_grad()
def sample_images(
    model: SD3Model, prompts: list[str], n: int, seed: int, draft: DraftConfig
) -> tuple[torch.Tensor, list[str]]:
    """n samples of every prompt (prompt id = index in ``prompts``), in prompt-major order."""
    texts = [p for p in prompts for _ in range(n)]
    pids = [i for i in range(len(prompts)) for _ in range(n)]
    idxs = [j for _ in prompts for j in range(n)]
    out = []
    for s in range(0, len(texts), 128):
        out.append(
            generate(
                model,
                texts[s : s + 128],
                pids[s : s + 128],
                idxs[s : s + 128],
                seed,
                **dataclasses.asdict(draft) | {"k": 0},
            )
        )
    return torch.cat(out), texts


def judge_scores(images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
    parts = []
    for s in range(0, len(texts), 256):
        parts.append(judge.components(images[s : s + 256], texts[s : s + 256]))
    comps = {k: torch.cat([p[k] for p in parts]) for k in judge.COMPONENTS}
    comps["quality"] = torch.stack([comps[k] for k in judge.COMPONENTS]).prod(0)
    comps["fidelity"] = torch.stack([comps[k] for k in judge.FIDELITY]).prod(0)
    comps["cleanliness"] = torch.stack([comps[k] for k in judge.CLEANLINESS]).prod(0)
    return comps


def sweep(model: SD3Model, prompts: list[str]) -> list[dict]:
    rows = []
    grid = [(8, g, s) for s in (1.0, 3.0) for g in (1.0, 2.0, 3.0, 4.0, 6.0)] + [(4, 3.0, 1.0), (16, 3.0, 1.0)]
    for steps, guidance, shift in grid:
        draft = DraftConfig(num_steps=steps, k=0, guidance_scale=guidance, shift=shift)
        images, texts = sample_images(model, prompts, 1, 3, draft)
        q = judge_scores(images, texts)
        rows.append(
            {
                "num_steps": steps,
                "guidance_scale": guidance,
                "shift": shift,
                "quality": round(float(q["quality"].mean()), 4),
                "fidelity": round(float(q["fidelity"].mean()), 4),
                "cleanliness": round(float(q["cleanliness"].mean()), 4),
            }
        )
        print(f"  sweep {rows[-1]}", flush=True)
    return rows


def train_preference(
    name: str, images: torch.Tensor, texts: list[str], target: torch.Tensor, n: int, seed: int, steps: int
):
    """Bradley-Terry on every within-prompt pair of the base samples that the target separates by >= TIE."""
    from pgot.testbed.proxies import PreferenceNet, scene_planes

    torch.manual_seed(seed)
    net = PreferenceNet()
    opt = torch.optim.AdamW(net.parameters(), lr=PM_LR, weight_decay=1e-4)
    planes = scene_planes([scenes.parse_prompt(t) for t in texts])
    n_prompts = len(texts) // n
    rng = np.random.default_rng(seed)
    tgt = target.view(n_prompts, n)
    diff = tgt[:, :, None] - tgt[:, None, :]  # (P, n, n): target(i) - target(j)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, PM_LR, 20)
        pick = torch.from_numpy(rng.choice(n_prompts, size=min(PM_PROMPTS_PER_STEP, n_prompts), replace=False))
        rows = (pick[:, None] * n + torch.arange(n)).reshape(-1)
        x = images[rows]
        flip = torch.from_numpy(rng.random(len(rows)) < 0.5)  # mirror images: every scene is symmetric, so is the judge
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        r = net(x, planes[rows]).view(-1, n)
        d = diff[pick]
        wins = (d >= TIE).float()  # i beat j
        margin = r[:, :, None] - r[:, None, :]
        loss = (F.softplus(-margin) * wins).sum() / wins.sum().clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  {name} step {step:4d} BT loss {loss.item():.4f}", flush=True)
    net.eval()
    return net


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n, n > 0 (Wilson 1927)."""
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (centre - half, centre + half)


def table1(scores: dict[str, torch.Tensor], quality: torch.Tensor, n: int) -> dict[str, dict]:
    """Accuracy of each proxy on disjoint held-out pairs (2i, 2i + 1) of each prompt, ties (< TIE) left out."""
    q = quality.view(-1, n)
    a, b = q[:, 0::2].reshape(-1), q[:, 1::2].reshape(-1)
    keep = (a - b).abs() >= TIE
    out = {}
    for name, s in scores.items():
        s = s.view(-1, n)
        sa, sb = s[:, 0::2].reshape(-1), s[:, 1::2].reshape(-1)
        agree = ((sa - sb) * (a - b) > 0)[keep]
        k, m = int(agree.sum()), int(keep.sum())
        ci = [round(v, 4) for v in wilson(k, m)] if m else None
        out[name] = {"accuracy": round(k / m, 4) if m else None, "pairs": m, "ci95": ci}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=PACKAGE, help="folder that gets model/, preference/ and report.json")
    ap.add_argument("--stage", choices=("all", "eval"), default="all", help="eval: reuse the saved SD3 in --out")
    ap.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (fixed for reproducibility)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    budget = QUICK if args.quick else FULL
    clock = Clock()
    folder = args.out / "model"
    report: dict = {"budget": budget, "threads": args.threads, "quick": args.quick}
    report_file = args.out / "report.json"
    if args.stage == "eval" and report_file.is_file():
        old = json.loads(report_file.read_text())
        report.update(
            {k: old[k] for k in ("training", "budget", "threads", "multiplicity_check_max_abs_diff") if k in old}
        )

    if args.stage == "all":
        parts = basemodel.build_components(seed=0)
        report["multiplicity_check_max_abs_diff"] = check_multiplicity(parts)
        print(f"multiplicity check: max |diff| = {report['multiplicity_check_max_abs_diff']:.2e}")
        with clock("vae"):
            vae_losses = train_vae(parts["vae"], budget["vae_steps"], budget["vae_batch"], seed=1)
        with clock("latents"):
            mean, std, data_prompts = encode_dataset(parts["vae"], budget["data_per_prompt"], seed=10_000)
            z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(2))
            parts["vae"].register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
            recon = parts["vae"].decode(mean[:256]).sample
            target = scenes.render(data_prompts[:256], seed=10_000) * 2 - 1
            vae_mse = float(F.mse_loss(recon, target))
        with clock("transformer"):
            tr_losses = train_transformer(
                parts, mean, std, data_prompts, budget["tr_steps"], budget["tr_batch"], seed=3
            )
        with clock("save"):
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
                parts[name] = parts[name].half()
            save_tiny(SD3Model(**parts), folder)
        report["training"] = {
            "vae_loss_first_last": [vae_losses[0], vae_losses[-1]],
            "vae_recon_mse_pm1": vae_mse,
            "vae_shift_factor": parts["vae"].config.shift_factor,
            "vae_scaling_factor": parts["vae"].config.scaling_factor,
            "transformer_loss_first100_last100": [
                sum(tr_losses[:100]) / len(tr_losses[:100]),
                sum(tr_losses[-100:]) / len(tr_losses[-100:]),
            ],
            "stages": dict(clock.stages),
        }
        report["training"]["cpu_s"] = round(sum(s["cpu_s"] for s in clock.stages.values()), 1)
        report["training"]["wall_s"] = round(sum(s["wall_s"] for s in clock.stages.values()), 1)

    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=basemodel.SHIFT).save_pretrained(
        folder / "scheduler"
    )
    model = load_model(model_config(folder))
    prompts = scenes.all_prompts()
    if args.quick:
        prompts = prompts[::9]
    eval_clock = Clock()
    with eval_clock("sweep"):
        report["sweep"] = sweep(model, prompts)
    draft = DraftConfig(
        num_steps=basemodel.NUM_STEPS, k=0, guidance_scale=basemodel.GUIDANCE_SCALE, shift=basemodel.SHIFT
    )
    report["sampler"] = {"num_steps": draft.num_steps, "guidance_scale": draft.guidance_scale, "shift": draft.shift}
    with eval_clock("base samples"):
        held_images, held_texts = sample_images(model, prompts, EVAL_SAMPLES, 2, draft)
        train_images, train_texts = sample_images(model, prompts, TRAIN_SAMPLES, 1, draft)
    with eval_clock("judge"):
        held = judge_scores(held_images, held_texts)
        train = judge_scores(train_images, train_texts)
    per_prompt = held["quality"].view(len(prompts), EVAL_SAMPLES).mean(1)
    order = per_prompt.argsort()
    _, held_out_prompts = scenes.split(prompts)
    is_held = torch.tensor([p in set(held_out_prompts) for p in prompts])
    report["base_quality"] = {
        "samples_per_prompt": EVAL_SAMPLES,
        "seed": 2,
        "mean": round(float(held["quality"].mean()), 4),
        "std_over_prompts": round(float(per_prompt.std()), 4),
        "std_over_samples": round(float(held["quality"].std()), 4),
        "median_over_prompts": round(float(per_prompt.median()), 4),
        "mean_fidelity": round(float(held["fidelity"].mean()), 4),
        "mean_cleanliness": round(float(held["cleanliness"].mean()), 4),
        "mean_train_split_prompts": round(float(per_prompt[~is_held].mean()), 4) if (~is_held).any() else None,
        "mean_held_out_split_prompts": round(float(per_prompt[is_held].mean()), 4) if is_held.any() else None,
        "components": {k: round(float(held[k].mean()), 4) for k in judge.COMPONENTS},
        "worst_prompts": [[prompts[i], round(float(per_prompt[i]), 4)] for i in order[:5].tolist()],
        "best_prompts": [[prompts[i], round(float(per_prompt[i]), 4)] for i in order[-5:].flip(0).tolist()],
        # sample 0 of every 7th prompt: what tests/test_testbed_model.py regenerates and compares
        "check_images": {
            str(i): round(float(held["quality"][i * EVAL_SAMPLES]), 4) for i in range(0, len(prompts), CHECK_EVERY)
        },
    }
    print(json.dumps(report["base_quality"], indent=1), flush=True)

    pref_dir = args.out / "preference"
    pref_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    with eval_clock("preference models"):
        for i, (name, target) in enumerate(proxies.PREFERENCE_MODELS.items()):
            net = train_preference(
                name, train_images, train_texts, train[target], TRAIN_SAMPLES, seed=20 + i, steps=budget["pm_steps"]
            )
            save_file(
                {k: v.half().contiguous() for k, v in net.state_dict().items()}, str(pref_dir / f"{name}.safetensors")
            )
    with eval_clock("table 1"):
        names = list(proxies.PREFERENCE_MODELS) + list(proxies.WEAK_REWARDS)
        cfgs = [RewardConfig(name=n, path=str(pref_dir) if n in proxies.PREFERENCE_MODELS else "") for n in names]
        rewards = build_rewards(cfgs)
        with torch.no_grad():
            scores = {
                r.name: torch.cat(
                    [r(held_images[s : s + 256], held_texts[s : s + 256]) for s in range(0, len(held_texts), 256)]
                )
                for r in rewards
            }
        report["table1"] = table1(scores, held["quality"], EVAL_SAMPLES)
        report["table1_vs_fidelity"] = table1(scores, held["fidelity"], EVAL_SAMPLES)
    for name, row in report["table1"].items():
        print(f"  {name:14s} accuracy {row['accuracy']} {row['ci95']} on {row['pairs']} pairs")
    report["eval_stages"] = eval_clock.stages
    report["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "diffusers": __import__("diffusers").__version__,
        "transformers": __import__("transformers").__version__,
    }
    report_file.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {report_file}")


if __name__ == "__main__":
    main()
