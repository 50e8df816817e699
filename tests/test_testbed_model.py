"""Tests of the shipped testbed SD3 (pgot.testbed.basemodel): tokenizer, conditioning, folder, loading, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pgot.config import DraftConfig, ModelConfig
from pgot.generate import generate
from pgot.model import SD3Model, encode_prompts, load_model
from pgot.testbed import MODEL_DIR, basemodel, judge
from pgot.testbed.scenes import all_prompts

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


def test_encode_text_equals_the_pipeline_encoding():
    parts = basemodel.build_components(seed=1)
    model = SD3Model(**parts, max_sequence_length=5)
    prompts = ["a small red circle on a grey background", "", "a large black square on a white background"]
    ref = encode_prompts(model, prompts, negative=False)
    enc, pooled = basemodel.encode_text(
        [parts["text_encoder"], parts["text_encoder_2"]], [parts["tokenizer"], parts["tokenizer_2"]], prompts, 5
    )
    torch.testing.assert_close(enc, ref.prompt_embeds)
    torch.testing.assert_close(pooled, ref.pooled)
    assert enc.shape == (3, basemodel.TEXT_LENGTH + 5, 64) and pooled.shape == (3, 64)
    # eos (id 1) is pooled, not the largest id: the legacy eos_token_id == 2 path is not taken
    assert parts["text_encoder"].config.eos_token_id == 1


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


def test_loads_in_float32_through_pgots_loader(model):
    assert model.dtype == torch.float32 and model.path == str(MODEL_DIR)
    assert all(p.dtype == torch.float32 for p in model.transformer.parameters())
    assert model.latent_shape(32) == (4, 16, 16)


def _check_images(model, seed: int = 2):
    """Sample 0 of every 7th prompt with the report's held-out seed: the 16 images the report scored."""
    ids = [int(i) for i in REPORT["base_quality"]["check_images"]]
    prompts = [all_prompts()[i] for i in ids]
    with torch.no_grad():
        images = generate(model, prompts, ids, [0] * len(ids), seed, DRAFT, k=0)
    return images, prompts, ids


def test_sampling_is_deterministic_and_matches_the_report(model):
    images, prompts, ids = _check_images(model)
    again, _, _ = _check_images(model)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    assert images.shape == (16, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    q = judge.quality(images, prompts)
    reported = REPORT["base_quality"]
    # the report's figure is the mean over 108 prompts x 16 samples; 16 samples scatter by about std / 4
    band = max(3 * reported["std_over_samples"] / 4, 0.05)
    assert abs(float(q.mean()) - reported["mean"]) <= band
    # the report sampled with one zero T5 row (model.max_sequence_length=1); 256 rows must give about the same images
    fast = load_model(ModelConfig(path=str(MODEL_DIR), resolution=32, use_t5=False, max_sequence_length=1))
    images_1, _, _ = _check_images(fast)
    q1 = judge.quality(images_1, prompts)
    expected = torch.tensor([reported["check_images"][str(i)] for i in ids])
    torch.testing.assert_close(q1, expected, atol=2e-3, rtol=0)
    assert float((images - images_1).abs().mean()) < 0.02
    # a different seed gives different images
    other, _, _ = _check_images(model, seed=3)
    assert float((other - images).abs().mean()) > 0.01


def test_samples_mostly_show_their_prompt(model):
    images, prompts, _ = _check_images(model)
    comps = judge.components(images, prompts)
    fidelity = torch.stack([comps[k] for k in judge.FIDELITY]).prod(0)
    assert float(fidelity.median()) > 0.5
    assert float(comps["colour"].mean()) > 0.8 and float(comps["background"].mean()) > 0.8
