"""Tests of pgot.testbed.scenes: the prompt grammar, the split and the exact renderer."""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import pytest
import torch

from pgot.testbed import scenes
from pgot.testbed.scenes import COLOURS, SCALES, SHAPES, Scene, all_prompts, coverage, parse_prompt, render, split


def test_grammar_counts_and_round_trip():
    prompts = all_prompts()
    # 2 sizes x 3 shapes x (7 colours x 3 backgrounds - 3 invisible pairs)
    assert len(prompts) == 2 * 3 * (7 * 3 - 3) == 108
    assert len(set(prompts)) == len(prompts)
    for p in prompts:
        s = parse_prompt(p)
        assert s.prompt == p
        assert s.colour != s.background


def test_shipped_prompt_file_is_the_grammar():
    text = (resources.files("pgot") / "data" / "testbed_prompts.txt").read_text(encoding="utf-8")
    assert text.splitlines() == all_prompts()


def test_parse_prompt_normalises_case_space_and_period():
    s = parse_prompt("  A Small RED   circle on a grey background. ")
    assert s == Scene("circle", "red", "small", "grey")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a small purple circle on a grey background", ["colour", "purple"]),
        ("a medium red circle on a grey background", ["size", "medium"]),
        ("a small red hexagon on a grey background", ["shape", "hexagon"]),
        ("a small red circle on a blue background", ["background", "blue"]),
        ("a small grey circle on a grey background", ["invisible"]),
        ("a photo of a cat", ["outside the testbed grammar"]),
        ("a small red cricle on a grey background", ["circle"]),  # did you mean
    ],
)
def test_parse_prompt_errors_say_what_and_how(text, words):
    with pytest.raises(ValueError) as err:
        parse_prompt(text)
    for w in words:
        assert w in str(err.value)


def test_split_is_deterministic_disjoint_and_covers_every_attribute():
    train, held = split()
    assert split() == (train, held)
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(all_prompts())
    assert 15 <= len(held) <= 40
    train_scenes = [parse_prompt(p) for p in train]
    for attr, values in (("shape", SHAPES), ("colour", COLOURS), ("size", SCALES)):
        assert {getattr(s, attr) for s in train_scenes} == set(values)
    # a subset splits consistently with the full set
    sub = all_prompts()[:30]
    assert split(sub)[1] == [p for p in sub if p in held]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [4.0, 8.0])
def test_every_shape_has_area_pi_s2(shape, scale):
    c = np.array([16.0])
    cov = coverage([shape], c, c, np.array([scale]), supersample=16)
    assert cov.sum() == pytest.approx(math.pi * scale**2, rel=0.02)


def test_coverage_is_exact_for_a_pixel_aligned_square():
    # half-side 4 * sqrt(pi) / 2 = 3.5449; centred at 16 the square spans [12.455, 19.545]
    cov = coverage(["square"], np.array([16.0]), np.array([16.0]), np.array([4.0]), supersample=8)[0]
    assert cov[16, 16] == 1.0 and cov[0, 0] == 0.0
    assert cov[16, 12] == pytest.approx(0.5, abs=1 / 8)  # edge pixel [12, 13] is about half covered


def test_triangle_points_up_with_centroid_at_position():
    cov = coverage(["triangle"], np.array([16.0]), np.array([16.0]), np.array([8.0]), supersample=16)[0]
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    assert (cov * xs).sum() / cov.sum() == pytest.approx(16.0, abs=0.05)
    assert (cov * ys).sum() / cov.sum() == pytest.approx(16.0, abs=0.05)
    top, bottom = cov[:16].sum(1), cov[16:].sum(1)
    assert top[top > 0].min() < bottom[bottom > 0].min()  # narrow at the top: apex up


def test_render_colours_and_range():
    x = render(["a large red square on a black background"])
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 16, 16], torch.tensor(COLOURS["red"]))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor(COLOURS["black"]))
    assert float(x.min()) >= 0.05 - 1e-6 and float(x.max()) <= 0.95 + 1e-6


def test_render_is_a_linear_mix_of_object_and_background():
    x = render(["a small blue circle on a white background"], seed=3)[0]
    c, g = torch.tensor(COLOURS["blue"])[:, None, None], torch.tensor(COLOURS["white"])[:, None, None]
    a = ((x - g) / (c - g))[0]  # coverage from the red channel
    torch.testing.assert_close(x, g * (1 - a) + c * a, atol=1e-6, rtol=0)
    assert 0 < float(a.sum()) < 60


