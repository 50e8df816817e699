"""Tests of pgot.testbed.proxies: registry, differentiability, the weak-reward mechanism, the shipped preference models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgot.config import RewardConfig
from pgot.rewards import REWARDS, build, score
from pgot.testbed import judge, proxies
from pgot.testbed.scenes import all_prompts, render

PROXIES = list(proxies.STRENGTHS)


def _build(name: str, path: str = "") -> torch.nn.Module:
    return build([RewardConfig(name=name, path=path)])[0]


def test_registry_strengths_and_signatures_cover_every_proxy():
    assert set(proxies.PREFERENCE_MODELS) <= set(REWARDS)
    assert set(proxies.WEAK_REWARDS) <= set(REWARDS)
    assert set(proxies.STRENGTHS) == set(proxies.SIGNATURES) == set(proxies.SIGNATURE_COMPONENTS)
    assert {proxies.STRENGTHS[n] for n in proxies.WEAK_REWARDS} == {"weak"}
    assert {proxies.STRENGTHS[n] for n in proxies.PREFERENCE_MODELS} == {"strong"}
    for weights in proxies.SIGNATURE_COMPONENTS.values():
        assert set(weights) <= set(judge.COMPONENTS) and all(w > 0 for w in weights.values())


# the weak (analytic) rewards have no weights, so no tiny build: the shipped and tiny builds of the strong ones
_BUILDS = [(n, "") for n in PROXIES] + [(n, "tiny") for n in PROXIES if n not in proxies.WEAK_REWARDS]


@pytest.mark.parametrize(("name", "path"), _BUILDS)
def test_every_proxy_is_a_differentiable_pgot_reward(name, path):
    reward = _build(name, path)
    prompts = all_prompts()[:4]
    x = render(prompts, seed=1).requires_grad_(True)
    r = reward(x, prompts)
    assert r.shape == (4,) and r.dtype == torch.float32 and torch.isfinite(r).all()
    r.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_score_stacks_testbed_proxies_and_resizes():
    rewards = build([RewardConfig(name=n) for n in ("tb_align", "tb_pref", "saturation")])
    prompts = all_prompts()[:3]
    x = render(prompts)
    s = score(rewards, x, prompts)
    assert s.shape == (3, 3)
    big = torch.nn.functional.interpolate(x, size=(64, 64), mode="nearest")
    torch.testing.assert_close(score(rewards[:1], big, prompts)[:, 0], s[:, 0], atol=0.05, rtol=0.05)


def test_tiny_build_is_seeded_and_differs_from_shipped():
    prompts = all_prompts()[:2]
    x = render(prompts)
    a = build([RewardConfig(name="tb_pref", path="tiny", tiny_seed=1)])[0](x, prompts)
    b = build([RewardConfig(name="tb_pref", path="tiny", tiny_seed=1)])[0](x, prompts)
    c = build([RewardConfig(name="tb_pref", path="tiny", tiny_seed=2)])[0](x, prompts)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, _build("tb_pref")(x, prompts))


def test_preference_errors():
    with pytest.raises(ValueError, match="neither a safetensors file"):
        _build("tb_align", "/nonexistent/weights.safetensors")
    with pytest.raises(ValueError, match="testbed prompts only"):
        _build("tb_align")(render(all_prompts()[:1]), ["a photo of a cat"])


# a prompt whose honest value of the weak reward is about the lowest of the world
HONEST_LOW = {
    "saturation": "a large grey circle on a white background",
    "colorfulness": "a large white triangle on a black background",
    "contrast": "a small green square on a grey background",
    "sharpness": "a small green square on a grey background",
}


def _push_to_target(reward, prompt: str, target: float, steps: int = 60) -> torch.Tensor:
    """Minimise the global-target hinge ``relu(C - r(x))`` (paper eq. 1) over the pixels, from the exact rendering
    plus faint noise (std 0.002; an exactly grey image is a saddle point of HSV saturation, no model makes one)."""
    gen = torch.Generator().manual_seed(0)
    x0 = (render([prompt]) + 0.002 * torch.randn(1, 3, 32, 32, generator=gen)).clamp(1e-3, 1 - 1e-3)
    theta = torch.logit(x0).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.1)
    for _ in range(steps):
        loss = torch.relu(target - reward(torch.sigmoid(theta), [prompt])).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(theta).detach()


@pytest.mark.parametrize("name", proxies.WEAK_REWARDS)
def test_weak_reward_global_target_beyond_the_honest_bound_costs_quality(name):
    reward = _build(name)
    prompts = all_prompts()
    with torch.no_grad():
        honest = reward(render(prompts), prompts)  # each prompt's honest value: its exact rendering
    low = HONEST_LOW[name]
    lo, target = float(honest[prompts.index(low)]), float(honest.max())
    assert target > lo + 0.05  # heterogeneous bounds: the global target is far above this prompt's honest value
    hacked = _push_to_target(reward, low, target)
    with torch.no_grad():
        r = float(reward(hacked, [low]))
    assert r > lo + 0.5 * (target - lo)  # the reward went well past the honest bound ...
    assert float(judge.quality(hacked, [low])) < 0.5  # ... and the image is no longer a good image of the prompt
    # the prompt that attains the global target is left alone: its honest image already meets it
    best = prompts[int(honest.argmax())]
    kept = _push_to_target(reward, best, target, steps=5)
    assert float(judge.quality(kept, [best])) > 0.95


@pytest.fixture(scope="module")
def base_samples():
    """4 samples of 8 prompts from the shipped base model at the recommended sampler (seed 5: not a training seed)."""
    from pgot.config import DraftConfig, ModelConfig
    from pgot.generate import generate
    from pgot.model import load_model
    from pgot.testbed import MODEL_DIR, basemodel

    cfg = ModelConfig(
        path=str(MODEL_DIR), resolution=32, use_t5=False, max_sequence_length=basemodel.MAX_SEQUENCE_LENGTH
    )
    model = load_model(cfg)
    prompts = all_prompts()[5::13]  # 8 prompts
    texts = [p for p in prompts for _ in range(4)]
    draft = DraftConfig(
        num_steps=basemodel.NUM_STEPS, k=0, guidance_scale=basemodel.GUIDANCE_SCALE, shift=basemodel.SHIFT
    )
    with torch.no_grad():
        images = generate(
            model,
            texts,
            [i // 4 for i in range(32)],
            [i % 4 for i in range(32)],
            5,
            **dataclasses.asdict(draft) | {"k": 0},
        )
    return images, texts


@pytest.mark.parametrize("name", list(proxies.PREFERENCE_MODELS))
def test_shipped_preference_models_agree_with_the_judge_above_chance(name, base_samples):
    images, texts = base_samples
    with torch.no_grad():
        r = _build(name)(images, texts).view(8, 4)
        tiny = _build(name, "tiny")(images, texts).view(8, 4)
    q = judge.quality(images, texts).view(8, 4)
    i, j = torch.triu_indices(4, 4, 1)
    dq = q[:, i] - q[:, j]  # (8, 6) within-prompt pairs
    keep = dq.abs() >= 0.01
    assert int(keep.sum()) >= 20
    agree = float(((r[:, i] - r[:, j]) * dq > 0)[keep].float().mean())
    agree_tiny = float(((tiny[:, i] - tiny[:, j]) * dq > 0)[keep].float().mean())
    assert agree >= 0.65, f"{name} agrees with the judge on {agree:.2f} of {int(keep.sum())} pairs"
    assert agree > agree_tiny


def test_preference_models_refuse_a_bare_string_as_prompts():
    from pgot.testbed.proxies import scene_planes

    reward = build([RewardConfig(name="tb_align", path="tiny")])[0]
    x = render(["a small red circle on a white background"])
    with pytest.raises(TypeError, match=r"^reward 'tb_align': prompts must be a list of prompts, got a single string"):
        reward.compute(x, "a small red circle on a white background")
    with pytest.raises(TypeError, match=r"^scene_planes: scenes must be a list of prompts, got a single string"):
        scene_planes("a small red circle on a white background")


def test_build_log_says_where_each_rewards_weights_come_from(caplog):
    with caplog.at_level("INFO", logger="pgot.rewards"):
        build(
            [RewardConfig(name="tb_align"), RewardConfig(name="saturation"), RewardConfig(name="tb_pref", path="tiny")]
        )
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("building reward")] == [
        "building reward tb_align from its shipped weights (pgot/testbed/preference/tb_align.safetensors)",
        "building reward saturation from its formula (analytic, no weights)",
        "building reward tb_pref from a random tiny build (tiny_seed=0)",
    ]
