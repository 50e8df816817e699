"""Tests of pgot.testbed.judge: about 1 on exact renderings, graded damage on the right component, ~0 on nonsense."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgot.testbed import judge
from pgot.testbed.scenes import COLOURS, all_prompts, parse_prompt, render

PROMPTS = all_prompts()[::7]  # 16 prompts: every shape, size, colour and background
CLEAN = render(PROMPTS, seed=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mean(images: torch.Tensor, prompts=PROMPTS) -> dict[str, float]:
    comps = judge.components(images, prompts)
    out = {k: float(v.mean()) for k, v in comps.items()}
    out["quality"] = float(judge.quality(images, prompts).mean())
    return out


def test_exact_renderings_score_about_one_with_any_jitter():
    prompts = all_prompts()
    for seed in (0, 1):
        q = judge.quality(render(prompts, seed=seed), prompts)
        assert q.shape == (len(prompts),) and q.dtype == torch.float32
        assert float(q.min()) > 0.97
    corners = np.array([[2.5, -2.5]] * len(prompts))
    assert float(judge.quality(render(prompts, offsets=corners), prompts).min()) > 0.97


def test_quality_is_the_product_of_the_components():
    x = (CLEAN + 0.03 * torch.randn(CLEAN.shape, generator=_gen())).clamp(0, 1)
    comps = judge.components(x, PROMPTS)
    assert list(comps) == list(judge.COMPONENTS) == list(judge.FIDELITY + judge.CLEANLINESS)
    torch.testing.assert_close(judge.quality(x, PROMPTS), torch.stack(list(comps.values())).prod(0))
    for v in comps.values():
        assert float(v.min()) >= 0 and float(v.max()) <= 1


def _noise(x, a):
    return (x + a * torch.randn(x.shape, generator=_gen(1))).clamp(0, 1)


def _vstripes(x, a):
    return (x + a * torch.tensor([(-1.0) ** j for j in range(32)])).clamp(0, 1)


def _bands(x, a):
    return (x + a * torch.sin(torch.arange(32.0) / 32 * 4 * math.pi)[:, None]).clamp(0, 1)


def _blur(x, sigma):
    k = torch.exp(-(torch.arange(-4.0, 5.0) ** 2) / (2 * sigma**2))
    k = (k / k.sum())[:, None] * (k / k.sum())[None, :]
    return F.conv2d(F.pad(x, (4, 4, 4, 4), mode="replicate"), k.expand(3, 1, 9, 9), groups=3)


def _shift_background(x, a):
    """Make the background darker by a (lighter for a black one); the object keeps its colour."""
    out = []
    for img, p in zip(x, PROMPTS, strict=True):
        tint = (a if parse_prompt(p).background == "black" else -a) * (1 - _coverage(img, p))
        out.append((img + tint).clamp(0, 1))
    return torch.stack(out)


def _coverage(img, prompt):
    s = parse_prompt(prompt)
    g, c = torch.tensor(s.background_rgb)[:, None, None], torch.tensor(s.rgb)[:, None, None]
    return ((img - g) * (c - g)).sum(0) / ((c - g) ** 2).sum()


def _recolour(x, a):
    """Move the object's colour a of the way toward magenta (0.75, 0.25, 0.75)."""
    magenta = torch.tensor([0.75, 0.25, 0.75])[:, None, None]
    return torch.stack([img + a * (magenta - img) * _coverage(img, p) for img, p in zip(x, PROMPTS, strict=True)])


def _halo(x, a):
    """Unsharp masking: x + a (x - blur(x)), which rings bright and dark around every edge."""
    return (x + a * (x - _blur(x, 1.0))).clamp(0, 1)


# damage, strengths (increasing), the component it must lower most (iid RGB noise is both brightness and colour noise)
DAMAGES = [
    (_noise, (0.01, 0.03, 0.08), "noise"),
    (_noise, (0.01, 0.03, 0.08), "colour_noise"),
    (_vstripes, (0.01, 0.03, 0.06), "stripes"),
    (_bands, (0.01, 0.03, 0.06), "banding"),
    (_blur, (0.5, 1.0, 1.5), "blur"),
    (_shift_background, (0.05, 0.1, 0.2), "background"),
    (_recolour, (0.1, 0.3, 0.6), "colour"),
    (_halo, (0.3, 1.0, 2.0), "halo"),
]


@pytest.mark.parametrize(("damage", "levels", "component"), DAMAGES, ids=[d[2] for d in DAMAGES])
def test_each_damage_lowers_its_component_more_with_more_damage(damage, levels, component):
    scores = [_mean(damage(CLEAN, a)) for a in levels]
    values = [s[component] for s in scores]
    quality = [s["quality"] for s in scores]
    assert values[0] < 0.999  # even the smallest damage costs something
    assert values[0] > 0.6  # ... but only a little
    assert values[0] > values[1] > values[2]  # graded
    assert quality[0] > quality[1] > quality[2]
    assert values[-1] < 0.5
    # the named component is the most damaged one at the middle level
    middle = {k: v for k, v in scores[1].items() if k != "quality"}
    most = min(middle, key=middle.__getitem__)
    assert most == component or {most, component} == {"noise", "colour_noise"}


