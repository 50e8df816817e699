"""Rewards on HF ``CLIPModel`` towers: CLIP score, ICT, PickScore, HP and the LAION aesthetic predictor.

=========== ========================================= ================================================
name        score                                     checkpoint (``path``)
=========== ========================================= ================================================
clip        ``cos(img, txt)``                         HF CLIPModel folder (default arch OpenAI ViT-L/14)
ict         ``cos(img, txt)`` (Ba et al. 2025)        ``pytorch_model.bin`` (full CLIPModel state dict,
                                                      laion ViT-H-14 config) or a folder with config.json
pickscore   ``exp(logit_scale) * cos(img, txt)``      HF CLIPModel folder (``yuvalkirstain/PickScore_v1``)
hp          ``sigmoid(MLP(img))``, img not normalised folder with ``hp_backbone/`` (CLIPModel) and
                                                      ``hp_scorer/mlp_pytorch_model.bin`` (``8y/HP``)
aesthetic   ``MLP(img / ||img||)``                    folder with a ViT-L/14 CLIPModel (in the folder or
                                                      in ``clip/``) and the MLP ``*.pth``
=========== ========================================= ================================================

``img`` is the projected image embedding (``visual_projection`` of the pooled vision output), ``txt``
the projected text embedding. Text is tokenised with open_clip's bundled BPE (identical ids to the HF
CLIP tokenizers up to EOT; the text tower is causal and pools at EOT, so padding does not matter).
A folder without ``config.json`` uses the built-in config of ``arch`` (``ViT-L-14``, ``ViT-H-14``,
``ViT-B-16``, ``ViT-B-32``). ``path: tiny`` builds a 2-layer, 32-wide random model on the same code
path; ``path: random`` the full-size architecture with random weights (benchmarks).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

from pgot.config import RewardConfig
from pgot.devices import resolve_dtype
from pgot.rewards.base import (
    LinearMLP,
    Reward,
    TextCache,
    check_image_size,
    load_state_dict_file,
    load_strict,
    maybe_checkpoint,
    resolve_path,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HF_ARCHS",
    "LOCATORS",
    "AestheticReward",
    "ClipCosineReward",
    "HPReward",
    "build_aesthetic",
    "build_clip",
    "build_hp",
    "build_ict",
    "build_pickscore",
    "clip_tokenizer",
    "hf_clip_config",
    "image_embeds",
    "load_hf_clip",
    "tiny_clip_model",
]

# (text width, ffn, layers, heads), (vision width, ffn, layers, heads, patch), projection dim, activation
HF_ARCHS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int, str]] = {
    "ViT-B-32": ((512, 2048, 12, 8), (768, 3072, 12, 12, 32), 512, "quick_gelu"),
    "ViT-B-16": ((512, 2048, 12, 8), (768, 3072, 12, 12, 16), 512, "quick_gelu"),
    "ViT-L-14": ((768, 3072, 12, 12), (1024, 4096, 24, 16, 14), 768, "quick_gelu"),  # openai/clip-vit-large-patch14
    "ViT-H-14": ((1024, 4096, 24, 16), (1280, 5120, 32, 16, 14), 1024, "gelu"),  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K
}
"""Built-in HF CLIPConfig shapes, used when a checkpoint has no ``config.json`` and for ``path: random``."""

PICKSCORE_LOGIT_SCALE = 4.6052
"""ln(100): CLIP's clamped logit scale, used by the tiny PickScore so its scores have the real scale."""


def hf_clip_config(name: str, arch: str, logit_scale: float = 2.6592) -> CLIPConfig:
    """The full-size HF ``CLIPConfig`` of ``arch`` (a key of :data:`HF_ARCHS`)."""
    if arch not in HF_ARCHS:
        raise ValueError(
            f"reward {name!r}: unknown arch {arch!r}. Set rewards.<i>.arch to one of {', '.join(HF_ARCHS)}, or ship a config.json with the checkpoint."
        )
    (tw, tf, tl, th), (vw, vf, vl, vh, patch), proj, act = HF_ARCHS[arch]
    return CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=tw,
            intermediate_size=tf,
            num_hidden_layers=tl,
            num_attention_heads=th,
            max_position_embeddings=77,
            hidden_act=act,
        ),
        vision_config=dict(
            hidden_size=vw,
            intermediate_size=vf,
            num_hidden_layers=vl,
            num_attention_heads=vh,
            image_size=224,
            patch_size=patch,
            hidden_act=act,
        ),
        projection_dim=proj,
        logit_scale_init_value=logit_scale,
    )


