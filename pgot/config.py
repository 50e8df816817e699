"""Typed configuration for every pgot stage.

A config is a tree of dataclasses. YAML files and ``key=value`` overrides are read with
:func:`load_config`, which coerces values by field type, rejects unknown keys with a "did you
mean", checks ranges, and reports every problem at once in one :class:`ConfigError`.

Keys equal the keyword names of the functions they feed (``ot.epsilon`` -> ``epsilon=``). Every field
carries a one-line docstring; :func:`describe_keys` reads them back (``pgot-train --list-keys``).

The configs shipped with pgot (the repository's ``configs/`` folder, installed as the package
``pgot.configs``) are found by name: ``load_config("debug")``, ``load_config("baselines/weighted_1111")``
(:func:`find_config`, :func:`config_names`).

This module reads YAML and nothing else: checks that need files, models or the environment are
:mod:`pgot.preflight`'s.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ANALYTIC_REWARDS",
    "LEARNED_REWARDS",
    "REWARD_NAMES",
    "TESTBED_REWARDS",
    "AgentConfig",
    "Config",
    "ConfigError",
    "DraftConfig",
    "EvalConfig",
    "EvalModelConfig",
    "ModelConfig",
    "OTConfig",
    "PrecomputeConfig",
    "PromptsConfig",
    "RewardConfig",
    "TrainConfig",
    "check",
    "check_sampler",
    "config_names",
    "config_to_dict",
    "configs_dir",
    "describe_keys",
    "field_docs",
    "UniqueKeyLoader",
    "load_yaml",
    "yaml_error",
    "find_config",
    "KeyDoc",
    "known_reward_names",
    "load_config",
    "plain",
    "save_config",
    "unknown_reward",
    "validate",
]

LEARNED_REWARDS = ("clip", "ict", "hp", "hps", "pickscore", "imagereward", "aesthetic")
"""Rewards with weights (:mod:`pgot.rewards.clip`, :mod:`pgot.rewards.hps`, :mod:`pgot.rewards.imagereward`)."""
ANALYTIC_REWARDS = ("brightness", "colorfulness", "contrast", "saturation", "sharpness")
"""Rewards computed from the pixels alone (:mod:`pgot.rewards.analytic`)."""
TESTBED_REWARDS = ("tb_align", "tb_pref")
"""The reward-hacking testbed's learned preference models (:mod:`pgot.testbed.proxies`)."""
REWARD_NAMES = LEARNED_REWARDS + ANALYTIC_REWARDS + TESTBED_REWARDS
"""The names of ``pgot.rewards.REWARDS``, known without importing the reward models (checked there at import)."""


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` lists them, one line each.

    ``config`` is the config as far as it could be built (fields that failed to coerce hold their defaults), or
    None when there is none (a missing file, bad YAML): the CLI runs the file checks on it too, so one command
    reports every problem.
    """

    def __init__(self, problems: list[str], config: Config | None = None):
        self.problems = list(problems)
        self.config = config
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The SD3 / SD3.5 base model and its LoRA."""

    path: str = ""
    """Local diffusers folder of SD3 / SD3.5, a hub id already in the local hub cache (``pgot-fetch`` puts it there), or ``builtin:testbed`` (the reward-hacking testbed's tiny SD3 shipped with pgot). Ignored when ``tiny``."""
    tiny: bool = False
    """Build a small random SD3 (no weights needed) for tests and the CPU demo."""
    tiny_seed: int = 0
    """Seed of the tiny model's random weights."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of the frozen model: ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda[:i]``; a named device must exist on this machine
    (the preflight refuses it otherwise). In training, accelerate places each process on its own device."""
    resolution: int = 1024
    """Image height and width in pixels (a multiple of 16)."""
    use_t5: bool = True
    """Load the T5 text encoder (SD3 works without it, at some cost in prompt following)."""
    max_sequence_length: int = 256
    """Token length of the T5 prompt embedding."""
    lora_rank: int = 32
    """LoRA rank r."""
    lora_alpha: float = 64.0
    """LoRA alpha (scale = alpha / r)."""
    lora_target_modules: list[str] = field(
        default_factory=lambda: [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
        ]
    )
    """Module names of the transformer that get LoRA adapters."""
    lora_init: Literal["gaussian", "zeros"] = "gaussian"
    """LoRA B init: ``gaussian`` as in diffusers' SD3 examples; A is always random."""
    lora_path: str = ""
    """A LoRA file or folder (diffusers, peft or kohya naming) to load before training or sampling (empty: none)."""
    allow_lora_transfer: bool = False
    """Load ``model.lora_path`` even when the file records another base model than this one (``pgot_base_fingerprint``
    differs): for deliberate transfers of a LoRA to another base. Off: such a LoRA is an error."""
    gradient_checkpointing: bool = True
    """Recompute transformer activations in the backward pass to save memory."""
    vae_gradient_checkpointing: bool = False
    """Recompute VAE decoder activations in the backward pass (large images)."""
    embedding_cache: str = ""
    """Folder for cached prompt embeddings (empty: in memory only)."""


@dataclass
class DraftConfig:
    """The sampler and how gradients flow through it (DRaFT-K, Clark et al. 2024; ReFL, Xu et al. 2023)."""

    num_steps: int = 4
    """Number of Euler steps of the flow-matching sampler (SD3.5-Large-Turbo: 4)."""
    k: int = 1
    """Number of final steps run with gradients (DRaFT-K); 0 means no gradient at all."""
    guidance_scale: float = 0.0
    """Classifier-free guidance; 0 or 1 disables it (Turbo models are trained for 0)."""
    method: Literal["draft_k", "refl"] = "draft_k"
    """``draft_k``: backprop through the last ``k`` steps. ``refl``: stop at a random late step and backprop through a one-step clean-latent prediction."""
    refl_min_step: int | None = None
    """ReFL: earliest step at which to stop, in [0, draft.num_steps - 1] (null: ``num_steps // 2``)."""
    shift: float | None = None
    """Time shift of the flow-matching schedule (null: the model's scheduler config; SD3.5: 3.0)."""


def check_sampler(
    num_steps: int, k: int, method: str, refl_min_step: int | None, shift: float | None, *, training: bool = False
) -> list[str]:
    """The sampler's rules, in one place (config validation and :func:`pgot.generate.sample` both call it).

    Args:
        num_steps: T, Euler steps (``draft.num_steps``).
        k: final steps with gradients (``draft.k``): in [0, T]; at least 1 to train with ``draft_k``.
        method: ``draft_k`` or ``refl``.
        refl_min_step: earliest ReFL stopping step, in [0, T - 1], or None.
        shift: schedule shift (> 0) or None.
        training: apply the training rule (``draft_k`` needs k >= 1 to give a gradient).

    Returns:
        One line per problem, naming the config keys (empty when all is well).
    """
    p = []
    if num_steps < 1:
        p.append(f"draft.num_steps must be >= 1, got {num_steps}.")
    if method not in ("draft_k", "refl"):
        p.append(f"draft.method must be draft_k or refl, got {method!r}.")
    if not 0 <= k <= max(num_steps, 0):
        p.append(
            f"draft.k must be in [0, draft.num_steps={num_steps}], got {k}. Lower draft.k or raise draft.num_steps."
        )
    elif training and method == "draft_k" and k < 1:
        p.append(f"draft.k={k} gives no gradient to train on. Set draft.k between 1 and draft.num_steps={num_steps}.")
    if refl_min_step is not None and not 0 <= refl_min_step <= num_steps - 1:
        p.append(
            f"draft.refl_min_step must be in [0, draft.num_steps - 1 = {num_steps - 1}] or null, got {refl_min_step}."
        )
    if shift is not None and not shift > 0:
        p.append(f"draft.shift must be > 0 or null (the model's own shift), got {shift}.")
    return p


@dataclass
class RewardConfig:
    """One reward model."""

    name: str = ""
    """Registry name: clip, ict, hp, hps, pickscore, imagereward, aesthetic, colorfulness, contrast, saturation, brightness, sharpness."""
    path: str = ""
    """Checkpoint file or folder; ``tiny`` for a random-init tiny build; empty for analytic rewards."""
    arch: str = ""
    """Architecture override (e.g. ``ViT-L-14`` for clip); empty for the reward's default."""
    strength: Literal["strong", "weak"] | None = None
    """``strong`` (tracks human judgement) or ``weak`` (prone to hacking): the agent may only remove weak rewards (unless agent.allow_remove_strong), and the online strategy is meant for strong ones. null: the reward's default from pgot.rewards.STRENGTHS (ict, hp strong; clip, hps, pickscore, imagereward, aesthetic and the analytic rewards weak; a reward pgot does not know: weak)."""
    weight: float = 1.0
    """Weight w_k in weighted baselines."""
    target: float | None = None
    """Global target C_k of the weighted_sum baseline (eq. 1); null: the store's maximum of this reward (train.store), which train.target_form hinge or squared then needs."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: ``auto`` is bfloat16 on CUDA and float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute the reward towers' activations in the backward pass."""
    tiny_seed: int = 0
    """Seed of the tiny random build."""
    text_cache: int = 1024
    """Prompt text embeddings kept in memory per reward and reused across steps (0: recompute every call)."""


@dataclass
class OTConfig:
    """Entropic optimal transport (log-domain Sinkhorn, POT)."""

    epsilon: float = 0.5
    """Entropic regularisation, in the units of the (normalised) squared reward distances; about 0.05-0.1 of the typical cost converges in a few hundred iterations (smaller is sharper but slower)."""
    max_iter: int = 1000
    """Sinkhorn iterations at most."""
    tol: float = 1e-4
    """Marginal error at which Sinkhorn stops; above it after ot.max_iter iterations a warning names ot.epsilon and ot.max_iter."""
    normalize: Literal["none", "frontier"] = "frontier"
    """``frontier``: divide rewards by the per-reward standard deviation stored with the frontier before the cost; ``none``: raw rewards."""


@dataclass
class PromptsConfig:
    """Where prompts come from."""

    path: str = "builtin:demo"
    """A .txt (one per line), .csv, .jsonl or .parquet file; ``builtin:demo`` for the prompts shipped with pgot."""
    column: str = "prompt"
    """Column holding the prompt text in .csv, .jsonl and .parquet files."""
    limit: int = 0
    """Use only the first ``limit`` prompts (0: all)."""
    eval_fraction: float = 0.0
    """Fraction of prompts held out as the eval split."""
    split_seed: int = 0
    """Seed of the train/eval split."""


@dataclass
class PrecomputeConfig:
    """The offline Pareto frontier of the base model (``pgot-precompute``)."""

    store: str = "runs/frontier"
    """Output folder of the frontier store (samples.parquet + meta.json)."""
    samples_per_prompt: int = 50
    """N: base-model samples per prompt (paper: 50)."""
    batch_size: int = 8
    """Images generated per forward pass."""
    seed: int = 0
    """Seed of the initial noise: sample (prompt_id, i) uses noise from (seed, prompt_id, i)."""
    save_images: bool = False
    """Also save every sample as a PNG in the store."""


@dataclass
class TrainConfig:
    """LoRA training (``pgot-train``)."""

    output_dir: str = "runs/train"
    """Run folder: config.yaml, metrics.jsonl, checkpoints/, agent/, final/."""
    objective: Literal["pgot", "single_reward", "weighted_sum", "hetero_weighted_sum", "separate_constraints"] = "pgot"
    """The loss: PG-OT or one of the paper's baselines."""
    target_form: Literal["linear", "hinge", "squared"] = "squared"
    """How weighted_sum (global targets) and hetero_weighted_sum (per-prompt bounds) compare the weighted gap g = sum_k w_k (C_k - r_k): ``linear`` g (DRaFT; the target never reaches the gradient, so both train the same model), ``hinge`` relu(g) (ReFL), ``squared`` g^2 (the paper's separate constraints); only these two objectives read it."""
    strategy: Literal["offline", "online", "auto"] = "offline"
    """PG-OT strategy: offline (precomputed fronts), online (gathered dominating sets), auto (offline until the agent switches to online; needs an agent, so agent.backend=none is refused)."""
    active_rewards: list[str] = field(default_factory=list)
    """Rewards that drive the loss (empty: all); the others are still scored and logged."""
    reduction: Literal["mean", "sum"] = "mean"
    """How per-prompt (offline) or per-sample (online) costs are combined; the paper sums online costs."""
    prompts_per_step: int = 2
    """P: prompts per process per optimizer micro-step."""
    samples_per_prompt: int = 4
    """N: samples per prompt per process."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    max_steps: int = 1000
    """Optimizer steps."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """accelerate mixed precision."""
    seed: int = 0
    """Seed of prompts order and sample noise."""
    store: str = ""
    """Frontier store for the offline strategy and heterogeneous baselines (default: precompute.store)."""
    precompute_if_missing: bool = False
    """Run pgot-precompute first when the store does not exist."""
    log_every: int = 1
    """Steps between metrics.jsonl lines."""
    probe_every: int = 100
    """Steps between probes (JDR/JCR vs the step-0 model on fixed prompts and seeds); 0: off."""
    probe_prompts: int = 8
    """Number of probe prompts (the first ones of the prompt set)."""
    probe_samples: int = 2
    """Samples per probe prompt."""
    reward_sets: dict[str, list[str]] = field(default_factory=dict)
    """Named reward sets for probe JDR/JCR (default: all rewards as ``all``)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0: only the final weights)."""
    keep_checkpoints: int = 3
    """Checkpoints kept (older ones are deleted; agent-approved ones are kept)."""
    resume: str = ""
    """``latest`` (the newest checkpoint in train.output_dir; a fresh start when there is none), a checkpoint folder to continue from, or empty (start fresh)."""
    max_bad_steps: int = 5
    """Consecutive skipped steps (a NaN/inf loss, reward or LoRA gradient) after which training stops."""
    log_with: list[str] = field(default_factory=list)
    """accelerate trackers, tensorboard and / or wandb (pip install wandb): the numbers of metrics.jsonl, the probe grids, the agent's grids and decisions, the final table and the resolved config."""
    final_eval: bool = True
    """At the end, print the tuned model against the base model (JDR / JCR per reward set, win rate and mean per reward, bootstrap intervals over prompts, non-finite pairs) on the held-out prompts (prompts.eval_fraction), else on the training prompts."""
    final_eval_prompts: int = 64
    """Prompts in the end-of-training table: the first ones of the held-out split (of the training prompts without one)."""
    final_eval_samples: int = 2
    """Seeds per prompt in the end-of-training table (sample indices 0.. with train.seed; pairs = prompts x seeds)."""


@dataclass
class AgentConfig:
    """The VLM decision agent (paper section 3.3, appendix D)."""

    backend: Literal["none", "openai", "scripted", "heuristic"] = "none"
    """``openai``: an OpenAI-compatible chat-completions endpoint; ``scripted``: decisions from a YAML file; ``heuristic``: a probe-score z-score detector (no VLM; a weak fallback, paper D.4); ``none``: off."""
    every: int = 100
    """Steps between decisions."""
    act: bool = True
    """Apply decisions (true) or only log them (false)."""
    base_url: str = "https://api.openai.com/v1"
    """Chat-completions endpoint root."""
    model: str = "gpt-4o"
    """Model name sent to the endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (the key itself never goes in a config)."""
    timeout: float = 60.0
    """Seconds per request."""
    max_retries: int = 3
    """Retries with exponential backoff after an HTTP error or timeout."""
    retry_backoff: float = 1.0
    """Seconds before the first retry; doubled after each one (a 429's Retry-After is honoured up to 60 s)."""
    temperature: float = 0.0
    """Sampling temperature sent to the endpoint."""
    max_tokens: int = 1024
    """Reply length limit sent to the endpoint (0: leave it to the server; raise it for thinking models)."""
    image_size: int = 512
    """Pixel size of each image tile in the diagnostic grids sent to the VLM."""
    heuristic_z: float = 3.0
    """``heuristic`` backend: remove the weak reward whose latest probe mean moved more than this many standard deviations of its earlier probe means."""
    cost_limit: float = 10.0
    """Dollars per run after which the agent stops calling the endpoint (0: no limit)."""
    price_per_1k_input: float = 0.0025
    """Dollars per 1000 input tokens (for the cost limit)."""
    price_per_1k_output: float = 0.01
    """Dollars per 1000 output tokens."""
    script: str = ""
    """YAML file of scripted decisions keyed by step."""
    knowledge: dict[str, str] = field(default_factory=dict)
    """Collapse signature per reward, overriding the paper's D.1 texts."""
    references: dict[str, str] = field(default_factory=dict)
    """Reference image (PNG/JPEG path) of each reward's mild collapse, shown to the VLM next to its signature (paper D.2 (ii))."""
    diagnostic_prompts: int = 4
    """Number of diagnostic prompts (the first ones of the prompt set)."""
    diagnostic_seed: int = 1234
    """Seed of the diagnostic samples."""
    allow_remove_strong: bool = False
    """Let the agent remove rewards marked strong."""


@dataclass
class EvalModelConfig:
    """One model to evaluate."""

    name: str = ""
    """Label used in tables and figures."""
    lora: str = ""
    """A diffusers LoRA file, a folder holding one, or a pgot run folder (uses final/); empty: the base model."""
    soup: dict[str, float] = field(default_factory=dict)
    """Reward soup: LoRA path -> weight, merged at inference (overrides ``lora``)."""
    lora_scale: float = 1.0
    """Scale applied to the LoRA."""
    allow_lora_transfer: bool = False
    """Apply this model's ``lora`` / ``soup`` files even when they record another base model than ``model``
    (``pgot_base_fingerprint`` differs): for deliberate transfers. Off: such a LoRA is an error."""

    def resolved_name(self, index: int) -> str:
        """The label of the ``index``-th model: ``name``, else one derived from its LoRA path or soup.

        ``runs/x``, ``runs/x/final`` and ``runs/x/final/pytorch_lora_weights.safetensors`` give ``x``; ``y.safetensors``
        gives ``y``; a soup ``soup-<w1>:<w2>``; no LoRA ``base`` (first model) or ``model<index>``.
        """
        if self.name:
            return self.name
        if self.soup:
            return "soup-" + ":".join(f"{w:g}" for w in self.soup.values())
        if self.lora:
            p = Path(self.lora)
            if p.suffix == ".safetensors":
                if not p.name.startswith("pytorch_lora_weights"):
                    return p.stem
                p = p.parent
            return p.parent.name if p.name == "final" else p.name
        return "base" if index == 0 else f"model{index}"


@dataclass
class EvalConfig:
    """Evaluation (``pgot-eval``)."""

    output_dir: str = "runs/eval"
    """Evaluation folder: scores.parquet, results.md/.csv/.tex, figures/."""
    models: list[EvalModelConfig] = field(default_factory=list)
    """Models to compare."""
    baseline: str = ""
    """Name of the baseline model (default: the first one)."""
    samples_per_prompt: int = 1
    """Samples per prompt and model."""
    seed: int = 0
    """Seed of the shared initial noise."""
    batch_size: int = 4
    """Images per forward pass (identical for every model)."""
    manifest: str = ""
    """Rescore images on disk instead of generating: a .csv/.jsonl/.parquet (or a folder holding manifest.*) with columns model, prompt (or prompt_id), seed and/or sample_index, path (relative to the manifest)."""
    reward_sets: dict[str, list[str]] = field(
        default_factory=lambda: {"JDR2": ["ict", "hp"], "JDR4": ["ict", "hp", "clip", "hps"]}
    )
    """Named reward sets for JDR and JCR (sets naming unconfigured rewards are an error)."""
    bootstrap: int = 1000
    """Bootstrap resamples (over prompts) for confidence intervals (0: none); also those of pgot-train's end-of-training table."""
    confidence: float = 0.95
    """Confidence level of the intervals (pgot-eval and the end-of-training table)."""
    scatter_rewards: list[str] = field(default_factory=list)
    """Two rewards for the per-prompt Pareto scatter (default: the first two)."""
    figure_prompts: int = 4
    """Prompts shown in per-prompt figures."""
    runs: list[str] = field(default_factory=list)
    """Training run folders whose metrics.jsonl gives JDR/JCR curves."""
    save_images: bool = False
    """Save generated images under the evaluation folder."""
    preference_data: str = ""
    """Pairs with a human choice (parquet or manifest) for reward preference accuracy (Table 1)."""
    study_pairs: int = 0
    """Write a user-study page with this many randomised pairs per candidate (0: none)."""
    study_image_size: int = 512
    """Longest side in pixels of the images embedded in the user-study page (JPEG); 0: embed the files unchanged."""
    votes: list[str] = field(default_factory=list)
    """Vote files downloaded from the user-study page, to tally."""
    ground_truth: Literal["none", "testbed"] = "none"
    """``testbed``: the world has a ground truth, the reward-hacking testbed's judge (pgot.testbed.judge). Every generated (or rescored) image is also judged (a ``quality`` column in scores.parquet, never a training reward), and the tables of pgot-eval and pgot-train's end-of-training table gain ground-truth columns against the baseline: change in mean quality, share of pairs whose quality improved or fell, and the hacked rate of each reward set (pairs that dominate the baseline on every reward of the set while their quality fell by more than eval.quality_tol). Needs model.resolution=32 and prompts of the testbed grammar (prompts.path=builtin:testbed). ``none``: no ground truth."""
    quality_tol: float = 0.001
    """With eval.ground_truth: a pair's ground-truth quality (in [0, 1]) improved when it rose by more than this, fell when it dropped by more than this (robust to float noise; nearly equal pairs are neither)."""


@dataclass
class Config:
    """A whole pgot configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    """The reward models, in the order of the reward-vector columns."""
    ot: OTConfig = field(default_factory=OTConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def reward_names(self) -> list[str]:
        return [r.name for r in self.rewards]


# --------------------------------------------------------------------------------------------
# Validation beyond types
# --------------------------------------------------------------------------------------------

INF_ALLOWED = "``inf``"
"""A float field whose docstring contains this marker (e.g. "``inf``: no limit") may be +inf; every other float
config value must be finite (:func:`_check_finite`)."""


def _check_finite(obj: Any, prefix: str = "") -> list[str]:
    """One line per float config value that is NaN or infinite, walking every field of the dataclass tree ``obj``.

    The rule is generic: every ``float`` anywhere in the config (list items as ``rewards.2.weight``, mapping values as
    ``eval.models.0.soup.<key>``) must be finite, unless its field's docstring contains :data:`INF_ALLOWED` (then
    +inf is allowed, NaN and -inf are not). A non-finite value would pass most range checks (``inf > 0``) and fail
    only later (AdamW's "Invalid weight_decay value: nan") or silently (an infinite learning rate).
    """
    problems: list[str] = []
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        doc = docs.get(f.name, "")
        problems.extend(_finite_value(getattr(obj, f.name), key, doc, INF_ALLOWED in doc, f))
    return problems


def _finite_value(value: Any, key: str, doc: str, inf_ok: bool, f: dataclasses.Field) -> list[str]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _check_finite(value, f"{key}.")
    if isinstance(value, (list, tuple)):
        return [q for i, v in enumerate(value) for q in _finite_value(v, f"{key}.{i}", doc, inf_ok, f)]
    if isinstance(value, dict):
        return [q for k, v in value.items() for q in _finite_value(v, f"{key}.{k}", doc, inf_ok, f)]
    if not isinstance(value, float) or math.isfinite(value) or (inf_ok and value == math.inf):
        return []
    default = f.default if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) else None
    hint = f"e.g. the default {key}={default}" if default is not None else f"e.g. {key}=1.0"
    what = f" {key}: {plain(doc)}" if doc else ""
    allowed = "a finite number or inf" if inf_ok else "a finite number"
    return [f"{key} must be {allowed}, got {value}. Set a finite value ({hint}).{what}"]


def _check_ranges(cfg: Config) -> list[str]:
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    m, d, t, o = cfg.model, cfg.draft, cfg.train, cfg.ot
    need(
        m.tiny or bool(m.path),
        "model.path is empty. Set model.path to a local SD3/SD3.5 diffusers folder, or model.tiny=true for the tiny random model.",
    )
    need(
        m.resolution > 0 and m.resolution % 16 == 0,
        f"model.resolution must be a positive multiple of 16, got {m.resolution}.",
    )
    need(m.lora_rank >= 1, f"model.lora_rank must be >= 1, got {m.lora_rank}.")
    need(m.lora_alpha > 0, f"model.lora_alpha must be > 0, got {m.lora_alpha}.")
    p.extend(check_sampler(d.num_steps, d.k, d.method, d.refl_min_step, d.shift))
    need(d.guidance_scale >= 0, f"draft.guidance_scale must be >= 0, got {d.guidance_scale}.")
    need(o.epsilon > 0, f"ot.epsilon must be > 0, got {o.epsilon}.")
    need(o.max_iter >= 1, f"ot.max_iter must be >= 1, got {o.max_iter}.")
    need(o.tol > 0, f"ot.tol must be > 0, got {o.tol}.")
    need(cfg.prompts.limit >= 0, f"prompts.limit must be >= 0, got {cfg.prompts.limit}.")
    need(
        0.0 <= cfg.prompts.eval_fraction < 1.0,
        f"prompts.eval_fraction must be in [0, 1), got {cfg.prompts.eval_fraction}.",
    )
    need(
        cfg.precompute.samples_per_prompt >= 1,
        f"precompute.samples_per_prompt must be >= 1, got {cfg.precompute.samples_per_prompt}.",
    )
    need(cfg.precompute.batch_size >= 1, f"precompute.batch_size must be >= 1, got {cfg.precompute.batch_size}.")
    need(t.prompts_per_step >= 1, f"train.prompts_per_step must be >= 1, got {t.prompts_per_step}.")
    need(t.samples_per_prompt >= 1, f"train.samples_per_prompt must be >= 1, got {t.samples_per_prompt}.")
    need(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}.")
    need(t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}.")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}.")
    need(
        t.gradient_accumulation_steps >= 1,
        f"train.gradient_accumulation_steps must be >= 1, got {t.gradient_accumulation_steps}.",
    )
    need(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {t.max_grad_norm}.")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}.")
    need(t.probe_every >= 0, f"train.probe_every must be >= 0, got {t.probe_every}.")
    need(t.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0, got {t.checkpoint_every}.")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}.")
    need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}.")
    need(t.final_eval_prompts >= 1, f"train.final_eval_prompts must be >= 1, got {t.final_eval_prompts}.")
    need(t.final_eval_samples >= 1, f"train.final_eval_samples must be >= 1, got {t.final_eval_samples}.")
    for tracker in t.log_with:
        need(tracker in ("tensorboard", "wandb"), f"train.log_with may name tensorboard or wandb, got {tracker!r}.")
    need(cfg.agent.every >= 1, f"agent.every must be >= 1, got {cfg.agent.every}.")
    need(cfg.agent.timeout > 0, f"agent.timeout must be > 0, got {cfg.agent.timeout}.")
    need(cfg.agent.max_retries >= 0, f"agent.max_retries must be >= 0, got {cfg.agent.max_retries}.")
    need(cfg.agent.cost_limit >= 0, f"agent.cost_limit must be >= 0, got {cfg.agent.cost_limit}.")
    if cfg.agent.backend == "scripted":
        need(
            bool(cfg.agent.script), "agent.backend=scripted needs agent.script, a YAML file of decisions keyed by step."
        )
    e = cfg.eval
    need(e.samples_per_prompt >= 1, f"eval.samples_per_prompt must be >= 1, got {e.samples_per_prompt}.")
    need(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}.")
    need(e.bootstrap >= 0, f"eval.bootstrap must be >= 0, got {e.bootstrap}.")
    need(0 < e.confidence < 1, f"eval.confidence must be in (0, 1), got {e.confidence}.")
    need(
        0.0 <= e.quality_tol < 1.0,
        f"eval.quality_tol must be in [0, 1) (ground-truth quality is in [0, 1]), got {e.quality_tol}.",
    )

    names = cfg.reward_names
    known = known_reward_names()
    for i, r in enumerate(cfg.rewards):
        need(bool(r.name), f"rewards.{i}.name is empty. Name a reward, e.g. rewards.{i}.name=clip.")
        need(not r.name or r.name in known, unknown_reward(i, r.name, known))
    dup = sorted({n for n in names if names.count(n) > 1})
    need(not dup, f"rewards lists {', '.join(dup)} more than once; each reward may appear once.")
    # a reward named right here but mistyped in rewards is that typo's line (a "did you mean"), not one more
    typo = any(n and n not in known for n in names)
    for n in t.active_rewards:
        need(
            n in names or (typo and n in known),
            f"train.active_rewards names {n!r}, which is not in rewards ({', '.join(names) or 'none'}).{_did_you_mean(n, names)}",
        )
    model_names = [mm.resolved_name(i) for i, mm in enumerate(e.models)]
    if e.baseline and model_names and not e.manifest:  # with a manifest, the models come from its model column
        need(
            e.baseline in model_names,
            f"eval.baseline is {e.baseline!r}, not one of eval.models ({', '.join(model_names)}).",
        )
    return p


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _did_you_mean(key: str, options: typing.Iterable[str], prefix: str = "") -> str:
    """`` Did you mean 'x'?`` for the option closest to ``key`` ('' when none is close); ``prefix`` (``train.``) is
    put before the suggestion, so it names the full dotted key as typed."""
    options = list(options)
    # a transposition (hsp for hps) first: difflib's ratio prefers a shorter name that shares a prefix (hp)
    close = [o for o in options if sorted(o) == sorted(key) and o != key]
    close = close or difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" Did you mean {prefix + close[0]!r}?" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a repeated key: PyYAML would keep the last value silently
    (two ``epsilon:`` under ``ot:``). Merge keys (``<<``) may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not key_node:
                    m = first.start_mark
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first at line {m.line + 1}, column {m.column + 1}); YAML would keep "
                        "only the last value. Remove one of them",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``text`` read as YAML by :class:`UniqueKeyLoader`: the one loader of every YAML pgot reads as a config
    (config files, ``key=value`` overrides, ``agent.script``).

    Raises:
        yaml.YAMLError: not valid YAML, or a mapping with a repeated key (a ``MarkedYAMLError`` with its position).
    """
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_error(exc: yaml.YAMLError, path: str | Path) -> str:
    """``file:line:col: problem (context at line:col)`` for a YAML error in the file ``path``, on one line."""
    return "{}: {}".format(*_yaml_where(exc, path))


def _yaml_where(exc: yaml.YAMLError, path: str | Path) -> tuple[str, str]:
    """(``file:line:col``, what is wrong) of a YAML error in the file ``path``."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(path), str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    mark, ctx = exc.problem_mark or exc.context_mark, exc.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = exc.problem or "unreadable"
    if exc.context:
        at = f" at {ctx.line + 1}:{ctx.column + 1}" if ctx is not None and ctx is not mark else ""
        what += f" ({exc.context}{at})"
    return where, what


def _yaml_value(text: str, key: str, what: str, problems: list[str]) -> Any:
    """``text`` (a list or mapping typed on the command line) read as YAML; None and a problem when it is not."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at column {mark.column + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or "unreadable"
        example = "[a, b]" if what == "a list" else "{name: [a, b]}"
        problems.append(
            f"{key} must be {what}, got {text!r}, which is not valid YAML ({why}{at}). Quote it whole, e.g. {key}='{example}'."
        )
        return None


def _coerce(value: Any, tp: Any, key: str, problems: list[str], failed: set[str] | None = None) -> Any:
    """Coerce ``value`` to the annotated type ``tp``; on failure append a problem and return None."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            problems.append(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}.")
            return None
        return _build(tp, value, key, problems, failed)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            sub: list[str] = []
            out = _coerce(value, a, key, sub)
            if not sub:
                return out
        problems.append(f"{key} must be {_type_name(tp)}, got {value!r}.")
        return None
    if origin is Literal:
        if value in args:
            return value
        if isinstance(value, str):
            for a in args:
                if isinstance(a, str) and a == value.strip():
                    return a
        problems.append(
            f"{key} must be {_type_name(tp)}, got {value!r}.{_did_you_mean(str(value), [str(a) for a in args])}"
        )
        return None
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = _yaml_value(text, key, "a list", problems)
                if value is None:
                    return None
            else:
                value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key} must be a list, got {value!r}.")
            return None
        items = [_coerce(v, item_tp, f"{key}.{i}", problems, failed) for i, v in enumerate(value)]
        # an item that failed to coerce is reported above; dropping it lets the range checks run on the rest
        return [v for v in items if v is not None]
    if origin is dict:
        k_tp, v_tp = args
        if isinstance(value, str):
            value = _yaml_value(value, key, "a mapping", problems) if value.strip() else {}
            if value is None:
                return None
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{key} must be a mapping, got {value!r}.")
            return None
        pairs = {_coerce(k, k_tp, key, problems): _coerce(v, v_tp, f"{key}.{k}", problems) for k, v in value.items()}
        return {k: v for k, v in pairs.items() if k is not None and v is not None}  # failures are reported above
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        problems.append(f"{key} must be true or false, got {value!r}.")
        return None
    if tp is int:
        if isinstance(value, bool):
            problems.append(f"{key} must be an integer, got {value!r}.")
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        problems.append(f"{key} must be an integer, got {value!r}.")
        return None
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{key} must be a number, got {value!r}.")
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key} must be a number, got {value!r}.")
        return None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
        problems.append(f"{key} must be a string, got {value!r}.")
        return None
    return value


def _build(cls: type, data: dict, prefix: str, problems: list[str], failed: set[str] | None = None) -> Any:
    """``cls(**data)`` with every value coerced; problems are appended, and the keys whose value failed to coerce
    are added to ``failed`` (their fields keep the defaults, whose range checks would only add noise)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = field_docs(cls)
    failed = set() if failed is None else failed
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            problems.append(f"unknown key {full!r}.{_did_you_mean(str(key), fields, f'{prefix}.' if prefix else '')}")
            continue
        before = len(problems)
        kwargs[key] = _coerce(value, hints[key], full, problems, failed)
        for j in range(before, len(problems)):  # say what the key is for, after what is wrong with the value
            if problems[j].startswith(f"{full} must be"):
                failed.add(full)
                if docs.get(key):
                    problems[j] = f"{problems[j]} {full}: {plain(docs[key])}"
    return cls(
        **{
            k: v
            for k, v in kwargs.items()
            if v is not None or typing.get_origin(hints[k]) in (typing.Union, types.UnionType)
        }
    )


def _set_dotted(data: dict, dotted: str, value: Any, problems: list[str]) -> None:
    """Set ``a.b.c=value`` in nested dicts/lists; list items are addressed by index (``rewards.0.weight``)."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) > len(node):
                problems.append(
                    f"override {dotted}: {'.'.join(parts[: i + 1])} is not an item of the list (it has {len(node)} items; use index {len(node)} to add one)."
                )
                return
            if int(part) == len(node):  # one past the end adds an item
                node.append([] if nxt.isdigit() else {})
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            problems.append(_not_a_section(dotted, parts[:i], node))
            return
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        problems.append(_not_a_section(dotted, parts[:-1], node))
        return
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            problems.append(f"override {dotted}: index {last} is outside the list (it has {len(node)} items).")
            return
        if int(last) == len(node):
            node.append(value)
        else:
            node[int(last)] = value
    else:
        node[last] = value


def _not_a_section(dotted: str, parent: list[str], value: Any) -> str:
    key = ".".join(parent)
    return f"override {dotted}: {key} is a value ({value!r}), not a section, so it has no keys. Set {key}=<value>."


def _parse_override(text: str) -> tuple[str, Any] | None:
    if "=" not in text:
        return None
    key, raw = text.split("=", 1)
    raw = raw.strip()
    try:
        value = load_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = (), stage: str | None = None
) -> Config:
    """Read a YAML config, apply dotted ``key=value`` overrides, coerce and validate.

    Args:
        path: YAML file, or the name of a shipped config (``debug``, ``baselines/weighted_1111``; see
            :func:`find_config`); None for the defaults.
        overrides: strings such as ``train.max_steps=10`` or ``rewards.0.weight=2``.
        stage: also check the rules of this stage (``precompute``, ``train``, ``eval``; see :func:`check`).

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: listing every problem found (missing file, bad YAML with ``file:line:col``, unknown keys,
            wrong types with what the key is for, out-of-range values), one per line; its ``config`` is the config
            as far as it could be built (None for a missing file or bad YAML).
    """
    problems: list[str] = []
    data: dict = {}
    if path is not None:
        data = _read_yaml(path)
    for ov in overrides:
        parsed = _parse_override(ov)
        if parsed is None:
            problems.append(f"override {ov!r} is not of the form key=value (e.g. train.max_steps=10).")
            continue
        _set_dotted(data, parsed[0], parsed[1], problems)
    failed: set[str] = set()
    cfg = _build(Config, data, "", problems, failed)
    # range and stage checks too, so every problem is reported at once; a key whose value did not coerce holds its
    # default, so its range lines would be about a value nobody typed
    problems.extend(q for q in check(cfg, stage) if not any(_about(q, k) for k in failed))
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), config=cfg)
    return cfg


def _about(problem: str, key: str) -> bool:
    """Whether ``problem`` is a line about ``key`` (it starts with the key, then a space or ``=``)."""
    return problem.startswith(key) and problem[len(key) : len(key) + 1] in (" ", "=")


def _read_yaml(path: str | Path) -> dict:
    """The mapping in a config file, found by path or by the name of a shipped config (:func:`find_config`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        if p.is_dir():
            raise ConfigError([f"config file {str(p)!r} is a folder; give a YAML file."])
        found = find_config(str(path))
        if found is None:
            names = config_names()
            hint = ""
            if names and not p.is_absolute():
                hint = f" Nor is it a shipped config (`pgot config list` names them).{_did_you_mean(str(path), names)}"
            raise ConfigError([f"config file {str(p)!r} does not exist.{hint}"])
        p = found
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {str(p)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})."]) from None
    try:
        loaded = load_yaml(text)  # a repeated key is an error (file:line:col), not the last value silently
    except yaml.MarkedYAMLError as exc:
        where, what = _yaml_where(exc, p)
        raise ConfigError([f"{where}: config file {str(p)!r} is not valid YAML: {what}."]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"config file {str(p)!r} is not valid YAML: {str(exc).splitlines()[0]}"]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"config file {str(p)!r} must hold a mapping of sections, got {type(loaded).__name__}."])
    return loaded


STAGES = ("precompute", "train", "eval")
"""The stages a config can be checked for (:func:`check`)."""


def check(cfg: Config, stage: str | None = None) -> list[str]:
    """Every problem of ``cfg`` that needs no file, model or weights, one line each (empty when all is well).

    Every float value must be finite (:func:`_check_finite`, unless its docstring allows ``inf``), then each
    section's ranges, then the stage's rules.

    Args:
        cfg: a config (fields of a type that failed to coerce hold their defaults).
        stage: also apply the rules of ``precompute``, ``train`` or ``eval``; None: only the section rules.
    """
    problems = _check_finite(cfg)
    nonfinite = [q.split(" ", 1)[0] for q in problems]  # their range lines would only repeat the same key
    problems += [q for q in _check_ranges(cfg) if not any(_about(q, k) for k in nonfinite)]
    problems += check_reward_sets(cfg, stage)
    if stage is None:
        return problems
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}.")
    if not cfg.rewards:
        problems.append("rewards is empty; list at least one reward, e.g. rewards: [{name: colorfulness}].")
    if stage == "train":
        problems.extend(_check_train(cfg))
    if stage == "eval":
        problems.extend(_check_eval(cfg))
    if stage == "eval" or (stage == "train" and cfg.train.final_eval):
        problems.extend(_check_ground_truth(cfg, stage))
    return problems


def validate(cfg: Config, stage: str | None = None) -> None:
    """Raise :class:`ConfigError` listing every problem :func:`check` finds.

    Raises:
        ConfigError: one or more problems.
    """
    problems = check(cfg, stage)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


def check_reward_sets(cfg: Config, stage: str) -> list[str]:
    """The reward sets JDR/JCR are computed on: ``train.reward_sets`` (probes and the end-of-training table; checked
    in every stage, as the config's own rule) and, in ``eval``, ``eval.reward_sets``.

    Rule: each set is non-empty (a joint rate over no reward is undefined: the probes and the tables would fail
    after training) and names only configured rewards (a name a mistyped ``rewards.<i>.name`` meant is that typo's
    line, not one more). ``train.reward_sets={}`` means every reward as ``all``.

    Args:
        cfg: the config.
        stage: ``precompute``, ``train``, ``eval`` or None (the section rules only).

    Returns:
        One line per problem, naming the key as typed on the command line (``train.reward_sets.X``).
    """
    names, known, p = cfg.reward_names, known_reward_names(), []
    typo = any(n and n not in known for n in names)  # then a known name here is that typo's line, not one more
    sets = [("train", cfg.train.reward_sets)] + ([("eval", cfg.eval.reward_sets)] if stage == "eval" else [])
    for section, set_name, members in [(sec, k, v) for sec, rs in sets for k, v in rs.items()]:
        key = f"{section}.reward_sets.{set_name}"
        if not members:
            p.append(
                f"{key} is empty: a joint rate over no reward is undefined. List at least one reward "
                f"(e.g. {key}=[{', '.join(names[:2])}]), or remove the set."
            )
        for n in members:
            if n not in names and not (typo and n in known):
                listed = ", ".join(names) or "none"
                p.append(
                    f"{key} names {n!r}, which is not a scored reward ({listed}). Add it to rewards, or set "
                    f"eval.reward_sets, e.g. eval.reward_sets='{{all: [{', '.join(names)}]}}'."
                    if section == "eval"
                    else f"{key} names {n!r}, which is not in rewards ({listed}).{_did_you_mean(n, names)}"
                )
    return p


def known_reward_names() -> list[str]:
    """The reward names a config may use: :data:`REWARD_NAMES`, plus any registered in ``pgot.rewards.REWARDS``
    since it was imported (read only when something imported it: this check stays light)."""
    registry = getattr(sys.modules.get("pgot.rewards"), "REWARDS", None)
    return list(dict.fromkeys([*REWARD_NAMES, *(registry or ())]))


def unknown_reward(index: int, name: str, known: typing.Sequence[str] | None = None) -> str:
    """The message for a reward name that is not in the registry (``rewards.<index>.name``)."""
    known = list(known or known_reward_names())
    return (
        f"rewards.{index}.name={name!r} is not a known reward. Known rewards: {', '.join(known)}."
        f"{_did_you_mean(name, known)}"
    )


def _check_train(cfg: Config) -> list[str]:
    t, d, p = cfg.train, cfg.draft, []
    p.extend(q for q in check_sampler(d.num_steps, d.k, d.method, d.refl_min_step, d.shift, training=True))
    if t.objective == "pgot" and t.strategy == "auto" and cfg.agent.backend == "none":
        p.append(
            "train.strategy=auto starts offline and goes online only when the agent says so, but agent.backend=none "
            "has no agent, so the run would stay offline. Set train.strategy=offline (or online), or choose an agent "
            "with agent.backend=openai, scripted or heuristic."
        )
    if cfg.agent.backend == "heuristic" and t.probe_every == 0:
        p.append(
            "agent.backend=heuristic decides from probe scores, but train.probe_every=0 computes none, so every "
            "decision would fail. Set train.probe_every (e.g. to agent.every) or choose another agent.backend."
        )
    if cfg.agent.backend != "none":
        names = cfg.reward_names
        for section in ("knowledge", "references"):
            for n in getattr(cfg.agent, section):
                if n not in names:
                    p.append(
                        f"agent.{section}.{n} names a reward that is not in rewards ({', '.join(names) or 'none'})."
                        f"{_did_you_mean(n, names)}"
                    )
    active = t.active_rewards or cfg.reward_names
    if t.objective == "single_reward" and len(active) != 1 and cfg.rewards:
        p.append(
            f"train.objective=single_reward needs exactly one active reward, got {len(active)} ({', '.join(active)}). "
            f"Set train.active_rewards=[{active[0]}] (the other rewards are still scored and logged)."
        )
    if t.target_form != "squared" and t.objective not in ("weighted_sum", "hetero_weighted_sum"):
        p.append(
            f"train.target_form={t.target_form} has no effect with train.objective={t.objective}: only weighted_sum "
            "and hetero_weighted_sum have a target. Remove train.target_form or pick one of those objectives."
        )
    if t.objective == "weighted_sum" and t.target_form != "linear" and not t.store:
        missing = [
            f"rewards.{i}.target ({r.name})" for i, r in enumerate(cfg.rewards) if r.name in active and r.target is None
        ]
        if missing:
            p.append(
                f"train.objective=weighted_sum with train.target_form={t.target_form} needs a global target per "
                f"active reward; not set: {', '.join(missing)}, and no train.store to take each reward's maximum "
                "from. Set the targets, set train.store to a frontier store, or set train.target_form=linear."
            )
    if cfg.agent.backend != "none" and t.objective == "single_reward":
        p.append(
            "agent.backend with train.objective=single_reward cannot remove the only reward. Set agent.backend=none."
        )
    return p


def _check_eval(cfg: Config) -> list[str]:
    e, names, p = cfg.eval, cfg.reward_names, []
    sr = e.scatter_rewards
    if sr and (len(sr) != 2 or any(n not in names for n in sr)):
        p.append(f"eval.scatter_rewards must name two scored rewards ({', '.join(names)}), got {sr}.")
    return p


def _check_ground_truth(cfg: Config, stage: str) -> list[str]:
    """``eval.ground_truth`` against the settings it needs (the prompts themselves are checked where they are read)."""
    if cfg.eval.ground_truth != "testbed" or cfg.model.resolution == 32:
        return []
    where = "pgot-eval" if stage == "eval" else "the end-of-training table (train.final_eval)"
    return [
        f"eval.ground_truth=testbed judges {where} with the testbed's judge, which scores 32 x 32 images, but "
        f"model.resolution={cfg.model.resolution}. Set model.resolution=32 (the testbed model, "
        "model.path=builtin:testbed, is trained at 32), or set eval.ground_truth=none."
    ]


def config_to_dict(cfg: Any) -> dict:
    """The config as plain dicts and lists (what :func:`save_config` writes)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML; :func:`load_config` reads it back unchanged."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Documentation of the keys
# --------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of the dataclass ``cls`` (the string literal after its annotation).

    Read from the source, which Python does not keep at run time; a field without one is absent.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # no source (a frozen install): no docs, never an error
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def plain(text: str) -> str:
    """Docstring text without reStructuredText markup: ````x```` and ``:func:`x``` become ``x``."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    return re.sub(r"`([^`]*)`", r"\1", text)


@dataclass(frozen=True)
class KeyDoc:
    """One config key: as typed on the command line, its type, default and docstring."""

    key: str
    type: str
    default: str
    doc: str


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:  # pragma: no cover - every config field has a default
        return ""
    if dataclasses.is_dataclass(value):
        return ""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def describe_keys(section: str | None = None) -> list[KeyDoc]:
    """Every config key with its type, default and docstring, in the order of the dataclasses.

    List sections use ``<i>`` for the index (``rewards.<i>.path``, ``eval.models.<i>.lora``).

    Args:
        section: only the keys under this prefix (``train``, ``rewards``, ``eval.models``); None: all.

    Raises:
        ValueError: ``section`` matches no key (the message lists the sections).
    """
    out: list[KeyDoc] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            tp, key = hints[f.name], f"{prefix}{f.name}"
            args = typing.get_args(tp)
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{key}.")
            elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
                walk(args[0], f"{key}.<i>.")
            else:
                out.append(KeyDoc(key, _type_name(tp), _default_text(f), plain(docs.get(f.name, ""))))

    walk(Config, "")
    if section:
        wanted = section.strip().rstrip(".")
        picked = [k for k in out if k.key == wanted or k.key.startswith(wanted + ".")]
        if not picked:
            sections = list(dict.fromkeys(k.key.split(".")[0] for k in out))
            raise ValueError(
                f"no config key under {section!r}. Sections: {', '.join(sections)}.{_did_you_mean(wanted, sections)}"
            )
        return picked
    return out


# --------------------------------------------------------------------------------------------
# The shipped configs
# --------------------------------------------------------------------------------------------


def configs_dir() -> Path | None:
    """The folder of the configs shipped with pgot, or None when this install has none.

    A source checkout (``pip install -e .`` or ``PYTHONPATH``) reads the repository's ``configs/`` next to the
    package; a wheel install reads the package ``pgot.configs`` (the same files, mapped in by ``pyproject.toml``)
    through :mod:`importlib.resources`.
    """
    root = Path(__file__).resolve().parents[1]
    if (root / "configs").is_dir() and (root / "pyproject.toml").is_file():
        return root / "configs"
    try:
        folder = resources.files("pgot.configs")
    except ModuleNotFoundError:
        return None
    path = Path(str(folder))
    return path if path.is_dir() else None


def config_names() -> list[str]:
    """Names of the shipped configs (``debug``, ``baselines/weighted_1111``, ...), sorted; accelerate launch files
    (``accelerate/``) and agent scripts (``agent/``) are not pgot configs and are left out."""
    folder = configs_dir()
    if folder is None:
        return []
    names = (p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
    return sorted(n for n in names if n.split("/")[0] not in ("accelerate", "agent"))


def find_config(name: str) -> Path | None:
    """The shipped file a config name refers to, or None.

    ``debug``, ``debug.yaml``, ``configs/debug.yaml`` (as the README and config headers write it) and
    ``baselines/weighted_1111`` all work, so the documented commands run from any folder; the other files of
    the folder (``accelerate/8gpu.yaml``, ``agent/d3_schedule.yaml``) are found by their path too.
    """
    folder = configs_dir()
    if folder is None or not name or Path(name).is_absolute():
        return None
    rel = name.strip().removeprefix("./").removeprefix("configs/")
    for cand in (rel, f"{rel}.yaml"):
        p = (folder / cand).resolve()
        if p.is_file() and p.suffix in (".yaml", ".yml") and folder.resolve() in p.parents:
            return p
    return None
