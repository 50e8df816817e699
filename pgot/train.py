"""``pgot-train``: DRaFT-K LoRA fine-tuning with the PG-OT loss or one of the paper's baselines (Algorithm 1).

A recipe in three parts: :func:`setup` (accelerator, model + LoRA, rewards, prompts, store, optimizer, resume),
:func:`train` (the loop: sample, score, loss, step, log, check) and :func:`cleanup` (final LoRA, final table).
One optimizer step::

    prompts (P per process) -> sample (gradients in the last K steps) -> rewards (P, N, M)
    -> objective on the active reward columns -> backward -> one all-reduce of the LoRA gradients -> AdamW

Objectives (``train.objective``, :mod:`pgot.objectives`): ``pgot`` with ``train.strategy`` ``offline`` (each
prompt's precomputed Pareto front is the OT target of its dominated samples), ``online`` (the reward vectors of the
same prompts are gathered from every process; each sample's target is the gathered vectors that dominate it) or
``auto`` (offline until the agent switches to online); and the baselines ``single_reward``, ``weighted_sum``,
``hetero_weighted_sum``, ``separate_constraints``.

Decisions documented here (the paper leaves them open):

* **OT normalisation** (``ot.normalize=frontier``): rewards, fronts and pools are divided by the store's
  per-reward std. An online run without a store (``train.store`` empty, ``strategy=online``) uses a running
  std of every reward vector gathered so far (all processes, float64 sums kept in ``trainer_state.json``, so
  resume is exact). A store is loaded when the objective needs one (:func:`pgot.objectives.needs_store`) or
  when ``train.store`` is set.
* **weighted_sum targets**: ``rewards.<i>.target`` when set; else the store's maximum of that reward when a
  store is loaded (the global upper bound of paper eq. 1); else 1.0 under ``train.target_form=linear`` (where a
  target does not change the gradient) and an error under ``hinge`` / ``squared``.
* **Gradient sync**: the transformer is not wrapped in DDP (DRaFT-K calls it K times per backward, with
  gradient checkpointing); the LoRA gradients and the bad-step flag travel in one flat all-reduce per step.
  Gathers otherwise carry reward vectors only. DeepSpeed is refused: ZeRO-2 shards only optimizer state and
  gradients, which for LoRA are a fraction of a percent of the memory (the frozen weights stay replicated).
* **Probe KL**: Gaussian fits, :func:`pgot.metrics.gaussian_kl` (paper appendix D.4 reports mean, std and KL
  as heuristic collapse signals).
* **Bad steps**: a NaN or infinite loss, reward or LoRA gradient on any process skips the optimizer step everywhere
  (the flag rides in the gradient all-reduce) with a one-line warning; ``train.max_bad_steps`` in a row stop the run
  with :class:`TooManyBadSteps` (a ``ValueError``: the CLI prints one line); checkpoints are never written after it.
  A reward scores NaN for an image with a non-finite pixel (:func:`pgot.rewards.score`), so diverged samples are bad
  steps. The ``train.checkpoint_every`` checkpoint of a skipped step is not written, and a checkpoint that is written
  after one (``train.max_steps``, the agent's, a stop signal) never prunes the last *good* checkpoint (one written
  after an applied step, or the step-0 / resumed one).
* **Finite weights**: the LoRA weights never become NaN or infinite on disk. When an optimizer step makes one
  non-finite (on every process alike: the weights are replicated), the run stops at once with
  :class:`NonFiniteWeights` (one line naming the step and the last good checkpoint), writing no checkpoint and no
  ``final/`` from the broken weights.
* **Agent** (``agent.backend``): every ``agent.every`` steps a checkpoint is written, the main process shows the
  agent diagnostic images of the current and the base model (LoRA disabled; same prompts and seeds), and the
  decision is broadcast and applied on every process (:meth:`pgot.agent.AgentState.apply`). ``remove
  <reward>`` also reloads the approved checkpoint (or the one the agent names), deletes the newer ones and
  writes a ``revert`` event line to ``metrics.jsonl``. A step-0 checkpoint is the first approved one. A failing
  agent is logged and counts as continue.
* **Determinism**: the prompts of step s come from a generator seeded by ``(train.seed, s)``; the noise of
  sample i of prompt p on process r from ``make_noise(train.seed + 7919 * t, p, r * N + i)`` with
  ``t = (s - 1) * train.gradient_accumulation_steps + micro_step + 1``. Online: every process draws the same
  prompts (different sample indices); offline: processes draw different prompts.

Run folder (``train.output_dir``): ``config.yaml``, ``sigmas.json``, ``metrics.jsonl`` (:mod:`pgot.tracking`),
``probes/`` (``step0_scores.safetensors``, ``step-XXXXXX.png``), ``checkpoints/step-XXXXXX/``
(:mod:`pgot.checkpoints`), ``agent/step-XXXXXX/``, ``logs/`` (trackers), ``final/pytorch_lora_weights.safetensors``
(written atomically: complete or absent), ``.pgot.lock`` and ``.pgot.lock.json`` (the folder lock).

**One run, one folder.** One process at a time works in a run folder: :func:`fit` holds its lock
(:func:`pgot.files.hold_folder`; under ``accelerate launch`` the main process, the others wait for it); a second
run gets one error line naming the holder. What a run does with the folder (:func:`_prepare_folder`, decided on the
main process before anything is written):

* empty or missing: a fresh start;
* holds a run and ``train.resume`` is empty: refused;
* ``train.resume=latest`` with no checkpoint (an attempt killed or interrupted before its first checkpoint): what
  the attempt wrote is deleted and the run starts afresh;
* a checkpoint to resume: the config must equal the run's ``config.yaml`` except :data:`RESUMABLE_KEYS`; every
  other difference is refused, one line per key (:func:`config_changes`), and nothing in the folder changes. The
  resume is exact: ``metrics.jsonl`` is truncated to the checkpoint's lines, the interrupted attempt's agent
  records and probe grids go, and a decision the agent had not made on the checkpoint is made first;
* the checkpoint of ``train.max_steps`` and the final LoRA exist: finished; the table is printed again and
  nothing in the folder changes.

**Signals.** SIGINT and SIGTERM during training stop every process after the step in flight (the flag rides in
the gradient all-reduce, so all agree on the step), with a checkpoint of that step;
:class:`~pgot.checkpoints.Interrupted` then says so, and the CLI exits with 130 / 143. Outside the loop (set-up,
cleanup) they stop at once, and the message says what a rerun does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from pgot import checkpoints, metrics, objectives, precompute, probes, rewards, run_folder, tables
from pgot.agent import Agent, AgentState, Decision, build_agent
from pgot.checkpoints import Interrupted, StopSignals, TrainerState
from pgot.config import Config, ConfigError, save_config
from pgot.devices import every_process, on_cpu, processes
from pgot.embeddings import PromptEmbeds, encode_prompts
from pgot.evaluate import ground_truth_problems, ground_truth_quality
from pgot.files import atomic_write, atomic_write_json, hold_folder
from pgot.frontier import Frontier, compare_settings, load_store
from pgot.generate import generate, sigmas
from pgot.images import labelled_grid, save_png
from pgot.model import SD3Model, add_lora, load_model, save_lora
from pgot.ot_loss import OTConvergenceWarning
from pgot.preflight import preflight
from pgot.prompts import load_prompts, split
from pgot.tracking import RunLog, finite_or_none, flatten

log = logging.getLogger(__name__)

__all__ = ["NonFiniteWeights", "TooManyBadSteps", "cleanup", "fit", "run", "setup", "train"]

_NOISE_STRIDE = 7919
"""Seed offset per micro-step: the noise of training micro-step t uses seed ``train.seed + 7919 * t``."""
_TIMING_KEYS = ("step_time", "peak_memory_gb")  # vary between runs: not compared on resume


class TooManyBadSteps(ValueError):
    """Too many consecutive steps with a NaN / infinite loss, reward or LoRA gradient (the CLI prints it as one line).
    Decided from all-reduced flags: raised alike by every process (:func:`pgot.devices.every_process`)."""

    every_process = True


class NonFiniteWeights(ValueError):
    """An optimizer step made a LoRA weight NaN or infinite; nothing was saved from it (the CLI prints one line).
    The weights are the same on every process: raised alike by all (:func:`pgot.devices.every_process`)."""

    every_process = True


@dataclass
class Run:
    """Everything the loop touches."""

    cfg: Config
    accelerator: Accelerator
    model: SD3Model
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    reward_models: list[rewards.Reward]
    train_ids: list[int]
    train_texts: list[str]
    store: Frontier | None
    run_dir: Path
    state: TrainerState
    front: Frontier | None = None  # the store restricted to the active rewards (Frontier.select)
    running: torch.Tensor | None = None  # float64 (1 + 2M,): online std without a store
    probe0: torch.Tensor | None = None  # (B_probe, M) step-0 probe scores
    base_diag: torch.Tensor | None = None  # the base model's diagnostic images for the agent
    agent: Agent | None = None
    ot_warned: bool = False  # the Sinkhorn warning is said once per run
    log: RunLog | None = None  # main process only
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # summed over micro-steps until the next line
    finished: bool = False  # a rerun of a complete run: nothing to train, nothing to write
    decision_due: bool = False  # resumed from a checkpoint the agent had not decided on yet
    saved_at: tuple[int, int] | None = None  # (step, steps_run) of the state last written to a checkpoint
    last_good: str | None = None  # the newest checkpoint written after an applied step (or step 0, or resumed)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def agent_on(self) -> bool:
        return self.cfg.agent.backend != "none"


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def run(cfg: Config) -> Path:
    """Train a LoRA as configured and return the run folder (see the module docstring for its layout)."""
    return fit(cfg)[0]


def fit(cfg: Config) -> tuple[Path, SD3Model]:
    """Train; return ``(run folder, SD3Model with the trained adapter)``.

    The run folder is locked for the duration (:func:`pgot.files.hold_folder`). What a run does with a folder
    that already holds one (resume, start afresh, nothing, refuse) is :func:`setup`'s.

    Raises:
        ValueError: a user error (config, a folder in use or holding another run, store mismatch), or
            :class:`TooManyBadSteps`.
        Interrupted: SIGINT or SIGTERM (after the checkpoint of the step in flight, when training had started).
    """
    # every input checked before any weight loads (a collective under accelerate launch)
    preflight(cfg, "train", processes(cfg.model.device))
    accelerator = _accelerator(cfg)
    try:
        with hold_folder(  # a run refused before its first record leaves no trace (files.hold_folder)
            cfg.train.output_dir,
            key="train.output_dir",
            what="a pgot-train run",
            accelerator=accelerator,
            scratch=("config.yaml", "sigmas.json"),
        ):
            try:
                r = setup(cfg, accelerator)
                train(r)
                cleanup(r)
            except Interrupted:
                raise
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI, outside the loop's handling
                raise _interrupted(cfg, getattr(exc, "signum", signal.SIGINT)) from None
        return r.run_dir, r.model
    finally:
        accelerator.end_training()  # destroys the process group; without it gloo processes abort at exit


def train(r: Run) -> None:
    """The method, one optimizer step per iteration: sample, score, loss, step, log, check."""
    t, acc = r.cfg.train, r.accelerator
    with StopSignals("after the step in flight, with a checkpoint") as signals:
        if r.decision_due:  # the checkpoint was written, the agent's decision on it was not: decide it now
            _consult_agent(r)
        while r.state.step < t.max_steps:
            step, start = r.state.step + 1, time.perf_counter()
            for micro in range(t.gradient_accumulation_steps):
                with acc.autocast():
                    texts, ids, scores = _rollout(r, step, micro)  # (P, N, M) rewards of P prompts x N samples
                    loss = _objective(r, scores, ids, texts)  # PG-OT or a baseline, on the active reward columns
                acc.backward(loss / t.gradient_accumulation_steps)
            ok, grad_norm, stop = _update(r, step, signals.signum)  # one all-reduce: LoRA grads, NaN and stop flags
            r.state.step, r.state.bad_steps = step, 0 if ok else r.state.bad_steps + 1
            r.state.skipped_steps += 0 if ok else 1
            r.state.steps_run += 1
            _log(r, step, grad_norm, time.perf_counter() - start)  # metrics.jsonl, trackers, bar; probes
            if r.state.bad_steps >= t.max_bad_steps:
                _close_bar(r)
                raise TooManyBadSteps(
                    f"{r.state.bad_steps} consecutive steps had a NaN or infinite loss, reward or LoRA gradient "
                    f"(train.max_bad_steps={t.max_bad_steps}); stopped at step {step}. {_last_good_text(r)} Lower "
                    "train.learning_rate, set train.max_grad_norm, or check the rewards."
                )
            agent_due = r.agent_on and step % r.cfg.agent.every == 0
            if agent_due or (ok and _due(step, t.checkpoint_every)) or step == t.max_steps:
                _save_checkpoint(r)
            if agent_due:
                _consult_agent(r)  # continue / switch to online / remove a reward and revert to the approved checkpoint
            if stop and r.state.step < t.max_steps:
                _stop(r, signals.signum or signal.SIGTERM)  # a checkpoint of this state, then Interrupted


def _stop(r: Run, signum: int) -> None:
    """Checkpoint the current state (unless that is done) and raise :class:`Interrupted` on every process."""
    if r.saved_at != (r.state.step, r.state.steps_run):
        _save_checkpoint(r)
    path = r.checkpoint_dir / checkpoints.checkpoint_name(r.state.step)
    raise every_process(
        Interrupted(
            f"stopped by {signal.Signals(signum).name} after step {r.state.step} of {r.cfg.train.max_steps}, with the "
            f"checkpoint {path}. Run the same command with train.resume=latest to continue from it (exactly).",
            signum,
            checkpoint=path,
        )
    )


def _interrupted(cfg: Config, signum: int) -> Interrupted:
    """The :class:`Interrupted` of a run stopped outside the loop's handling (set-up, a second signal, cleanup)."""
    run_dir, name = Path(cfg.train.output_dir), signal.Signals(signum).name
    found = checkpoints.list_checkpoints(run_dir / "checkpoints")
    if found:
        return Interrupted(
            f"interrupted by {name}; the last checkpoint is {found[-1]}. Run the same command with "
            "train.resume=latest to continue from it.",
            signum,
            checkpoint=found[-1],
        )
    return Interrupted(
        f"interrupted by {name} before the first checkpoint. Run the same command with train.resume=latest to "
        f"start the run in {run_dir} afresh.",
        signum,
    )


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


