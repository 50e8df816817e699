"""CLIP-family rewards (pgot/rewards/clip.py) against transformers' CLIPModel on the same tiny weights.

Oracles:
* the reference pipeline of each original project: PIL image -> ``CLIPImageProcessor`` (resize 224
  bicubic, centre crop, CLIP mean/std) -> ``CLIPModel.get_image_features`` / ``get_text_features`` (or
  ``CLIPVisionModelWithProjection(...).image_embeds`` for HP and aesthetic) -> the score formula;
* the checkpoint written in each released layout loads through the real loader with no missing or
  unexpected key and scores exactly like the in-memory model.

Tolerance of the PIL pipeline (``PIL_ATOL``): the test images are 8-bit, so pgot and the reference see
the same pixels; the two resizes differ only because PIL resamples to uint8 (quantisation: <= 1 level,
0.015 in normalised units, mean 0.004, asserted in ``test_preprocess_matches_clip_image_processor``)
while pgot keeps float. On the tiny models that moves the cosine by ~1.5e-4 (measured); we allow
2e-3 on cosine-scale scores (about 10x margin), times the score scale for PickScore (x100). With the
same pixel values the scores agree to float32 round-off (1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor

from pgot.config import RewardConfig
from pgot.rewards import REWARDS, build, preprocess
from pgot.rewards.clip import PICKSCORE_LOGIT_SCALE, tiny_clip_model

PROMPTS = ["a photo of a cat", "a red house at night, oil painting"]
FAMILY = ["clip", "ict", "pickscore", "hp", "aesthetic"]
SCALE = {"clip": 1.0, "ict": 1.0, "pickscore": 100.0, "hp": 1.0, "aesthetic": 1.0}
PIL_ATOL = 2e-3


def _u8_images() -> torch.Tensor:
    """Two smooth 8-bit test images of different aspect ratios (landscape 256x320, portrait 300x240)."""
    out = []
    for seed, (h, w) in enumerate([(256, 320), (300, 240)]):
        z = torch.rand(1, 3, h // 16, w // 16, generator=torch.Generator().manual_seed(seed))
        out.append(
            (F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)[0]
        )
    return out


def _pil(u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(u8.permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def rewards():
    return {name: REWARDS[name](RewardConfig(name=name, path="tiny", tiny_seed=1), "cpu", None) for name in FAMILY}


def _reference(name: str, reward, pixel_values: torch.Tensor, prompt: str) -> float:
    """The original projects' scoring code (transformers 5: ``.pooler_output``) on given pixel values."""
    m = reward.model
    with torch.no_grad():
        if name in ("hp", "aesthetic"):
            img = m(pixel_values=pixel_values).image_embeds  # CLIPVisionModelWithProjection forward
            if name == "hp":
                return torch.sigmoid(reward.mlp(img)).item()
            return reward.mlp(img / img.norm(dim=-1, keepdim=True)).item()
        img = m.get_image_features(pixel_values=pixel_values).pooler_output
        txt = m.get_text_features(input_ids=reward.tokenizer([prompt])).pooler_output
        cos = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
        return (m.logit_scale.exp() * cos if name == "pickscore" else cos).item()


def test_preprocess_matches_clip_image_processor():
    processor = CLIPImageProcessor()  # defaults = OpenAI CLIP / laion ViT-H-14 preprocessor_config.json
    for u8 in _u8_images():
        ref = processor(images=_pil(u8), return_tensors="pt")["pixel_values"]
        ours = preprocess(u8[None].float() / 255)
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        diff = (ours - ref).abs()
        assert diff.max() < 0.02 and diff.mean() < 0.006, (diff.max(), diff.mean())  # <= 1 uint8 level


@pytest.mark.parametrize("name", FAMILY)
def test_matches_reference_pipeline(name, rewards):
    reward = rewards[name]
    processor = CLIPImageProcessor()
    for u8, prompt in zip(_u8_images(), PROMPTS, strict=True):
        images = u8[None].float() / 255
        ours = reward(images, [prompt]).item()
        pil_ref = _reference(name, reward, processor(images=_pil(u8), return_tensors="pt")["pixel_values"], prompt)
        same_pixels_ref = _reference(name, reward, preprocess(images), prompt)
        assert abs(ours - same_pixels_ref) <= 1e-5 * SCALE[name] + 1e-5 * abs(ours), (ours, same_pixels_ref)
        assert abs(ours - pil_ref) <= PIL_ATOL * SCALE[name], (ours, pil_ref)


