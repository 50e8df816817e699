"""``pgot-train``: DRaFT-K LoRA fine-tuning with the PG-OT loss or one of the paper's baselines (Algorithm 1).

One optimizer step::

    prompts (P per process) -> sample (gradients in the last K steps) -> rewards (P, N, M)
    -> objective on the active reward columns -> backward -> one all-reduce of the LoRA gradients -> AdamW

Objectives (``train.objective``): ``pgot`` with ``train.strategy`` ``offline`` (each prompt's precomputed
Pareto front is the OT target of its dominated samples), ``online`` (the reward vectors of the same prompts are
gathered from every process; each sample's target is the gathered vectors that dominate it) or ``auto``
(offline until the agent switches to online); and the baselines ``single_reward``, ``weighted_sum``,
``hetero_weighted_sum``, ``separate_constraints``.

Decisions documented here (the paper leaves them open):

* **OT normalisation** (``ot.normalize=frontier``): rewards, fronts and pools are divided by the store's
  per-reward std. An online run without a store (``train.store`` empty, ``strategy=online``) uses a running
  std of every reward vector gathered so far (all processes, float64 sums kept in ``trainer_state.json``, so
  resume is exact). A store is loaded when the objective needs one (offline / auto PG-OT, the heterogeneous
  baselines) or when ``train.store`` is set.
* **weighted_sum targets**: ``rewards.<i>.target`` when set; else the store's maximum of that reward when a
  store is loaded; else 1.0.
* **Gradient sync**: the transformer is not wrapped in DDP (DRaFT-K calls it K times per backward, with
  gradient checkpointing); the LoRA gradients and the bad-step flag travel in one flat all-reduce per step.
  Gathers otherwise carry reward vectors only. DeepSpeed is refused: ZeRO-2 shards only optimizer state and
  gradients, which for LoRA are a fraction of a percent of the memory (the frozen weights stay replicated).
* **Probe KL**: the KL divergence of each reward's probe distribution from its step-0 distribution uses
  Gaussian fits, ``KL(N(m_t, s_t) || N(m_0, s_0)) = log(s_0/s_t) + (s_t^2 + (m_t - m_0)^2) / (2 s_0^2) - 1/2``
  (paper appendix D.4 reports mean, std and KL as heuristic collapse signals).
* **Bad steps**: a NaN or infinite loss or reward on any process skips the optimizer step everywhere (the flag
  rides in the gradient all-reduce) with a warning; ``train.max_bad_steps`` in a row stop the run with
  :class:`TooManyBadSteps` (a ``ValueError``: the CLI prints one line); checkpoints are never written after it.
* **Agent** (``agent.backend``): every ``agent.every`` steps a checkpoint is written, the main process shows the
  agent diagnostic images of the current and the base model (LoRA disabled; same prompts and seeds), and the
  decision is broadcast. ``continue`` / ``switch`` (to online) approve that checkpoint; ``remove <reward>`` drops
  the reward and reloads the approved checkpoint (or the one the agent names), deleting the newer ones. A step-0
  checkpoint is the first approved one. Decisions, active rewards and the strategy live in trainer_state.json.
  A failing agent is logged and counts as continue.
* **Determinism**: the prompts of step s come from a generator seeded by ``(train.seed, s)``; the noise of
  sample i of prompt p on process r from ``make_noise(train.seed + 7919 * t, p, r * N + i)`` with
  ``t = (s - 1) * train.gradient_accumulation_steps + micro_step + 1``. Online: every process draws the same
  prompts (different sample indices); offline: processes draw different prompts.

Run folder (``train.output_dir``): ``config.yaml``, ``sigmas.json``, ``metrics.jsonl``, ``probes/``
(``step0_scores.safetensors``, ``step-XXXXXX.png``), ``checkpoints/step-XXXXXX/`` (accelerate state with
optimizer, scheduler and RNG; ``lora_state.safetensors``; the diffusers LoRA; ``trainer_state.json``),
``agent/step-XXXXXX/``, ``final/pytorch_lora_weights.safetensors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgot import objectives, rewards
from pgot.config import Config, save_config

log = logging.getLogger(__name__)

__all__ = ["TooManyBadSteps", "TrainerState", "fit", "run"]

_NOISE_STRIDE = 7919
"""Seed offset per micro-step: the noise of training micro-step t uses seed ``train.seed + 7919 * t``."""
_STATE_FILE = "trainer_state.json"
_LORA_STATE = "lora_state.safetensors"
_TIMING_KEYS = ("step_time", "peak_memory_gb")  # vary between runs: not compared on resume


class TooManyBadSteps(ValueError):
    """Too many consecutive steps with a NaN / infinite loss or reward (the CLI prints it as one line)."""


@dataclass
class TrainerState:
    """What a checkpoint needs beyond the accelerate state (``trainer_state.json``)."""

    step: int = 0
    active_rewards: list[str] = field(default_factory=list)
    strategy: str = "offline"
    bad_steps: int = 0
    """Consecutive skipped steps."""
    skipped_steps: int = 0
    """All skipped steps."""
    approved: str = ""
    """Checkpoint folder name the agent last approved (never deleted)."""
    agent_history: list[dict] = field(default_factory=list)
    metrics_lines: int = 0
    """Lines of metrics.jsonl written up to this state (resume truncates the file to them)."""
    running: list[float] = field(default_factory=list)
    """Online std without a store: [count, sum_1..M, sumsq_1..M] of the gathered reward vectors."""
    removed: list[dict] = field(default_factory=list)
    """Rewards the agent removed: step, reward, reverted_to."""
    agent_cost: float = 0.0
    """Dollars spent on the agent's endpoint (agent.cost_limit spans resumed runs)."""
    probe_means: dict[str, list[float]] = field(default_factory=dict)
    """Per reward, the probe mean at every probe (the heuristic agent reads it)."""