def _rollout(r: Run, step: int, micro: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """This process's prompts, their N samples each (DRaFT-K / ReFL gradients) and reward vectors (P, N, M)."""
    t, acc = r.cfg.train, r.accelerator
    p, n = t.prompts_per_step, t.samples_per_prompt
    idx = _step_prompts(r, step, micro)  # (P,) indices into the train split
    ids = torch.tensor([r.train_ids[i] for i in idx])
    texts = [r.train_texts[i] for i in idx]
    per_image = [x for x in texts for _ in range(n)]
    seed = t.seed + _NOISE_STRIDE * ((step - 1) * t.gradient_accumulation_steps + micro + 1)
    sample_idx = torch.arange(n).repeat(p) + acc.process_index * n  # (B,)
    images = generate(
        r.model, per_image, ids.repeat_interleave(n), sample_idx, seed, **dataclasses.asdict(r.cfg.draft),
        embeds=_embeds(r, texts).repeat_interleave(n), resolution=r.cfg.model.resolution,
        generator=torch.Generator().manual_seed(seed),  # the ReFL stopping step: same on every process and on resume
    )  # fmt: skip
    scores = rewards.score(r.reward_models, images, per_image)  # (B, M)
    return texts, ids, scores.float().view(p, n, -1)


def _embeds(r: Run, texts: list[str]) -> PromptEmbeds:
    return encode_prompts(
        r.model, texts, r.cfg.model.embedding_cache or None, negative=r.cfg.draft.guidance_scale > 1.0
    )


def _step_prompts(r: Run, step: int, micro: int) -> list[int]:
    """Indices of this process's P prompts, a function of ``(train.seed, step, micro)`` only."""
    t, acc = r.cfg.train, r.accelerator
    g = torch.Generator().manual_seed(t.seed * 1_000_003 + (step - 1) * t.gradient_accumulation_steps + micro)
    perm = torch.randperm(len(r.train_ids), generator=g).tolist()
    online = objectives.needs_pool(t.objective, r.state.agent.strategy)
    start = 0 if online else acc.process_index * t.prompts_per_step  # online: every process the same prompts
    return [perm[(start + j) % len(perm)] for j in range(t.prompts_per_step)]


def _objective(r: Run, scores: torch.Tensor, ids: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """The configured loss on the active reward columns; records it and its diagnostics for the next log line."""
    cfg, dev, state = r.cfg, scores.device, r.state.agent
    cols = torch.tensor(rewards.columns(cfg.reward_names, state.active_rewards), device=dev)
    s = scores.index_select(-1, cols)  # (P, N, M_active)
    active = [cfg.rewards[i] for i in cols.tolist()]
    inputs: dict[str, torch.Tensor | None] = {"weights": torch.tensor([rc.weight for rc in active], device=dev)}
    if objectives.needs_pool(cfg.train.objective, state.strategy):
        pool = _gather_pool(r, scores.detach()).index_select(-1, cols)  # (P, world*N, M_active), a collective
        inputs.update(pool=pool, pool_mask=torch.isfinite(pool).all(-1))
    elif objectives.needs_store(cfg.train.objective, state.strategy):
        inputs["front"], inputs["front_mask"] = r.front.lookup(ids, dev, prompts=texts)  # (P, F, M_a), (P, F)
    if cfg.train.objective == "weighted_sum":
        inputs["targets"] = _targets(r, active).to(dev)
    with warnings.catch_warnings(record=True) as caught:  # Sinkhorn's warning: counted, and said once per run
        warnings.simplefilter("always", OTConvergenceWarning)
        loss, diagnostics = objectives.compute(
            cfg.train.objective, s, strategy=state.strategy, scale=_scale(r, cols), reduction=cfg.train.reduction,
            target_form=cfg.train.target_form, epsilon=cfg.ot.epsilon, max_iter=cfg.ot.max_iter, tol=cfg.ot.tol,
            **inputs,
        )  # fmt: skip
    unconverged = 0
    for w in caught:
        if issubclass(w.category, OTConvergenceWarning):
            unconverged += 1
        else:  # anything else goes on as it came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if unconverged and not r.ot_warned:
        r.ot_warned = True
        scale = "" if cfg.ot.normalize == "frontier" else " or set ot.normalize=frontier (comparable reward scales)"
        log.warning(
            "Sinkhorn did not reach ot.tol=%g within ot.max_iter=%d iterations (ot.epsilon=%g) at step %d; "
            "metrics.jsonl counts such steps in ot_unconverged. Raise ot.max_iter or ot.epsilon%s.",
            cfg.ot.tol, cfg.ot.max_iter, cfg.ot.epsilon, r.state.step + 1, scale,
        )  # fmt: skip
    if objectives.needs_store(cfg.train.objective, state.strategy) or objectives.needs_pool(
        cfg.train.objective, state.strategy
    ):
        diagnostics["ot_unconverged"] = torch.tensor(float(unconverged > 0))
    bad = (~torch.isfinite(loss)).float() + (~torch.isfinite(scores)).any().float()
    _accumulate(r, loss=loss.detach(), rewards=_finite_mean(scores.detach()), _bad=bad, **diagnostics)
    return loss


def _gather_pool(r: Run, scores: torch.Tensor) -> torch.Tensor:
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


def _scale(r: Run, cols: torch.Tensor) -> torch.Tensor | None:
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


def _targets(r: Run, active: list) -> torch.Tensor:
    """weighted_sum targets C_k: ``rewards.<i>.target``, else the store's max of the reward; 1.0 only under
    ``train.target_form=linear``, where the target does not change the gradient."""
    out, linear = [], r.cfg.train.target_form == "linear"
    for rc in active:
        if rc.target is not None:
            out.append(float(rc.target))
            continue
        mx = float(r.store.stats.max[r.store.reward_names.index(rc.name)]) if r.store is not None else math.nan
        if math.isfinite(mx):
            out.append(mx)
        elif linear:
            out.append(1.0)
        else:
            i = r.cfg.reward_names.index(rc.name)
            raise every_process(
                ValueError(
                    f"train.objective=weighted_sum with train.target_form={r.cfg.train.target_form} needs a target for "
                    f"{rc.name}, and the store {r.cfg.train.store or '(none)'} has no finite maximum of it. Set "
                    f"rewards.{i}.target, or train.target_form=linear."
                )
            )
    return torch.tensor(out)


def _update(r: Run, step: int, signum: int) -> tuple[bool, torch.Tensor, bool]:
    """Gradient all-reduce, then skip the step (NaN / inf anywhere) or clip, AdamW step and schedule step.

    Returns:
        ``(applied, grad norm, stop)``; ``stop``: a process received SIGINT / SIGTERM (``signum`` here, 0 if not),
        decided identically on every process.
    """
    acc, t = r.accelerator, r.cfg.train
    bad_any, stop = _all_reduce_grads(r, r.pending.pop("_bad"), float(signum > 0))  # the same on every process
    if bad_any:
        log.warning("step %d: NaN or infinite loss, reward or LoRA gradient; the step is skipped", step)
        r.optimizer.zero_grad(set_to_none=True)
        return False, torch.tensor(float("nan")), stop
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
    grad_norm = acc.clip_grad_norm_(r.params, max_norm)
    r.optimizer.step()
    r.lr_scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    _check_finite_weights(r, f"the optimizer step of step {step}")
    return True, grad_norm.detach(), stop


def _check_finite_weights(r: Run, when: str) -> None:
    """Raise :class:`NonFiniteWeights` when a LoRA weight is NaN or infinite (one host sync).

    The weights are the same on every process (the same averaged gradients, the same AdamW), so every process
    raises alike without a collective; the caller writes nothing after it.
    """
    if torch.stack([torch.isfinite(p).all() for p in r.params]).all():
        return
    t, last = r.cfg.train, _last_good(r)
    _close_bar(r)
    raise NonFiniteWeights(
        f"{when} made LoRA weights NaN or infinite (train.learning_rate={t.learning_rate:g}, train.max_grad_norm="
        f"{t.max_grad_norm:g}); stopped without saving them. {_last_good_text(r)} Start a new run (another "
        "train.output_dir) with a lower train.learning_rate or a smaller train.max_grad_norm"
        + (f"; train.resume={last} continues from that checkpoint with the same settings." if last else ".")
    )


def _last_good(r: Run) -> Path | None:
    """The last good checkpoint (finite weights, written after an applied step, or step 0 / resumed), if any."""
    return r.checkpoint_dir / r.last_good if r.last_good and (r.checkpoint_dir / r.last_good).is_dir() else None


def _last_good_text(r: Run) -> str:
    """The sentence naming the last good checkpoint."""
    last = _last_good(r)
    if last is not None:
        return f"The last good checkpoint is {last}."
    return f"No good checkpoint was written (train.checkpoint_every={r.cfg.train.checkpoint_every})."


def _close_bar(r: Run) -> None:
    """Close the progress bar before a one-line error, so the error starts a line of its own."""
    if r.log is not None:
        r.log.close()
        r.log = None


def _all_reduce_grads(r: Run, bad: torch.Tensor, stop: float) -> tuple[bool, bool]:
    """Average the LoRA gradients over processes in one flat all-reduce that also carries the bad-step and stop
    flags; returns ``(bad anywhere, stop anywhere)``. A step is bad where the loss or a reward is non-finite
    (``bad`` > 0) or a LoRA gradient of this process is (checked here, before the average)."""
    acc = r.accelerator
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in r.params]
    nonfinite = torch.stack([~torch.isfinite(g).all() for g in grads]).any().float().to(bad.device)
    flags = torch.stack([bad.reshape(()).float() + nonfinite, torch.tensor(stop, device=bad.device)])  # (2,)
    if acc.num_processes > 1:
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [flags.to(grads[0].device) * acc.num_processes])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(r.params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        flags = flat[-2:]
    bad_any, stop_any = (flags > 0).tolist()  # the one host sync per step: decided identically everywhere
    return bool(bad_any), bool(stop_any)


# --------------------------------------------------------------------------------------------
# Logging and probes
# --------------------------------------------------------------------------------------------


def _finite_mean(scores: torch.Tensor) -> torch.Tensor:
    """(P, N, M) -> (M,) mean over finite entries."""
    flat = scores.reshape(-1, scores.shape[-1])
    ok = torch.isfinite(flat)
    return torch.where(ok, flat, torch.zeros_like(flat)).sum(0) / ok.sum(0)  # NaN for a column with no finite entry


def _accumulate(r: Run, _bad: torch.Tensor, **values: torch.Tensor) -> None:
    for k, v in values.items():
        r.pending[k] = r.pending.get(k, 0) + v.float()
    r.pending["_count"] = r.pending.get("_count", 0) + 1
    r.pending["_bad"] = r.pending.get("_bad", 0) + _bad


def _log(r: Run, step: int, grad_norm: torch.Tensor, step_time: float) -> None:
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
    line: dict = {"step": step, "log_index": r.state.metrics_lines, "steps_run": r.state.steps_run}
    line["loss"] = finite_or_none(values["loss"][0])
    line.update({f"reward/{n}": finite_or_none(v) for n, v in zip(cfg.reward_names, values["rewards"], strict=True)})
    line["lr"] = r.lr_scheduler.get_last_lr()[0]
    line["grad_norm"] = finite_or_none(float(grad_norm))
    line["step_time"] = step_time
    if acc.device.type == "cuda":  # this process's peak since the last logged step (OOM hunting)
        line["peak_memory_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        torch.cuda.reset_peak_memory_stats(acc.device)
    for k in ("n_dominated", "front_size", "ot_unconverged"):
        if k in values:
            line[k] = finite_or_none(values[k][0])
    line.update(bad_steps=r.state.bad_steps, skipped_steps=r.state.skipped_steps)
    line.update(strategy=r.state.agent.strategy, active_rewards=list(r.state.agent.active_rewards))
    if probe and acc.is_main_process:
        line.update(_probe(r, step))
    if acc.is_main_process:
        r.log.write(line, r.state.steps_run)  # trackers' x axis: steps_run, which never goes back
    r.state.metrics_lines += 1


def _probe(r: Run, step: int) -> dict[str, float | None]:
    """JDR / JCR per reward set, win rate, mean, std and KL per reward vs the step-0 model; an image grid."""
    cfg = r.cfg
    texts, ids, idx = probes.probe_set(r.train_ids, r.train_texts, cfg.train.probe_prompts, cfg.train.probe_samples)
    images, scores = probes.sample_and_score(cfg, r.model, r.reward_models, texts, ids, idx, cfg.train.seed)
    _save_probe_grid(r, images, texts, step)
    out = probes.probe_line(scores, r.probe0, cfg.reward_names, probes.reward_sets(cfg))
    for n in cfg.reward_names:
        mean = out[f"probe/mean_{n}"]
        r.state.probe_means.setdefault(n, []).append(math.nan if mean is None else mean)
    return out


def _save_probe_grid(r: Run, images: torch.Tensor, texts: list[str], step: int) -> None:
    s = r.cfg.train.probe_samples
    grid = labelled_grid(
        images, s, row_labels=texts[::s], column_labels=[f"sample {j}" for j in range(s)], title=f"step {step}"
    )
    save_png(grid, r.run_dir / "probes" / f"step-{step:06d}.png")
    r.log.log_images({"probes/grid": grid}, r.state.steps_run)  # trackers (train.log_with), x axis as write()


def _step0_probe(r: Run) -> torch.Tensor | None:
    """Probe reward vectors of the step-0 model, computed once and kept in the run folder (resume reuses them)."""
    cfg = r.cfg
    if cfg.train.probe_every <= 0:
        return None
    path = r.run_dir / "probes" / "step0_scores.safetensors"
    if path.exists():
        return load_file(str(path))["scores"]
    if r.state.step > 0:
        log.warning("no step-0 probe scores in %s; using the base model's", path.parent)
    texts, ids, idx = probes.probe_set(r.train_ids, r.train_texts, cfg.train.probe_prompts, cfg.train.probe_samples)
    with probes.base_model(r.model) if r.state.step > 0 else contextlib.nullcontext():
        _, scores = probes.sample_and_score(cfg, r.model, r.reward_models, texts, ids, idx, cfg.train.seed)
    atomic_write(path, lambda tmp: save_file({"scores": scores.contiguous()}, str(tmp)))
    return scores


# --------------------------------------------------------------------------------------------
# Checkpoints and the agent
# --------------------------------------------------------------------------------------------


def _save_checkpoint(r: Run) -> Path:
    """Write a checkpoint of the current state and prune. One written after a skipped step (``bad_steps`` > 0)
    never prunes the last good checkpoint; one written after an applied step becomes the last good one."""
    if r.running is not None:
        r.state.running = r.running.tolist()
    path = checkpoints.save(r.accelerator, r.checkpoint_dir, r.state, r.params, r.model)  # ends with a barrier
    good = r.state.bad_steps == 0
    protect = [r.state.agent.approved] + ([] if good or r.last_good is None else [r.last_good])
    if r.accelerator.is_main_process:
        checkpoints.prune(r.checkpoint_dir, r.cfg.train.keep_checkpoints, protect=protect)
    r.accelerator.wait_for_everyone()  # pruned before anyone lists or loads checkpoints again
    r.saved_at = (r.state.step, r.state.steps_run)
    if good:
        r.last_good = path.name
    return path


def _rewrite_state(r: Run, name: str) -> None:
    if r.running is not None:
        r.state.running = r.running.tolist()
    if r.accelerator.is_main_process:
        checkpoints.write_state(r.checkpoint_dir / name, r.state)
    r.accelerator.wait_for_everyone()
    r.saved_at = (r.state.step, r.state.steps_run)


def _consult_agent(r: Run) -> None:
    """Ask the agent on the main process, broadcast its decision, apply it on every process (paper appendix D)."""
    acc, cfg, step = r.accelerator, r.cfg, r.state.step
    box: list[dict | None] = [_decide(r, step).to_dict() if acc.is_main_process else None]
    broadcast_object_list(box, from_process=0)  # a collective, outside the main-process branch
    decision, here = Decision.from_dict(box[0]), checkpoints.checkpoint_name(step)
    reverted_to = None
    if cfg.agent.act and decision.action == "remove":
        reverted_to = _revert(r, decision)
    r.state.agent.apply(decision, checkpoint=here, act=cfg.agent.act, reverted_to=reverted_to)
    r.state.decided_at, r.decision_due = r.state.steps_run, False
    if acc.is_main_process:
        _track_decision(r, decision, step, reverted_to)
    if reverted_to is not None:
        r.front = r.store.select(r.state.agent.active_rewards) if r.store is not None else None
        log.info("agent: removed %s at step %d, reverted to %s", decision.reward, step, reverted_to[0])
    _rewrite_state(r, reverted_to[0] if reverted_to is not None else here)


def _track_decision(r: Run, decision: Decision, step: int, reverted_to: tuple[str, int] | None) -> None:
    """The agent's diagnostic grids (``agent/grid-NN``) and its decision at optimizer step ``step``
    (``agent/decision``) to the trackers, at x = ``steps_run`` like the metrics."""
    images = {}
    for path in sorted(Path(decision.log_dir).glob("grid-*.png")) if decision.log_dir else []:
        with Image.open(path) as im:
            images[f"agent/{path.stem}"] = im.convert("RGB")
    if images:
        r.log.log_images(images, r.state.steps_run)
    what = decision.action + (f" {decision.reward}" if decision.reward else "")
    if reverted_to is not None:
        what += f", reverted to {reverted_to[0]}"
    lines = [f"step {step}: {what}" + ("" if r.cfg.agent.act else " (not applied: agent.act=false)")]
    lines += [f"{k}: {v}" for k, v in (("reason", decision.reason), ("error", decision.error)) if v]
    lines += [f"analysis: {decision.analysis}"] if decision.analysis else []
    r.log.log_text({"agent/decision": "\n".join(lines)}, r.state.steps_run)


def _revert(r: Run, decision: Decision) -> tuple[str, int]:
    """Reload the checkpoint a removal reverts to (the one the agent names, else the approved one) on every
    process, delete the newer ones, mark the revert in metrics.jsonl, and keep the run's history; returns
    ``(folder name, step)``."""
    kept = r.state
    approved = kept.agent.approved
    target = checkpoints.checkpoint_name(decision.revert_to) if decision.revert_to is not None else approved
    if not (r.checkpoint_dir / target / checkpoints.STATE_FILE).is_file():
        log.warning("agent: checkpoint %s is gone; reverting to the approved %s instead", target, approved)
        target = approved
    loaded = checkpoints.load(r.accelerator, r.checkpoint_dir / target, r.params)  # LoRA, optimizer, scheduler
    r.last_good = target
    r.accelerator.wait_for_everyone()  # every process has read the target before anything in the folder changes
    line = {"event": "revert", "log_index": kept.metrics_lines, "steps_run": kept.steps_run, "step": kept.step}
    line.update(to_step=loaded.step, checkpoint=target, reward=decision.reward)
    kept.step, kept.bad_steps, kept.skipped_steps = loaded.step, 0, loaded.skipped_steps
    kept.metrics_lines += 1  # the event line, on every process
    if r.accelerator.is_main_process:
        checkpoints.discard_after(r.checkpoint_dir, loaded.step)  # the abandoned branch
        r.log.event(line)
        r.log.rewind(loaded.step)
    return target, loaded.step


def _decide(r: Run, step: int) -> Decision:
    """The agent's decision (main process); any failure is logged and becomes continue."""
    try:
        if r.base_diag is None:
            with probes.base_model(r.model):
                r.base_diag, _ = _diagnostic_images(r)
        current, texts = _diagnostic_images(r)
        return r.agent.decide(
            step, r.base_diag, current, texts, r.state.agent, log_dir=r.run_dir / "agent",
            probe_history=r.state.probe_means,
        )  # fmt: skip
    except Exception as exc:  # a failing agent never stops training
        log.warning("agent failed at step %d (%s: %s); continuing", step, type(exc).__name__, exc)
        return Decision("continue", None, f"agent error: {exc}", "", step=step, error=type(exc).__name__)


def _diagnostic_images(r: Run) -> tuple[torch.Tensor, list[str]]:
    k = min(r.cfg.agent.diagnostic_prompts, len(r.train_ids))
    ids, texts = r.train_ids[:k], r.train_texts[:k]
    seed = r.cfg.agent.diagnostic_seed
    images, _ = probes.sample_and_score(r.cfg, r.model, r.reward_models, texts, ids, [0] * k, seed)
    return images, texts


# --------------------------------------------------------------------------------------------
# Setup and cleanup
# --------------------------------------------------------------------------------------------


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _store_path(cfg: Config) -> Path | None:
    """The store to load, or None (see the module docstring for when a store is needed)."""
    t = cfg.train
    if t.store:
        return Path(t.store)
    return Path(cfg.precompute.store) if objectives.needs_store(t.objective, t.strategy) else None


def _accelerator(cfg: Config) -> Accelerator:
    t = cfg.train
    logging.getLogger("accelerate").setLevel(max(logging.WARNING, logging.getLogger("accelerate").getEffectiveLevel()))
    acc = Accelerator(
        cpu=on_cpu(cfg.model.device),  # gloo on CPU, NCCL on GPUs
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


def _ensure_store(cfg: Config, acc: Accelerator) -> Frontier | None:
    """The frontier store, built first by precompute (on every process of this accelerator) when it is missing
    and ``train.precompute_if_missing`` is set. Another run building the same store is waited for."""
    path = _store_path(cfg)
    if path is None:
        return None
    box = [(path / "meta.json").is_file() and (path / "samples.parquet").is_file()]
    broadcast_object_list(box, from_process=0)  # one decision for every process: build_store is a collective
    if not box[0] and cfg.train.precompute_if_missing:
        if acc.is_main_process:
            print(
                f"frontier store {path} is missing; precomputing it first, or waiting for the run that holds it "
                "(train.precompute_if_missing=true)"
            )
        store_cfg = dataclasses.replace(cfg, precompute=dataclasses.replace(cfg.precompute, store=str(path)))
        precompute.build_store(store_cfg, acc, wait=True)
    return load_store(path)  # says what is missing and how to build it


def _start(cfg: Config, acc: Accelerator) -> run_folder.Start:
    """Decide on the main process, under the folder's lock, how this run uses ``train.output_dir``; every process
    leaves with the same decision (a broadcast) or the same error. The folder is made consistent first."""
    box: list[dict[str, Any] | None] = [None]
    if acc.is_main_process:
        try:
            box[0] = dataclasses.asdict(run_folder.prepare(cfg, acc.num_processes))
        except ConfigError as exc:
            box[0] = dataclasses.asdict(run_folder.Start(problems=exc.problems))
        except ValueError as exc:
            box[0] = dataclasses.asdict(run_folder.Start(problems=[str(exc)]))
        except OSError as exc:  # removing what an attempt left failed: every process stops, none waits for this one
            box[0] = dataclasses.asdict(
                run_folder.Start(problems=[f"train.output_dir={cfg.train.output_dir} cannot be prepared: {exc!r}."])
            )
    broadcast_object_list(box, from_process=0)
    start = run_folder.Start(**box[0])
    if start.problems:
        raise every_process(ConfigError(start.problems))
    return start


def setup(cfg: Config, acc: Accelerator) -> Run:
    """Everything before the first step: the run folder (:func:`_prepare_folder`: fresh, resumed, finished or
    refused), store, model + LoRA, rewards, prompts, optimizer, resume, step-0 probe and checkpoint.

    A finished run (its ``train.max_steps`` checkpoint and final LoRA exist) loads its last checkpoint and
    writes nothing.
    """
    t = cfg.train
    run_dir = Path(t.output_dir)
    start = _start(cfg, acc)
    store = None if start.finished else _ensure_store(cfg, acc)
    model = load_model(cfg.model, device=acc.device)
    set_seed(t.seed)  # the LoRA's random A init: the same on every process and in every run of this config
    params = add_lora(model, cfg.model)
    if store is not None:  # with the model loaded: its fingerprint, shift and sigma schedule too
        sig = sigmas(model, cfg.draft.num_steps, shift=cfg.draft.shift, resolution=cfg.model.resolution)
        problems = compare_settings(
            store.meta, cfg, store=store.path, fingerprint=model.fingerprint,
            default_shift=model.scheduler.config.get("shift"), sigmas=sig.tolist(),
        )  # fmt: skip
        if problems:
            raise every_process(ConfigError(problems))  # the same store and model on every process
    prompt_set = load_prompts(cfg.prompts)
    if cfg.prompts.eval_fraction > 0:
        prompt_set, _ = split(prompt_set, cfg.prompts.eval_fraction, cfg.prompts.split_seed)
    if not prompt_set.prompts:
        raise every_process(
            ValueError(
                f"prompts.path={cfg.prompts.path} gives no training prompts; check prompts.limit and "
                "prompts.eval_fraction."
            )
        )
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
    lr_scheduler = get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
    optimizer, lr_scheduler = acc.prepare(optimizer, lr_scheduler)
    state = TrainerState(agent=AgentState.initial(cfg.rewards, t.active_rewards, t.strategy))
    r = Run(
        cfg=cfg, accelerator=acc, model=model, params=params, optimizer=optimizer, lr_scheduler=lr_scheduler,
        reward_models=rewards.build(cfg.rewards, device=acc.device), train_ids=[int(i) for i in prompt_set.ids],
        train_texts=list(prompt_set.prompts), store=store, run_dir=run_dir, state=state, finished=start.finished,
    )  # fmt: skip
    if store is None and cfg.ot.normalize == "frontier":
        r.running = torch.zeros(1 + 2 * len(cfg.rewards), dtype=torch.float64, device=acc.device)
    if start.resume:
        r.state = checkpoints.load(acc, start.resume, params)
        r.saved_at, r.last_good = (r.state.step, r.state.steps_run), Path(start.resume).name
        if r.running is not None and r.state.running:
            r.running = torch.tensor(r.state.running, dtype=torch.float64, device=acc.device)
        if acc.is_main_process:
            log.info("resumed from %s (step %d)", start.resume, r.state.step)
    if r.finished:
        if acc.is_main_process:
            log.info("the run in %s is complete (step %d); nothing to train", run_dir, r.state.step)
        return r
    r.front = store.select(r.state.agent.active_rewards) if store is not None else None
    every = cfg.agent.every
    r.decision_due = (
        r.agent_on and r.state.step > 0 and r.state.step % every == 0 and r.state.decided_at < r.state.steps_run
    )
    if r.agent_on and acc.is_main_process:
        r.agent = build_agent(cfg.agent, cfg.rewards)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: save_config(cfg, tmp))
        sig = sigmas(model, cfg.draft.num_steps, shift=cfg.draft.shift, resolution=cfg.model.resolution)
        atomic_write_json(
            run_dir / "sigmas.json", {"num_steps": cfg.draft.num_steps, "sigmas": sig.tolist()}, indent=None
        )
        r.probe0 = _step0_probe(r)
        r.log = RunLog(acc, run_dir, t.max_steps, r.state.step, r.state.metrics_lines)
    if t.log_with:
        # TensorBoard drops what an interrupted attempt logged after the checkpoint (x axis: steps_run)
        resumed = {"tensorboard": {"purge_step": r.state.steps_run + 1}} if start.resume else {}
        acc.init_trackers("pgot", config=flatten(dataclasses.asdict(cfg)), init_kwargs=resumed)  # main process
        if acc.is_main_process:
            r.log.log_config((run_dir / "config.yaml").read_text())
    acc.wait_for_everyone()
    if r.agent_on and not checkpoints.list_checkpoints(r.checkpoint_dir):
        _save_checkpoint(r)  # step 0: what a removal reverts to before the agent approved anything
        r.state.agent.approved = checkpoints.checkpoint_name(0)
        _rewrite_state(r, checkpoints.checkpoint_name(0))
    return r


def cleanup(r: Run) -> None:
    """Final LoRA in the diffusers format (written atomically: ``final/`` is complete or absent) and, when asked,
    the tuned-vs-base table (:func:`_final_table`, also sent to the trackers). A finished run's rerun only prints
    the table."""
    acc = r.accelerator
    if not r.finished:  # on every process alike: never a NaN final/ (an invariant: _update stops first)
        _check_finite_weights(r, "training")
    if acc.is_main_process:
        if r.log is not None:
            r.log.close()
        if not r.finished:
            tmp, final = r.run_dir / ".tmp-final", r.run_dir / "final"
            shutil.rmtree(tmp, ignore_errors=True)
            save_lora(r.model, tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        if r.cfg.train.final_eval:
            table = _final_table(r)
            print(table, flush=True)
            if r.log is not None:
                r.log.log_text({"final/table": table}, r.state.steps_run)
        log.info("run folder: %s", r.run_dir)
    acc.wait_for_everyone()


def _final_prompts(r: Run) -> tuple[list[int], list[str], str]:
    """(ids, texts, which) of the end-of-training table: the held-out split of ``prompts.eval_fraction`` when there is
    one (``which="held-out"``), else the training prompts (``which="training"``)."""
    cfg = r.cfg
    if cfg.prompts.eval_fraction > 0:
        _, held = split(load_prompts(cfg.prompts), cfg.prompts.eval_fraction, cfg.prompts.split_seed)
        if held.prompts:
            return [int(i) for i in held.ids], list(held.prompts), "held-out"
    return r.train_ids, r.train_texts, "training"


def _final_table(r: Run) -> str:
    """The tuned model against the base model (LoRA off), markdown: :func:`pgot.tables.comparison_markdown`.

    The first ``train.final_eval_prompts`` prompts of the held-out split (``prompts.eval_fraction``; else of the
    training prompts), ``train.final_eval_samples`` seeds each (sample indices 0.., noise from ``train.seed``), the
    same noise for both models. Rates and means come from :func:`pgot.metrics.comparison_table` and
    :func:`pgot.metrics.mean_score_table` on float64 scores, with ``eval.bootstrap`` percentile bootstrap intervals
    over prompts at ``eval.confidence``; pairs with a non-finite reward are counted (JDR / JCR definitions under it).
    With ``eval.ground_truth`` both models' images are judged too (:func:`pgot.evaluate.ground_truth_quality`) and the
    table gains mean quality, quality change, improved / fell and the hacked rate of each reward set
    (:func:`pgot.metrics.ground_truth_table`); prompts the judge cannot read leave those lines out, with a warning.
    """
    cfg, names, t = r.cfg, r.cfg.reward_names, r.cfg.train
    ids, texts, which = _final_prompts(r)
    texts, ids, idx = probes.probe_set(ids, texts, t.final_eval_prompts, t.final_eval_samples)
    tuned_images, tuned = probes.sample_and_score(cfg, r.model, r.reward_models, texts, ids, idx, t.seed)
    with probes.base_model(r.model):
        base_images, base = probes.sample_and_score(cfg, r.model, r.reward_models, texts, ids, idx, t.seed)
    scores, groups, sets = {"base": base.double(), "tuned": tuned.double()}, torch.tensor(ids), probes.reward_sets(cfg)
    boot = {"num_resamples": cfg.eval.bootstrap, "confidence": cfg.eval.confidence, "seed": t.seed}
    rates = metrics.comparison_table(scores, groups, "base", names, sets, **boot)
    truth, columns, kind = None, list(names), cfg.eval.ground_truth
    problems = ground_truth_problems(cfg, texts)
    for line in problems:
        log.warning("%s The end-of-training table has no ground-truth lines.", line)
    if kind != "none" and not problems:
        quality = {"base": ground_truth_quality(kind, base_images, texts)}
        quality["tuned"] = ground_truth_quality(kind, tuned_images, texts)
        truth = metrics.ground_truth_table(
            scores, quality, groups, "base", names, sets, tol=cfg.eval.quality_tol, **boot
        )
        scores = {m: torch.cat([s, quality[m][:, None]], dim=1) for m, s in scores.items()}  # means with quality
        columns.append(metrics.QUALITY)
    means = metrics.mean_score_table(scores, {"base": groups, "tuned": groups}, columns, **boot)
    n_prompts = len(dict.fromkeys(ids))
    title = (
        f"tuned vs base: {len(ids)} pairs, {n_prompts} {which} prompts x {t.final_eval_samples} seeds "
        f"(train.final_eval_prompts={t.final_eval_prompts}, train.final_eval_samples={t.final_eval_samples}"
        + (", no held-out split: prompts.eval_fraction=0" if which == "training" else "")
        + ")"
    )
    return tables.comparison_markdown(
        rates, means, names, sets, baseline="base", candidate="tuned", ci=cfg.eval.bootstrap > 0,
        confidence=cfg.eval.confidence, title=title, ground_truth=truth,
    )  # fmt: skip
