"""The decision-making agent of PG-OT (paper section 3.3 and appendix D).

Every ``agent.every`` optimizer steps the trainer shows the agent diagnostic images of the current
model next to the base model's images for the same prompts and seeds. The agent answers one of

- ``continue``: no collapse is visible; train on.
- ``remove``: the images show the collapse signature of an active (weak) reward: the trainer drops
  that reward and reverts to the last approved checkpoint ("Remove & Revert").
- ``switch``: nothing collapsed, only strong rewards remain, images change little: move from the
  offline strategy (precomputed fronts) to the online one.

Backends (``agent.backend``):

- ``openai``: any OpenAI-compatible chat-completions endpoint that takes images (GPT-4o; Qwen-VL or
  GLM-V served by vLLM or SGLang; ``agent.api_key_env=''`` for a server without a key). The request
  carries the knowledge base of collapse signatures (paper D.1, ``agent.knowledge``; reference images
  of mild collapse with ``agent.references``), the run state and the two-stage decision procedure
  (D.2); the reply is either the paper's ``Action: ... / Strategy: ...`` lines or a JSON object, read
  by the tolerant :func:`parse_reply`. Retries with exponential backoff on 408/429/5xx, timeouts and
  connection errors (``agent.max_retries``, ``agent.retry_backoff``), none on other 4xx; spending is
  counted from the reply's token usage and stops at ``agent.cost_limit``.
- ``scripted``: decisions read from a YAML file keyed by step (reproducing a run, tests;
  ``configs/agent/d3_schedule.yaml`` is the paper's D.3 run).
- ``heuristic``: no VLM. Flags the removable reward whose latest probe mean jumped by more than
  ``agent.heuristic_z`` standard deviations of its earlier probe means. The paper (D.4) shows such
  statistics are a weak signal; this is a cheap, non-proprietary fallback, not a replacement.
- ``none``: :func:`build_agent` returns None.

The agent never stops training: an endpoint that is down, slow, refuses the key, is over budget or
replies with nonsense, and a reply naming an unknown, inactive or protected (strong) reward, all give
``continue`` with the reason in :attr:`Decision.reason` and a logged warning.

Every text field an OpenAI-compatible server may answer in is read (:class:`pgot.vlm_client.Answer`: ``content`` as
a string or parts, ``<think>`` blocks, ``reasoning_content``, ``reasoning``, ``refusal``, tool-call arguments, the
legacy ``choices[0].text``): the decision comes from the final answer when it names one, else from the reasoning.
A reply without any text says why (``max_tokens``: raise ``agent.max_tokens``; ``refusal``; ``content_filter``;
``empty``).

Each call of :meth:`Agent.decide` writes ``log_dir/step-XXXXXX/``: the grids (``grid-NN.png``), the
exact request (``request.json``, images as file names, never base64 and never the API key), the full raw
reply (``reply.txt``: every text field, labelled; ``response.json``) and the decision (``decision.json``), and
appends one line to ``log_dir/decisions.jsonl``. Each file is written atomically. A resumed run keeps the records
of the decisions its checkpoint holds and drops those an interrupted attempt made after it (:func:`prune_records`).

The API key never leaves the process except in the request header: the ``openai`` backend protects it
(:func:`pgot.vlm_client.protect`: redacted from every log record of the process), and every agent file,
:class:`Decision` and :class:`AgentState` record (hence ``trainer_state.json``) is redacted, also where the endpoint
echoes the key URL-encoded, JSON-escaped or base64-encoded.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from pgot.config import AgentConfig, RewardConfig, load_yaml, yaml_error
from pgot.files import atomic_write_text
from pgot.images import labelled_grid, png_bytes, save_png
from pgot.rewards import default_strength
from pgot.vlm_client import ChatClient, EndpointError, protect, redact, redact_obj, release

log = logging.getLogger(__name__)

__all__ = [
    "KNOWLEDGE",
    "Agent",
    "AgentState",
    "Decision",
    "Reply",
    "ReplyError",
    "build_agent",
    "build_messages",
    "load_script",
    "make_grids",
    "parse_reply",
    "prune_records",
    "resolve_reward",
]

ACTIONS = ("continue", "remove", "switch")
STRATEGIES = ("offline", "online")

KNOWLEDGE: dict[str, str] = {
    # paper, appendix D.1
    "clip": "Texture pixelation and detail degradation, resulting in a blurred appearance.",
    "ict": "Mildest breakdown, characterized by overly smooth transitions and loss of depth.",
    "hps": "Severe over-saturation, sharpness distortion, and vertical stripe artifacts.",
    "hp": "Pronounced edge artifacts and over-saturated color transitions.",
    # pgot's defaults for the other rewards (not from the paper; override with agent.knowledge)
    "pickscore": "Glossy over-stylised 'digital art' look: exaggerated contrast and saturation, airbrushed "
    "surfaces, repeated ornamental detail, prompt content drifting toward generic showcase imagery.",
    "imagereward": "Over-sharpened, over-detailed textures with high-frequency noise, saturated colors and "
    "cluttered compositions crowded with prompt objects.",
    "aesthetic": "Painterly soft-focus look: heavy background blur, pastel or dreamy washed colors, loss of "
    "fine detail, scenes drifting toward generic 'beautiful' landscapes regardless of the prompt.",
    "colorfulness": "Psychedelic rainbow hues and color noise unrelated to the prompt.",
    "contrast": "Crushed blacks and blown highlights; harsh, posterised high-contrast look.",
    "saturation": "Neon, over-saturated colors with banding; skin, sky and foliage take unnatural hues.",
    "brightness": "Over-exposed, washed-out, nearly white images with lost highlight detail.",
    "sharpness": "Over-sharpening halos and ringing at edges, grainy high-frequency noise, stripe or "
    "checkerboard patterns.",
}
"""Collapse signature of each reward: what its reward hacking looks like (paper D.1 for clip, ict, hps, hp)."""

# Spellings a VLM may use for a reward, normalised by _norm (lowercase, alphanumerics only).
_ALIASES: dict[str, tuple[str, ...]] = {
    "clip": ("clip", "clipscore", "openclip", "clipsim"),
    "ict": ("ict", "ictscore", "imagecontainedtext", "imagecontainstext"),
    "hps": ("hps", "hpsv2", "hpsv21", "hpsv3", "hpsscore", "humanpreferencescore", "humanpreferencescorev2"),
    "hp": ("hp", "hpscore", "highpreference", "highpreferencescore"),
    "pickscore": ("pickscore", "pickapic"),
    "imagereward": ("imagereward", "imgreward", "ir"),
    "aesthetic": ("aesthetic", "aesthetics", "aestheticscore", "laionaesthetic", "aestheticpredictor"),
}
# Words around a reward name in an action ("Remove & Revert: the HPS reward model") that name nothing.
_FILLER = set(
    """a an and the then to from of at it its with by due for remove removed removing removal revert reverted
    reverting rollback roll back drop disable eliminate prune reward rewards model models rm score scorer
    checkpoint previous last latest stable approved step steps weak strong active set training train signal
    objective loss collapsed collapse""".split()
)
_ACTION_PATTERNS: tuple[tuple[str, str], ...] = (
    ("remove", r"remov\w*|revert\w*|drop\w*|disabl\w*|eliminat\w*|roll\s*back|rollback|prun\w*"),
    ("switch", r"switch\w*|go\s+online|online"),
    ("continue", r"continu\w*|keep\w*|maintain\w*|proceed\w*|no[\s_-]*action|no[\s_-]*change|none|stay\w*|nothing"),
)
_ACTION_RE = re.compile("|".join(f"(?P<{name}>\\b(?:{pat}))" for name, pat in _ACTION_PATTERNS), re.I)
_ACTION_LINE = re.compile(r"(?<![a-z])action\**\s*[:：=]\s*(?P<v>[^\n]*?)\s*(?=(?<![a-z])strategy|$)", re.I | re.M)
_STRATEGY_LINE = re.compile(r"(?<![a-z])strategy(?:[ _]+maintenance)?\**\s*[:：=]\s*(?P<v>[^\n]*)", re.I | re.M)


# --------------------------------------------------------------------------------------------
# Decisions and state
# --------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """What the agent decided at one step, with enough metadata to audit it.

    ``action`` is ``continue``, ``remove`` or ``switch``; ``reward`` is the reward to remove (only for
    ``remove``). Anything that went wrong (endpoint down, unparseable or invalid reply) gives
    ``continue`` with ``error`` set and the explanation in ``reason``.
    """

    action: str
    reward: str | None
    reason: str
    raw: str
    step: int = -1
    strategy: str | None = None
    """Strategy the agent asked for (``offline`` / ``online``), as read from the reply."""
    revert_to: int | None = None
    """Checkpoint step to revert to on ``remove``; None: the trainer's last approved checkpoint."""
    analysis: str = ""
    """The agent's training state analysis (its reasoning), as replied."""
    backend: str = ""
    latency_s: float = 0.0
    attempts: int = 0
    """HTTP requests sent (retries included)."""
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    """Dollars, from the endpoint's token usage and agent.price_per_1k_input / agent.price_per_1k_output."""
    error: str | None = None
    """Short error kind (``http_500``, ``timeout``, ``no_key``, ``cost_limit``, ``max_tokens``, ``refusal``, ``empty``,
    ``parse``, ``invalid``, ...), None if fine."""
    log_dir: str = ""

    def __post_init__(self) -> None:
        # a decision's texts come from the endpoint (which may echo the API key) and travel to logs, checkpoints,
        # metrics and trackers: every protected secret is redacted here, wherever the decision is made
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                setattr(self, f.name, redact(value))

    def to_dict(self) -> dict[str, Any]:
        return redact_obj(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict` (how a decision travels from the main process to the others)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class AgentState:
    """The agent's part of the run state: what it sees, and what its decisions change.

    One state for the whole run: :meth:`Agent.decide` reads it, :meth:`apply` changes it on every process, and
    the trainer checkpoints it inside ``trainer_state.json`` (:class:`pgot.checkpoints.TrainerState`).

    ``strengths`` holds every configured reward (``strong`` / ``weak``), ``active_rewards`` the ones that drive
    the loss now, ``strategy`` ``offline`` or ``online``, ``removed`` the removals (``step``, ``reward``,
    ``reverted_to``), ``approved`` the checkpoint folder the agent last approved (what a removal reverts to),
    ``history`` every decision with whether it was applied, ``cost`` the dollars spent on the endpoint (so
    ``agent.cost_limit`` spans resumed runs).
    """

    active_rewards: list[str] = field(default_factory=list)
    strengths: dict[str, str] = field(default_factory=dict)
    strategy: str = "offline"
    removed: list[dict] = field(default_factory=list)
    approved: str = ""
    history: list[dict] = field(default_factory=list)
    cost: float = 0.0

    @classmethod
    def initial(
        cls, reward_configs: Sequence[RewardConfig], active_rewards: Sequence[str] = (), strategy: str = "offline"
    ) -> AgentState:
        """The state at step 0: every configured reward (or ``active_rewards`` when given) is active; a reward's
        strength is ``rewards.<i>.strength``, or its default (:func:`pgot.rewards.default_strength`) when null."""
        names = [r.name for r in reward_configs]
        return cls(
            active_rewards=list(active_rewards) if active_rewards else names,
            strengths={r.name: default_strength(r.name, r.strength) for r in reward_configs},
            strategy="online" if strategy == "online" else "offline",
        )

    def to_dict(self) -> dict[str, Any]:
        return redact_obj(asdict(self))  # what trainer_state.json and decision.json hold: no secrets

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentState:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take their defaults."""
        return cls(
            active_rewards=list(data.get("active_rewards", [])),
            strengths=dict(data.get("strengths", {})),
            strategy=str(data.get("strategy", "offline")),
            removed=[dict(r) for r in data.get("removed", [])],
            approved=str(data.get("approved", "")),
            history=[dict(h) for h in data.get("history", [])],
            cost=float(data.get("cost", 0.0)),
        )

    def apply(
        self, decision: Decision, *, checkpoint: str, act: bool = True, reverted_to: tuple[str, int] | None = None
    ) -> None:
        """Apply a decision taken on the checkpoint ``checkpoint`` (the state every process holds after it).

        The decision and its cost are recorded whatever happens. With ``act``:

        - ``continue``: the checkpoint is approved, unless the agent did not really answer (``decision.error``:
          endpoint down, unparseable or invalid reply), so a later removal only reverts to what it looked at;
        - ``switch``: the strategy becomes ``online`` and the checkpoint is approved;
        - ``remove``: the reward leaves ``active_rewards``, the removal is recorded, and the checkpoint the
          trainer reverted to (``reverted_to = (folder name, step)``) becomes the approved one.

        Raises:
            ValueError: ``remove`` without ``reverted_to``.
        """
        self.cost += decision.cost
        self.history.append(
            {
                "step": decision.step,
                "action": decision.action,
                "reward": decision.reward,
                "revert_to": decision.revert_to,
                "reason": decision.reason,
                "error": decision.error,
                "applied": act,
            }
        )
        if not act:
            return
        if decision.action == "continue":
            if not decision.error:
                self.approved = checkpoint
        elif decision.action == "switch":
            self.strategy, self.approved = "online", checkpoint
        elif decision.action == "remove":
            if reverted_to is None:
                raise ValueError("a removal needs the checkpoint the trainer reverted to (reverted_to).")
            self.active_rewards = [r for r in self.active_rewards if r != decision.reward]
            self.removed.append({"step": decision.step, "reward": decision.reward, "reverted_to": reverted_to[1]})
            self.approved = reverted_to[0]


# --------------------------------------------------------------------------------------------
# Reply parsing
# --------------------------------------------------------------------------------------------


class ReplyError(ValueError):
    """A reply from which no decision can be read."""


@dataclass
class Reply:
    """What a reply says, before it is checked against the run state."""

    action: str
    reward: str | None = None
    """Canonical reward name (``hps`` for "HPSv2"), or None."""
    reward_text: str = ""
    """The words the reply used for the reward."""
    strategy: str | None = None
    analysis: str = ""


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def resolve_reward(text: str, reward_names: Sequence[str] = ()) -> tuple[str | None, str]:
    """Find the reward named in ``text`` ("HPSv2", "the ImageReward model", "Remove & Revert: HPS").

    Args:
        text: words following an action, or a JSON ``reward`` field.
        reward_names: configured reward names (matched exactly, after normalisation, before aliases).

    Returns:
        ``(name, words)``: the canonical name (a configured name, or a known alias's registry name)
        or None, and the words that named it (or the first unrecognised word, for error messages).
    """
    lookup: dict[str, str] = {}
    for canonical, aliases in _ALIASES.items():
        for a in aliases:
            lookup[a] = canonical
    for n in reward_names:
        lookup[_norm(n)] = n
        for a in _ALIASES.get(n, ()):
            lookup[a] = n
    whole = _norm(text)
    if whole in lookup:
        return lookup[whole], text.strip()
    tokens = re.findall(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", text)
    unknown = ""
    for i in range(len(tokens)):
        for width in (3, 2, 1):  # "HPS v2.1", "Image Reward", "HPS"
            words = tokens[i : i + width]
            if len(words) == width and _norm("".join(words)) in lookup:
                return lookup[_norm("".join(words))], " ".join(words)
        word = tokens[i].strip(".-_")
        if not unknown and word.lower() not in _FILLER and not word.isdigit() and _norm(word):
            unknown = word
    return None, unknown


def _action_of(text: str) -> tuple[str, int] | None:
    """First action keyword in ``text`` and the end of its match; None if there is none."""
    m = _ACTION_RE.search(text)
    if m is None:
        return None
    return str(m.lastgroup), m.end()


def _parse_action_text(text: str, reward_names: Sequence[str]) -> Reply | None:
    """``Remove & Revert: HPS`` -> Reply(remove, hps). None for templates and texts with no action."""
    text = text.strip().strip("*_`[]()\"' ")
    if not text or "<reward>" in text.lower():
        return None
    parts = [p for p in re.split(r"[|/]", text) if p.strip()]
    kinds = {a[0] for p in parts if (a := _action_of(p)) is not None}
    if len(kinds) > 1:  # "Continue | Remove <reward> | Switch": the format echoed back, not an answer
        return None
    found = _action_of(text)
    if found is None:
        return None
    action, end = found
    if action != "remove":
        return Reply(action=action)
    reward, words = resolve_reward(text[end:], reward_names)
    return Reply(action="remove", reward=reward, reward_text=words)


