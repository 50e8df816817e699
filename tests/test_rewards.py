"""The reward contract (pgot/rewards/__init__.py, base.py, preprocessing.py, analytic.py).

Registry and build errors, score() stacking with one shared preprocessing, input validation messages,
and the analytic rewards against brute-force per-pixel implementations of their documented formulas
(colorsys for HSV saturation, PIL for luma, plain Python loops for colourfulness and the Laplacian).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch
from PIL import Image

import pgot.rewards as rewards_pkg
from pgot.config import RewardConfig
from pgot.rewards import REWARDS, Reward, build, preprocess, score
from pgot.rewards.analytic import ANALYTIC

LEARNED = ["clip", "ict", "hp", "hps", "pickscore", "imagereward", "aesthetic"]
ANALYTIC_NAMES = ["colorfulness", "contrast", "saturation", "brightness", "sharpness"]


@pytest.fixture(scope="module")
def tiny_rewards():
    cfgs = [RewardConfig(name=n, path="tiny") for n in LEARNED] + [RewardConfig(name=n) for n in ANALYTIC_NAMES]
    return build(cfgs)


def _images(b: int = 2, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_registry_names():
    assert set(REWARDS) == set(LEARNED + ANALYTIC_NAMES + ["tb_align", "tb_pref"])  # + the testbed's preference models


def test_unknown_name_lists_known_ones():
    with pytest.raises(
        ValueError,
        match=r"rewards.1.name='imgreward' is not a known reward. Known rewards: clip, ict, hp, hps, pickscore, imagereward, aesthetic, .*Did you mean 'imagereward'\?",
    ):
        build([RewardConfig(name="brightness"), RewardConfig(name="imgreward", path="tiny")])


def test_score_stacks_all_rewards_with_one_preprocessing(tiny_rewards, monkeypatch):
    images = _images().requires_grad_(True)
    prompts = ["a cat", "a dog"]
    calls = []
    real = rewards_pkg.preprocess
    monkeypatch.setattr(rewards_pkg, "preprocess", lambda x: calls.append(x.shape) or real(x))
    scores = score(tiny_rewards, images, prompts)
    assert calls == [images.shape]  # once for the seven learned rewards
    assert scores.shape == (2, len(tiny_rewards)) and scores.dtype == torch.float32
    for m, r in enumerate(tiny_rewards):
        torch.testing.assert_close(scores[:, m], r(images, prompts), rtol=1e-6, atol=1e-6)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_every_reward_is_a_frozen_module(tiny_rewards):
    for r in tiny_rewards:
        assert isinstance(r, Reward) and isinstance(r, torch.nn.Module) and r.name in REWARDS
        assert not any(p.requires_grad for p in r.parameters()) and not r.training


def test_tiny_builds_are_fast(tiny_rewards):
    """Forward + backward of 4 images at 64 x 64 well under a second per tiny reward (1 CPU thread)."""
    import time

    images = _images(4, 64, 64).requires_grad_(True)
    prompts = ["a photo of a cat"] * 4
    for r in tiny_rewards:
        r(images, prompts).sum().backward()  # warm-up (text cache, allocator)
        start = time.perf_counter()
        r(images, prompts).sum().backward()
        assert time.perf_counter() - start < 1.0, r.name


@pytest.mark.parametrize("which", ["clip", "brightness", "score"])
def test_bad_inputs(which, tiny_rewards):
    by_name = {r.name: r for r in tiny_rewards}
    if which == "score":
        call, label = (lambda x, p: score([by_name["clip"], by_name["brightness"]], x, p)), "clip, brightness"
    else:
        call, label = by_name[which], which
    ok = _images()
    with pytest.raises(
        ValueError,
        match=rf"reward '{label}': images must be a float tensor of shape \(B, 3, H, W\).*got shape \(3, 40, 56\)",
    ):
        call(ok[0], ["a"])
    with pytest.raises(
        ValueError, match=rf"reward '{label}': images must be a float tensor.*got shape \(2, 4, 40, 56\)"
    ):
        call(torch.rand(2, 4, 40, 56), ["a", "b"])
    with pytest.raises(ValueError, match=rf"reward '{label}': images must be a float tensor.*dtype torch.uint8"):
        call((ok * 255).to(torch.uint8), ["a", "b"])
    bad = ok.clone()
    bad[0, 0, 0, :2] = torch.tensor([-1.0, 1.5])
    with pytest.raises(
        ValueError,
        match=rf"reward '{label}': images must lie in \[0, 1\] \(tolerance 0.001\), got values in \[-1, 1.5\].*x / 2 \+ 0.5",
    ):
        call(bad, ["a", "b"])
    with pytest.raises(
        ValueError, match=rf"reward '{label}': the prompt list is empty; pass one prompt per image \(B=2\)"
    ):
        call(ok, [])
    with pytest.raises(ValueError, match=rf"reward '{label}': got 3 prompts for 2 images \(shape \(2, 3, 40, 56\)\)"):
        call(ok, ["a", "b", "c"])
    with pytest.raises(ValueError, match=rf"reward '{label}': prompts must be a list of strings"):
        call(ok, "a cat")
    call((ok * (1 + 5e-4)).clamp(max=1 + 5e-4), ["a", "b"])  # within the tolerance


def test_bf16_weights_match_float32():
    f32 = REWARDS["clip"](RewardConfig(name="clip", path="tiny"), "cpu", None)
    bf16 = REWARDS["clip"](RewardConfig(name="clip", path="tiny", dtype="bfloat16"), "cpu", None)
    assert bf16.dtype == torch.bfloat16 and f32.dtype == torch.float32
    images = _images().requires_grad_(True)
    out = bf16(images, ["a cat", "a dog"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, f32(images, ["a cat", "a dog"]), rtol=0, atol=3e-2)  # bf16 has 8 mantissa bits
    out.sum().backward()
    assert torch.isfinite(images.grad).all()


def test_preprocess_shapes_and_identity_at_224():
    for h, w in [(64, 64), (512, 768), (1024, 640), (224, 300)]:
        assert preprocess(torch.rand(1, 3, h, w)).shape == (1, 3, 224, 224)
    x = torch.rand(1, 3, 224, 224)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(x), (x - mean) / std)


# ---------------------------------------------------------------------------------------------
# Analytic rewards: brute force on an 8-bit image (values k/255)
# ---------------------------------------------------------------------------------------------


def _u8(seed: int = 0, h: int = 9, w: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _tensor(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(2, 0, 1)[None].double() / 255


def test_brightness_is_pil_luma():
    u8 = _u8()
    pil_l = np.asarray(Image.fromarray(u8).convert("L"), dtype=np.float64) / 255  # rounded to 8 bits
    got = ANALYTIC["brightness"](_tensor(u8)).item()
    assert abs(got - pil_l.mean()) < 0.5 / 255 + 1e-9


def test_contrast_saturation_colorfulness_sharpness_brute_force():
    u8 = _u8(1)
    x = u8.astype(np.float64) / 255
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    contrast = math.sqrt(sum((v - y.mean()) ** 2 for v in y.flat) / y.size)
    sat = np.mean([colorsys.rgb_to_hsv(*px)[1] for px in x.reshape(-1, 3)])
    rg = [p[0] - p[1] for p in x.reshape(-1, 3)]
    yb = [0.5 * (p[0] + p[1]) - p[2] for p in x.reshape(-1, 3)]
    colorful = math.sqrt(np.var(rg) + np.var(yb)) + 0.3 * math.sqrt(np.mean(rg) ** 2 + np.mean(yb) ** 2)
    lap = [
        abs(y[i - 1, j] + y[i + 1, j] + y[i, j - 1] + y[i, j + 1] - 4 * y[i, j])
        for i in range(1, y.shape[0] - 1)
        for j in range(1, y.shape[1] - 1)
    ]
    t = _tensor(u8)
    for name, expected in [
        ("contrast", contrast),
        ("saturation", sat),
        ("colorfulness", colorful),
        ("sharpness", np.mean(lap)),
    ]:
        assert ANALYTIC[name](t).item() == pytest.approx(expected, rel=1e-9, abs=1e-9), name


def test_colorfulness_matches_8bit_paper_scale():
    """Hasler-Suesstrunk on 0-255 pixels is 255 x the [0, 1] value (e.g. a pure red image: 0.3 * sqrt(255^2 + 127.5^2))."""
    red = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    red[:, 0] = 1
    assert 255 * ANALYTIC["colorfulness"](red).item() == pytest.approx(0.3 * math.hypot(255, 127.5), rel=1e-6)


@pytest.mark.parametrize("name", ANALYTIC_NAMES)
def test_analytic_gradients_finite_on_flat_and_black_images(name):
    reward = REWARDS[name](RewardConfig(name=name), "cpu", None)
    for fill in (0.0, 0.5):
        images = torch.full((2, 3, 8, 8), fill, requires_grad=True)
        reward(images, ["", ""]).sum().backward()
        assert torch.isfinite(images.grad).all(), (name, fill)
    images = _images().requires_grad_(True)
    reward(images, ["a", "b"]).sum().backward()
    assert images.grad.abs().sum() > 0


def test_analytic_rejects_weights_path():
    with pytest.raises(ValueError, match=r"reward 'contrast' is analytic and has no weights; leave its path empty"):
        build([RewardConfig(name="contrast", path="/some/file.pt")])


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_every_reward_scores_nan_for_a_nonfinite_pixel(bad_value, tiny_rewards):
    """The rule of pgot.rewards.base.nan_for_nonfinite: one non-finite pixel makes that image's score NaN in every
    reward (analytic and learned, through score() and through a reward's own call); the other image keeps its
    finite score, unchanged."""
    images = _images()
    clean = score(tiny_rewards, images, ["a cat", "a dog"])
    broken = images.clone()
    broken[1, 2, 3, 4] = bad_value
    scores = score(tiny_rewards, broken, ["a cat", "a dog"])
    assert torch.isnan(scores[1]).all(), [
        r.name for r, s in zip(tiny_rewards, scores[1], strict=True) if not torch.isnan(s)
    ]
    torch.testing.assert_close(scores[0], clean[0])
    for r in tiny_rewards:
        alone = r(broken, ["a cat", "a dog"])
        assert torch.isnan(alone[1]) and torch.isfinite(alone[0]), r.name


@pytest.mark.parametrize("name", ["contrast", "saturation", "colorfulness"])
def test_analytic_functions_keep_nan(name):
    """The guarded square root and division map 0 to 0 but NaN to NaN (they once mapped NaN to 0)."""
    images = torch.full((1, 3, 8, 8), float("nan"))
    assert torch.isnan(ANALYTIC[name](images)).all()
    assert ANALYTIC[name](torch.zeros(1, 3, 8, 8)).item() == 0.0