@dataclass
class _Run:
    """Everything the loop touches."""

    cfg: Config
    accelerator: Any
    model: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    reward_models: list
    train_ids: list[int]
    train_texts: list[str]
    store: Any
    run_dir: Path
    state: TrainerState
    front: Any = None  # the store restricted to the active rewards (Frontier.select)
    running: torch.Tensor | None = None  # float64 (1 + 2M,)
    probe0: torch.Tensor | None = None  # (B_probe, M) step-0 probe scores
    base_diag: torch.Tensor | None = None
    agent: Any = None
    bar: Any = None
    pending: dict = field(default_factory=dict)  # tensors summed over micro-steps until the next log line


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def run(cfg: Config) -> Path:
    """Train a LoRA as configured and return the run folder (see the module docstring for its layout)."""
    return fit(cfg)[0]


def fit(cfg: Config) -> tuple[Path, Any]:
    """Train; return ``(run folder, SD3Model with the trained adapter)``.

    Raises:
        ValueError: a user error (config, store mismatch), or :class:`TooManyBadSteps`.
    """
    _check_config(cfg)
    store_path = _prepare_store(cfg)
    accelerator = _accelerator(cfg)
    try:
        r = _setup(cfg, accelerator, store_path)
        _loop(r)
        _finish(r)
        return r.run_dir, r.model
    finally:
        accelerator.end_training()  # destroys the process group; without it gloo processes abort at exit


def _loop(r: _Run) -> None:
    """The method, one optimizer step per iteration: sample, score, loss, step, log, check."""
    t, acc = r.cfg.train, r.accelerator
    while r.state.step < t.max_steps:
        step, start = r.state.step + 1, time.perf_counter()
        for micro in range(t.gradient_accumulation_steps):
            with acc.autocast():
                texts, ids, scores = _rollout(r, step, micro)  # (P, N, M) rewards of P prompts x N samples, DRaFT-K
                loss = _objective(r, scores, ids, texts)  # PG-OT or a baseline, on the active reward columns
            acc.backward(loss / t.gradient_accumulation_steps)
        ok, grad_norm = _update(r, step)  # one all-reduce (LoRA grads + NaN flag); skip, or clip + AdamW + schedule
        r.state.step, r.state.bad_steps = step, 0 if ok else r.state.bad_steps + 1
        r.state.skipped_steps += 0 if ok else 1
        _log(r, step, grad_norm, time.perf_counter() - start)  # metrics.jsonl, trackers, bar; probes
        if r.state.bad_steps >= t.max_bad_steps:
            raise TooManyBadSteps(
                f"{r.state.bad_steps} consecutive steps had a NaN or infinite loss or reward (train.max_bad_steps="
                f"{t.max_bad_steps}); stopped at step {step}. The last good checkpoint is intact in "
                f"{r.run_dir / 'checkpoints'}. Lower train.learning_rate, set train.max_grad_norm, or check the rewards."
            )
        agent_due = _agent_on(r.cfg) and step % r.cfg.agent.every == 0
        if agent_due or _due(step, t.checkpoint_every) or step == t.max_steps:
            _save_checkpoint(r)
        if agent_due:
            _consult_agent(r)  # continue / switch to online / remove a reward and revert to the approved checkpoint


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


def _update(r: _Run, step: int) -> tuple[bool, torch.Tensor]:
    """Gradient all-reduce, then skip the step (NaN / inf anywhere) or clip, AdamW step and schedule step."""
    acc, t = r.accelerator, r.cfg.train
    bad_any = _all_reduce_grads(r, r.pending.pop("_bad"))  # also decides the skip identically on every process
    if bad_any:
        warnings.warn(f"step {step}: NaN or infinite loss or reward; the step is skipped", RuntimeWarning, stacklevel=2)
        r.optimizer.zero_grad(set_to_none=True)
        return False, torch.tensor(float("nan"))
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    grad_norm = acc.clip_grad_norm_(r.params, max_norm)
    r.optimizer.step()
    r.lr_scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    return True, grad_norm.detach()


