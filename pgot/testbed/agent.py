"""The diagnosing logic of an agent that can see, for the testbed (paper section 3.3 and appendix D).

A VLM agent compares the current model's images with the base model's images of the same prompts and seeds and
decides, with a knowledge base of each reward's collapse signature, whether to continue, remove a collapsing reward
(and revert), or switch to the online strategy. In the testbed the agent's eyes are the ground-truth judge: its
components say what changed (:mod:`pgot.testbed.judge`), and :data:`~pgot.testbed.proxies.SIGNATURE_COMPONENTS`
(the machine-readable form of :data:`~pgot.testbed.proxies.SIGNATURES`) says which reward causes such damage.

:func:`diagnose` follows the two-stage procedure of appendix D.2:

1. **Breakdown detection.** With ``drop_k = mean_b(component_k(base_b) - component_k(current_b))`` over the paired
   images (positive: worse now) and ``quality_drop`` the same for the quality, a breakdown is
   ``quality_drop > 0 and quality_drop >= quality_tol * mean_b quality(base_b)`` (a share of the base images' quality: the judge's quality
   is a product of eleven components, so its scale is the base model's, 0.04 to 0.06 for the shipped one) or
   ``max_k drop_k > 0 and max_k drop_k >= component_tol`` (components are each in [0, 1]): a breakdown needs
   damage, so images no worse than the base ones never are one, whatever the thresholds. Each active weak reward ``r`` is then
   implicated by how well the pattern of damage matches its signature: the cosine similarity
   ``s_r = <w_r, d+> / (|w_r| |d+|)`` between its signature weights ``w_r`` and the positive drops ``d+`` (the
   magnitude is what detected the breakdown; the pattern says whose it is). The most implicated one (largest
   ``s_r > 0``; none when ``d+`` is all zeros, e.g. a quality drop spread thinly over the components) is removed (D.2: "remove the most severely affected reward model"). Strong rewards are never removed (pgot's agent removes weak ones only by default).
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
from pgot.testbed.scenes import as_prompt_list

__all__ = ["THRESHOLDS", "check_thresholds", "diagnose"]

THRESHOLDS: dict[str, float] = {"quality_tol": 0.25, "component_tol": 0.15, "change_tol": 0.02}
"""The default thresholds of :func:`diagnose` (the agent server's and its command line's too): the one place they are
set."""


def check_thresholds(quality_tol: float, component_tol: float, change_tol: float) -> None:
    """Refuse thresholds :func:`diagnose` cannot use (its own, the agent server's and its command line's).

    Args:
        quality_tol: a share of the base images' quality, in [0, 1].
        component_tol: a component drop, finite and >= 0.
        change_tol: a mean absolute pixel change, finite and >= 0.

    Raises:
        ValueError: a threshold that is not a finite number >= 0, or ``quality_tol`` above 1 (the message names it).
    """
    for key, value in (("quality_tol", quality_tol), ("component_tol", component_tol), ("change_tol", change_tol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a finite number >= 0, got {value!r} (default {THRESHOLDS[key]}).")
    if quality_tol > 1:
        raise ValueError(
            f"quality_tol must be at most 1 (a share of the base images' quality), got {quality_tol!r} "
            f"(default {THRESHOLDS['quality_tol']})."
        )


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
        TypeError: ``prompts`` or ``active_rewards`` is a single string, not a list.
        ValueError: images that are not (B, 3, 32, 32) float batches in [0, 1] (:func:`pgot.testbed.judge.check_images`;
            the message names the argument: ``current_images`` or ``previous_images`` when their count differs from
            ``base_images``', ``prompts`` when the prompt count differs from the images'), an empty batch (nothing to
            diagnose), an unknown strategy, thresholds that :func:`check_thresholds` refuses, or prompts outside the
            testbed grammar.
    """
    prompts = as_prompt_list(prompts, "diagnose")
    if isinstance(active_rewards, str):
        raise TypeError(f"diagnose: active_rewards must be a list of reward names, got the string {active_rewards!r}.")
    check_thresholds(quality_tol, component_tol, change_tol)
    if strategy not in ("offline", "online"):
        raise ValueError(f"diagnose: strategy must be offline or online, got {strategy!r}.")
    if not isinstance(base_images, torch.Tensor) or base_images.ndim != 4:
        judge.check_images(base_images, len(prompts), where="diagnose", name="base_images")  # raises
    b = base_images.shape[0]
    for name, images in (("current_images", current_images), ("previous_images", previous_images)):
        if images is not None and isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] != b:
            raise ValueError(
                f"diagnose: {name} holds {images.shape[0]} images but base_images {b}; pass the same prompts and seeds "
                "in the same order (one image per prompt)."
            )
    if len(prompts) != b:
        raise ValueError(
            f"diagnose: got {len(prompts)} prompts for {b} image pairs; pass one prompt per image of base_images and "
            "current_images."
        )
    if b == 0:
        raise ValueError("diagnose: no images to diagnose (empty batch); pass at least one base / current image pair.")
    for name, images in (("base_images", base_images), ("current_images", current_images)):
        judge.check_images(images, b, where="diagnose", name=name)
    if previous_images is not None:
        judge.check_images(previous_images, b, where="diagnose", name="previous_images")
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
    breakdown = (quality_drop > 0 and quality_drop >= quality_tol * float(q_base.mean())) or (
        drops[worst] > 0 and drops[worst] >= component_tol
    )

    if breakdown:
        positive = {k: max(v, 0.0) for k, v in drops.items()}
        norm = math.sqrt(sum(v * v for v in positive.values()))
        scores = {}
        for name in active_rewards:
            if strengths.get(name, "strong") != "weak":
                continue
            weights = SIGNATURE_COMPONENTS.get(name, {})
            if weights and norm > 0:
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