def test_over_saturation_component_sees_a_neon_tint():
    tint = torch.tensor([1.0, 0.3, -1.0])[None, :, None, None]  # toward orange
    levels = [_mean((CLEAN + a * tint).clamp(0, 1)) for a in (0.03, 0.1, 0.2)]
    values = [s["oversaturation"] for s in levels]
    assert 0.999 > values[0] > values[1] > values[2]
    assert min(levels[1], key=levels[1].__getitem__) in ("oversaturation", "quality")
    # a grey object turned colourful: colour fidelity and over-saturation both drop
    p = ["a large grey circle on a black background"]
    x = render(p)
    neon = x.clone()
    neon[:, 0] = torch.where(x[:, 0] > 0.3, torch.full_like(x[:, 0], 0.95), x[:, 0])
    c = judge.components(neon, p)
    assert float(c["colour"]) < 0.1 and float(c["oversaturation"]) < 0.95


@pytest.mark.parametrize(
    ("swap", "component"),
    [
        ({"colour": "blue"}, "colour"),
        ({"size": "large"}, "size"),
        ({"shape": "square"}, "shape"),
        ({"shape": "triangle"}, "shape"),
        ({"background": "black"}, "background"),
    ],
)
def test_wrong_prompt_lowers_the_right_fidelity_component(swap, component):
    truth = parse_prompt("a small red circle on a white background")
    asked = truth.__class__(**{**truth.__dict__, **swap})
    x = render([truth], seed=4)
    comps = judge.components(x, [asked.prompt])
    assert float(comps[component]) < 0.2
    assert float(judge.quality(x, [asked.prompt])) < 0.2
    assert float(judge.quality(x, [truth.prompt])) > 0.97


def test_wrong_prompts_and_pure_noise_score_about_zero():
    perm = torch.randperm(len(PROMPTS), generator=_gen(2))
    wrong = [PROMPTS[i] for i in perm.tolist()]
    q = judge.quality(CLEAN, wrong)
    same = torch.tensor([a == b for a, b in zip(wrong, PROMPTS, strict=True)])
    assert float(q[~same].mean()) < 0.1
    noise = torch.rand(CLEAN.shape, generator=_gen(3))
    assert float(judge.quality(noise, PROMPTS).max()) < 0.05
    flat = torch.full_like(CLEAN, 0.5)  # nothing drawn
    assert float(judge.quality(flat, PROMPTS).max()) < 0.05


def test_missing_object_scores_zero_on_shape_colour_size():
    p = ["a large blue square on a white background"]
    x = torch.tensor(COLOURS["white"])[None, :, None, None].expand(1, 3, 32, 32).clone()
    c = judge.components(x, p)
    for k in ("shape", "colour", "size"):
        assert float(c[k]) == 0.0
    assert float(c["background"]) == pytest.approx(1.0)


def test_input_errors():
    with pytest.raises(ValueError, match="32 x 32"):
        judge.quality(torch.zeros(1, 3, 64, 64), PROMPTS[:1])
    with pytest.raises(ValueError, match="one prompt per image"):
        judge.quality(CLEAN[:2], PROMPTS[:1])
    with pytest.raises(ValueError, match="grammar"):
        judge.quality(CLEAN[:1], ["a cat"])


def test_images_follow_the_rule_of_pgot_score():
    """Float images in [0, 1] only: uint8 or 0-255 images are refused (they used to score 0, clamped to white)."""
    x = CLEAN[:1]
    with pytest.raises(ValueError, match=r"^judge: images must be float images in \[0, 1\], got dtype torch.uint8"):
        judge.quality((x * 255).to(torch.uint8), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"^judge: images must lie in \[0, 1\] \(tolerance 0.001\), got values in"):
        judge.components(x * 255, PROMPTS[:1])
    with pytest.raises(ValueError, match=r"^judge: images hold NaN or infinite values"):
        judge.quality(torch.full_like(x, float("nan")), PROMPTS[:1])
    assert float(judge.quality(x.clamp(1e-4, 1) + 5e-4, PROMPTS[:1])[0]) > 0.9  # within the tolerance: clamped


@pytest.mark.parametrize("fn", [judge.quality, judge.components])
def test_empty_batch_and_bare_string(fn):
    out = fn(torch.zeros(0, 3, 32, 32), [])
    shapes = [tuple(v.shape) for v in out.values()] if isinstance(out, dict) else [tuple(out.shape)]
    assert set(shapes) == {(0,)}
    with pytest.raises(TypeError, match=r"^judge: prompts must be a list of prompts, got a single string"):
        fn(CLEAN[:1], PROMPTS[0])