def _rollout(r: _Run, step: int, micro: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """This process's prompts, their N samples each (DRaFT-K / ReFL gradients) and reward vectors (P, N, M)."""
    from pgot.generate import generate

    t, acc = r.cfg.train, r.accelerator
    p, n = t.prompts_per_step, t.samples_per_prompt
    idx = _step_prompts(r, step, micro)  # (P,) indices into the train split
    ids = torch.tensor([r.train_ids[i] for i in idx])
    texts = [r.train_texts[i] for i in idx]
    seed = _noise_seed(t, step, micro)
    sample_idx = torch.arange(n).repeat(p) + acc.process_index * n  # (B,)
    images = generate(
        r.model, [x for x in texts for _ in range(n)], ids.repeat_interleave(n), sample_idx, seed, r.cfg.draft,
        embeds=_embeds(r, texts).repeat_interleave(n), resolution=r.cfg.model.resolution,
        generator=torch.Generator().manual_seed(seed),  # the ReFL stopping step: same on every process and on resume
    )  # fmt: skip
    scores = rewards.score(r.reward_models, images, [x for x in texts for _ in range(n)])  # (B, M)
    return texts, ids, scores.float().view(p, n, -1)


def _embeds(r: _Run, texts: list[str]) -> Any:
    """Prompt embeddings, one row per text, each prompt encoded alone (cached): a text encoder's numerics depend
    on the batch it runs in, so batch-of-one encoding keeps a prompt's embedding the same in every run and on resume."""
    from pgot.model import encode_prompts

    neg = r.cfg.draft.guidance_scale > 1.0
    return encode_prompts(r.model, texts, r.cfg.model.embedding_cache or None, negative=neg, batch_size=1)


def _step_prompts(r: _Run, step: int, micro: int) -> list[int]:
    """Indices of this process's P prompts, a function of ``(train.seed, step, micro)`` only."""
    t, acc = r.cfg.train, r.accelerator
    g = torch.Generator().manual_seed(t.seed * 1_000_003 + (step - 1) * t.gradient_accumulation_steps + micro)
    perm = torch.randperm(len(r.train_ids), generator=g).tolist()
    online = t.objective == "pgot" and r.state.strategy == "online"
    start = 0 if online else acc.process_index * t.prompts_per_step  # online: every process the same prompts
    return [perm[(start + j) % len(perm)] for j in range(t.prompts_per_step)]


def _noise_seed(t: Any, step: int, micro: int) -> int:
    return t.seed + _NOISE_STRIDE * ((step - 1) * t.gradient_accumulation_steps + micro + 1)


def _objective(r: _Run, scores: torch.Tensor, ids: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """The configured loss on the active reward columns; records it and its diagnostics for the next log line."""
    loss, stats = _loss(r, scores, ids, texts)
    bad = (~torch.isfinite(loss)).float() + (~torch.isfinite(scores)).any().float()
    _accumulate(r, loss=loss.detach(), rewards=_finite_mean(scores.detach()), **stats)
    r.pending["_bad"] = r.pending.get("_bad", 0) + bad
    return loss


def _loss(
    r: _Run, scores: torch.Tensor, ids: torch.Tensor, texts: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, diagnostics n_dominated / front_size as tensors) for the configured objective."""
    from pgot.pareto import dominated_by, dominating_sets

    cfg, dev = r.cfg, scores.device
    cols = torch.tensor([cfg.reward_names.index(n) for n in r.state.active_rewards], device=dev)
    s = scores.index_select(-1, cols)  # (P, N, M_active)
    active = [cfg.rewards[cfg.reward_names.index(n)] for n in r.state.active_rewards]
    ot = {"epsilon": cfg.ot.epsilon, "max_iter": cfg.ot.max_iter, "tol": cfg.ot.tol}
    obj, red = cfg.train.objective, cfg.train.reduction
    weights = torch.tensor([rc.weight for rc in active], device=dev)
    if obj == "pgot" and r.state.strategy == "online":
        pool = _gather_pool(r, scores.detach()).index_select(-1, cols)  # (P, world*N, M_active)
        mask = torch.isfinite(pool).all(-1)  # (P, G)
        scale = _scale(r, cols)
        loss = objectives.pgot_online(
            objectives.normalize(s, scale), objectives.normalize(pool, scale), mask, reduction=red, **ot
        )
        n_dom = dominating_sets(s.detach(), pool, mask).any(-1).sum()
        return loss, {"n_dominated": n_dom.float(), "front_size": mask.sum(-1).float().mean()}
    if obj == "single_reward":
        return objectives.single_reward(s, 0, reduction=red), {}
    if obj == "weighted_sum":
        return objectives.weighted_sum(s, weights, _targets(r, active).to(dev), reduction=red), {}
    front, fmask = r.front.lookup(ids, dev, prompts=texts)  # (P, F, M_active), (P, F)
    stats = {
        "n_dominated": dominated_by(s.detach(), front, fmask).sum().float(),
        "front_size": fmask.sum(-1).float().mean(),
    }
    if obj == "pgot":
        scale = _scale(r, cols)
        loss = objectives.pgot_offline(
            objectives.normalize(s, scale), objectives.normalize(front, scale), fmask, reduction=red, **ot
        )
    elif obj == "hetero_weighted_sum":
        loss = objectives.hetero_weighted_sum(s, front, fmask, weights, reduction=red)
    else:
        loss = objectives.separate_constraints(s, front, fmask, weights, reduction=red)
    return loss, stats


def _gather_pool(r: _Run, scores: torch.Tensor) -> torch.Tensor:
    """(P, N, M) local -> (P, world*N, M): every process's vectors of the same prompts (a collective)."""
    acc = r.accelerator
    p, n, m = scores.shape
    gathered = acc.gather(scores.contiguous()).view(acc.num_processes, p, n, m)  # (world, P, N, M)
    pool = gathered.permute(1, 0, 2, 3).reshape(p, acc.num_processes * n, m)
    if r.running is not None:  # running std for online PG-OT without a store
        flat = pool.reshape(-1, m).double()
        flat = flat[torch.isfinite(flat).all(-1)]
        r.running += torch.cat([flat.new_tensor([flat.shape[0]]), flat.sum(0), (flat * flat).sum(0)])
    return pool


def _scale(r: _Run, cols: torch.Tensor) -> torch.Tensor | None:
    """Per-reward std of the active columns (``ot.normalize=frontier``), or None."""
    if r.cfg.ot.normalize != "frontier":
        return None
    if r.store is not None:
        return r.front.stats.std.to(cols.device)  # r.front: the store's columns restricted to the active rewards
    m = len(r.cfg.rewards)
    count, s1, s2 = r.running[0], r.running[1 : 1 + m], r.running[1 + m :]
    var = (s2 / count.clamp(min=1) - (s1 / count.clamp(min=1)) ** 2).clamp(min=0)
    std = torch.where((count > 1) & (var > 0), var.sqrt(), torch.ones_like(var)).float()
    return std.index_select(0, cols)


def _targets(r: _Run, active: list) -> torch.Tensor:
    """weighted_sum targets C_k: ``rewards.<i>.target``, else the store's max of the reward, else 1.0."""
    out = []
    for rc in active:
        if rc.target is not None:
            out.append(float(rc.target))
        elif r.store is not None:
            mx = float(r.store.stats.max[r.store.reward_names.index(rc.name)])
            out.append(mx if math.isfinite(mx) else 1.0)
        else:
            out.append(1.0)
    return torch.tensor(out)


def _all_reduce_grads(r: _Run, bad: torch.Tensor) -> bool:
    """Average the LoRA gradients over processes in one flat all-reduce that also carries the bad-step flag."""
    acc = r.accelerator
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in r.params]
    if acc.num_processes > 1:
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [bad.reshape(1).float() * acc.num_processes])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(r.params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        bad = flat[-1]
    return bool(bad.item() > 0)  # the one host sync per step: the skip must be decided identically everywhere


# --------------------------------------------------------------------------------------------
# Logging and probes
# --------------------------------------------------------------------------------------------


def _finite_mean(scores: torch.Tensor) -> torch.Tensor:
    """(P, N, M) -> (M,) mean over finite entries."""
    flat = scores.reshape(-1, scores.shape[-1])
    ok = torch.isfinite(flat)
    return torch.where(ok, flat, torch.zeros_like(flat)).sum(0) / ok.sum(0)  # NaN for a column with no finite entry


def _accumulate(r: _Run, **values: torch.Tensor) -> None:
    for k, v in values.items():
        r.pending[k] = r.pending.get(k, 0) + v.float()
    r.pending["_count"] = r.pending.get("_count", 0) + 1


def _log(r: _Run, step: int, grad_norm: torch.Tensor, step_time: float) -> None:
    """On logging steps: average over micro-steps and processes, write metrics.jsonl, trackers and the bar."""
    t, acc, cfg = r.cfg.train, r.accelerator, r.cfg
    probe = _due(step, t.probe_every)
    if not (step % t.log_every == 0 or probe or step == t.max_steps):
        return
    count = r.pending.pop("_count", 1)
    keys = sorted(r.pending)
    vec = torch.cat([r.pending[k].reshape(-1) / count for k in keys]).to(acc.device)
    vec = acc.reduce(vec, reduction="mean") if acc.num_processes > 1 else vec  # collective: every process logs
    values, offset = {}, 0
    for k in keys:
        size = r.pending[k].numel()
        values[k] = vec[offset : offset + size].tolist()
        offset += size
    r.pending.clear()
    line: dict[str, Any] = {"step": step, "loss": _num(values["loss"][0])}
    line.update({f"reward/{n}": _num(v) for n, v in zip(cfg.reward_names, values["rewards"], strict=True)})
    line["lr"] = r.lr_scheduler.get_last_lr()[0]
    line["grad_norm"] = _num(float(grad_norm))
    line["step_time"] = step_time
    if acc.device.type == "cuda":  # this process's peak since the last logged step (OOM hunting)
        line["peak_memory_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        torch.cuda.reset_peak_memory_stats(acc.device)
    for k in ("n_dominated", "front_size"):
        if k in values:
            line[k] = _num(values[k][0])
    line.update(bad_steps=r.state.bad_steps, skipped_steps=r.state.skipped_steps)
    line.update(strategy=r.state.strategy, active_rewards=list(r.state.active_rewards))
    if probe and acc.is_main_process:
        line.update(_probe(r, step))
    if acc.is_main_process:
        with open(r.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        acc.log({k: v for k, v in line.items() if isinstance(v, (int, float)) and v is not None}, step=step)
        r.bar.set_postfix(
            {"loss": f"{line['loss']:.4g}" if line["loss"] is not None else "nan"}
            | {n: f"{line[f'reward/{n}']:.3g}" for n in cfg.reward_names if line[f"reward/{n}"] is not None}
        )
        r.bar.update(step - r.bar.n)
    r.state.metrics_lines += 1


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _probe_batch(cfg: Config, ids: list[int]) -> tuple[list[int], list[int]]:
    s = cfg.train.probe_samples
    return [i for i in ids for _ in range(s)], [j for _ in ids for j in range(s)]


def _sample_scores(
    r: _Run, texts: list[str], ids: list[int], sample_idx: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad images and reward vectors, in chunks of one training batch: (B, 3, H, W), (B, M)."""
    from pgot.generate import generate

    chunk = r.cfg.train.prompts_per_step * r.cfg.train.samples_per_prompt
    images, scores = [], []
    with torch.no_grad():
        for s in range(0, len(texts), chunk):
            sl = slice(s, s + chunk)
            img = generate(
                r.model, texts[sl], torch.tensor(ids[sl]), torch.tensor(sample_idx[sl]), seed, r.cfg.draft, k=0,
                embeds=_embeds(r, texts[sl]), resolution=r.cfg.model.resolution,
            )  # fmt: skip
            scores.append(rewards.score(r.reward_models, img, texts[sl]).float().cpu())
            images.append(img.cpu())
    return torch.cat(images), torch.cat(scores)


def _probe_set(r: _Run) -> tuple[list[str], list[int], list[int]]:
    k = min(r.cfg.train.probe_prompts, len(r.train_ids))
    ids, idx = _probe_batch(r.cfg, r.train_ids[:k])
    texts = [r.train_texts[r.train_ids.index(i)] for i in ids]
    return texts, ids, idx


def _probe(r: _Run, step: int) -> dict[str, float | None]:
    """JDR / JCR per reward set, win rate, mean, std and Gaussian KL per reward vs the step-0 model; image grid."""
    from pgot.metrics import jcr, jdr, win_rate

    cfg = r.cfg
    texts, ids, idx = _probe_set(r)
    images, scores = _sample_scores(r, texts, ids, idx, cfg.train.seed)
    _save_grid(images, cfg.train.probe_samples, r.run_dir / "probes" / f"step-{step:06d}.png")
    base, names = r.probe0, cfg.reward_names
    out: dict[str, float | None] = {}
    for set_name, members in _reward_sets(cfg).items():
        cols = torch.tensor([names.index(n) for n in members])
        out[f"probe/jdr_{set_name}"] = float(jdr(scores[:, cols], base[:, cols]))
        out[f"probe/jcr_{set_name}"] = float(jcr(scores[:, cols], base[:, cols]))
    wins = win_rate(scores, base)
    m1, s1 = scores.mean(0), scores.std(0, unbiased=False)
    m0, s0 = base.mean(0), base.std(0, unbiased=False)
    kl = torch.log(s0 / s1) + (s1**2 + (m1 - m0) ** 2) / (2 * s0**2) - 0.5  # Gaussian KL(step t || step 0)
    for j, n in enumerate(names):
        out[f"probe/win_{n}"] = _num(float(wins[j]))
        out[f"probe/mean_{n}"] = _num(float(m1[j]))
        out[f"probe/std_{n}"] = _num(float(s1[j]))
        out[f"probe/kl_{n}"] = _num(float(kl[j]))
        r.state.probe_means.setdefault(n, []).append(float(m1[j]))
    return out


def _reward_sets(cfg: Config) -> dict[str, list[str]]:
    return dict(cfg.train.reward_sets) or {"all": list(cfg.reward_names)}


def _save_grid(images: torch.Tensor, cols: int, path: Path) -> None:
    """(B, 3, H, W) in [0, 1] -> one PNG, a row per prompt."""
    from PIL import Image

    b, c, h, w = images.shape
    rows = max(1, math.ceil(b / cols))
    grid = torch.zeros(c, rows * h, cols * w)
    for i in range(b):
        grid[:, (i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = images[i]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@contextlib.contextmanager
def _base_model(model: Any) -> Iterator[None]:
    """LoRA adapters off (the base model); requires_grad flags restored afterwards (peft resets them)."""
    flags = [(p, p.requires_grad) for p in model.transformer.parameters()]
    model.transformer.disable_adapters()
    try:
        yield
    finally:
        model.transformer.enable_adapters()
        for p, f in flags:
            p.requires_grad_(f)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _ckpt_dir(r: _Run) -> Path:
    return r.run_dir / "checkpoints"


def _checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / _STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def _save_checkpoint(r: _Run) -> Path:
    """Write checkpoints/step-XXXXXX atomically: save into a temporary folder, then rename (all processes save)."""
    from safetensors.torch import save_file

    from pgot.model import save_lora

    acc = r.accelerator
    name = f"step-{r.state.step:06d}"
    final, tmp = _ckpt_dir(r) / name, _ckpt_dir(r) / f".tmp-{name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))  # on every process: optimizer, scheduler, each process's RNG
    if acc.is_main_process:
        save_file({f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(r.params)}, str(tmp / _LORA_STATE))
        save_lora(r.model, tmp)
        _write_state(r, tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(r)
    acc.wait_for_everyone()
    return final


def _write_state(r: _Run, folder: Path) -> None:
    """trainer_state.json of ``folder`` (atomic replace)."""
    if r.running is not None:
        r.state.running = r.running.tolist()
    tmp = folder / f".{_STATE_FILE}.tmp"
    tmp.write_text(json.dumps(asdict(r.state), indent=1))
    os.replace(tmp, folder / _STATE_FILE)


def _prune(r: _Run) -> None:
    keep = r.cfg.train.keep_checkpoints
    found = _checkpoints(_ckpt_dir(r))
    for p in found[: max(0, len(found) - keep)]:
        if p.name != r.state.approved:
            shutil.rmtree(p, ignore_errors=True)


def _load_checkpoint(r: _Run, folder: Path) -> TrainerState:
    """LoRA, optimizer, scheduler and RNG from ``folder`` on every process; returns its trainer state."""
    from safetensors.torch import load_file

    r.accelerator.load_state(str(folder))
    saved = load_file(str(folder / _LORA_STATE))
    with torch.no_grad():
        for i, p in enumerate(r.params):
            p.copy_(saved[f"{i}"].to(p.device, p.dtype))
    return TrainerState(**json.loads((folder / _STATE_FILE).read_text()))


def _resume_folder(cfg: Config, run_dir: Path) -> Path | None:
    spec = cfg.train.resume
    if not spec:
        return None
    if spec == "latest":
        found = _checkpoints(run_dir / "checkpoints")
        if not found:
            log.warning("train.resume=latest: no checkpoint in %s yet; starting from step 0", run_dir / "checkpoints")
        return found[-1] if found else None
    folder = Path(spec)
    if not (folder / _STATE_FILE).is_file():
        raise ValueError(
            f"train.resume={spec!r} is not a pgot checkpoint folder (no {_STATE_FILE}). Use train.resume=latest or a "
            f"folder such as {run_dir / 'checkpoints' / 'step-000100'}."
        )
    return folder


# --------------------------------------------------------------------------------------------
# Agent
# --------------------------------------------------------------------------------------------


def _agent_on(cfg: Config) -> bool:
    return cfg.agent.backend != "none"


def _diagnostic_images(r: _Run) -> tuple[torch.Tensor, list[str]]:
    k = min(r.cfg.agent.diagnostic_prompts, len(r.train_ids))
    ids, texts = r.train_ids[:k], r.train_texts[:k]
    images, _ = _sample_scores(r, texts, ids, [0] * k, r.cfg.agent.diagnostic_seed)
    return images, texts


def _consult_agent(r: _Run) -> None:
    """Ask the agent on the main process, broadcast its decision, apply it on every process (paper appendix D)."""
    from accelerate.utils import broadcast_object_list

    acc, cfg, step = r.accelerator, r.cfg, r.state.step
    box = [None]
    if acc.is_main_process:
        box[0] = _decide(r, step)
    broadcast_object_list(box, from_process=0)  # a collective, outside the main-process branch
    d, here = box[0], f"step-{step:06d}"
    r.state.agent_cost = d.pop("agent_cost", r.state.agent_cost)
    r.state.agent_history.append({**d, "applied": cfg.agent.act})
    if not cfg.agent.act or d["action"] == "continue":
        if cfg.agent.act and not d.get("error"):  # only a checkpoint the agent actually looked at is approved
            r.state.approved = here
        return _rewrite_state(r, here)
    if d["action"] == "switch":
        r.state.strategy, r.state.approved = "online", here
        return _rewrite_state(r, here)
    target = f"step-{d['revert_to']:06d}" if d.get("revert_to") is not None else r.state.approved
    if not (_ckpt_dir(r) / target / _STATE_FILE).is_file():
        log.warning("agent: checkpoint %s is gone; reverting to the approved %s instead", target, r.state.approved)
        target = r.state.approved
    kept = r.state
    loaded = _load_checkpoint(r, _ckpt_dir(r) / target)  # LoRA, optimizer, scheduler back to the stable state
    kept.active_rewards = [n for n in kept.active_rewards if n != d["reward"]]
    kept.removed.append({"step": step, "reward": d["reward"], "reverted_to": loaded.step})
    kept.step, kept.approved, kept.bad_steps, kept.skipped_steps = loaded.step, target, 0, loaded.skipped_steps
    r.state = kept  # the removal, the agent history and the metrics lines survive the revert
    r.front = r.store.select(kept.active_rewards) if r.store is not None else None
    if acc.is_main_process:
        for p in _checkpoints(_ckpt_dir(r)):
            if int(p.name.removeprefix("step-")) > loaded.step:
                shutil.rmtree(p, ignore_errors=True)  # the abandoned branch
        r.bar.n = loaded.step
    log.info("agent: removed %s at step %d, reverted to %s", d["reward"], step, target)
    _rewrite_state(r, target)


def _rewrite_state(r: _Run, name: str) -> None:
    if r.accelerator.is_main_process:
        _write_state(r, _ckpt_dir(r) / name)
    r.accelerator.wait_for_everyone()


def _decide(r: _Run, step: int) -> dict:
    """The agent's decision as a plain dict (what is broadcast); any failure is logged and becomes continue."""
    from pgot.agent import AgentState

    cfg, st = r.cfg, r.state
    state = AgentState(
        step=step, active_rewards=list(st.active_rewards), strengths={rc.name: rc.strength for rc in cfg.rewards},
        removed=list(st.removed), strategy=st.strategy, cost=st.agent_cost,
    )  # fmt: skip
    try:
        if r.base_diag is None:
            with _base_model(r.model):
                r.base_diag, _ = _diagnostic_images(r)
        current, texts = _diagnostic_images(r)
        d = r.agent.decide(
            step, r.base_diag, current, texts, state, log_dir=r.run_dir / "agent", probe_history=st.probe_means
        )
        out = {"step": step, "action": d.action, "reward": d.reward, "revert_to": d.revert_to, "reason": d.reason}
        out["error"] = d.error
    except Exception as exc:  # a failing agent never stops training
        log.warning("agent failed at step %d (%s: %s); continuing", step, type(exc).__name__, exc)
        out = {"step": step, "action": "continue", "reward": None, "revert_to": None, "reason": f"agent error: {exc}"}
        out["error"] = type(exc).__name__
    if out["action"] == "remove" and (out["reward"] not in st.active_rewards or len(st.active_rewards) < 2):
        out.update(action="continue", reason=f"cannot remove {out['reward']!r} (active: {st.active_rewards}); continue")
    return {**out, "agent_cost": state.cost}


# --------------------------------------------------------------------------------------------
# Setup and finish
# --------------------------------------------------------------------------------------------


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _check_config(cfg: Config) -> None:
    """User errors that need no model: raised before anything is loaded."""
    t = cfg.train
    if not cfg.rewards:
        raise ValueError("rewards is empty; list at least one reward, e.g. rewards: [{name: colorfulness}].")
    active = t.active_rewards or cfg.reward_names
    if t.objective == "single_reward" and len(active) != 1:
        raise ValueError(
            f"train.objective=single_reward needs exactly one active reward, got {len(active)} ({', '.join(active)}). "
            f"Set train.active_rewards=[{active[0]}] (the other rewards are still scored and logged)."
        )
    if cfg.draft.method == "draft_k" and cfg.draft.k < 1:
        raise ValueError(
            f"draft.k={cfg.draft.k} gives no gradient to train on. Set draft.k between 1 and draft.num_steps={cfg.draft.num_steps}."
        )
    if _agent_on(cfg) and t.objective == "single_reward":
        raise ValueError(
            "agent.backend with train.objective=single_reward cannot remove the only reward. Set agent.backend=none."
        )


def _store_path(cfg: Config) -> Path | None:
    """The store to load, or None (see the module docstring for when a store is needed)."""
    t = cfg.train
    needs = (t.objective == "pgot" and t.strategy in ("offline", "auto")) or t.objective in (
        "hetero_weighted_sum",
        "separate_constraints",
    )
    if t.store:
        return Path(t.store)
    return Path(cfg.precompute.store) if needs else None


def _prepare_store(cfg: Config) -> Path | None:
    """Precompute a missing store first when ``train.precompute_if_missing`` (single process only)."""
    path = _store_path(cfg)
    if path is None or (path / "meta.json").is_file() and (path / "samples.parquet").is_file():
        return path
    if not cfg.train.precompute_if_missing:
        return path  # load_store says what is missing and how to build it
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"the frontier store {path} does not exist. Under accelerate launch, build it first with the same config: "
            "`accelerate launch ... -m pgot precompute --config <config>` (train.precompute_if_missing works on one process)."
        )
    from accelerate.state import AcceleratorState

    from pgot import precompute

    log.info("frontier store %s is missing: running pgot-precompute first (train.precompute_if_missing=true)", path)
    print(f"frontier store {path} is missing; precomputing it first (train.precompute_if_missing=true)", flush=True)
    precompute.run(dataclasses.replace(cfg, precompute=dataclasses.replace(cfg.precompute, store=str(path))))
    AcceleratorState._reset_state(reset_partial_state=True)  # precompute ended its accelerator; train starts a new one
    return path


def _accelerator(cfg: Config) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    t = cfg.train
    logging.getLogger("accelerate").setLevel(max(logging.WARNING, logging.getLogger("accelerate").getEffectiveLevel()))
    acc = Accelerator(
        cpu=not torch.cuda.is_available() or cfg.model.device == "cpu",  # gloo on CPU, NCCL on GPUs
        mixed_precision=t.mixed_precision,
        log_with=list(t.log_with) or None,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=str(Path(t.output_dir) / "logs")),
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
    )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        acc.end_training()
        raise ValueError(
            "pgot-train does not run under DeepSpeed: LoRA gradients and optimizer state are a fraction of a percent of "
            "the memory and the frozen weights are replicated under ZeRO-2 anyway. Use configs/accelerate/8gpu.yaml."
        )
    return acc


def _setup(cfg: Config, acc: Any, store_path: Path | None) -> _Run:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from pgot.frontier import check_compatible, load_store
    from pgot.generate import sigmas
    from pgot.model import add_lora, load_model
    from pgot.prompts import load_prompts, split

    t = cfg.train
    run_dir = Path(t.output_dir)
    resume = _resume_folder(cfg, run_dir)
    if resume is None and ((run_dir / "metrics.jsonl").exists() or _checkpoints(run_dir / "checkpoints")):
        raise ValueError(
            f"train.output_dir={run_dir} already holds a run. Continue it with train.resume=latest, or choose a new "
            "train.output_dir."
        )
    model = load_model(cfg.model, device=acc.device)
    set_seed(t.seed)  # the LoRA's random A init: the same on every process and in every run of this config
    params = add_lora(model, cfg.model)
    store = None
    if store_path is not None:
        store = load_store(store_path)
        check_compatible(store, cfg.reward_names, model.fingerprint)
    prompt_set = load_prompts(cfg.prompts)
    if cfg.prompts.eval_fraction > 0:
        prompt_set, _ = split(prompt_set, cfg.prompts.eval_fraction, cfg.prompts.split_seed)
    if not prompt_set.prompts:
        raise ValueError(
            f"prompts.path={cfg.prompts.path} gives no training prompts; check prompts.limit and prompts.eval_fraction."
        )
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
    lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    optimizer, lr_scheduler = acc.prepare(optimizer, lr_scheduler)
    state = TrainerState(
        active_rewards=list(t.active_rewards or cfg.reward_names),
        strategy="online" if t.strategy == "online" else "offline",
    )
    r = _Run(
        cfg=cfg, accelerator=acc, model=model, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
        reward_models=rewards.build(cfg.rewards, device=acc.device), train_ids=[int(i) for i in prompt_set.ids],
        train_texts=list(prompt_set.prompts), store=store, run_dir=run_dir, state=state,
    )  # fmt: skip
    if store is None and cfg.ot.normalize == "frontier":
        r.running = torch.zeros(1 + 2 * len(cfg.rewards), dtype=torch.float64, device=acc.device)
    if resume is not None:
        r.state = _load_checkpoint(r, resume)
        if r.running is not None and r.state.running:
            r.running = torch.tensor(r.state.running, dtype=torch.float64, device=acc.device)
        log.info("resumed from %s (step %d)", resume, r.state.step)
    r.front = store.select(r.state.active_rewards) if store is not None else None
    if _agent_on(cfg) and acc.is_main_process:
        from pgot.agent import build_agent

        r.agent = build_agent(cfg.agent, cfg.rewards)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        sig = sigmas(
            model,
            cfg.draft.num_steps,
            shift=None if cfg.draft.shift < 0 else cfg.draft.shift,
            resolution=cfg.model.resolution,
        )
        (run_dir / "sigmas.json").write_text(json.dumps({"num_steps": cfg.draft.num_steps, "sigmas": sig.tolist()}))
        _truncate_metrics(run_dir / "metrics.jsonl", r.state.metrics_lines)
        r.probe0 = _step0_probe(r)
        r.bar = tqdm(total=t.max_steps, initial=r.state.step, desc="train", dynamic_ncols=True)
    if t.log_with:
        acc.init_trackers("pgot", config=_flat(asdict(cfg)))  # TensorBoard / W&B through accelerate (main process)
    acc.wait_for_everyone()
    if _agent_on(cfg) and not _checkpoints(_ckpt_dir(r)):
        _save_checkpoint(r)  # step 0: what a removal reverts to before the agent approved anything
        r.state.approved = "step-000000"
        _rewrite_state(r, "step-000000")
    return r


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"train.learning_rate": 1e-4, ...} with scalars only (what trackers accept)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _truncate_metrics(path: Path, lines: int) -> None:
    """Drop lines written after the checkpoint being resumed (a killed run may have logged further)."""
    if not path.exists():
        return
    kept = path.read_text().splitlines(keepends=True)[:lines]
    path.write_text("".join(kept))


def _step0_probe(r: _Run) -> torch.Tensor | None:
    """Probe reward vectors of the step-0 model, computed once and kept in the run folder (resume reuses them)."""
    from safetensors.torch import load_file, save_file

    if r.cfg.train.probe_every <= 0:
        return None
    path = r.run_dir / "probes" / "step0_scores.safetensors"
    if path.exists():
        return load_file(str(path))["scores"]
    if r.state.step > 0:
        log.warning("no step-0 probe scores in %s; using the base model's", path.parent)
    with _base_model(r.model) if r.state.step > 0 else contextlib.nullcontext():
        texts, ids, idx = _probe_set(r)
        _, scores = _sample_scores(r, texts, ids, idx, r.cfg.train.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"scores": scores.contiguous()}, str(path))
    return scores


