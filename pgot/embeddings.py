"""Prompt embeddings of SD3: one encoding rule for every stage, and its cache.

SD3 conditions on the CLIP-L and CLIP-G penultimate hidden states (padded to the joint width) followed by the
T5 states, and on the pooled CLIP projections (:class:`PromptEmbeds`). pgot computes them with the pipeline's
own ``StableDiffusion3Pipeline.encode_prompt``, so they match diffusers exactly.

**The encoding rule.** A text encoder's numerics depend on the batch it runs in (padding, kernel choice), so a
prompt encoded with 15 others can differ in the last bits from the same prompt encoded alone, and whichever
stage encoded it first would fix the cached value for the others. :func:`encode_prompts` therefore encodes
every prompt alone (batch of one), in every stage (precompute, train, eval, probes): a prompt's embedding is a
function of the prompt, the base model and the text settings only. Encoding is cheap next to sampling (one
call per distinct prompt per run; the cache makes it once per prompt).

Embeddings are kept in memory on the CPU (``SD3Model.embed_cache``) and optionally on disk as
``<cache_dir>/<sha1>.safetensors``, where the sha1 covers the prompt, the model fingerprint and the text
settings. After encoding, :func:`offload_text_encoders` frees the text encoders so training never holds them
on the GPU.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pgot.files import atomic_write
from pgot.model import SD3Model, pipeline

__all__ = ["PromptEmbeds", "encode_prompts", "offload_text_encoders"]

logger = logging.getLogger(__name__)


@dataclass
class PromptEmbeds:
    """Text conditioning of SD3, one row per prompt (or per image once expanded).

    Attributes:
        prompt_embeds: (P, L, D) CLIP-L/CLIP-G penultimate states (padded to D) followed by T5 states.
        pooled: (P, D_pool) pooled CLIP-L and CLIP-G projections, concatenated.
        negative_prompt_embeds: (P, L, D) the same for the empty prompt (classifier-free guidance), or None.
        negative_pooled: (P, D_pool) or None.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn: Any) -> PromptEmbeds:
        neg = self.negative_prompt_embeds
        negp = self.negative_pooled
        return PromptEmbeds(
            fn(self.prompt_embeds),
            fn(self.pooled),
            None if neg is None else fn(neg),
            None if negp is None else fn(negp),
        )

    def select(self, index: torch.Tensor | list[int]) -> PromptEmbeds:
        """Rows ``index`` (e.g. ``torch.arange(P).repeat_interleave(N)`` to give each of N samples its prompt)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.prompt_embeds.device)
        return self._map(lambda t: t.index_select(0, idx.to(t.device)))

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each prompt row repeated ``n`` times in a row: (P, ...) -> (P*n, ...), the ``B = P*N`` layout."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """Moved / cast copy."""
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    @staticmethod
    def cat(items: list[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the row dimension (negatives kept only when every item has them)."""
        has_neg = all(e.negative_prompt_embeds is not None for e in items)
        return PromptEmbeds(
            torch.cat([e.prompt_embeds for e in items]),
            torch.cat([e.pooled for e in items]),
            torch.cat([e.negative_prompt_embeds for e in items]) if has_neg else None,
            torch.cat([e.negative_pooled for e in items]) if has_neg else None,
        )


def _embed_key(model: SD3Model, prompt: str) -> str:
    text = json.dumps(
        [
            prompt,
            model.fingerprint,
            model.max_sequence_length,
            model.text_encoder_3 is not None or model.tokenizer_3 is not None,
        ],
        ensure_ascii=False,
    )
    return hashlib.sha1(text.encode()).hexdigest()


def _encode_uncached(model: SD3Model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    if model.text_encoder is None or model.text_encoder_2 is None:
        raise ValueError(
            f"{len(prompts)} prompt(s) (e.g. {prompts[0]!r}) have no cached embedding and the text encoders were "
            "offloaded. Encode every prompt with encode_prompts before offload_text_encoders(model), or point "
            "model.embedding_cache at a folder that holds them."
        )
    pipe = pipeline(model)
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=model.text_encoder.device,  # the CPU after offload_text_encoders(keep_on_cpu=True)
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=model.max_sequence_length,
        )
    return pe, pooled


def encode_prompts(
    model: SD3Model,
    prompts: list[str],
    cache_dir: str | Path | None = None,
    *,
    negative: bool = True,
) -> PromptEmbeds:
    """Text embeddings of ``prompts``, each computed once (memory cache, then the disk cache, then the encoders).

    The embeddings are those of ``StableDiffusion3Pipeline.encode_prompt`` (CLIP-L and CLIP-G penultimate
    states padded to the joint width, T5 states or zeros without T5). The disk cache holds
    ``<cache_dir>/<sha1(prompt, fingerprint, text settings)>.safetensors`` with tensors ``prompt_embeds`` (L, D)
    and ``pooled`` (D_pool,).

    Args:
        model: the model; its text encoders are needed only for prompts not cached yet.
        prompts: P prompt texts.
        cache_dir: optional folder for the disk cache.
        negative: also return the empty prompt's embeddings expanded to P rows (for guidance).

    Returns:
        :class:`PromptEmbeds` with (P, L, D) and (P, D_pool) tensors on ``model.device`` in ``model.dtype``.
    """
    texts = list(prompts) + ([""] if negative else [])
    keys = [_embed_key(model, p) for p in texts]
    folder = Path(cache_dir) if cache_dir else None
    missing: dict[str, str] = {}
    for text, key in zip(texts, keys, strict=True):
        if key in model.embed_cache or key in missing:
            continue
        f = folder / f"{key}.safetensors" if folder else None
        if f is not None and f.is_file():
            t = load_file(str(f))
            model.embed_cache[key] = (t["prompt_embeds"], t["pooled"])
        else:
            missing[key] = text
    if missing:
        items = list(missing.items())
        logger.debug("encoding %d prompt(s)", len(items))
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        for key, text in items:  # one prompt per encoder call: the encoding rule of this module
            pe, pooled = _encode_uncached(model, [text])
            row = (pe[0].detach().cpu().clone(), pooled[0].detach().cpu().clone())
            model.embed_cache[key] = row
            if folder is not None:  # atomic: several processes may cache the same prompt
                tensors = {"prompt_embeds": row[0].contiguous(), "pooled": row[1].contiguous()}
                atomic_write(folder / f"{key}.safetensors", lambda tmp, t=tensors: save_file(t, str(tmp)), fsync=False)
    rows = [model.embed_cache[k] for k in keys[: len(prompts)]]
    pe = torch.stack([r[0] for r in rows]).to(model.device, model.dtype)
    pooled = torch.stack([r[1] for r in rows]).to(model.device, model.dtype)
    neg = negp = None
    if negative:
        ne, np_ = model.embed_cache[keys[-1]]
        neg = ne.to(model.device, model.dtype).unsqueeze(0).expand(len(prompts), -1, -1)
        negp = np_.to(model.device, model.dtype).unsqueeze(0).expand(len(prompts), -1)
    return PromptEmbeds(pe, pooled, neg, negp)


def offload_text_encoders(model: SD3Model, keep_on_cpu: bool = False) -> None:
    """Free the text encoders (or move them to the CPU) once every prompt is encoded; cached prompts still work."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(model, name)
        if m is None:
            continue
        setattr(model, name, m.to("cpu") if keep_on_cpu else None)
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