def test_render_jitter_seeds_and_offsets():
    p = ["a large green triangle on a grey background"] * 4
    a, b = render(p, seed=1), render(p, seed=1)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], a[1])  # each image gets its own offset
    assert not torch.equal(render(p, seed=2), a)
    centred = render(p[:1])
    shifted = render(p[:1], offsets=np.array([[2.0, 0.0]]))
    torch.testing.assert_close(shifted[..., 2:], centred[..., :-2])
    with pytest.raises(ValueError, match="offsets"):
        render(p, offsets=np.zeros((3, 2)))


def test_render_accepts_scenes_and_rejects_bad_prompts():
    s = parse_prompt("a small yellow square on a black background")
    torch.testing.assert_close(render([s]), render([s.prompt]))
    with pytest.raises(ValueError, match="grammar"):
        render(["a dog"])
    assert render([]).shape == (0, 3, 32, 32)


def test_jitter_keeps_every_object_inside_the_image():
    corners = np.array([[dx, dy] for dx in (-scenes.JITTER, scenes.JITTER) for dy in (-scenes.JITTER, scenes.JITTER)])
    for shape in SHAPES:
        for size in SCALES:
            p = [f"a {size} red {shape} on a black background"] * 4
            x = render(p, offsets=corners)
            border = torch.cat([x[:, 0, 0], x[:, 0, -1], x[:, 0, :, 0], x[:, 0, :, -1]], dim=1)
            assert float(border.max()) == pytest.approx(COLOURS["black"][0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"offsets": [[float("nan"), 0.0]]},
            "render: offsets must be finite numbers of pixels, got [nan, 0.0] for scene 0.",
        ),
        (
            {"offsets": [[0.0, float("inf")]]},
            "render: offsets must be finite numbers of pixels, got [0.0, inf] for scene 0.",
        ),
        (
            {"seed": 0, "jitter": -5},
            "render: jitter must be a finite number of pixels >= 0 (the largest offset), got -5",
        ),
        ({"seed": 0, "jitter": float("nan")}, "render: jitter must be a finite number of pixels >= 0"),
        ({"resolution": 0}, "render: resolution must be a positive number of pixels, got 0."),
    ],
)
def test_render_refuses_bad_geometry(kwargs, message):
    with pytest.raises(ValueError) as err:
        render(["a small red circle on a white background"], **kwargs)
    assert str(err.value).startswith(message)


def test_render_refuses_a_bare_string_and_renders_an_empty_list():
    with pytest.raises(TypeError, match=r"^render: scenes must be a list of prompts, got a single string"):
        render("a small red circle on a white background")
    assert tuple(render([]).shape) == (0, 3, 32, 32)


def test_grammar_problems_state_the_grammar_once():
    bad = ["a photo of a cat", "a photo of a dog", "a small purple circle on a white background", "a photo of a cat"]
    message = scenes.grammar_problems([*bad, "a small red circle on a white background"], limit=2)
    assert message.startswith(
        "3 prompt(s) are outside the testbed grammar: prompt 'a photo of a cat' is outside the testbed grammar; "
        "prompt 'a photo of a dog' is outside the testbed grammar (1 more). Testbed prompts read "
    )
    assert message.count("Testbed prompts read") == 1 and message.endswith("all_prompts() lists them all.")
    assert scenes.grammar_problems(all_prompts()) is None
    with pytest.raises(scenes.PromptError) as err:
        parse_prompt("a small purple circle on a white background")
    assert err.value.problem == (
        "prompt 'a small purple circle on a white background': colour 'purple' is not in the testbed grammar "
        "(red, green, blue, yellow, white, grey, black)."
    )
    assert str(err.value) == err.value.problem + " " + scenes.GRAMMAR_HINT


@pytest.mark.parametrize("path", ["", "no/such/prompts.txt"])
def test_missing_prompts_name_every_builtin_set(path):
    from pgot.config import PromptsConfig
    from pgot.prompts import load_prompts

    with pytest.raises(ValueError, match=r"builtin prompt set \(builtin:demo, builtin:testbed\)\.$"):
        load_prompts(PromptsConfig(path=path))
