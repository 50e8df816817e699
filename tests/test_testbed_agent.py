"""Tests of pgot.testbed.agent.diagnose: Continue on clean images, Remove the right weak reward, Switch when only
strong rewards remain and nothing changes, in the reply format pgot.agent.parse_reply reads."""

from __future__ import annotations

import pytest
import torch

from pgot.agent import parse_reply
from pgot.config import RewardConfig
from pgot.rewards import build
from pgot.testbed import proxies
from pgot.testbed.agent import diagnose
from pgot.testbed.scenes import all_prompts, render

PROMPTS = all_prompts()[::7]  # 16 prompts: every shape, size, colour and background
ALL = list(proxies.STRENGTHS)
STRONG = list(proxies.PREFERENCE_MODELS)


def _base() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (render(PROMPTS, seed=0) + 0.002 * torch.randn(len(PROMPTS), 3, 32, 32, generator=gen)).clamp(1e-3, 1 - 1e-3)


def _hack(name: str, steps: int) -> torch.Tensor:
    """Mild collapse: a few pixel-space steps on the global-target hinge relu(C - r(x)) of weak reward ``name``."""
    reward = build([RewardConfig(name=name)])[0]
    with torch.no_grad():
        target = float(reward(render(all_prompts()), all_prompts()).max())
    theta = torch.logit(_base()).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(steps):
        loss = torch.relu(target - reward(torch.sigmoid(theta), PROMPTS)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(theta).detach()


def _read(text: str):
    return parse_reply(text, ALL)


def test_clean_images_continue():
    base = _base()
    reply = _read(diagnose(base, base.clone(), PROMPTS, ALL, proxies.STRENGTHS))
    assert reply.action == "continue" and reply.strategy == "offline"
    assert "No breakdown" in reply.analysis


@pytest.mark.parametrize("name", proxies.WEAK_REWARDS)
def test_mild_collapse_of_a_weak_reward_removes_it(name):
    current = _hack(name, steps=6)
    text = diagnose(_base(), current, PROMPTS, ALL, proxies.STRENGTHS)
    reply = _read(text)
    assert reply.action == "remove" and reply.reward == name, text
    assert proxies.SIGNATURES[name] in text


def test_only_inactive_or_strong_rewards_are_never_removed():
    current = _hack("sharpness", steps=6)
    # sharpness is not active: the next best matching active weak reward goes, never a strong one
    text = diagnose(_base(), current, PROMPTS, ["saturation", "contrast", *STRONG], proxies.STRENGTHS)
    reply = _read(text)
    assert reply.action == "remove" and reply.reward in ("saturation", "contrast")
    text = diagnose(_base(), current, PROMPTS, STRONG, proxies.STRENGTHS)
    reply = _read(text)
    assert reply.action == "continue" and "Breakdown" in reply.analysis


def test_switch_when_only_strong_rewards_remain_and_images_change_little():
    base = _base()
    still = (base + 0.004).clamp(0, 1)
    reply = _read(diagnose(base, still, PROMPTS, STRONG, proxies.STRENGTHS))
    assert reply.action == "switch" and reply.strategy == "online"
    # a weak reward still active: no switch
    assert _read(diagnose(base, still, PROMPTS, ["saturation", *STRONG], proxies.STRENGTHS)).action == "continue"
    # already online: stay
    reply = _read(diagnose(base, still, PROMPTS, STRONG, proxies.STRENGTHS, strategy="online"))
    assert reply.action == "continue" and reply.strategy == "online"
    # images still changing since the previous check: no switch
    moved = render(PROMPTS, seed=9)  # same scenes, other positions: a change, not a breakdown
    reply = _read(diagnose(base, moved, PROMPTS, STRONG, proxies.STRENGTHS, previous_images=base))
    assert reply.action == "continue"


def test_input_errors():
    base = _base()
    with pytest.raises(ValueError, match="current_images"):
        diagnose(base, base[:3], PROMPTS, ALL, proxies.STRENGTHS)
    with pytest.raises(ValueError, match="strategy"):
        diagnose(base, base, PROMPTS, ALL, proxies.STRENGTHS, strategy="sometimes")


@pytest.mark.parametrize(("shape_now", "breakdown"), [(0.035, True), (0.045, False)])
def test_quality_breakdown_is_a_share_of_the_base_quality(monkeypatch, shape_now, breakdown):
    """The judge's quality is a product of components, so its scale is the base model's (about 0.05 for the shipped
    one): losing 30% of it is a breakdown (quality_tol=0.25), losing 10% is not, though no component drops by
    component_tol (0.15) and the absolute drop (0.015) is far below any fixed threshold on [0, 1]."""
    from pgot.testbed import agent, judge

    def fake_components(images, prompts):  # base images are all 0, current all 1; every component 1 but the shape
        shape = 0.05 if float(images.max()) == 0 else shape_now
        return {k: torch.full((len(prompts),), shape if k == "shape" else 1.0) for k in judge.COMPONENTS}

    monkeypatch.setattr(agent.judge, "components", fake_components)
    base, current = torch.zeros(len(PROMPTS), 3, 32, 32), torch.ones(len(PROMPTS), 3, 32, 32)
    reply = _read(diagnose(base, current, PROMPTS, STRONG, proxies.STRENGTHS))
    assert reply.analysis.startswith("Breakdown") is breakdown, reply.analysis
    assert "0.050 (base)" in reply.analysis


@pytest.mark.parametrize("thresholds", [{}, {"quality_tol": 0.0, "component_tol": 0.0}])
def test_no_damage_is_no_breakdown_whatever_the_inputs(thresholds):
    """Base quality exactly 0 and no component drop (the reported ZeroDivisionError): 0 >= 0.25 * 0 is no breakdown,
    a breakdown needs a positive drop, even with zero thresholds."""
    b = torch.zeros(1, 3, 32, 32)
    strengths = {"saturation": "weak", "contrast": "weak", "tb_align": "strong", "tb_pref": "strong"}
    reply = _read(diagnose(b, b.clone(), PROMPTS[:1], list(strengths), strengths, **thresholds))
    assert reply.action == "continue" and reply.analysis.startswith("No breakdown"), reply.analysis


def test_quality_breakdown_without_a_mean_component_drop_implicates_nobody(monkeypatch):
    """The mean quality drops (1 -> 0 and 0 -> 0) while every component's mean stays 0.5: a breakdown whose positive
    drops are all 0 matches no signature (no division by zero) and continues."""
    from pgot.testbed import agent, judge

    def fake_components(images, prompts):
        base = float(images.max()) == 0
        shape = torch.tensor([1.0, 0.0]) if base else torch.tensor([1.0, 0.0])
        colour = torch.tensor([1.0, 0.0]) if base else torch.tensor([0.0, 1.0])
        return {k: shape if k == "shape" else colour if k == "colour" else torch.ones(2) for k in judge.COMPONENTS}

    monkeypatch.setattr(agent.judge, "components", fake_components)
    base, current = torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)
    reply = _read(diagnose(base, current, PROMPTS[:2], ALL, proxies.STRENGTHS))
    assert reply.action == "continue"
    assert reply.analysis.startswith("Breakdown") and "No active weak reward's collapse signature" in reply.analysis


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quality_tol": -1}, "quality_tol must be a finite number >= 0, got -1 (default 0.25)."),
        ({"quality_tol": float("nan")}, "quality_tol must be a finite number >= 0, got nan (default 0.25)."),
        ({"quality_tol": 1.5}, "quality_tol must be at most 1 (a share of the base images' quality), got 1.5"),
        ({"component_tol": float("inf")}, "component_tol must be a finite number >= 0, got inf (default 0.15)."),
        ({"change_tol": -0.01}, "change_tol must be a finite number >= 0, got -0.01 (default 0.02)."),
    ],
)
def test_thresholds_are_validated(kwargs, message):
    base = _base()[:1]
    with pytest.raises(ValueError) as err:
        diagnose(base, base, PROMPTS[:1], ALL, proxies.STRENGTHS, **kwargs)
    assert str(err.value).startswith(message)


