"""Proxy rewards of the testbed: hackable weak rewards and learned strong preference models.

The two mechanisms of reward hacking in the paper (section 2, appendix C) exist here by construction:

- **Weak rewards** are pgot's analytic rewards (:mod:`pgot.rewards.analytic`), used unchanged: ``saturation``,
  ``colorfulness``, ``contrast`` and ``sharpness``. They ignore the prompt, so their honest bound (their value on
  an exact rendering of the prompt) depends on the prompt: every achromatic scene has saturation and colourfulness 0,
  a large yellow square on black has saturation 0.19; contrast ranges from 0.004 (a small green square on grey) to
  0.35 (a large white square on black). A single global target (eq. 1) above a prompt's honest bound can only be
  met by changing the image away from the prompt (over-saturating, tinting the background, growing the object,
  adding noise): reward up, ground-truth quality down (``tests/test_testbed_proxies.py`` shows both facts).
- **Strong rewards** are small learned preference models, trained like real ones (HPS, PickScore, HP) on pairs of
  base-model images of one prompt ranked by a "human", here the ground-truth judge (:mod:`pgot.testbed.judge`),
  with the Bradley-Terry loss ``-log sigmoid(r(winner) - r(loser))`` (``scripts/train_testbed.py``). Like real
  ones, they are fitted to the base model's distribution only; nothing makes them right off it.

  ============ ======================================================================================
  name         trained on pairs ranked by
  ============ ======================================================================================
  tb_align     the judge's fidelity (product of shape, colour, size, background): an alignment model,
               the testbed's ICT
  tb_pref      the judge's quality (every component): a preference model, the testbed's HP
  ============ ======================================================================================

  Both are :class:`PreferenceNet` CNNs on the 32 x 32 image, conditioned on the prompt through its parsed scene
  (the object and background colours as constant RGB planes, one-hot shape and size planes), the testbed's stand-in
  for a text tower. ``path: ""`` loads the shipped weights (``pgot/testbed/preference/<name>.safetensors``),
  ``path: tiny`` a random init (seeded by ``tiny_seed``) for tests, any other path a safetensors file (or a folder
  holding ``<name>.safetensors``).

**Table 1 in this world** (``report.json``): preference accuracy against the judge's quality on 637 held-out pairs of
base-model samples (disjoint pairs of one prompt, fresh seeds, ties within 0.01 left out), Wilson 95% intervals:
tb_align 0.733 [0.698, 0.766], tb_pref 0.706 [0.670, 0.741], saturation 0.443 [0.405, 0.482], colorfulness 0.473
[0.434, 0.511], contrast 0.468 [0.429, 0.507], sharpness 0.466 [0.428, 0.505]. The weak rewards are at or below
chance (saturation significantly below) on the base distribution.

:data:`STRENGTHS` says which is which, :data:`SIGNATURES` what each one's hacking looks like (the knowledge base of
the agent, paper D.1), and :data:`SIGNATURE_COMPONENTS` which ground-truth components it damages (for
:func:`pgot.testbed.agent.diagnose`). The weak rewards' component signatures were read off mild pixel-space hacks of
exact renderings (a few Adam steps on the global-target hinge; ``tests/test_testbed_agent.py`` replays them); the
strong rewards' are expectations, not yet observed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pgot.config import RewardConfig
from pgot.devices import resolve_dtype
from pgot.rewards import STRENGTHS as DEFAULT_STRENGTHS
from pgot.rewards.base import Reward, load_strict
from pgot.testbed.scenes import RESOLUTION, SHAPES, SIZES, Scene, as_prompt_list, parse_prompt

__all__ = [
    "PREFERENCE_DIR",
    "PREFERENCE_MODELS",
    "SIGNATURES",
    "SIGNATURE_COMPONENTS",
    "STRENGTHS",
    "WEAK_REWARDS",
    "PreferenceNet",
    "PreferenceReward",
    "build_preference",
    "scene_planes",
]

PREFERENCE_DIR = Path(__file__).resolve().parent / "preference"
"""Shipped weights of the preference models (package data)."""

PREFERENCE_MODELS: dict[str, str] = {
    "tb_align": "fidelity",
    "tb_pref": "quality",
}
"""Preference model name -> the judge score whose pairwise ranking it is trained on."""

WEAK_REWARDS = ("saturation", "colorfulness", "contrast", "sharpness")
"""The analytic rewards that act as the testbed's weak proxies (registered by :mod:`pgot.rewards`)."""

