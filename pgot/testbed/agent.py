"""The diagnosing logic of an agent that can see, for the testbed (paper section 3.3 and appendix D).

A VLM agent compares the current model's images with the base model's images of the same prompts and seeds and
decides, with a knowledge base of each reward's collapse signature, whether to continue, remove a collapsing reward
(and revert), or switch to the online strategy. In the testbed the agent's eyes are the ground-truth judge: its
components say what changed (:mod:`pgot.testbed.judge`), and :data:`~pgot.testbed.proxies.SIGNATURE_COMPONENTS`
(the machine-readable form of :data:`~pgot.testbed.proxies.SIGNATURES`) says which reward causes such damage.

:func:`diagnose` follows the two-stage procedure of appendix D.2:

1. **Breakdown detection.** With ``drop_k = mean_b(component_k(base_b) - component_k(current_b))`` over the paired
   images (positive: worse now) and ``quality_drop`` the same for the quality, a breakdown is
   ``quality_drop >= quality_tol * mean_b quality(base_b)`` (a share of the base images' quality: the judge's quality
   is a product of eleven components, so its scale is the base model's, 0.04 to 0.06 for the shipped one) or
   ``max_k drop_k >= component_tol`` (components are each in [0, 1]). Each active weak reward ``r`` is then
   implicated by how well the pattern of damage matches its signature: the cosine similarity
   ``s_r = <w_r, d+> / (|w_r| |d+|)`` between its signature weights ``w_r`` and the positive drops ``d+`` (the
   magnitude is what detected the breakdown; the pattern says whose it is). The most implicated one (largest
   ``s_r > 0``) is removed (D.2: "remove the most severely affected reward model"). Strong rewards are never removed (pgot's agent removes weak ones only by default).
2. **Strategy.** Without a breakdown: switch from offline to online when every active reward is strong and the
   images change little (mean absolute pixel change ``<= change_tol`` against ``previous_images``, or against the
   base images when none are given); otherwise continue.

The reply is in the paper's format (D.2), readable by :func:`pgot.agent.parse_reply`::

    Analysis: <what changed, which signature it matches>
    Action: Continue | Remove <reward> | Switch
    Strategy: offline | online
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from pgot.testbed import judge
from pgot.testbed.proxies import SIGNATURE_COMPONENTS, SIGNATURES

__all__ = ["THRESHOLDS", "diagnose"]

THRESHOLDS: dict[str, float] = {"quality_tol": 0.25, "component_tol": 0.15, "change_tol": 0.02}
"""The default thresholds of :func:`diagnose` (the agent server's and its command line's too): the one place they are
set."""


def _check(name: str, images: torch.Tensor, n: int) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != n:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"diagnose: {name} must be a (B={n}, 3, 32, 32) tensor (one image per prompt), got {got}.")


def diagnose(
    base_images: torch.Tensor,
    current_images: torch.Tensor,
    prompts: Sequence[str],
    active_rewards: Sequence[str],
    strengths: Mapping[str, str],
    *,
    strategy: str = "offline",
    previous_images: torch.Tensor | None = None,
    quality_tol: float = THRESHOLDS["quality_tol"],
    component_tol: float = THRESHOLDS["component_tol"],
    change_tol: float = THRESHOLDS["change_tol"],
) -> str:
    """Decide Continue / Remove <reward> / Switch from base and current images (paper D.2), as a reply text.

    Args:
        base_images: (B, 3, 32, 32) base-model images in [0, 1].
        current_images: (B, 3, 32, 32) images of the model being trained, same prompts and seeds, same order.
        prompts: B testbed prompts.
        active_rewards: names of the rewards still in the objective.
        strengths: reward name -> ``weak`` or ``strong`` (e.g. :data:`pgot.testbed.proxies.STRENGTHS`); a reward
            missing here counts as strong (never removed).
        strategy: the current strategy, ``offline`` or ``online``.
        previous_images: (B, 3, 32, 32) images of the previous check, to measure how much the images still change.
        quality_tol: mean quality drop that counts as a breakdown, as a share of the base images' mean quality
            (0.25: a quarter of it lost).
        component_tol: mean drop of any one judge component that counts as a breakdown.
        change_tol: mean absolute pixel change below which the images "change little" (switch condition).

    Returns:
        The reply: an ``Analysis:`` line, an ``Action:`` line and a ``Strategy:`` line.

    Raises:
        ValueError: mismatched shapes or counts, an unknown strategy, or prompts outside the testbed grammar.
    """
    n = len(prompts)
    _check("base_images", base_images, n)
    _check("current_images", current_images, n)
    if previous_images is not None:
        _check("previous_images", previous_images, n)
    if strategy not in ("offline", "online"):
        raise ValueError(f"diagnose: strategy must be offline or online, got {strategy!r}.")
    base = judge.components(base_images, prompts)
    now = judge.components(current_images, prompts)
    q_base = torch.stack(list(base.values())).prod(0)
    q_now = torch.stack(list(now.values())).prod(0)
    quality_drop = float((q_base - q_now).mean())
    drops = {k: float((base[k] - now[k]).mean()) for k in judge.COMPONENTS}
    worst = max(drops, key=drops.__getitem__)
    summary = (
        f"mean ground-truth quality {float(q_base.mean()):.3f} (base) -> {float(q_now.mean()):.3f} (now); "
        f"largest component drop: {worst} {drops[worst]:+.3f}"
    )
    breakdown = quality_drop >= quality_tol * float(q_base.mean()) or drops[worst] >= component_tol

    if breakdown:
        positive = {k: max(v, 0.0) for k, v in drops.items()}
        norm = math.sqrt(sum(v * v for v in positive.values()))
        scores = {}
        for name in active_rewards:
            if strengths.get(name, "strong") != "weak":
                continue
            weights = SIGNATURE_COMPONENTS.get(name, {})
            if weights:
                dot = sum(w * positive[k] for k, w in weights.items())
                scores[name] = dot / (math.sqrt(sum(w * w for w in weights.values())) * norm)
        damaged = ", ".join(f"{k} {v:+.3f}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1]) if v > 0.02)
        if scores and max(scores.values()) > 0:
            culprit = max(scores, key=scores.__getitem__)
            ranking = ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items(), key=lambda kv: -kv[1]))
            analysis = (
                f"Breakdown: {summary}. Damaged components: {damaged}. This matches the collapse signature of "
                f"{culprit} ({SIGNATURES.get(culprit, 'no signature')}) Implication scores: {ranking}."
            )
            return f"Analysis: {analysis}\nAction: Remove {culprit}\nStrategy: {strategy}"
        analysis = (
            f"Breakdown: {summary}. Damaged components: {damaged or 'none above 0.02'}. No active weak reward's "
            "collapse signature matches it, and strong rewards are not removed; continuing."
        )
        return f"Analysis: {analysis}\nAction: Continue\nStrategy: {strategy}"

    reference = base_images if previous_images is None else previous_images
    change = float((current_images.float() - reference.float()).abs().mean())
    against = "the base images" if previous_images is None else "the previous check"
    only_strong = bool(active_rewards) and all(strengths.get(r, "strong") == "strong" for r in active_rewards)
    if strategy == "offline" and only_strong and change <= change_tol:
        analysis = (
            f"No breakdown: {summary}. Only strong rewards remain ({', '.join(active_rewards)}) and the images change "
            f"little (mean absolute pixel change {change:.4f} against {against}, at most {change_tol}): switch to the "
            "online strategy."
        )
        return f"Analysis: {analysis}\nAction: Switch\nStrategy: online"
    analysis = f"No breakdown: {summary}; mean absolute pixel change {change:.4f} against {against}."
    return f"Analysis: {analysis}\nAction: Continue\nStrategy: {strategy}"