@pytest.mark.parametrize("name", FAMILY)
def test_gradients_reach_pixels_and_scores_are_deterministic(name, rewards):
    reward = rewards[name]
    images = torch.rand(2, 3, 48, 72, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.shape == (2,) and out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    torch.testing.assert_close(reward(images, PROMPTS), out.detach(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.training  # frozen models stay in eval mode


def test_pickscore_uses_logit_scale(rewards):
    assert rewards["pickscore"].model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-3)
    assert PICKSCORE_LOGIT_SCALE == pytest.approx(4.6052)


@pytest.mark.parametrize("name", ["hp", "aesthetic"])
def test_gradient_checkpointing_same_grads(name, rewards):
    ckpt = REWARDS[name](RewardConfig(name=name, path="tiny", tiny_seed=1, gradient_checkpointing=True), "cpu", None)
    grads = []
    for r in (rewards[name], ckpt):
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        r(images, PROMPTS).sum().backward()
        grads.append(images.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_text_cache_reuses_and_is_bounded(rewards):
    reward = REWARDS["clip"](RewardConfig(name="clip", path="tiny", tiny_seed=1, text_cache=2), "cpu", None)
    calls = []
    encode = reward.encode_text
    reward.encode_text = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = reward(images, ["a", "b", "a"])
    second = reward(images, ["a", "b", "a"])
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert calls == [["a", "b"]]  # unique prompts, encoded once
    reward(images, ["c", "c", "c"])
    assert len(reward.text_cache) == 2 and calls[-1] == ["c"]
    uncached = REWARDS["clip"](RewardConfig(name="clip", path="tiny", tiny_seed=1, text_cache=0), "cpu", None)
    torch.testing.assert_close(uncached(images, ["a", "b", "a"]), first)


# ---------------------------------------------------------------------------------------------
# Released checkpoint layouts
# ---------------------------------------------------------------------------------------------


def _images() -> torch.Tensor:
    return torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(9))


def _legacy_bin(model) -> dict:
    """A transformers-4.27 style pytorch_model.bin: the state dict plus the old position_ids buffers."""
    state = dict(model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    return state


def test_hf_clipmodel_folder(rewards, tmp_path):
    for name in ("clip", "pickscore"):
        folder = tmp_path / name
        rewards[name].model.save_pretrained(folder)  # config.json + model.safetensors, as on the hub
        loaded = REWARDS[name](RewardConfig(name=name, path=str(folder)), "cpu", None)
        torch.testing.assert_close(loaded(_images(), PROMPTS), rewards[name](_images(), PROMPTS), rtol=1e-6, atol=1e-6)


def test_ict_pytorch_model_bin(rewards, tmp_path):
    model = rewards["ict"].model
    torch.save(_legacy_bin(model), tmp_path / "pytorch_model.bin")
    model.config.to_json_file(tmp_path / "config.json")
    expected = rewards["ict"](_images(), PROMPTS)
    for path in (tmp_path, tmp_path / "pytorch_model.bin"):  # folder, or the weights file with config.json beside it
        loaded = REWARDS["ict"](RewardConfig(name="ict", path=str(path)), "cpu", None)
        torch.testing.assert_close(loaded(_images(), PROMPTS), expected, rtol=1e-6, atol=1e-6)
    # The bare file with no config.json uses the laion ViT-H-14 config: the tiny weights do not fit it.
    (tmp_path / "config.json").unlink()
    with pytest.raises(
        ValueError,
        match=r"reward 'ict': checkpoint .*pytorch_model.bin' does not fit the CLIPModel architecture \(.*shape mismatches: .*rewards.<i>.arch",
    ):
        REWARDS["ict"](RewardConfig(name="ict", path=str(tmp_path / "pytorch_model.bin")), "cpu", None)


def test_hp_backbone_and_scorer(rewards, tmp_path):
    tiny_clip_model(1).save_pretrained(tmp_path / "hp_backbone")  # the full CLIPModel, text tower included
    (tmp_path / "hp_scorer").mkdir()
    torch.save(rewards["hp"].mlp.state_dict(), tmp_path / "hp_scorer" / "mlp_pytorch_model.bin")
    loaded = REWARDS["hp"](RewardConfig(name="hp", path=str(tmp_path)), "cpu", None)
    torch.testing.assert_close(loaded(_images(), PROMPTS), rewards["hp"](_images(), PROMPTS), rtol=1e-6, atol=1e-6)
    (tmp_path / "hp_scorer" / "mlp_pytorch_model.bin").unlink()
    with pytest.raises(ValueError, match=r"reward 'hp': .*mlp_pytorch_model.bin' does not exist"):
        REWARDS["hp"](RewardConfig(name="hp", path=str(tmp_path)), "cpu", None)


def test_aesthetic_folder(rewards, tmp_path):
    tiny_clip_model(1, act="quick_gelu").save_pretrained(tmp_path / "clip")
    torch.save(rewards["aesthetic"].mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    loaded = REWARDS["aesthetic"](RewardConfig(name="aesthetic", path=str(tmp_path)), "cpu", None)
    torch.testing.assert_close(
        loaded(_images(), PROMPTS), rewards["aesthetic"](_images(), PROMPTS), rtol=1e-6, atol=1e-6
    )
    # An MLP for another embedding width (e.g. a ViT-H head) is another architecture.
    state = rewards["aesthetic"].mlp.state_dict()
    state["layers.0.weight"] = torch.zeros(1024, 1024)
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(
        ValueError,
        match=r"reward 'aesthetic': checkpoint .*linearMSE.pth' does not fit the LinearMLP architecture \(shape mismatches: layers.0.weight",
    ):
        REWARDS["aesthetic"](RewardConfig(name="aesthetic", path=str(tmp_path)), "cpu", None)


def test_bad_checkpoint_paths(rewards, tmp_path):
    with pytest.raises(
        ValueError, match=r"reward 'aesthetic': no checkpoint path. Set the reward's path \(rewards.0.path"
    ):
        build([RewardConfig(name="aesthetic")])
    with pytest.raises(
        ValueError, match=r"reward 'clip': checkpoint path '/nonexistent/clip' does not exist.*rewards.0.path"
    ):
        build([RewardConfig(name="clip", path="/nonexistent/clip")])
    with pytest.raises(ValueError, match=r"reward 'pickscore': checkpoint path 'nobody/no-such-model' does not exist"):
        build([RewardConfig(name="pickscore", path="nobody/no-such-model")])  # a hub id, offline in tests
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"reward 'clip': no weights in folder .*empty'"):
        build([RewardConfig(name="clip", path=str(tmp_path / "empty"))])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"reward 'clip': .*config.json' describes a 'bert' model"):
        build([RewardConfig(name="clip", path=str(tmp_path / "bert"))])
    # An open_clip (HPSv2-style) state dict is not an HF CLIPModel.
    (tmp_path / "hps").mkdir()
    rewards["clip"].model.config.to_json_file(tmp_path / "hps" / "config.json")
    save_file(
        {"visual.conv1.weight": torch.zeros(2, 3, 14, 14), "logit_scale": torch.zeros(())},
        str(tmp_path / "hps" / "model.safetensors"),
    )
    with pytest.raises(
        ValueError,
        match=r"reward 'clip': checkpoint .*hps' does not fit the CLIPModel architecture \(missing keys: .*unexpected keys: visual.conv1.weight",
    ):
        build([RewardConfig(name="clip", path=str(tmp_path / "hps"))])
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(
        ValueError, match=r"reward 'ict': cannot read checkpoint .*junk.bin' as a weights-only state dict"
    ):
        build([RewardConfig(name="ict", path=str(tmp_path / "junk.bin"))])
    with pytest.raises(ValueError, match=r"reward 'clip': unknown arch 'ViT-Q-99'"):
        build([RewardConfig(name="clip", path="random", arch="ViT-Q-99")])