STRENGTHS: dict[str, str] = {n: DEFAULT_STRENGTHS[n] for n in (*WEAK_REWARDS, *PREFERENCE_MODELS)}
"""Proxy name -> ``weak`` or ``strong``: the registry's defaults (:data:`pgot.rewards.STRENGTHS`, one home)."""

SIGNATURES: dict[str, str] = {
    "saturation": "Colours pushed past the prompt's: neon, over-saturated objects; grey, white or black objects and "
    "backgrounds take on a colour tint; coloured fringes at the object's edge.",
    "colorfulness": "Colour noise: speckles, blotches or bands of unrelated hues over the background and the "
    "object; achromatic objects and backgrounds tinted; the object's hue drifts toward a more vivid one.",
    "contrast": "Background and object pushed apart in brightness: grey backgrounds turn black or white, the object "
    "grows or darkens, harsh light and dark bands or blotches appear.",
    "sharpness": "Grainy high-frequency noise, one-pixel stripe or checkerboard patterns, and bright or dark halos "
    "ringing around the object's edge.",
    "tb_align": "Mild: the object's colour and shape are exaggerated toward the prototype while faint "
    "texture or edge patterns that the small CNN does not penalise creep in.",
    "tb_pref": "Mildest: overly smooth, flat rendering with slightly faint or blurred edges and low-amplitude "
    "patterns that a small CNN rewards.",
}
"""Proxy name -> its collapse signature: what its reward hacking looks like in the testbed world."""

SIGNATURE_COMPONENTS: dict[str, dict[str, float]] = {
    "saturation": {"colour_noise": 1.0, "oversaturation": 0.5, "halo": 0.3},
    "colorfulness": {
        "colour_noise": 1.0,
        "noise": 0.8,
        "oversaturation": 0.8,
        "halo": 0.5,
        "background": 0.5,
        "colour": 0.3,
        "banding": 0.3,
    },
    "contrast": {"background": 1.0, "colour": 1.0, "size": 0.3},
    "sharpness": {"noise": 1.0, "halo": 0.5, "stripes": 0.5},
    "tb_align": {"noise": 0.5, "halo": 0.5, "stripes": 0.5},
    "tb_pref": {"blur": 0.5, "noise": 0.5, "banding": 0.5},
}
"""Proxy name -> judge component -> weight: the components its hacking damages (the machine-readable form of
:data:`SIGNATURES`, used by :func:`pgot.testbed.agent.diagnose`)."""

_PLANES = 3 + 3 + len(SHAPES) + len(SIZES)


def scene_planes(scenes: Sequence[Scene], device: torch.device | str = "cpu") -> torch.Tensor:
    """The prompt conditioning of a preference model: (B, 11) = object RGB, background RGB, one-hot shape, one-hot size.

    Raises:
        TypeError: ``scenes`` is a single string or holds something else than :class:`Scene` objects.
    """
    rows = []
    for i, s in enumerate(as_prompt_list(scenes, "scene_planes", "scenes")):
        if not isinstance(s, Scene):
            raise TypeError(f"scene_planes: scenes[{i}] must be a Scene (pgot.testbed.scenes.parse_prompt), got str.")
        shape = [1.0 if s.shape == k else 0.0 for k in SHAPES]
        size = [1.0 if s.size == k else 0.0 for k in SIZES]
        rows.append([*s.rgb, *s.background_rgb, *shape, *size])
    return torch.tensor(rows, dtype=torch.float32, device=device)


