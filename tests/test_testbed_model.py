"""Tests of the shipped testbed SD3 (pgot.testbed.basemodel): tokenizer, conditioning, folder, loading, sampling."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pgot.config import DraftConfig, ModelConfig
from pgot.embeddings import encode_prompts
from pgot.generate import generate
from pgot.model import load_model
from pgot.testbed import MODEL_DIR, basemodel, judge
from pgot.testbed.scenes import SHAPES, all_prompts, parse_prompt

REPORT = json.loads((Path(basemodel.__file__).parent / "report.json").read_text())
DRAFT = DraftConfig(num_steps=basemodel.NUM_STEPS, k=0, guidance_scale=basemodel.GUIDANCE_SCALE, shift=basemodel.SHIFT)


def test_word_tokenizer_makes_one_token_per_word():
    tok = basemodel.word_tokenizer()
    for p in all_prompts():
        ids = tok(p)["input_ids"]
        assert len(ids) == basemodel.TEXT_LENGTH  # start + 8 words + end
        assert ids[0] == 0 and ids[-1] == 1 and all(3 <= i < 3 + len(basemodel.WORDS) for i in ids[1:-1])
    assert tok("")["input_ids"] == [0, 1]
    assert tok("a purple blob")["input_ids"][1] == 3  # "a" is a word; the rest splits into known pieces


def test_shipped_folder_is_a_small_sd3_without_t5():
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (MODEL_DIR / sub).is_dir()
    assert not (MODEL_DIR / "text_encoder_3").exists()
    size = sum(f.stat().st_size for f in MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 10 * 2**20
    sched = json.loads((MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shift"] == basemodel.SHIFT


@pytest.fixture(scope="module")
def model():
    """The shipped model through pgot's loader, with the defaults (256 zero T5 rows)."""
    return load_model(ModelConfig(path=str(MODEL_DIR), resolution=32, use_t5=False))


@pytest.fixture(scope="module")
def fast_model():
    """The same with one zero T5 row (model.max_sequence_length=1), as the report sampled it."""
    return load_model(
        ModelConfig(path=str(MODEL_DIR), resolution=32, use_t5=False, max_sequence_length=basemodel.MAX_SEQUENCE_LENGTH)
    )


def _sample(model, ids: list[int], seed: int = 2) -> tuple[torch.Tensor, list[str]]:
    """Sample 0 of the prompts ``ids`` (prompt id = index in all_prompts()), with the report's held-out seed."""
    prompts = [all_prompts()[i] for i in ids]
    with torch.no_grad():
        return generate(model, prompts, ids, [0] * len(ids), seed, **dataclasses.asdict(DRAFT) | {"k": 0}), prompts


@pytest.fixture(scope="module")
def check_images(fast_model):
    """Sample 0 of every 7th prompt: the 16 images whose quality the report lists."""
    ids = [int(i) for i in REPORT["base_quality"]["check_images"]]
    images, prompts = _sample(fast_model, ids)
    return images, prompts, ids


@pytest.mark.parametrize("which", ["model", "fast_model"])
def test_encode_text_equals_the_pipeline_encoding(which, request):
    model = request.getfixturevalue(which)
    prompts = ["a small red circle on a grey background", "", "a large black square on a white background"]
    ref = encode_prompts(model, prompts, negative=False)
    enc, pooled = basemodel.encode_text(
        [model.text_encoder, model.text_encoder_2],
        [model.tokenizer, model.tokenizer_2],
        prompts,
        model.max_sequence_length,
    )
    torch.testing.assert_close(enc, ref.prompt_embeds)
    torch.testing.assert_close(pooled, ref.pooled)
    assert enc.shape == (3, basemodel.TEXT_LENGTH + model.max_sequence_length, 64) and pooled.shape == (3, 64)
    # eos (id 1) is pooled, not the largest id: the legacy eos_token_id == 2 path is not taken
    assert model.text_encoder.config.eos_token_id == 1


def test_loads_in_float32_through_pgots_loader(model):
    assert model.dtype == torch.float32 and model.path == str(MODEL_DIR)
    assert all(p.dtype == torch.float32 for p in model.transformer.parameters())
    assert model.latent_shape(32) == (4, 16, 16)


def test_samples_match_the_report(check_images):
    images, prompts, ids = check_images
    assert images.shape == (16, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    q = judge.quality(images, prompts)
    expected = torch.tensor([REPORT["base_quality"]["check_images"][str(i)] for i in ids])
    torch.testing.assert_close(q, expected, atol=2e-3, rtol=0)
    # the report's figure is the mean over 108 prompts x 16 samples; 16 samples scatter by about std / 4
    reported = REPORT["base_quality"]
    assert abs(float(q.mean()) - reported["mean"]) <= max(3 * reported["std_over_samples"] / 4, 0.02)


def test_sampling_is_deterministic_at_any_t5_length(model, fast_model, check_images):
    ids = [0, 49, 98]
    again, _ = _sample(fast_model, ids)
    torch.testing.assert_close(_sample(fast_model, ids)[0], again, rtol=0, atol=0)  # bit for bit
    first = check_images[0][[check_images[2].index(i) for i in ids]]  # same images, sampled in a batch of 16
    torch.testing.assert_close(again, first, rtol=0, atol=1e-5)
    # 256 zero T5 rows (the loader's default) act as one row weighted 256 times: trained for, so about the same images
    slow, _ = _sample(model, ids)
    assert float((slow - first).abs().mean()) < 0.02
    other, _ = _sample(fast_model, ids, seed=3)
    assert float((other - first).abs().mean()) > 0.01


def test_samples_mostly_show_their_prompt(check_images):
    images, prompts, _ = check_images
    comps = judge.components(images, prompts)
    for k in ("colour", "size", "background"):
        assert float(comps[k].mean()) > 0.8, k
    # shape: the prompted shape fits better than the other two in most images (imperfect: circles come out lumpy)
    scenes = [parse_prompt(p) for p in prompts]
    fits = torch.stack(
        [judge.components(images, [replace(s, shape=shape).prompt for s in scenes])["shape"] for shape in SHAPES], 1
    )
    asked = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    assert float((fits.argmax(1) == asked).float().mean()) >= 0.6