def test_inputs_are_named_exactly():
    base = _base()[:2]
    with pytest.raises(ValueError, match=r"^diagnose: got 3 prompts for 2 image pairs; pass one prompt per image"):
        diagnose(base, base, PROMPTS[:3], ALL, proxies.STRENGTHS)
    with pytest.raises(ValueError, match=r"^diagnose: previous_images holds 1 images but base_images 2"):
        diagnose(base, base, PROMPTS[:2], ALL, proxies.STRENGTHS, previous_images=base[:1])
    with pytest.raises(TypeError, match=r"^diagnose: prompts must be a list of prompts, got a single string"):
        diagnose(base[:1], base[:1], PROMPTS[0], ALL, proxies.STRENGTHS)
    with pytest.raises(TypeError, match=r"^diagnose: active_rewards must be a list of reward names"):
        diagnose(base[:1], base[:1], PROMPTS[:1], "saturation", proxies.STRENGTHS)
    with pytest.raises(ValueError, match=r"^diagnose: current_images must be float images in \[0, 1\], got dtype "):
        diagnose(base, (base * 255).to(torch.uint8), PROMPTS[:2], ALL, proxies.STRENGTHS)
    with pytest.raises(ValueError, match=r"^diagnose: base_images must lie in \[0, 1\]"):
        diagnose(base * 255, base, PROMPTS[:2], ALL, proxies.STRENGTHS)
    with pytest.raises(ValueError, match=r"^diagnose: no images to diagnose \(empty batch\)"):
        diagnose(base[:0], base[:0], [], ALL, proxies.STRENGTHS)