def _strategy_of(text: str) -> str | None:
    words = {w.lower() for w in re.findall(r"offline|online", text, re.I)}
    return words.pop() if len(words) == 1 else None


def _strip_reply(text: str) -> str:
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.S | re.I)
    if "</think>" in text.lower():  # an unopened think block (some servers drop the opening tag)
        text = text[text.lower().rfind("</think>") + len("</think>") :]
    return re.sub(r"```[A-Za-z0-9_-]*", "\n", text)


def _json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text`` (nested ones too, after their parent), keys lowercased."""
    decoder = json.JSONDecoder()
    found: list[dict] = []
    i = text.find("{")
    while i != -1:
        try:
            obj, _ = decoder.raw_decode(text, i)
            if isinstance(obj, dict):
                found.append({str(k).lower(): v for k, v in obj.items()})
        except ValueError:
            pass
        i = text.find("{", i + 1)
    return found


def parse_reply(text: str, reward_names: Sequence[str] = ()) -> Reply:
    """Read a decision from a VLM reply, in either of the two accepted formats.

    1. The paper's lines (D.2), anywhere in the text, case-insensitive, markdown allowed::

           Action: Continue | Remove <reward> | Switch
           Strategy: Offline | Online

       ("Strategy Maintenance:" and "Remove & Revert: HPS", "Remove/Revert HPS", "**Action:** remove
       the HPSv2 model" are read too). The last line that names exactly one action wins, so a reply
       that first echoes the format and then answers is read correctly.
    2. A JSON object (possibly in a markdown fence) ``{"action": ..., "reward": ..., "strategy": ...,
       "analysis": ...}``; the last object with an ``action`` key wins, and it wins over lines.

    ``<think>...</think>`` blocks of reasoning models are ignored. A short reply without an
    ``Action:`` line ("Continue", "Remove HPS") is read as the action itself.

    Args:
        text: the reply.
        reward_names: configured reward names, recognised besides the aliases of known rewards.

    Returns:
        The :class:`Reply`; ``reward`` is None when the named reward is unknown (``reward_text``
        then holds the name used).

    Raises:
        ReplyError: no action can be read.
    """
    body = _strip_reply(text or "")
    for obj in reversed(_json_objects(body)):
        raw_action = obj.get("action", obj.get("decision"))
        if not isinstance(raw_action, str):
            continue
        reply = _parse_action_text(raw_action, reward_names)
        if reply is None:
            raise ReplyError(f"the JSON reply's action {raw_action!r} is not one of continue, remove, switch.")
        field_reward = obj.get("reward", obj.get("reward_model"))
        if reply.action == "remove" and isinstance(field_reward, str) and field_reward.strip():
            reward, words = resolve_reward(field_reward, reward_names)
            reply.reward, reply.reward_text = reward, words or field_reward.strip()
        strategy = obj.get("strategy")
        reply.strategy = _strategy_of(strategy) if isinstance(strategy, str) else None
        analysis = obj.get("analysis", obj.get("reason", ""))
        reply.analysis = analysis if isinstance(analysis, str) else json.dumps(analysis)
        return reply

    reply = None
    action_start = len(body)
    for m in reversed(list(_ACTION_LINE.finditer(body))):
        reply = _parse_action_text(m.group("v"), reward_names)
        if reply is not None:
            action_start = m.start()
            break
    if reply is None:
        short = body.strip().strip("*_#>` \n")
        if short and "\n" not in short and len(short) <= 80:
            reply = _parse_action_text(short, reward_names)
            action_start = 0
    if reply is None:
        raise ReplyError("the reply has no 'Action:' line naming one action and no JSON object with an 'action' key.")
    for m in reversed(list(_STRATEGY_LINE.finditer(body))):
        strategy = _strategy_of(m.group("v"))
        if strategy is not None:
            reply.strategy = strategy
            break
    analysis = re.sub(r"(?i)^\W*(final output|training state analysis|analysis)\W*", "", body[:action_start].strip())
    reply.analysis = analysis.strip(" \n*#>[]:")[-4000:]
    return reply


_GIST_CHARS = 300  # longest quote of the reply's analysis in a decision's reason


def _gist(reply: Reply) -> str:
    """What the reply reported, for a decision's reason: ``" (the agent reported: <first sentence>)"``.

    The first sentence of the analysis (up to the first ``. `` or line break, at most 300 characters), or
    ``" (the reply gives no analysis)"``.
    """
    text = " ".join(reply.analysis.split("\n", 1)[0].split())
    text = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if not text:
        return " (the reply gives no analysis)"
    if len(text) > _GIST_CHARS:
        text = text[: _GIST_CHARS - 3].rstrip() + "..."
    return f" (the agent reported: {text})"


def _check(reply: Reply, state: AgentState, allow_remove_strong: bool) -> tuple[str, str | None, str, str | None]:
    """Check a reply against the state: ``(action, reward, reason, error)``, continue when it is invalid.

    The reason of a valid decision reflects the reply: the action taken, then the first sentence of the reply's
    analysis (:func:`_gist`), never a fixed text that could contradict it (a reply that reports a breakdown and
    continues is logged as ``continue (the agent reported: Breakdown: ...)``). An invalid reply's reason says why.
    """
    if reply.action == "remove":
        name = reply.reward
        problem = None
        if name is None:
            said = reply.reward_text or "nothing"
            hint = difflib.get_close_matches(said.lower(), list(state.strengths), n=1, cutoff=0.5)
            more = f" Did you mean {hint[0]!r}?" if hint else ""
            problem = f"the reply asks to remove {said!r}, not a known reward ({', '.join(state.strengths)}).{more}"
        elif name not in state.strengths:
            problem = (
                f"the reply asks to remove {name!r}, which is not configured (rewards: {', '.join(state.strengths)})."
            )
        elif name not in state.active_rewards:
            problem = (
                f"the reply asks to remove {name!r}, which is not active (active: {', '.join(state.active_rewards)})."
            )
        elif state.strengths.get(name) == "strong" and not allow_remove_strong:
            problem = (
                f"the reply asks to remove {name!r}, a strong reward; only weak rewards may be removed "
                "unless agent.allow_remove_strong=true."
            )
        elif len(state.active_rewards) <= 1:
            problem = f"the reply asks to remove {name!r}, the last active reward; training needs at least one."
        if problem is not None:
            return "continue", None, problem, "invalid"
        return "remove", name, f"remove {name} and revert to the last approved checkpoint{_gist(reply)}", None
    if reply.action == "switch" or (reply.action == "continue" and reply.strategy == "online"):
        if state.strategy == "online":
            if reply.action == "switch":
                return "continue", None, "the reply asks to switch, but the strategy is already online.", "invalid"
            return "continue", None, f"continue with the online strategy{_gist(reply)}", None
        return "switch", None, f"switch from the offline to the online strategy{_gist(reply)}", None
    return "continue", None, f"continue{_gist(reply)}", None


# --------------------------------------------------------------------------------------------
# Diagnostic grids
# --------------------------------------------------------------------------------------------


def make_grids(
    base_images: torch.Tensor,
    current_images: torch.Tensor,
    prompts: Sequence[str],
    step: int,
    tile: int = 512,
    max_columns: int = 4,
) -> list[tuple[Image.Image, str, int]]:
    """Labelled comparison grids, one per prompt: base model (top row) vs current model (bottom row).

    Images of the same prompt (consecutive or not) share one grid, one column per sample and seed,
    the prompt text above. Rows are labelled ``base`` and ``step N``.

    Args:
        base_images: (B, 3, H, W) in [0, 1], the base model's samples.
        current_images: (B, 3, H, W) in [0, 1], the current model's samples with the same seeds.
        prompts: B prompt texts (one per image).
        step: optimizer step of the current model (label of the bottom row).
        tile: longest side of each image tile in pixels.
        max_columns: samples shown per prompt at most.

    Returns:
        ``(grid, prompt, n_samples)`` per distinct prompt, in order of first appearance.

    Raises:
        ValueError: the image batches or the prompt list do not match.
    """
    if base_images.ndim != 4 or base_images.shape[1] != 3 or base_images.shape != current_images.shape:
        raise ValueError(
            f"agent images must be two (B, 3, H, W) batches of the same shape, got base {tuple(base_images.shape)} "
            f"and current {tuple(current_images.shape)}."
        )
    if len(prompts) != base_images.shape[0]:
        raise ValueError(
            f"agent got {base_images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image."
        )
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    grids = []
    for prompt, idx in groups.items():
        idx = idx[:max_columns]
        pair = torch.cat([base_images[idx], current_images[idx]])  # (2n, 3, H, W): base row, then current row
        grid = labelled_grid(pair, len(idx), row_labels=["base", f"step {step}"], title=f"prompt: {prompt}", tile=tile)
        grids.append((grid, prompt, len(idx)))
    return grids


# --------------------------------------------------------------------------------------------
# The request
# --------------------------------------------------------------------------------------------


def _system_text(knowledge: Mapping[str, str], state: AgentState, allow_remove_strong: bool) -> str:
    kb = []
    for name, strength in state.strengths.items():
        status = "active" if name in state.active_rewards else "removed"
        kb.append(f"- {name} ({strength}, {status}): {knowledge.get(name, 'no known collapse signature.')}")
    removable = "any active reward (weak ones first)" if allow_remove_strong else "only weak active rewards"
    return f"""You are the decision-making agent of a multi-reward fine-tuning run of a text-to-image diffusion model (PG-OT).
At fixed intervals you compare diagnostic images of the current model with the base model's images for the same prompts and seeds, and decide how training goes on:
- Continue: no sign of collapse; train on.
- Remove <reward>: a reward model is being hacked (its collapse signature is visible); it is removed and training reverts to the last approved checkpoint.
- Switch: no collapse, only strong reward models remain and the images change little; move from the offline strategy (precomputed Pareto fronts) to the online one.

Knowledge base: how the reward hacking of each reward model looks in the images.
{chr(10).join(kb)}
Early collapse is mild: the current images differ only slightly from the base images. Look closely at texture, sharpness, saturation, edges, stripes and depth.

Decision procedure, two stages; reason step by step:
1. Breakdown detection. Compare each current image with its base image and with the signatures above.
   - If a breakdown is detected, choose the active reward whose signature matches the most severely affected images: Action: Remove <reward>. You may remove {removable}.
   - If no breakdown is detected, go to stage 2.
2. Training strategy decision, from the state.
   - If the strategy is offline, every remaining active reward is strong, and the images are stable (no breakdown, little change), switch to the online strategy: Action: Switch, Strategy: Online.
   - Otherwise: Action: Continue, and keep the current strategy.

Reply with a short training state analysis, then exactly these two final lines:
Action: Continue | Remove <reward> | Switch
Strategy: Offline | Online
(choose one option on each line; <reward> is one of: {", ".join(state.active_rewards)}).
Alternatively reply with one JSON object: {{"analysis": "...", "action": "continue" | "remove" | "switch", "reward": "<reward>" or null, "strategy": "offline" | "online"}}."""


def _state_text(state: AgentState, step: int, captions: Sequence[str]) -> str:
    active = ", ".join(f"{n} ({state.strengths.get(n, '?')})" for n in state.active_rewards) or "none"
    if state.removed:
        history = "; ".join(
            f"{r.get('reward')} removed at step {r.get('step')}"
            + (f", reverted to step {r['reverted_to']}" if r.get("reverted_to") is not None else "")
            for r in state.removed
        )
    else:
        history = "none"
    lines = [
        "Training state:",
        f"- step: {step}",
        f"- strategy: {state.strategy}",
        f"- active rewards: {active}",
        f"- removal history: {history}",
        "",
        f"{len(captions)} diagnostic image(s) follow. In each, the top row is the base model and the bottom row "
        f"the current model at step {step}, same prompt and seed column by column.",
    ]
    lines += [f"Image {k + 1}: {c}" for k, c in enumerate(captions)]
    lines.append("Decide now.")
    return "\n".join(lines)


def build_messages(
    state: AgentState,
    step: int,
    images: Sequence[str],
    captions: Sequence[str],
    knowledge: Mapping[str, str],
    allow_remove_strong: bool = False,
    references: Sequence[tuple[str, str]] = (),
) -> list[dict]:
    """Chat-completions messages: system (knowledge base, procedure, format), user (state, images).

    Args:
        state: the run state.
        step: the current step.
        images: one ``image_url`` URL per grid (``data:image/png;base64,...`` when sent; a file name
            in the saved request log).
        captions: one caption per grid.
        knowledge: collapse signature per reward name.
        allow_remove_strong: whether strong rewards may be removed.
        references: ``(reward, url)`` of reference images of each reward's mild collapse, sent
            before the diagnostic grids.
    """
    content: list[dict] = []
    if references:
        content.append({"type": "text", "text": "Reference images of mild collapse, one per reward (knowledge base):"})
        for name, url in references:
            content.append({"type": "text", "text": f"Reference: {name} collapse"})
            content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": _state_text(state, step, captions)})
    content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [
        {"role": "system", "content": _system_text(knowledge, state, allow_remove_strong)},
        {"role": "user", "content": content},
    ]


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@dataclass
class _Answer:
    raw: str
    """The full raw answer (every text field of the reply), saved as reply.txt."""
    reply: Reply | None = None
    revert_to: int | None = None
    meta: dict = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    """Texts to read the decision from, in order (default: ``raw``)."""
    problem: EndpointError | None = None
    """Why the reply holds no answer; raised after the reply is saved."""
    cut: bool = False
    """The reply stopped at the token limit (``finish_reason: length``)."""


def _write(path: Path, text: str) -> None:
    """Write an agent record; every protected secret is redacted first, whatever the caller passed."""
    try:
        atomic_write_text(path, redact(text))
    except OSError as exc:  # a full disk must not stop training either
        log.warning("agent: could not write %s: %s", path, exc)


def prune_records(log_dir: str | Path, kept: int) -> list[str]:
    """Keep the records of the first ``kept`` decisions of a run and delete the later ones.

    A resumed run continues from a checkpoint whose agent state holds ``kept`` decisions
    (``len(AgentState.history)``); the decisions an interrupted attempt made after that checkpoint are
    made again, so their records go: the lines of ``log_dir/decisions.jsonl`` after the first ``kept``
    (and a line cut by a kill) and the ``step-XXXXXX`` folders those lines and no kept line name.
    Main process only.

    Returns:
        The names of the deleted folders.
    """
    log_dir = Path(log_dir)
    path = log_dir / "decisions.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            break  # cut by a kill mid-write: nothing after it was written
    keep = {Path(str(r.get("log_dir", ""))).name for _, r in records[:kept]}
    drop = {Path(str(r.get("log_dir", ""))).name for _, r in records[kept:]} - keep - {""}
    for name in sorted(drop):
        shutil.rmtree(log_dir / name, ignore_errors=True)
    text = "".join(line if line.endswith("\n") else line + "\n" for line, _ in records[:kept])
    if text != path.read_text():
        atomic_write_text(path, text)
    return sorted(drop)


def _parse(answer: _Answer, reward_names: Sequence[str], max_tokens: int) -> Reply:
    """The decision of the first of ``answer.texts`` that holds one (the final answer before any reasoning).

    Raises:
        ReplyError: none does; the reason of the first text, with a hint when the reply was cut at the token limit.
    """
    first: ReplyError | None = None
    for text in answer.texts or [answer.raw]:
        try:
            return parse_reply(text, reward_names)
        except ReplyError as exc:
            first = first or exc
    message = str(first or "the reply is empty.")
    if answer.cut:
        limit = f"agent.max_tokens={max_tokens}" if max_tokens > 0 else "the server's token limit"
        message += f" The reply was cut off at {limit} (finish_reason: length): raise agent.max_tokens."
    raise ReplyError(message)


class Agent:
    """Shared decision flow: grids, backend call, parsing, checks against the state, logs.

    Backends override :meth:`_answer`. Build one with :func:`build_agent`.
    """

    backend = ""

    def __init__(self, cfg: AgentConfig, reward_configs: Sequence[RewardConfig]):
        self.cfg = cfg
        self.reward_names = [r.name for r in reward_configs]
        self.knowledge = {n: KNOWLEDGE[n] for n in self.reward_names if n in KNOWLEDGE}
        self.knowledge.update(cfg.knowledge)
        self.references: list[tuple[str, Image.Image]] = []
        for name, path in cfg.references.items():
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
                    image.thumbnail((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
            except OSError as exc:
                raise ValueError(
                    f"agent.references.{name}={path!r} is not a readable image ({exc}). Fix the path or drop the entry."
                ) from None
            self.references.append((name, image))

    def decide(
        self,
        step: int,
        base_images: torch.Tensor,
        current_images: torch.Tensor,
        prompts: Sequence[str],
        state: AgentState,
        log_dir: str | Path,
        *,
        probe_history: Mapping[str, Sequence[float]] | None = None,
    ) -> Decision:
        """Decide continue / remove / switch at ``step``; never raises for endpoint trouble.

        Args:
            step: the optimizer step of the current model.
            base_images: (B, 3, H, W) in [0, 1], base-model samples of the diagnostic prompts.
            current_images: (B, 3, H, W) in [0, 1], current-model samples with the same seeds.
            prompts: B prompt texts, one per image.
            state: the run state; read only (apply the decision, its cost included, with
                :meth:`AgentState.apply` on every process).
            log_dir: the run's agent folder; this call writes ``log_dir/step-XXXXXX/`` (``-2``, ``-3``
                appended when the step is decided again after a revert) and appends to
                ``log_dir/decisions.jsonl``.
            probe_history: per reward, probe mean scores at the previous checks and now (latest
                last); used by the ``heuristic`` backend only.

        Returns:
            The :class:`Decision`; ``continue`` with ``error`` and ``reason`` set when anything failed.

        Raises:
            ValueError: the images or prompts do not match (a caller bug, not endpoint trouble).
        """
        start = time.monotonic()
        folder = Path(log_dir) / f"step-{step:06d}"
        repeat = 1
        while (folder / "decision.json").exists():  # a step replayed after a revert keeps both records
            repeat += 1
            folder = Path(log_dir) / f"step-{step:06d}-{repeat}"
        grids = make_grids(base_images, current_images, prompts, step, tile=self.cfg.image_size)
        files = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for k, (grid, _, _) in enumerate(grids):
                name = f"grid-{k:02d}.png"
                save_png(grid, folder / name)
                files.append(name)
        except OSError as exc:
            log.warning("agent: could not save the diagnostic grids under %s: %s", folder, exc)
        decision = Decision("continue", None, "", "", step=step, backend=self.backend, log_dir=str(folder))
        try:
            answer = self._answer(step, grids, files, state, folder, probe_history)
            decision.raw = answer.raw
            meta = answer.meta
            decision.attempts = int(meta.get("attempts", 0))
            decision.tokens_in = int(meta.get("tokens_in", 0))
            decision.tokens_out = int(meta.get("tokens_out", 0))
            decision.cost = float(meta.get("cost", 0.0))
            if answer.problem is not None:
                raise answer.problem
            reply = answer.reply if answer.reply is not None else _parse(answer, self.reward_names, self.cfg.max_tokens)
            decision.strategy = reply.strategy
            action, reward, reason, error = _check(reply, state, self.cfg.allow_remove_strong)
            decision.action, decision.reward, decision.error, decision.reason = action, reward, error, reason
            decision.revert_to = answer.revert_to if action == "remove" else None
            decision.analysis = self._redact(reply.analysis)
            if error is not None:
                log.warning("agent step %d: %s Continuing.", step, self._redact(reason))
        except EndpointError as exc:
            decision.error, decision.reason = exc.kind, self._redact(exc.reason)
            decision.attempts = exc.attempts or decision.attempts
            log.warning("agent step %d: %s Continuing.", step, decision.reason)
        except ReplyError as exc:
            decision.error, decision.reason = "parse", self._redact(f"unparseable reply: {exc}")
            log.warning("agent step %d: %s Continuing. Raw reply in %s.", step, decision.reason, folder / "reply.txt")
        except Exception as exc:  # a bug in a backend must not end a long run either
            decision.error = "internal"
            decision.reason = self._redact(f"agent failure: {type(exc).__name__}: {exc}")
            log.exception("agent step %d: unexpected failure; continuing.", step)
        for f in dataclasses.fields(decision):  # the endpoint may echo the key in any text it returns
            if isinstance(getattr(decision, f.name), str):
                setattr(decision, f.name, self._redact(getattr(decision, f.name)))
        decision.latency_s = round(time.monotonic() - start, 4)
        if decision.action != "continue":
            log.info("agent step %d: %s %s (%s)", step, decision.action, decision.reward or "", decision.reason[:200])
        _write(folder / "reply.txt", decision.raw)
        record = {"decision": decision.to_dict(), "state": state.to_dict(), "grids": files, "prompts": list(prompts)}
        _write(folder / "decision.json", self._redact(json.dumps(record, indent=2)))
        try:
            with open(Path(log_dir) / "decisions.jsonl", "a") as fh:
                fh.write(self._redact(json.dumps(decision.to_dict())) + "\n")
        except OSError as exc:
            log.warning("agent: could not append to %s: %s", Path(log_dir) / "decisions.jsonl", exc)
        return decision

    def _redact(self, text: str) -> str:
        return redact(text)

    def close(self) -> None:
        """Release what the backend holds (the ``openai`` backend's protection of its key in logs)."""

    def _answer(
        self,
        step: int,
        grids: list[tuple[Image.Image, str, int]],
        files: list[str],
        state: AgentState,
        folder: Path,
        probe_history: Mapping[str, Sequence[float]] | None,
    ) -> _Answer:
        raise NotImplementedError


class OpenAIAgent(Agent):
    """An OpenAI-compatible chat-completions endpoint that takes images (GPT-4o, vLLM, SGLang)."""

    backend = "openai"

    def __init__(self, cfg: AgentConfig, reward_configs: Sequence[RewardConfig]):
        super().__init__(cfg, reward_configs)
        self.client = ChatClient.from_config(cfg)
        # from now on the key is redacted from every log record of the process, whoever writes it
        self._protected = cfg.api_key_env
        protect(cfg.api_key_env)

    def _redact(self, text: str) -> str:
        return self.client.redact(text)

    def close(self) -> None:
        if self._protected:
            release(self._protected)
            self._protected = ""

    def _answer(self, step, grids, files, state, folder, probe_history) -> _Answer:
        cfg = self.cfg
        captions = [f'prompt "{p}", {n} sample(s)' for _, p, n in grids]
        refs = [(name, str(cfg.references[name])) for name, _ in self.references]
        messages = build_messages(state, step, files, captions, self.knowledge, cfg.allow_remove_strong, refs)
        if cfg.cost_limit > 0 and state.cost >= cfg.cost_limit:
            raise EndpointError(
                "cost_limit",
                f"agent.cost_limit=${cfg.cost_limit:g} reached (spent ${state.cost:.4f}); no request sent. "
                "Raise agent.cost_limit (0: no limit) to keep asking the endpoint.",
            )
        # the log names the image files; only the request sent carries the images themselves
        logged = {"url": self.client.url, "headers": self.client.logged_headers(), "body": self.client.body(messages)}
        _write(folder / "request.json", json.dumps(logged, indent=2))
        user_text = "\n".join(p["text"] for p in messages[1]["content"] if p["type"] == "text")
        _write(folder / "request.txt", f"{messages[0]['content']}\n\n{user_text}\n")
        sent = json.loads(json.dumps(messages))
        parts = [p for p in sent[1]["content"] if p["type"] == "image_url"]
        pictures = [image for _, image in self.references] + [grid for grid, _, _ in grids]
        for part, picture in zip(parts, pictures, strict=True):
            part["image_url"]["url"] = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii")
        result = self.client.complete(sent)
        _write(folder / "response.json", self._redact(json.dumps(result.response, indent=2)))
        meta = {"attempts": result.attempts, "tokens_in": result.tokens_in, "tokens_out": result.tokens_out}
        meta["cost"] = result.cost
        return _Answer(
            raw=self._redact(result.raw),
            meta=meta,
            texts=result.answer.candidates(),
            problem=result.problem,
            cut=result.answer.finish_reason == "length",
        )


def load_script(path: str | Path, reward_names: Sequence[str] = (), every: int = 0) -> dict[int, dict]:
    """Read a scripted-decision YAML file: ``{step: {action, reward, revert_to, strategy, reason}}``.

    A value may also be a string read like a reply's action (``"remove hps"``, ``"switch"``).
    Steps without an entry mean continue.

    Args:
        path: the YAML file (``agent.script``).
        reward_names: configured rewards; a removal naming another reward is an error.
        every: ``agent.every``; entries at steps that are not multiples of it are reported (never reached).

    Returns:
        Step -> normalised entry with keys ``action``, ``reward``, ``revert_to``, ``strategy``, ``reason``.

    Raises:
        ValueError: missing file, bad YAML, unknown action or reward, bad step.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"agent.script={str(p)!r} does not exist. Point agent.script at a YAML file of decisions keyed by step."
        )
    try:
        data = load_yaml(p.read_text()) or {}  # a step given twice is an error, not the last decision silently
    except yaml.YAMLError as exc:
        raise ValueError(f"agent.script={str(p)!r} is not valid YAML: {yaml_error(exc, p)}.") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"agent.script={str(p)!r} must map steps to decisions, e.g. {{200: {{action: remove, reward: hps}}}}."
        )
    script: dict[int, dict] = {}
    problems = []
    for key, value in data.items():
        try:
            step = int(key)
        except (TypeError, ValueError):
            problems.append(f"step {key!r} is not an integer")
            continue
        if not isinstance(value, (str, dict, type(None))):
            problems.append(
                f"step {step}: expected a mapping such as {{action: remove, reward: hps}} or a string, got {value!r}"
            )
            continue
        if every and step % every:
            problems.append(f"step {step} is not a multiple of agent.every={every}, so it is never reached")
        entry = {"action": value} if isinstance(value, str) else dict(value or {})
        text = str(entry.get("action", "")).strip()
        reply = _parse_action_text(text, reward_names) if text else None
        if reply is None or reply.action not in ACTIONS:
            problems.append(f"step {step}: action {text!r} is not one of continue, remove, switch")
            continue
        reward = entry.get("reward")
        if reply.action == "remove":
            name, words = resolve_reward(str(reward), reward_names) if reward else (reply.reward, reply.reward_text)
            if name is None or (reward_names and name not in reward_names):
                problems.append(
                    f"step {step}: remove names {reward or words or 'no reward'!r}, not one of the rewards ({', '.join(reward_names)})"
                )
                continue
            reward = name
        revert_to = entry.get("revert_to")
        strategy = entry.get("strategy")
        script[step] = {
            "action": reply.action,
            "reward": reward if reply.action == "remove" else None,
            "revert_to": int(revert_to) if revert_to is not None else None,
            "strategy": _strategy_of(str(strategy)) if strategy else None,
            "reason": str(entry.get("reason", "")),
        }
    if problems:
        raise ValueError(f"agent.script={str(p)!r}: " + "; ".join(problems) + ".")
    return script


class ScriptedAgent(Agent):
    """Decisions read from ``agent.script``; steps without an entry continue."""

    backend = "scripted"

    def __init__(self, cfg: AgentConfig, reward_configs: Sequence[RewardConfig]):
        super().__init__(cfg, reward_configs)
        self.script = load_script(cfg.script, self.reward_names, cfg.every)

    def _answer(self, step, grids, files, state, folder, probe_history) -> _Answer:
        entry = self.script.get(step)
        if entry is None:
            return _Answer(raw="", reply=Reply("continue", analysis=f"no scripted decision at step {step}"))
        reply = Reply(
            entry["action"], reward=entry["reward"], reward_text=entry["reward"] or "", strategy=entry["strategy"]
        )
        reply.analysis = entry["reason"] or f"scripted ({self.cfg.script})"
        return _Answer(raw=yaml.safe_dump({step: entry}, sort_keys=False), reply=reply, revert_to=entry["revert_to"])


class HeuristicAgent(Agent):
    """No VLM: remove the removable reward whose latest probe mean jumped by > agent.heuristic_z sigmas.

    With ``probe_history[r] = [m_1, ..., m_t]`` (probe means at successive checks, latest last) and at
    least two earlier values, ``z_r = |m_t - mean(m_<t)| / std(m_<t)`` (std floored at 1e-6 times the
    scale). The removable reward with the largest ``z_r > agent.heuristic_z`` is removed. Without a
    jump: switch when the strategy is offline and only strong rewards remain, else continue. The paper
    (D.4) finds such statistics unreliable at naming the collapsed reward; use this as a fallback.
    """

    backend = "heuristic"

    def _answer(self, step, grids, files, state, folder, probe_history) -> _Answer:
        if not probe_history:
            raise EndpointError(
                "no_scores",
                "the heuristic backend needs probe scores (probe_history) and got none; train.probe_every may be 0.",
            )
        z: dict[str, float] = {}
        for name in state.active_rewards:
            values = [float(v) for v in probe_history.get(name, ()) if math.isfinite(float(v))]
            if len(values) < 3:
                continue
            prev, last = values[:-1], values[-1]
            mean = sum(prev) / len(prev)
            std = math.sqrt(sum((v - mean) ** 2 for v in prev) / (len(prev) - 1))
            z[name] = abs(last - mean) / max(std, 1e-6 * max(abs(mean), 1.0))
        removable = {n: v for n, v in z.items() if self.cfg.allow_remove_strong or state.strengths.get(n) != "strong"}
        table = ", ".join(f"{n}: z={v:.2f}" for n, v in z.items()) or "not enough probe history"
        worst = max(removable, key=removable.__getitem__) if removable else None
        if worst is not None and removable[worst] > self.cfg.heuristic_z:
            reply = Reply("remove", reward=worst, reward_text=worst)
        elif (
            state.strategy == "offline" and z and all(state.strengths.get(n) == "strong" for n in state.active_rewards)
        ):
            reply = Reply("switch", strategy="online")
        else:
            reply = Reply("continue")
        reply.analysis = f"probe z-scores ({table}); threshold agent.heuristic_z={self.cfg.heuristic_z:g}"
        return _Answer(raw=json.dumps({"z": z, "action": reply.action, "reward": reply.reward}), reply=reply)


_BACKENDS: dict[str, type[Agent]] = {"openai": OpenAIAgent, "scripted": ScriptedAgent, "heuristic": HeuristicAgent}


def build_agent(cfg: AgentConfig, reward_configs: Sequence[RewardConfig]) -> Agent | None:
    """The agent for ``cfg.backend`` (None for ``none``).

    Raises:
        ValueError: agent.knowledge or agent.references names an unconfigured reward, a reference image is
            unreadable, a setting is out of range, or agent.script is bad.
    """
    if cfg.backend == "none":
        return None
    if cfg.backend not in _BACKENDS:
        raise ValueError(f"agent.backend must be one of none, {', '.join(_BACKENDS)}; got {cfg.backend!r}.")
    names = [r.name for r in reward_configs]
    for key, mapping in (("knowledge", cfg.knowledge), ("references", cfg.references)):
        for name in mapping:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                more = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"agent.{key} names {name!r}, which is not in rewards ({', '.join(names)}).{more}")
    if cfg.image_size < 32:
        raise ValueError(f"agent.image_size must be >= 32 pixels, got {cfg.image_size}.")
    if cfg.retry_backoff < 0:
        raise ValueError(f"agent.retry_backoff must be >= 0 seconds, got {cfg.retry_backoff}.")
    return _BACKENDS[cfg.backend](cfg, reward_configs)