def _finish(r: _Run) -> None:
    """Final LoRA in the diffusers format and, when asked, the tuned-vs-base table on the probe prompts."""
    from pgot.model import save_lora

    acc = r.accelerator
    if acc.is_main_process:
        r.bar.close()
        save_lora(r.model, r.run_dir / "final")
        if r.cfg.train.final_eval:
            print(_final_table(r), flush=True)
        log.info("run folder: %s", r.run_dir)
    acc.wait_for_everyone()


def _final_table(r: _Run) -> str:
    """JDR / JCR per reward set and win rate per reward of the tuned model against the base model (markdown)."""
    from pgot.metrics import jcr, jdr, win_rate

    cfg, names = r.cfg, r.cfg.reward_names
    texts, ids, idx = _probe_set(r)
    _, tuned = _sample_scores(r, texts, ids, idx, cfg.train.seed)
    with _base_model(r.model):
        _, base = _sample_scores(r, texts, ids, idx, cfg.train.seed)
    rows = [("pairs", f"{tuned.shape[0]}")]
    for set_name, members in _reward_sets(cfg).items():
        cols = torch.tensor([names.index(n) for n in members])
        rows.append((f"JDR {set_name}", f"{100 * float(jdr(tuned[:, cols], base[:, cols])):.1f}%"))
        rows.append((f"JCR {set_name}", f"{100 * float(jcr(tuned[:, cols], base[:, cols])):.1f}%"))
    for n, w in zip(names, win_rate(tuned, base).tolist(), strict=True):
        rows.append((f"win rate {n}", f"{100 * w:.1f}%"))
    for j, n in enumerate(names):
        rows.append((f"mean {n}", f"{float(base[:, j].mean()):.4g} -> {float(tuned[:, j].mean()):.4g}"))
    width = max(len(a) for a, _ in rows)
    lines = [f"tuned vs base, {len(set(ids))} probe prompts x {cfg.train.probe_samples} seeds", "",
             f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]  # fmt: skip
    lines += [f"| {a.ljust(width)} | {b} |" for a, b in rows]
    return "\n".join(lines)