def tiny_clip_model(seed: int, act: str = "gelu", logit_scale: float = 2.6592) -> CLIPModel:
    """A random 2-layer, 32-wide HF ``CLIPModel`` (real vocabulary 49408, 224 px, patch 14, projection 16)."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act=act,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=14,
            hidden_act=act,
        ),
        projection_dim=16,
        logit_scale_init_value=logit_scale,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(config)


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """open_clip's bundled OpenAI BPE tokenizer (context 77, SOT 49406, EOT 49407, pad 0), no files needed."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    vocab = len(getattr(tokenizer, "encoder", {}))
    assert vocab == 49408, f"open_clip BPE tokenizer has {vocab} tokens, expected 49408 (broken open_clip install?)"
    return tokenizer


def _vision_config(config: CLIPConfig):
    vision = config.vision_config
    vision.projection_dim = config.projection_dim
    return vision


def _fix_position_ids(model: nn.Module) -> None:
    """Give the non-persistent ``position_ids`` buffers (left on the meta device) their values."""
    for module in model.modules():
        buf = getattr(module, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            module.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)


def _hf_weight_files(name: str, path: Path) -> list[Path]:
    """The weight files of an HF CLIPModel checkpoint (a file, or a folder as ``save_pretrained`` writes it)."""
    if path.is_file():
        return [path]
    for fname in ("model.safetensors", "pytorch_model.bin"):
        if (path / fname).is_file():
            return [path / fname]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"reward {name!r}: {str(path / index)!r} is not a weight index ({err}).") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ValueError(
                    f"reward {name!r}: {str(path / index)!r} names shards that are not in the folder: "
                    f"{', '.join(missing[:3])}. Download the whole checkpoint folder again."
                )
            return [path / s for s in shards]
    raise ValueError(
        f"reward {name!r}: no weights in folder {str(path)!r} (expected model.safetensors, pytorch_model.bin or a sharded "
        "*.index.json, as written by CLIPModel.save_pretrained). Point rewards.<i>.path at the model folder."
    )


def _read_hf_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(name, path):
        state.update(load_state_dict_file(name, f))
    return state


def _clip_config(name: str, path: Path, arch: str) -> CLIPConfig:
    """The checkpoint's ``config.json`` (next to the weights), else the built-in config of ``arch``; 224 px only."""
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"reward {name!r}: {str(config_file)!r} is not valid JSON ({err}).") from None
        if not isinstance(raw, dict) or raw.get("model_type", "clip") != "clip":
            what = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(
                f"reward {name!r}: {str(config_file)!r} describes a {what!r} model, not a CLIP model. Point rewards.<i>.path at this reward's checkpoint."
            )
        config = CLIPConfig.from_dict(raw)
        check_image_size(name, config.vision_config.image_size, f"{str(config_file)!r}")
        return config
    return hf_clip_config(name, arch)


def load_hf_clip(
    name: str, path: Path, arch: str, *, vision_only: bool, device: torch.device | str, dtype: torch.dtype
) -> CLIPModel | CLIPVisionModelWithProjection:
    """Load an HF CLIPModel checkpoint (folder or weights file) strictly, built on the meta device.

    ``config.json`` next to the weights wins over ``arch``. With ``vision_only`` only the image tower and
    ``visual_projection`` are kept (HP and aesthetic do not read text); the text keys are then expected.
    """
    config = _clip_config(name, path, arch)
    state = _read_hf_weights(name, path)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(_vision_config(config)) if vision_only else CLIPModel(config)
    text_keys = ("text_model.", "text_projection.", "logit_scale")

    def ignore(key: str) -> bool:  # legacy buffers (transformers < 4.31 saved them); text tower when unused
        return key.endswith("position_ids") or (vision_only and key.startswith(text_keys))

    load_strict(name, model, state, path, ignore=ignore)
    _fix_position_ids(model)
    return model.to(device=device, dtype=dtype)


