"""The testbed's tiny SD3: its architecture, word tokenizer, text conditioning and recommended sampler.

The shipped model (``pgot/testbed/model/``, :data:`MODEL_DIR`) is an ordinary diffusers SD3 folder
(``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
``tokenizer_2/``, ``scheduler/``; no T5) built from the classes real checkpoints use, trained on rendered scenes
by ``scripts/train_testbed.py``. Load it with pgot's loader::

    from pgot.config import ModelConfig
    from pgot.model import load_model
    model = load_model(ModelConfig(path=str(MODEL_DIR), resolution=32, use_t5=False))

=============== =====================================================================================
part            configuration
=============== =====================================================================================
VAE             ``AutoencoderKL``, blocks (16, 32), 1 layer each, 8 norm groups, 4 latent channels:
                32 x 32 -> 16 x 16 x 4
transformer     ``SD3Transformer2DModel``, patch 2 (64 image tokens), 4 layers, 4 heads x 32, joint
                attention width 64, pooled width 64, RMS qk-norm
text encoders   two ``CLIPTextModelWithProjection``, width 32, 2 layers, 2 heads, projection 32, over a
                word vocabulary (:data:`WORDS`), 10 tokens; penultimate states concatenated = 64 = the
                joint width (no padding needed), pooled projections concatenated = 64
scheduler       ``FlowMatchEulerDiscreteScheduler`` with ``shift = SHIFT``
=============== =====================================================================================

**Conditioning** (:func:`encode_text`) is exactly ``StableDiffusion3Pipeline.encode_prompt`` without T5: the
penultimate hidden states of both CLIP encoders concatenated along features (zero-padded to the joint width),
followed by ``L_t5`` zero rows standing for the absent T5 (``L_t5 = model.max_sequence_length``, 256 by default),
and the pooled projections concatenated. Because those zero rows are identical tokens, the transformer sees them as
one token whose attention weight is multiplied by ``L_t5``; training draws ``ln L_t5`` uniformly in
``[0, ln 256]`` (``scripts/train_testbed.py``), so the model works at any ``model.max_sequence_length`` from 1 to
256. ``model.max_sequence_length=1`` (:data:`MAX_SEQUENCE_LENGTH`) samples about 5 times faster than the default on
a CPU.

**Sampler** (:data:`NUM_STEPS`, :data:`GUIDANCE_SCALE`, :data:`SHIFT`): 8 Euler steps, guidance 3, shift 1. In the
sweep of ``scripts/train_testbed.py`` (``report.json``: mean judge quality over the 108 prompts, one sample each) it
ties for the best quality with guidance 2 at shift 3 (0.054 vs 0.055, within sampling noise) and has the best
fidelity; guidance 1 (no guidance) halves the quality, guidance 6 or 4 steps lose a third.

**Quality** (``report.json``, 16 samples of each prompt at the recommended sampler): mean ground-truth quality about
0.06. Colour, size and background are right almost always (components 0.95 to 1.0) and the prompted shape fits better
than the other two in most images (``tests/test_testbed_model.py``), but the shapes are lumpy (shape component 0.18)
and the edges soft with faint halos (blur 0.65, halo 0.56): the samples mostly match their prompts, imperfectly, with
room both to improve and to hack. Large triangles are best (about 0.2-0.3), small circles worst (below 0.01).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pgot.testbed import MODEL_DIR  # defined in the package itself, so that importing it stays light
from pgot.testbed.scenes import as_prompt_list

__all__ = [
    "GUIDANCE_SCALE",
    "MAX_SEQUENCE_LENGTH",
    "MODEL_DIR",
    "NUM_STEPS",
    "SHIFT",
    "TEXT_LENGTH",
    "WORDS",
    "build_components",
    "encode_text",
    "word_tokenizer",
]

NUM_STEPS = 8
"""Recommended Euler steps (``draft.num_steps``)."""

GUIDANCE_SCALE = 3.0
"""Recommended classifier-free guidance (``draft.guidance_scale``)."""

SHIFT = 1.0
"""Time shift of the flow-match schedule (the saved scheduler's ``shift``; ``draft.shift: null`` uses it)."""

MAX_SEQUENCE_LENGTH = 1
"""Recommended ``model.max_sequence_length``: one zero T5 row (any count up to 256 gives about the same images)."""

TEXT_LENGTH = 10
"""CLIP token length: start + the 8 words of a testbed prompt + end."""

WORDS = (
    "a",
    "an",
    "on",
    "background",
    "small",
    "large",
    "circle",
    "square",
    "triangle",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "grey",
    "black",
)
"""The tokenizer's whole-word tokens (the grammar's words, see :mod:`pgot.testbed.scenes`)."""

_SPECIAL = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<|unk|>": 2}


def _bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges under which every word tokenizes to the single token ``word</w>``.

    CLIP's tokenizer splits a word into characters (the last one with ``</w>``) and applies merges by rank. Merges are
    added one pair at a time, always the first pair of a word that does not yet collapse; a new merge has the lowest
    rank, so it never changes how earlier words split. Repeats until every word is one token.
    """
    merges: list[tuple[str, str]] = []

    def split(word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = {m: i for i, m in enumerate(merges)}
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))]
            rank, i = min(pairs)
            if rank == len(ranks):
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
        return parts

    changed = True
    while changed:
        changed = False
        for w in words:
            parts = split(w)
            if len(parts) > 1:
                merges.append((parts[0], parts[1]))
                changed = True
    for w in words:
        assert split(w) == [w + "</w>"], w
    return merges


def word_tokenizer() -> Any:
    """A ``CLIPTokenizer`` in which every word of :data:`WORDS` is one token (ids 3 to 18), with 10-token inputs.

    Ids: 0 ``<|startoftext|>``, 1 ``<|endoftext|>`` (end and padding), 2 ``<|unk|>``, then the words, then the
    letters and partial words BPE needs (other text splits into those; characters outside them are ``<|unk|>``). The end id is deliberately not 2:
    ``CLIPTextModel`` pools the hidden state at ``argmax(input_ids)`` when ``eos_token_id == 2`` (a legacy path),
    which would pool a word instead of the end token.
    """
    from transformers import CLIPTokenizer

    merges = _bpe_merges(WORDS)
    vocab = dict(_SPECIAL)
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    # the BPE model also needs every piece a merge reads or writes: single letters (with and without </w>) and
    # the partial words; the grammar's prompts never end up on them
    letters = sorted({ch for w in WORDS for ch in w})
    for piece in [*letters, *(ch + "</w>" for ch in letters), *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|unk|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=TEXT_LENGTH,
    )


def build_components(seed: int = 0) -> dict[str, Any]:
    """Untrained modules of the testbed SD3 (float32, CPU), deterministic in ``seed``.

    Returns:
        Dict with ``transformer``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``,
        ``scheduler``: the keyword arguments of ``StableDiffusion3Pipeline`` (without T5).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = word_tokenizer()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=1.0,  # set from the trained encoder's latents by the training script
            shift_factor=0.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=128,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
            qk_norm="rms_norm",
        )
        encoders = []
        for _ in range(2):
            cfg = CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=TEXT_LENGTH,
                projection_dim=32,
                hidden_act="gelu",
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
            encoders.append(CLIPTextModelWithProjection(cfg))
    finally:
        torch.random.set_rng_state(state)
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": encoders[0],
        "text_encoder_2": encoders[1],
        "tokenizer": tokenizer,
        "tokenizer_2": word_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
    }


