"""Fixed-seed probes during training: the probe set, no-grad samples of the current or base model, the probe line.

A probe samples the first ``train.probe_prompts`` training prompts ``train.probe_samples`` times each with the
seed ``train.seed`` and compares their reward vectors with those of the step-0 model on the same prompts and
seeds: JDR / JCR per reward set, win rate, mean, std and Gaussian KL per reward (paper section 2.3 and appendix
D.4). The agent's diagnostic images and the end-of-training table use the same sampling.

In a world with a ground truth (the reward-hacking testbed, ``eval.ground_truth=testbed``) the probe images can also
be judged: :func:`ground_truth_line` gives their true quality, its change against the step-0 model and the hacked
rates (:mod:`pgot.metrics`, "Ground truth"), the curves of Figure 4 with ground truth
(``scripts/testbed_table3.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import torch

from pgot import metrics, rewards
from pgot.config import Config
from pgot.embeddings import encode_prompts
from pgot.generate import generate
from pgot.model import SD3Model

__all__ = ["base_model", "ground_truth_line", "probe_line", "probe_set", "reward_sets", "sample_and_score"]


@contextlib.contextmanager
def base_model(model: SD3Model) -> Iterator[None]:
    """LoRA adapters off (the base model) inside the block; requires_grad flags restored afterwards (peft resets
    them)."""
    flags = [(p, p.requires_grad) for p in model.transformer.parameters()]
    model.transformer.disable_adapters()
    try:
        yield
    finally:
        model.transformer.enable_adapters()
        for p, f in flags:
            p.requires_grad_(f)


def probe_set(
    ids: Sequence[int], texts: Sequence[str], prompts: int, samples: int
) -> tuple[list[str], list[int], list[int]]:
    """The first ``prompts`` prompts, each ``samples`` times: ``(texts, prompt ids, sample indices)``, B rows."""
    k = min(prompts, len(ids))
    rows = [(texts[j], int(ids[j]), s) for j in range(k) for s in range(samples)]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def sample_and_score(
    cfg: Config,
    model: SD3Model,
    reward_models: Sequence[rewards.Reward],
    texts: Sequence[str],
    ids: Sequence[int],
    sample_indices: Sequence[int],
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad images and reward vectors, in chunks of one training batch: (B, 3, H, W) and (B, M), on the CPU."""
    chunk = cfg.train.prompts_per_step * cfg.train.samples_per_prompt
    sampler = dataclasses.asdict(cfg.draft) | {"k": 0}
    images, scores = [], []
    with torch.no_grad():
        for s in range(0, len(texts), chunk):
            batch = list(texts[s : s + chunk])
            embeds = encode_prompts(
                model, batch, cfg.model.embedding_cache or None, negative=cfg.draft.guidance_scale > 1.0
            )
            img = generate(
                model, batch, torch.tensor(ids[s : s + chunk]), torch.tensor(sample_indices[s : s + chunk]), seed,
                embeds=embeds, resolution=cfg.model.resolution, **sampler,
            )  # fmt: skip
            scores.append(rewards.score(reward_models, img, batch).float().cpu())
            images.append(img.cpu())
    return torch.cat(images), torch.cat(scores)


def reward_sets(cfg: Config) -> dict[str, list[str]]:
    """``train.reward_sets``, or every reward as ``all``."""
    return dict(cfg.train.reward_sets) or {"all": list(cfg.reward_names)}


def probe_line(
    scores: torch.Tensor, base: torch.Tensor, names: Sequence[str], sets: Mapping[str, Sequence[str]]
) -> dict[str, float | None]:
    """The probe's metrics.jsonl entries: ``probe/jdr_<set>``, ``probe/jcr_<set>``, and per reward
    ``probe/win_``, ``probe/mean_``, ``probe/std_``, ``probe/kl_`` (non-finite values become None).

    Args:
        scores: (B, M) reward vectors of the current model.
        base: (B, M) of the step-0 model on the same prompts and seeds.
        names: the M reward names.
        sets: named reward sets for JDR / JCR.
    """
    out: dict[str, float | None] = {}
    for set_name, members in sets.items():
        cols = torch.tensor(rewards.columns(names, members))
        out[f"probe/jdr_{set_name}"] = float(metrics.jdr(scores[:, cols], base[:, cols]))
        out[f"probe/jcr_{set_name}"] = float(metrics.jcr(scores[:, cols], base[:, cols]))
    wins = metrics.win_rate(scores, base)
    kl = metrics.gaussian_kl(scores, base)
    m1, s1 = scores.mean(0), scores.std(0, unbiased=False)
    for j, n in enumerate(names):
        out[f"probe/win_{n}"] = _finite(float(wins[j]))
        out[f"probe/mean_{n}"] = _finite(float(m1[j]))
        out[f"probe/std_{n}"] = _finite(float(s1[j]))
        out[f"probe/kl_{n}"] = _finite(float(kl[j]))
    return out


def ground_truth_line(
    scores: torch.Tensor,
    base: torch.Tensor,
    quality: torch.Tensor,
    base_quality: torch.Tensor,
    names: Sequence[str],
    sets: Mapping[str, Sequence[str]],
    *,
    tol: float | None = None,
) -> dict[str, float | None]:
    """The probe's ground-truth entries, next to :func:`probe_line`'s: ``probe/quality`` (mean true quality of the
    probe images), ``probe/quality_change`` (mean over pairs of the change against the step-0 model),
    ``probe/quality_improved`` and ``probe/quality_fell`` (shares of pairs), and ``probe/hacked_<set>`` per reward set
    (pairs that dominate the step-0 model on every reward of the set while their quality fell). Definitions and the
    tolerance are :mod:`pgot.metrics`' ("Ground truth"); non-finite values become None.

    Args:
        scores: (B, M) reward vectors of the current model's probe images.
        base: (B, M) of the step-0 model on the same prompts and seeds.
        quality: (B,) true quality of the current images (e.g. :func:`pgot.testbed.judge.quality`), in [0, 1].
        base_quality: (B,) of the step-0 images.
        names: the M reward names.
        sets: named reward sets (as for :func:`probe_line`).
        tol: a pair's quality improved (fell) when it rose (dropped) by more than this (``eval.quality_tol``; None:
            :data:`pgot.metrics.QUALITY_TOL`).

    Raises:
        ValueError: shapes that do not match, a set naming an unknown reward, or a negative ``tol``.
    """
    tol = metrics.QUALITY_TOL if tol is None else tol
    counts = metrics.count_ground_truth(scores, base, quality, base_quality, names, sets, tol=tol)
    q, q0 = quality.detach().double().cpu(), base_quality.detach().double().cpu()
    both = torch.isfinite(q) & torch.isfinite(q0)
    out: dict[str, float | None] = {
        "probe/quality": _finite(float(q[torch.isfinite(q)].mean())) if torch.isfinite(q).any() else None,
        "probe/quality_change": _finite(float((q - q0)[both].mean())) if both.any() else None,
        "probe/quality_improved": _finite(counts.rate(counts.improved)),
        "probe/quality_fell": _finite(counts.rate(counts.fell)),
    }
    for set_name in sets:
        out[f"probe/hacked_{set_name}"] = _finite(counts.rate(counts.hacked[set_name]))
    return out


def _finite(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None
