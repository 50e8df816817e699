"""ImageReward in plain torch (pgot/rewards/imagereward.py) against transformers' BLIP on the same weights.

The original ``image-reward`` package cannot be imported on this stack, so the oracles are:
* the text encoder == transformers ``BlipTextModel`` (the same "med" BERT with cross-attention, same key
  names) called with ``is_decoder=False`` (bidirectional self-attention, as in ImageReward's scoring);
* the ViT == transformers ``BlipVisionModel`` after renaming keys;
* the full-size parameter tree == the 620 keys of the released ``ImageReward.pt`` after dropping
  ``blip.text_encoder.embeddings.position_ids``, ``blip.vision_proj.*`` and ``blip.text_proj.*``
  (625 in the file; listed below from the BLIP ``vit='large'`` + med_config.json architecture).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BlipTextConfig, BlipVisionConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from pgot.config import RewardConfig
from pgot.rewards import REWARDS, preprocess
from pgot.rewards.imagereward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    MED_CONFIG,
    TINY_MED_CONFIG,
    TINY_VIT,
    VIT_L16,
    ImageRewardModel,
    tiny_vocab,
)

PROMPTS = ["a photo of a cat", "a red house at night, painting"]


@pytest.fixture(scope="module")
def reward():
    return REWARDS["imagereward"](RewardConfig(name="imagereward", path="tiny", tiny_seed=3), "cpu", None)


def _images(seed: int = 0, size: tuple[int, int] = (64, 80)) -> torch.Tensor:
    return torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def _reference(reward, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """ImageReward's score_gard with transformers' BlipVisionModel + BlipTextModel on pgot's weights."""
    model = reward.model
    vit, med = TINY_VIT, {**TINY_MED_CONFIG, "vocab_size": len(tiny_vocab()) + 2}
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=vit["width"],
            intermediate_size=4 * vit["width"],
            num_hidden_layers=vit["depth"],
            num_attention_heads=vit["heads"],
            image_size=vit["image_size"],
            patch_size=vit["patch_size"],
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        )
    ).eval()
    rename = [
        ("cls_token", "embeddings.class_embedding"),
        ("pos_embed", "embeddings.position_embedding"),
        ("patch_embed.proj.", "embeddings.patch_embedding."),
        ("blocks.", "encoder.layers."),
        (".norm1.", ".layer_norm1."),
        (".norm2.", ".layer_norm2."),
        (".attn.proj.", ".self_attn.projection."),
        (".attn.qkv.", ".self_attn.qkv."),
    ]
    vstate = {}
    for key, value in model.blip.visual_encoder.state_dict().items():
        new = "post_layernorm." + key[len("norm.") :] if key.startswith("norm.") else key
        for old, repl in rename:
            new = new.replace(old, repl)
        vstate[new] = value
    vision.load_state_dict(vstate, strict=True)
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=med["hidden_size"],
            intermediate_size=med["intermediate_size"],
            num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"],
            max_position_embeddings=med["max_position_embeddings"],
            encoder_hidden_size=vit["width"],
            layer_norm_eps=med["layer_norm_eps"],
            hidden_act="gelu",
            is_decoder=True,
            bos_token_id=101,
            sep_token_id=102,
            pad_token_id=0,
        ),
        add_pooling_layer=False,
    ).eval()
    text.load_state_dict(model.blip.text_encoder.state_dict(), strict=True)
    ids, mask = reward.tokenize(prompts)
    with torch.no_grad():
        emb = vision(pixel_values=pixel_values).last_hidden_state  # (B, 197, W)
        h = text(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=emb,
            encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state
        return ((model.mlp(h[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def test_matches_transformers_blip(reward):
    images = _images()
    px = preprocess(images)
    ours = reward(images, PROMPTS)
    ref = _reference(reward, px, PROMPTS)
    # Same pixels, same weights, float32: only summation order differs.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours.shape == (2,) and ours[0] != ours[1]


def test_tokenizer_matches_imagereward_layout(reward):
    ids, mask = reward.tokenize(["A photo of a CAT!", "x " * 100])
    assert ids.shape == (2, 35) and mask.shape == (2, 35)
    vocab = tiny_vocab()
    assert ids[0, :7].tolist() == [
        vocab.index(t) for t in ["[CLS]", "a", "photo", "of", "a", "cat", "!"]
    ]  # lower-cased WordPiece
    assert ids[0, 7].item() == vocab.index("[SEP]") and ids[0, 8:].eq(0).all() and mask[0].sum() == 8
    assert mask[1].all() and ids[1, -1].item() == vocab.index("[SEP]")  # truncated to 35 with [SEP] kept


def test_gradients_and_determinism(reward):
    images = _images(1).requires_grad_(True)
    out = reward(images, PROMPTS)
    out.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    torch.testing.assert_close(reward(images, PROMPTS), out.detach(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in reward.parameters())


def test_gradient_checkpointing_same_scores_and_grads(reward):
    ckpt = REWARDS["imagereward"](
        RewardConfig(name="imagereward", path="tiny", tiny_seed=3, gradient_checkpointing=True), "cpu", None
    )
    grads = []
    for r in (reward, ckpt):
        images = _images(2).requires_grad_(True)
        r(images, PROMPTS).sum().backward()
        grads.append(images.grad)
    torch.testing.assert_close(grads[0], grads[1])


def _expected_imagereward_keys() -> dict[str, tuple[int, ...]]:
    """The released ImageReward.pt tensors the score reads: BLIP ViT-L/16 + med BERT (12 x 768, vocab 30524) + MLP(768)."""
    keys: dict[str, tuple[int, ...]] = {}
    v, w = "blip.visual_encoder.", 1024
    keys |= {
        f"{v}cls_token": (1, 1, w),
        f"{v}pos_embed": (1, 197, w),
        f"{v}patch_embed.proj.weight": (w, 3, 16, 16),
        f"{v}patch_embed.proj.bias": (w,),
    }
    for i in range(24):
        b = f"{v}blocks.{i}."
        keys |= {
            f"{b}norm1.weight": (w,),
            f"{b}norm1.bias": (w,),
            f"{b}attn.qkv.weight": (3 * w, w),
            f"{b}attn.qkv.bias": (3 * w,),
            f"{b}attn.proj.weight": (w, w),
            f"{b}attn.proj.bias": (w,),
            f"{b}norm2.weight": (w,),
            f"{b}norm2.bias": (w,),
            f"{b}mlp.fc1.weight": (4 * w, w),
            f"{b}mlp.fc1.bias": (4 * w,),
            f"{b}mlp.fc2.weight": (w, 4 * w),
            f"{b}mlp.fc2.bias": (w,),
        }
    keys |= {f"{v}norm.weight": (w,), f"{v}norm.bias": (w,)}
    t, d = "blip.text_encoder.", 768
    keys |= {
        f"{t}embeddings.word_embeddings.weight": (30524, d),
        f"{t}embeddings.position_embeddings.weight": (512, d),
        f"{t}embeddings.LayerNorm.weight": (d,),
        f"{t}embeddings.LayerNorm.bias": (d,),
    }
    for i in range(12):
        lay = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", d), ("crossattention", w)):
            keys |= {
                f"{lay}{att}.self.query.weight": (d, d),
                f"{lay}{att}.self.query.bias": (d,),
                f"{lay}{att}.self.key.weight": (d, kv),
                f"{lay}{att}.self.key.bias": (d,),
                f"{lay}{att}.self.value.weight": (d, kv),
                f"{lay}{att}.self.value.bias": (d,),
                f"{lay}{att}.output.dense.weight": (d, d),
                f"{lay}{att}.output.dense.bias": (d,),
                f"{lay}{att}.output.LayerNorm.weight": (d,),
                f"{lay}{att}.output.LayerNorm.bias": (d,),
            }
        keys |= {
            f"{lay}intermediate.dense.weight": (3072, d),
            f"{lay}intermediate.dense.bias": (3072,),
            f"{lay}output.dense.weight": (d, 3072),
            f"{lay}output.dense.bias": (d,),
            f"{lay}output.LayerNorm.weight": (d,),
            f"{lay}output.LayerNorm.bias": (d,),
        }
    for i, (a, b) in zip((0, 2, 4, 6, 7), ((768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)), strict=True):
        keys |= {f"mlp.layers.{i}.weight": (b, a), f"mlp.layers.{i}.bias": (b,)}
    return keys


def test_full_size_parameter_tree_matches_released_checkpoint():
    with torch.device("meta"):
        model = ImageRewardModel(VIT_L16, MED_CONFIG)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _expected_imagereward_keys()
    assert len(expected) == 620
    assert ours == expected
    n = sum(p.numel() for p in model.parameters())
    assert 446.0e6 < n < 446.5e6, n  # 446.2M (the file's 446.7M includes the unused ITC heads)


def _write_released_format(reward, folder, dtype=torch.float32) -> None:
    """ImageReward.pt (state dict incl. the keys the score ignores) + med_config.json + vocab.txt."""
    state = {k: v.to(dtype) for k, v in reward.model.state_dict().items()}
    med = {**TINY_MED_CONFIG, "vocab_size": len(tiny_vocab()) + 2}
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    state |= {
        "blip.vision_proj.weight": torch.zeros(8, TINY_VIT["width"]),
        "blip.vision_proj.bias": torch.zeros(8),
        "blip.text_proj.weight": torch.zeros(8, med["hidden_size"]),
        "blip.text_proj.bias": torch.zeros(8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")


def test_released_format_round_trip(reward, tmp_path):
    _write_released_format(reward, tmp_path / "ImageReward")
    images = _images(4)
    for path in (tmp_path / "ImageReward", tmp_path / "ImageReward" / "ImageReward.pt"):
        loaded = REWARDS["imagereward"](RewardConfig(name="imagereward", path=str(path)), "cpu", None)
        torch.testing.assert_close(loaded(images, PROMPTS), reward(images, PROMPTS), rtol=1e-6, atol=1e-6)


def test_bad_checkpoints(reward, tmp_path):
    folder = tmp_path / "ir"
    _write_released_format(reward, folder)
    build = REWARDS["imagereward"]
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    with pytest.raises(ValueError, match=r"reward 'imagereward': BERT tokenizer has 2 tokens.*expected \d+.*vocab.txt"):
        build(RewardConfig(name="imagereward", path=str(folder)), "cpu", None)
    (folder / "vocab.txt").unlink()
    with pytest.raises(ValueError, match=r"reward 'imagereward': .*vocab.txt' does not exist"):
        build(RewardConfig(name="imagereward", path=str(folder)), "cpu", None)
    (folder / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, folder / "ImageReward.pt")
    with pytest.raises(ValueError, match=r"reward 'imagereward': .*ImageReward.pt' is not an ImageReward checkpoint"):
        build(RewardConfig(name="imagereward", path=str(folder)), "cpu", None)
    state = {k: v for k, v in reward.model.state_dict().items() if not k.startswith("mlp.")}
    state["blip.extra.weight"] = torch.zeros(1)
    torch.save(state, folder / "ImageReward.pt")
    with pytest.raises(
        ValueError,
        match=r"reward 'imagereward': checkpoint .*ImageReward.pt' does not fit .*missing keys: mlp\.layers.*unexpected keys: blip\.extra\.weight",
    ):
        build(RewardConfig(name="imagereward", path=str(folder)), "cpu", None)
