"""pgot/embeddings.py: prompt embeddings equal the pipeline's own, one encoding rule, memory and disk cache."""

from __future__ import annotations

import pytest
import torch
from sd3_helpers import PROMPTS, tiny_cfg

from pgot.embeddings import encode_prompts, offload_text_encoders
from pgot.model import (
    load_model,
    pipeline,
)

# ------------------------------------------------------------------ prompt embeddings


def test_encode_prompts_matches_pipeline_and_caches(tmp_path):
    model = load_model(tiny_cfg())
    calls = []
    for te in (model.text_encoder, model.text_encoder_2):
        te.register_forward_pre_hook(lambda m, a: calls.append(1))
    e = encode_prompts(model, PROMPTS, cache_dir=tmp_path)
    assert len(calls) == 2 * 3  # the encoding rule: each prompt (and the empty negative) alone, once per encoder
    for j, prompt in enumerate(PROMPTS):  # the pipeline's own encode_prompt of that prompt alone
        pe, npe, pooled, npooled = pipeline(model).encode_prompt(
            [prompt], None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8
        )
        torch.testing.assert_close(e.prompt_embeds[j : j + 1], pe, rtol=0, atol=0)
        torch.testing.assert_close(e.pooled[j : j + 1], pooled, rtol=0, atol=0)
        torch.testing.assert_close(e.negative_prompt_embeds[j : j + 1], npe, rtol=0, atol=0)
        torch.testing.assert_close(e.negative_pooled[j : j + 1], npooled, rtol=0, atol=0)
    assert e.prompt_embeds.shape == (2, 77 + 8, 32) and e.pooled.shape == (2, 32)
    n = len(calls)
    again = encode_prompts(model, list(reversed(PROMPTS)), cache_dir=tmp_path)
    assert len(calls) == n, "memory cache hit: no encoder call"
    torch.testing.assert_close(again.prompt_embeds, e.prompt_embeds.flip(0))
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    # a fresh model (same fingerprint) reads the disk cache, even without text encoders
    fresh = load_model(tiny_cfg())
    offload_text_encoders(fresh)
    assert fresh.text_encoder is None and fresh.text_encoder_2 is None
    from_disk = encode_prompts(fresh, PROMPTS, cache_dir=tmp_path)
    torch.testing.assert_close(from_disk.prompt_embeds, e.prompt_embeds, rtol=0, atol=0)
    with pytest.raises(ValueError, match="offload"):
        encode_prompts(fresh, ["a prompt never encoded"], cache_dir=tmp_path)
    # another tiny seed is another model: its cache keys differ
    other = load_model(tiny_cfg(tiny_seed=2))
    offload_text_encoders(other)
    with pytest.raises(ValueError, match="no cached embedding"):
        encode_prompts(other, PROMPTS, cache_dir=tmp_path)


def test_prompt_embeds_helpers():
    model = load_model(tiny_cfg())
    e = encode_prompts(model, PROMPTS)
    r = e.repeat_interleave(3)
    assert len(r) == 6 and torch.equal(r.prompt_embeds[2], e.prompt_embeds[0]) and torch.equal(r.pooled[3], e.pooled[1])
    s = e.select([1, 1, 0])
    assert torch.equal(s.prompt_embeds[0], e.prompt_embeds[1]) and torch.equal(
        s.negative_pooled[2], e.negative_pooled[0]
    )
    assert len(type(e).cat([e, s])) == 5


def test_embedding_does_not_depend_on_the_other_prompts_or_the_stage():
    """One encoding rule: a prompt's embedding is the same whatever prompts it is encoded with, and in
    whichever order stages (precompute: many prompts; train: a few) fill the cache."""
    many = [f"prompt number {i} with some words" for i in range(12)]
    a = encode_prompts(load_model(tiny_cfg()), many, negative=False)
    fresh = load_model(tiny_cfg())
    b = encode_prompts(fresh, [many[5]], negative=False)
    c = encode_prompts(fresh, many[::-1], negative=False)
    torch.testing.assert_close(b.prompt_embeds[0], a.prompt_embeds[5], rtol=0, atol=0)
    torch.testing.assert_close(c.prompt_embeds.flip(0), a.prompt_embeds, rtol=0, atol=0)