def _random_clip(config: CLIPConfig, vision_only: bool, device: torch.device | str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):  # initialise directly on the device: seconds instead of minutes for ViT-H on CUDA
        return CLIPVisionModelWithProjection(_vision_config(config)) if vision_only else CLIPModel(config)


def _vision_from_full(full: CLIPModel) -> CLIPVisionModelWithProjection:
    vision = CLIPVisionModelWithProjection(_vision_config(full.config))
    vision.load_state_dict(
        {k: v for k, v in full.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    )
    return vision


def image_embeds(model: nn.Module, pixel_values: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
    """Projected image embedding (B, D) = ``visual_projection(post_layernorm(ViT(px))[:, 0])``.

    The same computation as ``CLIPModel.get_image_features(...).pooler_output``, written out so that
    the encoder layers can be checkpointed while the frozen model stays in eval mode (transformers
    only checkpoints in training mode).
    """
    vision = model.vision_model
    h = vision.pre_layrnorm(vision.embeddings(pixel_values))  # (B, 1 + patches, W)
    for layer in vision.encoder.layers:
        out = maybe_checkpoint(layer, gradient_checkpointing, h, None)
        h = out[0] if isinstance(out, tuple) else out
    return model.visual_projection(vision.post_layernorm(h[:, 0]))


class _ClipImageReward(Reward):
    def __init__(self, name: str, model: nn.Module, gradient_checkpointing: bool):
        super().__init__(name)
        self.model = model
        self.gradient_checkpointing = gradient_checkpointing

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeds(self.model, pixel_values.to(self.dtype), self.gradient_checkpointing)


class ClipCosineReward(_ClipImageReward):
    """``scale * cos(image embedding, text embedding)``; ``scale`` is 1 or ``exp(logit_scale)`` (PickScore)."""

    def __init__(
        self,
        name: str,
        model: CLIPModel,
        *,
        logit_scale: bool,
        gradient_checkpointing: bool = False,
        text_cache: int = 1024,
    ):
        super().__init__(name, model, gradient_checkpointing)
        self.use_logit_scale = logit_scale
        self.tokenizer = clip_tokenizer()
        self.text_cache = TextCache(text_cache)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (P, D) float32 (no gradient: the text tower is frozen)."""
        ids = self.tokenizer(prompts).to(self.device)  # (P, 77)
        text = self.model.text_model(input_ids=ids)
        pooled = text.pooler_output if hasattr(text, "pooler_output") else text[1]
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def compute(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = F.normalize(self.image_embeds(pixel_values).float(), dim=-1)  # (B, D)
        txt = self.text_cache.get(prompts, self.encode_text).to(img.device)  # (B, D)
        cos = (img * txt).sum(-1)
        return cos * self.model.logit_scale.float().exp() if self.use_logit_scale else cos


class HPReward(_ClipImageReward):
    """HP (Ba et al. 2025): ``sigmoid(MLP(image embedding))``, the embedding not normalised; text-free."""

    def __init__(self, name: str, model: nn.Module, mlp: LinearMLP, gradient_checkpointing: bool = False):
        super().__init__(name, model, gradient_checkpointing)
        self.mlp = mlp

    def compute(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.sigmoid(self.mlp(self.image_embeds(pixel_values).float())).squeeze(-1)


class AestheticReward(_ClipImageReward):
    """LAION improved aesthetic predictor (linearMSE): ``MLP(img / ||img||)`` on the ViT-L/14 embedding; text-free."""

    def __init__(self, name: str, model: nn.Module, mlp: LinearMLP, gradient_checkpointing: bool = False):
        super().__init__(name, model, gradient_checkpointing)
        self.mlp = mlp

    def compute(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.mlp(F.normalize(self.image_embeds(pixel_values).float(), dim=-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Constructors: (cfg, device, dtype) -> Reward
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How one reward of this module finds its checkpoint (shared by its builder and its locator)."""

    default_arch: str
    what: str
    """The expected checkpoint, for error messages."""
    clip_path: Callable[[str, Path], Path] | None = None
    """Vision rewards: the CLIPModel folder inside the reward's folder."""
    mlp_path: Callable[[str, Path], Path] | None = None
    """Vision rewards: the MLP head file inside the reward's folder."""


def _locate_cosine(cfg: RewardConfig, spec: _Spec) -> Path | None:
    """The checkpoint of a cosine reward, checked as far as possible without reading weights (None: tiny/random)."""
    arch = cfg.arch or spec.default_arch
    if cfg.path == "tiny":
        return None
    if cfg.path == "random":
        hf_clip_config(cfg.name, arch)
        return None
    path = resolve_path(cfg.name, cfg.path, spec.what)
    _clip_config(cfg.name, path, arch)
    _hf_weight_files(cfg.name, path)
    return path


def _locate_vision(cfg: RewardConfig, spec: _Spec) -> tuple[Path, Path] | None:
    """(CLIPModel folder, MLP file) of a vision reward, checked without reading weights (None: tiny/random)."""
    arch = cfg.arch or spec.default_arch
    if cfg.path == "tiny":
        return None
    if cfg.path == "random":
        hf_clip_config(cfg.name, arch)
        return None
    assert spec.clip_path is not None and spec.mlp_path is not None
    root = resolve_path(cfg.name, cfg.path, spec.what)
    if not root.is_dir():
        raise ValueError(
            f"reward {cfg.name!r}: {str(root)!r} is a file; expected {spec.what}. Point rewards.<i>.path at the folder."
        )
    clip_path = spec.clip_path(cfg.name, root)
    _clip_config(cfg.name, clip_path, arch)
    _hf_weight_files(cfg.name, clip_path)
    return clip_path, spec.mlp_path(cfg.name, root)


def _cosine_reward(cfg: RewardConfig, device, dtype, spec: _Spec, *, logit_scale: bool) -> Reward:
    arch = cfg.arch or spec.default_arch
    wdtype = resolve_dtype(cfg.dtype, device, default=dtype, key=f"reward {cfg.name!r} dtype")
    scale = PICKSCORE_LOGIT_SCALE if logit_scale else 2.6592
    act = HF_ARCHS[arch][3] if arch in HF_ARCHS else "gelu"
    path = _locate_cosine(cfg, spec)
    if cfg.path == "tiny":
        model = tiny_clip_model(cfg.tiny_seed, act=act, logit_scale=scale)
    elif cfg.path == "random":
        model = _random_clip(hf_clip_config(cfg.name, arch, scale), False, device, cfg.tiny_seed)
    else:
        assert path is not None
        model = load_hf_clip(cfg.name, path, arch, vision_only=False, device=device, dtype=wdtype)
    model = model.to(device=device, dtype=wdtype)
    return ClipCosineReward(
        cfg.name,
        model,
        logit_scale=logit_scale,
        gradient_checkpointing=cfg.gradient_checkpointing,
        text_cache=cfg.text_cache,
    ).freeze()


def build_clip(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """CLIP score: cosine of CLIP image and text embeddings (default OpenAI ViT-L/14)."""
    return _cosine_reward(cfg, device, dtype, _SPECS["clip"], logit_scale=False)


def build_ict(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """ICT (Ba et al. 2025): cosine on the fine-tuned CLIP ViT-H-14 of ``8y/ICT``."""
    return _cosine_reward(cfg, device, dtype, _SPECS["ict"], logit_scale=False)


def build_pickscore(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos`` on ``yuvalkirstain/PickScore_v1``."""
    return _cosine_reward(cfg, device, dtype, _SPECS["pickscore"], logit_scale=True)


def _vision_reward(cfg: RewardConfig, device, dtype, spec: _Spec, cls: type) -> Reward:
    arch = cfg.arch or spec.default_arch
    wdtype = resolve_dtype(cfg.dtype, device, default=dtype, key=f"reward {cfg.name!r} dtype")
    located = _locate_vision(cfg, spec)
    if located is None:
        if cfg.path == "tiny":
            vision = _vision_from_full(
                tiny_clip_model(cfg.tiny_seed, act=HF_ARCHS[arch][3] if arch in HF_ARCHS else "gelu")
            )
        else:
            vision = _random_clip(hf_clip_config(cfg.name, arch), True, device, cfg.tiny_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.tiny_seed + 1)
            mlp = LinearMLP(vision.config.projection_dim)
    else:
        clip_path, mfile = located
        vision = load_hf_clip(cfg.name, clip_path, arch, vision_only=True, device=device, dtype=wdtype)
        state = load_state_dict_file(cfg.name, mfile)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        with torch.device("meta"):
            mlp = LinearMLP(vision.config.projection_dim)
        load_strict(cfg.name, mlp, state, mfile)
    vision = vision.to(device=device, dtype=wdtype)
    mlp = mlp.to(device=device, dtype=torch.float32)  # a few MB; float32 keeps the head exact in bf16 runs
    return cls(cfg.name, vision, mlp, gradient_checkpointing=cfg.gradient_checkpointing).freeze()


def _hp_backbone(name: str, root: Path) -> Path:
    folder = root / "hp_backbone"
    if not folder.is_dir():
        raise ValueError(
            f"reward {name!r}: {str(root)!r} has no hp_backbone/ folder (the 8y/HP layout: hp_backbone/ + hp_scorer/mlp_pytorch_model.bin)."
        )
    return folder


def _hp_scorer(name: str, root: Path) -> Path:
    file = root / "hp_scorer" / "mlp_pytorch_model.bin"
    if not file.is_file():
        raise ValueError(
            f"reward {name!r}: {str(file)!r} does not exist (the 8y/HP layout: hp_backbone/ + hp_scorer/mlp_pytorch_model.bin)."
        )
    return file


def build_hp(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """HP (Ba et al. 2025): ``sigmoid(MLP(img))`` on the fine-tuned ViT-H-14 image tower of ``8y/HP``."""
    return _vision_reward(cfg, device, dtype, _SPECS["hp"], HPReward)


def _aesthetic_clip(name: str, root: Path) -> Path:
    return root / "clip" if (root / "clip").is_dir() else root


def _aesthetic_mlp(name: str, root: Path) -> Path:
    files = sorted(root.glob("*.pth"))
    preferred = [f for f in files if f.name == "sac+logos+ava1-l14-linearMSE.pth"]
    if preferred:
        return preferred[0]
    if len(files) != 1:
        raise ValueError(
            f"reward {name!r}: expected one aesthetic MLP *.pth in {str(root)!r} (e.g. sac+logos+ava1-l14-linearMSE.pth), "
            f"found {len(files)}{': ' + ', '.join(f.name for f in files) if files else ''}."
        )
    return files[0]


def build_aesthetic(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """LAION improved aesthetic predictor: linear MLP on the L2-normalised OpenAI ViT-L/14 image embedding."""
    return _vision_reward(cfg, device, dtype, _SPECS["aesthetic"], AestheticReward)


_SPECS = {
    "clip": _Spec("ViT-L-14", "an HF CLIPModel folder (e.g. openai/clip-vit-large-patch14)"),
    "ict": _Spec("ViT-H-14", "the ICT pytorch_model.bin (8y/ICT) or a folder with config.json and weights"),
    "pickscore": _Spec("ViT-H-14", "the PickScore_v1 HF CLIPModel folder"),
    "hp": _Spec("ViT-H-14", "the 8y/HP folder (hp_backbone/ and hp_scorer/)", _hp_backbone, _hp_scorer),
    "aesthetic": _Spec(
        "ViT-L-14",
        "a folder with the ViT-L/14 CLIPModel (config.json + weights, here or in clip/) and the aesthetic MLP .pth",
        _aesthetic_clip,
        _aesthetic_mlp,
    ),
}

LOCATORS: dict[str, Callable[[RewardConfig], object]] = {
    name: functools.partial(_locate_vision if spec.clip_path else _locate_cosine, spec=spec)
    for name, spec in _SPECS.items()
}
"""Reward name -> ``locate(cfg)``: everything its builder checks before reading weights (path, files, arch, image
size), raising the builder's ``ValueError``; :func:`pgot.rewards.check` runs them in the preflight."""