def encode_text(
    text_encoders: Sequence[Any], tokenizers: Sequence[Any], prompts: Sequence[str], t5_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 text conditioning without T5, differentiable w.r.t. the text encoders (for training them).

    Equal to ``StableDiffusion3Pipeline.encode_prompt(prompts, max_sequence_length=t5_length)`` with
    ``text_encoder_3=None`` (``tests/test_testbed_model.py`` checks it).

    Args:
        text_encoders: the two ``CLIPTextModelWithProjection``.
        tokenizers: their tokenizers.
        prompts: a list of B texts.
        t5_length: number of zero rows standing for T5 (0 for none).

    Returns:
        ``(prompt_embeds (B, TEXT_LENGTH + t5_length, joint), pooled (B, 2 * projection))``; ``joint`` is the sum of
        the two encoders' widths (the testbed's joint attention width).

    Raises:
        TypeError: ``prompts`` is a single string, not a list.
    """
    prompts = as_prompt_list(prompts, "encode_text")
    states, pooled = [], []
    for enc, tok in zip(text_encoders, tokenizers, strict=True):
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True)
        ids = torch.tensor(ids["input_ids"], device=enc.device)
        out = enc(ids, output_hidden_states=True)
        pooled.append(out[0])
        states.append(out.hidden_states[-2])
    clip = torch.cat(states, dim=-1)
    zeros = clip.new_zeros(clip.shape[0], t5_length, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), torch.cat(pooled, dim=-1)