class PreferenceNet(nn.Module):
    """A small CNN scoring a 32 x 32 image given its scene: (B, 3, 32, 32), (B, 11) -> (B,).

    The scene vector is broadcast to 11 constant planes and concatenated with the image (14 input channels), then
    ``conv3x3(14, w) -> conv3x3 stride 2 (w, 2w) -> conv3x3 stride 2 (2w, 2w) -> conv3x3 stride 2 (2w, 4w)``, SiLU
    after each, a global average and max pool, and ``Linear(8w, 2w) SiLU Linear(2w, 1)``.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3 + _PLANES, w, 3, padding=1),
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
                nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
                nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            ]
        )
        self.head = nn.Sequential(nn.Linear(8 * w, 2 * w), nn.SiLU(), nn.Linear(2 * w, 1))

    def forward(self, images: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of images (B, 3, 32, 32) in [0, 1] with scene vectors (B, 11)."""
        b, _, h, w = images.shape
        x = torch.cat([images * 2 - 1, planes[:, :, None, None].expand(b, planes.shape[1], h, w) * 2 - 1], dim=1)
        for conv in self.convs:
            x = F.silu(conv(x))
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return self.head(pooled)[:, 0]


class PreferenceReward(Reward):
    """A testbed preference model as a pgot reward: ``reward(images, prompts) -> (B,)``, higher is better.

    Images of another size are resized to 32 x 32 (bilinear, antialiased) first; prompts must be testbed prompts.
    """

    uses_pixel_values = False

    def __init__(self, name: str, net: PreferenceNet):
        super().__init__(name)
        self.net = net

    def compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores (B,) of images (B, 3, H, W) in [0, 1] for a list of B testbed prompts.

        Raises:
            TypeError: ``prompts`` is a single string, not a list.
            ValueError: a prompt outside the testbed grammar.
        """
        prompts = as_prompt_list(prompts, f"reward {self.name!r}")
        try:
            scenes = [parse_prompt(p) for p in prompts]
        except ValueError as err:
            raise ValueError(f"reward {self.name!r} scores testbed prompts only: {err}") from None
        x = images.to(self.dtype)
        if tuple(x.shape[-2:]) != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
        return self.net(x.to(self.device), scene_planes(scenes, self.device).to(self.dtype))


def _weights_file(name: str, path: str) -> Path:
    if not path:
        f = PREFERENCE_DIR / f"{name}.safetensors"
        if not f.is_file():
            raise ValueError(
                f"reward {name!r}: the shipped weights {str(f)!r} are missing (an incomplete install?). Reinstall pgot, "
                "or run scripts/train_testbed.py to recreate them, or set the reward's path to `tiny` for a random build."
            )
        return f
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / f"{name}.safetensors"
    if not p.is_file():
        raise ValueError(
            f"reward {name!r}: {path!r} is neither a safetensors file nor a folder holding {name}.safetensors. Leave the "
            "reward's path empty for the shipped weights, or set it to `tiny` for a random build."
        )
    return p


def build_preference(cfg: RewardConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Reward:
    """Build the testbed preference model ``cfg.name`` (a name in :data:`PREFERENCE_MODELS`).

    Args:
        cfg: the reward's config; ``path`` is ``""`` (shipped weights), ``tiny`` (random init from ``tiny_seed``) or a
            file / folder.
        device: where the weights live.
        dtype: weights dtype when ``cfg.dtype`` is ``auto`` (default float32 on CPU, bfloat16 on CUDA).

    Raises:
        ValueError: an unknown name, a missing or mismatched weights file.
    """
    from safetensors.torch import load_file

    if cfg.name not in PREFERENCE_MODELS:
        raise ValueError(f"reward {cfg.name!r} is not a testbed preference model ({', '.join(PREFERENCE_MODELS)}).")
    if cfg.path == "tiny":
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(cfg.tiny_seed)
            net = PreferenceNet()
        finally:
            torch.random.set_rng_state(state)
    else:
        f = _weights_file(cfg.name, cfg.path)
        net = PreferenceNet()
        load_strict(cfg.name, net, {k: v.float() for k, v in load_file(str(f)).items()}, f)
    net = net.to(device=device, dtype=resolve_dtype(cfg.dtype, device, default=dtype, key=f"reward {cfg.name!r} dtype"))
    return PreferenceReward(cfg.name, net).freeze()
