"""HPSv2 (pgot/rewards/hps.py) against open_clip on the same tiny weights.

Oracles: HPSv2's ``img_score.py`` computation (``model(image, text)`` -> normalised features ->
``diag(image_features @ text_features.T)``) on open_clip's own eval transform of the PIL image; and the
``{'state_dict': ...}`` checkpoint file read back by ``open_clip.create_model(..., pretrained=file)``,
the loader HPSv2 itself uses. Tolerance of the PIL pipeline as in test_rewards_clip.py (uint8
resampling in PIL, <= 1 level): 2e-3 on a cosine, measured ~2e-4.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pgot.config import RewardConfig
from pgot.rewards import REWARDS, preprocess
from pgot.rewards.hps import TINY_OPEN_CLIP
from pgot.rewards.preprocessing import CLIP_MEAN, CLIP_STD

PROMPTS = ["a photo of a cat", "a red house at night, oil painting"]


@pytest.fixture(scope="module")
def reward():
    return REWARDS["hps"](RewardConfig(name="hps", path="tiny", tiny_seed=2), "cpu", None)


def _u8(seed: int, h: int, w: int) -> torch.Tensor:
    z = torch.rand(1, 3, h // 16, w // 16, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False) * 255).round().to(torch.uint8)[0]


def _hps_reference(model, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    tokenizer = open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        out = model(pixel_values, tokenizer(prompts))
        return torch.diagonal(out["image_features"] @ out["text_features"].T)


def test_matches_open_clip_reference(reward):
    transform = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    for seed, (h, w) in enumerate([(256, 320), (300, 240)]):
        u8 = _u8(seed, h, w)
        images = u8[None].float() / 255
        ours = reward(images, PROMPTS[:1])
        torch.testing.assert_close(
            ours, _hps_reference(reward.model, preprocess(images), PROMPTS[:1]), rtol=1e-5, atol=1e-5
        )
        pil = transform(Image.fromarray(u8.permute(1, 2, 0).numpy()))[None]
        torch.testing.assert_close(ours, _hps_reference(reward.model, pil, PROMPTS[:1]), rtol=0, atol=2e-3)


def test_gradients_and_determinism(reward):
    images = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = reward(images, PROMPTS)
    out.sum().backward()
    assert out.shape == (2,) and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    torch.testing.assert_close(reward(images, PROMPTS), out.detach(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in reward.parameters())


def test_gradient_checkpointing_same_grads(reward):
    ckpt = REWARDS["hps"](RewardConfig(name="hps", path="tiny", tiny_seed=2, gradient_checkpointing=True), "cpu", None)
    grads = []
    for r in (reward, ckpt):
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
        r(images, PROMPTS).sum().backward()
        grads.append(images.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_released_state_dict_format(reward, tmp_path):
    """HPS_v2*_compressed.pt = {'state_dict': fp16 open_clip state dict}."""
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    torch.save({"state_dict": reward.model.state_dict()}, tmp_path / "HPS_fp32.pt")
    # Register the tiny config with open_clip so both loaders read the file by model name.
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "pgot-tiny-hps.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "cfg")
    loaded = REWARDS["hps"](
        RewardConfig(name="hps", path=str(tmp_path / "HPS_fp32.pt"), arch="pgot-tiny-hps"), "cpu", None
    )
    torch.testing.assert_close(loaded(images, PROMPTS), reward(images, PROMPTS), rtol=1e-6, atol=1e-6)
    # The fp16 "compressed" file: open_clip's own loader and pgot's agree exactly.
    torch.save(
        {"state_dict": {k: v.half() for k, v in reward.model.state_dict().items()}}, tmp_path / "HPS_v2.1_compressed.pt"
    )
    ref_model = open_clip.create_model(
        "pgot-tiny-hps", pretrained=str(tmp_path / "HPS_v2.1_compressed.pt"), output_dict=True
    ).eval()
    loaded = REWARDS["hps"](
        RewardConfig(name="hps", path=str(tmp_path / "HPS_v2.1_compressed.pt"), arch="pgot-tiny-hps"), "cpu", None
    )
    torch.testing.assert_close(
        loaded(images, PROMPTS), _hps_reference(ref_model, preprocess(images), PROMPTS), rtol=1e-5, atol=1e-5
    )
    # Default arch ViT-H-14: the tiny file is another architecture.
    with pytest.raises(
        ValueError,
        match=r"reward 'hps': checkpoint .*HPS_v2.1_compressed.pt' does not fit the CLIP architecture \(missing keys: .*shape mismatches",
    ):
        REWARDS["hps"](RewardConfig(name="hps", path=str(tmp_path / "HPS_v2.1_compressed.pt")), "cpu", None)
    with pytest.raises(ValueError, match=r"reward 'hps': unknown open_clip arch 'ViT-Q-99'"):
        REWARDS["hps"](
            RewardConfig(name="hps", path=str(tmp_path / "HPS_v2.1_compressed.pt"), arch="ViT-Q-99"), "cpu", None
        )
    with pytest.raises(ValueError, match=r"reward 'hps': checkpoint path '/nonexistent/HPS_v2.pt' does not exist"):
        REWARDS["hps"](RewardConfig(name="hps", path="/nonexistent/HPS_v2.pt"), "cpu", None)
