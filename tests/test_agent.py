"""Tests of pgot/agent.py against a real chat-completions HTTP server on 127.0.0.1 (no network).

The oracle for the endpoint is the request the server actually received (headers, JSON body,
decoded PNGs); for the parser, a table of replies and the decisions they mean.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pgot.agent import (
    KNOWLEDGE,
    AgentState,
    Decision,
    ReplyError,
    build_agent,
    load_script,
    make_grids,
    parse_reply,
)
from pgot.config import AgentConfig, RewardConfig

KEY_ENV = "PGOT_TEST_AGENT_KEY"
KEY = "sk-test-0123456789-secret"
REWARDS = [
    RewardConfig(name="clip", strength="weak"),
    RewardConfig(name="ict", strength="strong"),
    RewardConfig(name="hps", strength="weak"),
    RewardConfig(name="hp", strength="strong"),
]
NAMES = [r.name for r in REWARDS]
D3 = Path(__file__).resolve().parents[1] / "configs" / "agent" / "d3_schedule.yaml"


# --------------------------------------------------------------------------------------------
# A chat-completions server
# --------------------------------------------------------------------------------------------


def chat(content: str, prompt_tokens: int = 1200, completion_tokens: int = 80) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test-vlm",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class FakeVLM:
    """Answers POST /v1/chat/completions from a queue of (status, body, delay); the last one repeats."""

    def __init__(self) -> None:
        self.responses: list[tuple[int, dict | str, float]] = [(200, chat("Action: Continue\nStrategy: Offline"), 0.0)]
        self.requests: list[dict] = []
        self.release = threading.Event()

    def answer(self, *responses: tuple[int, dict | str, float]) -> None:
        self.responses = list(responses)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server API
        fake: FakeVLM = self.server.fake  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        status, payload, delay = fake.responses.pop(0) if len(fake.responses) > 1 else fake.responses[0]
        if delay:
            fake.release.wait(delay)
        if callable(payload):  # an answer made from the request (an endpoint echoing its headers)
            payload = payload(dict(self.headers))
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def vlm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.block_on_close = False
    server.daemon_threads = True
    server.fake = FakeVLM()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    yield server.fake
    server.fake.release.set()  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.fixture()
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def openai_cfg(fake: FakeVLM, **kw) -> AgentConfig:
    base = {
        "backend": "openai",
        "base_url": fake.url,
        "model": "test-vlm",
        "api_key_env": KEY_ENV,
        "timeout": 2.0,
        "max_retries": 2,
        "retry_backoff": 0.01,
        "image_size": 64,
    }
    base.update(kw)
    return AgentConfig(**base)


def images(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 32, 32, generator=g)
    current = (base * 1.5).clamp(0, 1)
    prompts = [f"prompt {i // 2}" for i in range(b)]  # two samples per prompt
    return base, current, prompts


def state(**kw) -> AgentState:
    s = AgentState.initial(REWARDS)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def decide(agent, step: int, st: AgentState, log_dir: Path) -> Decision:
    base, current, prompts = images()
    return agent.decide(step, base, current, prompts, st, log_dir)


def all_logged_text(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file() and p.suffix != ".png")


# --------------------------------------------------------------------------------------------
# The openai backend
# --------------------------------------------------------------------------------------------


def test_line_reply_removes_and_request_carries_images_knowledge_state_key(vlm, key, tmp_path):
    vlm.answer(
        (
            200,
            chat(
                "The step-200 images are over-saturated with vertical stripes.\nAction: Remove HPS\nStrategy: Offline"
            ),
            0,
        )
    )
    agent = build_agent(openai_cfg(vlm), REWARDS)
    st = state(removed=[{"step": 100, "reward": "none-yet", "reverted_to": None}])
    decision = decide(agent, 200, st, tmp_path)

    assert (decision.action, decision.reward, decision.error) == ("remove", "hps", None)
    assert decision.strategy == "offline" and "vertical stripes" in decision.analysis
    assert decision.tokens_in == 1200 and decision.tokens_out == 80 and decision.attempts == 1
    assert decision.cost == pytest.approx(1.2 * 0.0025 + 0.08 * 0.01)
    assert st.cost == 0.0, "decide reads the state; apply changes it"
    st.apply(decision, checkpoint="step-000200", reverted_to=("step-000100", 100))
    assert st.cost == pytest.approx(decision.cost)

    (req,) = vlm.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "test-vlm" and body["max_tokens"] == 1024
    system, user = body["messages"]
    for name in NAMES:
        assert KNOWLEDGE[name] in system["content"]
    assert "Action: Continue | Remove <reward> | Switch" in system["content"]
    assert "Strategy: Offline | Online" in system["content"]
    text = user["content"][0]["text"]
    for needle in ("step: 200", "strategy: offline", "clip (weak)", "ict (strong)", "hps (weak)", "hp (strong)"):
        assert needle in text
    assert "none-yet removed at step 100" in text
    parts = user["content"][1:]
    assert [p["type"] for p in parts] == ["image_url", "image_url"]  # one grid per prompt
    for part in parts:
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert png.format == "PNG" and png.width > 2 * 32 and png.height > 2 * 32

    folder = tmp_path / "step-000200"
    assert sorted(p.name for p in folder.glob("grid-*.png")) == ["grid-00.png", "grid-01.png"]
    logged = json.loads((folder / "request.json").read_text())
    assert [p["image_url"]["url"] for p in logged["body"]["messages"][1]["content"][1:]] == [
        "grid-00.png",
        "grid-01.png",
    ]
    assert logged["headers"]["Authorization"] == f"Bearer <${KEY_ENV}>"
    assert KEY not in all_logged_text(tmp_path)
    assert "base64" not in all_logged_text(tmp_path)
    saved = json.loads((folder / "decision.json").read_text())
    assert saved["decision"]["action"] == "remove" and saved["decision"]["reward"] == "hps"
    assert saved["decision"]["tokens_in"] == 1200 and saved["decision"]["latency_s"] > 0
    assert "Action: Remove HPS" in (folder / "reply.txt").read_text()
    lines = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["action"] == "remove"


@pytest.mark.parametrize(
    ("reply", "strategy", "action"),
    [
        (
            '```json\n{"analysis": "stable", "action": "switch", "reward": null, "strategy": "online"}\n```',
            "offline",
            "switch",
        ),
        ('{"action": "continue", "strategy": "online", "analysis": "no collapse"}', "offline", "switch"),
        ('{"action": "continue", "strategy": "online"}', "online", "continue"),
        ("Analysis: fine.\nAction: Continue\nStrategy: Offline", "offline", "continue"),
        ('{"action": "Remove & Revert", "reward": "HPSv2.1", "strategy": "offline"}', "offline", "remove"),
    ],
)
def test_json_and_line_replies_map_to_actions(vlm, key, tmp_path, reply, strategy, action):
    vlm.answer((200, chat(reply), 0))
    agent = build_agent(openai_cfg(vlm), REWARDS)
    decision = decide(agent, 300, state(strategy=strategy), tmp_path)
    assert decision.action == action and decision.error is None
    assert decision.reward == ("hps" if action == "remove" else None)


@pytest.mark.parametrize(
    ("reply", "error", "words"),
    [
        ("I am not sure what to do here.", "parse", "unparseable"),
        ("Action: Remove FOO\nStrategy: Offline", "invalid", "'FOO'"),
        ("Action: Remove HP\nStrategy: Offline", "invalid", "strong"),  # strong, not allowed
        ("Action: Remove PickScore", "invalid", "not configured"),
        ("Action: Remove CLIP", "invalid", "not active"),  # clip removed earlier
    ],
)
def test_bad_replies_continue_with_reason(vlm, key, tmp_path, caplog, reply, error, words):
    vlm.answer((200, chat(reply), 0))
    agent = build_agent(openai_cfg(vlm), REWARDS)
    st = state(active_rewards=["ict", "hps", "hp"], removed=[{"step": 100, "reward": "clip", "reverted_to": 0}])
    with caplog.at_level("WARNING", logger="pgot.agent"):
        decision = decide(agent, 400, st, tmp_path)
    assert (decision.action, decision.reward, decision.error) == ("continue", None, error)
    assert words in decision.reason
    assert words in caplog.text
    saved = json.loads((tmp_path / "step-000400" / "decision.json").read_text())
    assert saved["decision"]["error"] == error and words in saved["decision"]["reason"]
    assert (tmp_path / "step-000400" / "reply.txt").read_text() == reply


def test_allow_remove_strong(vlm, key, tmp_path):
    vlm.answer((200, chat("Action: Remove HP\nStrategy: Offline"), 0))
    agent = build_agent(openai_cfg(vlm, allow_remove_strong=True), REWARDS)
    decision = decide(agent, 100, state(), tmp_path)
    assert (decision.action, decision.reward) == ("remove", "hp")


def test_http_500_retries_then_continues(vlm, key, tmp_path):
    vlm.answer((500, {"error": {"message": "overloaded"}}, 0))
    agent = build_agent(openai_cfg(vlm, max_retries=2), REWARDS)
    decision = decide(agent, 100, state(), tmp_path)
    assert (decision.action, decision.error, decision.attempts) == ("continue", "http_500", 3)
    assert len(vlm.requests) == 3 and "overloaded" in decision.reason
    assert json.loads((tmp_path / "step-000100" / "decision.json").read_text())["decision"]["error"] == "http_500"


def test_500_then_success_is_used(vlm, key, tmp_path):
    vlm.answer((503, "busy", 0), (200, chat("Action: Switch\nStrategy: Online"), 0))
    agent = build_agent(openai_cfg(vlm), REWARDS)
    decision = decide(agent, 800, state(active_rewards=["ict", "hp"]), tmp_path)
    assert (decision.action, decision.attempts) == ("switch", 2)


def test_slow_reply_times_out_quickly(vlm, key, tmp_path):
    vlm.answer((200, chat("Action: Remove HPS"), 30.0))  # the server waits until released
    agent = build_agent(openai_cfg(vlm, timeout=0.5, max_retries=1), REWARDS)
    start = time.monotonic()
    decision = decide(agent, 100, state(), tmp_path)
    elapsed = time.monotonic() - start
    assert (decision.action, decision.error, decision.attempts) == ("continue", "timeout", 2)
    assert "agent.timeout=0.5" in decision.reason
    assert elapsed < 4.0


def test_401_is_not_retried(vlm, key, tmp_path):
    vlm.answer((401, {"error": {"message": "invalid api key"}}, 0))
    agent = build_agent(openai_cfg(vlm), REWARDS)
    decision = decide(agent, 100, state(), tmp_path)
    assert (decision.action, decision.error, decision.attempts) == ("continue", "http_401", 1)
    assert len(vlm.requests) == 1 and KEY_ENV in decision.reason
    assert KEY not in all_logged_text(tmp_path)


def test_missing_key_sends_nothing(vlm, monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    agent = build_agent(openai_cfg(vlm), REWARDS)
    with caplog.at_level("WARNING", logger="pgot.agent"):
        decision = decide(agent, 100, state(), tmp_path)
    assert (decision.action, decision.error) == ("continue", "no_key")
    assert KEY_ENV in decision.reason and KEY_ENV in caplog.text
    assert vlm.requests == []


def test_no_key_needed_for_local_server(vlm, monkeypatch, tmp_path):
    vlm.answer((200, chat("Action: Continue\nStrategy: Offline"), 0))
    agent = build_agent(openai_cfg(vlm, api_key_env=""), REWARDS)
    decision = decide(agent, 100, state(), tmp_path)
    assert decision.action == "continue" and decision.error is None
    assert "Authorization" not in vlm.requests[0]["headers"]


def test_cost_limit_stops_requests(vlm, key, tmp_path):
    vlm.answer((200, chat("Action: Continue", prompt_tokens=10000, completion_tokens=100), 0))
    agent = build_agent(openai_cfg(vlm, cost_limit=0.02), REWARDS)
    st = state()
    first = decide(agent, 100, st, tmp_path)
    st.apply(first, checkpoint="step-000100")
    assert first.error is None and st.cost == pytest.approx(0.026)
    second = decide(agent, 200, st, tmp_path)
    assert (second.action, second.error) == ("continue", "cost_limit")
    assert "agent.cost_limit" in second.reason
    assert len(vlm.requests) == 1
    # the spent money travels with the state (trainer_state.json), so a resumed run stays stopped
    resumed = AgentState.from_dict(json.loads(json.dumps(st.to_dict())))
    third = build_agent(openai_cfg(vlm, cost_limit=0.02), REWARDS).decide(300, *images(), resumed, tmp_path)
    assert third.error == "cost_limit" and len(vlm.requests) == 1


def test_unreachable_endpoint_continues(key, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = AgentConfig(
        backend="openai", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV, max_retries=1, retry_backoff=0.01
    )
    decision = decide(build_agent(cfg, REWARDS), 100, state(), tmp_path)
    assert (decision.action, decision.error, decision.attempts) == ("continue", "connection", 2)


def test_knowledge_override_reaches_the_request(vlm, key, tmp_path):
    agent = build_agent(openai_cfg(vlm, knowledge={"clip": "purple polka dots everywhere"}), REWARDS)
    decide(agent, 100, state(), tmp_path)
    system = vlm.requests[0]["body"]["messages"][0]["content"]
    assert "purple polka dots everywhere" in system and KNOWLEDGE["clip"] not in system
    assert KNOWLEDGE["hps"] in system
    with pytest.raises(ValueError, match="agent.knowledge names 'clap'.*Did you mean 'clip'"):
        build_agent(openai_cfg(vlm, knowledge={"clap": "x"}), REWARDS)


def test_reference_images_are_sent_and_logged_by_path(vlm, key, tmp_path):
    ref = tmp_path / "hps_collapse.png"
    Image.new("RGB", (300, 200), (255, 0, 255)).save(ref)
    agent = build_agent(openai_cfg(vlm, references={"hps": str(ref)}), REWARDS)
    decide(agent, 100, state(), tmp_path / "logs")
    parts = vlm.requests[0]["body"]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url", "image_url"]
    assert parts[1]["text"] == "Reference: hps collapse"
    png = Image.open(io.BytesIO(base64.b64decode(parts[2]["image_url"]["url"].split(",", 1)[1])))
    assert png.size == (64, 43) and png.getpixel((10, 10)) == (255, 0, 255)  # thumbnail to agent.image_size
    logged = json.loads((tmp_path / "logs" / "step-000100" / "request.json").read_text())
    assert logged["body"]["messages"][1]["content"][2]["image_url"]["url"] == str(ref)
    with pytest.raises(ValueError, match="agent.references.hps=.*not a readable image"):
        build_agent(openai_cfg(vlm, references={"hps": str(tmp_path / "missing.png")}), REWARDS)


# --------------------------------------------------------------------------------------------
# Scripted, heuristic, none
# --------------------------------------------------------------------------------------------


def test_scripted_d3_schedule(tmp_path):
    cfg = AgentConfig(backend="scripted", script=str(D3), every=100, image_size=32)
    agent = build_agent(cfg, REWARDS)
    st = AgentState.initial(REWARDS)
    seen = {}
    for step in range(100, 1001, 100):
        d = decide(agent, step, st, tmp_path)
        seen[step] = (d.action, d.reward, d.revert_to)
        back = (f"step-{d.revert_to:06d}", d.revert_to) if d.action == "remove" else None
        st.apply(d, checkpoint=f"step-{step:06d}", reverted_to=back)
        assert d.error is None
    assert seen[200] == ("remove", "hps", 100)
    assert seen[600] == ("remove", "clip", 500)
    assert seen[800] == ("switch", None, None)
    assert all(seen[s][0] == "continue" for s in (100, 300, 400, 500, 700, 900, 1000))
    assert st.active_rewards == ["ict", "hp"] and st.strategy == "online" and st.approved == "step-001000"
    assert st.removed == [
        {"step": 200, "reward": "hps", "reverted_to": 100},
        {"step": 600, "reward": "clip", "reverted_to": 500},
    ]
    # a revert that replays step 200 meets an entry that no longer applies: continue, reason logged
    again = decide(agent, 200, st, tmp_path)
    assert (again.action, again.error) == ("continue", "invalid") and "not active" in again.reason
    # the state survives trainer_state.json
    assert AgentState.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    assert len((tmp_path / "decisions.jsonl").read_text().splitlines()) == 11


def test_scripted_shorthand_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("100: remove HPSv2\n200: switch\n")
    assert load_script(good, NAMES) == {
        100: {"action": "remove", "reward": "hps", "revert_to": None, "strategy": None, "reason": ""},
        200: {"action": "switch", "reward": None, "revert_to": None, "strategy": None, "reason": ""},
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("150: {action: remove, reward: pickscore}\n200: {action: explode}\nabc: continue\n")
    with pytest.raises(ValueError) as err:
        load_script(bad, NAMES, every=100)
    for needle in ("pickscore", "'explode'", "'abc'", "step 150 is not a multiple of agent.every=100"):
        assert needle in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        build_agent(AgentConfig(backend="scripted", script=str(tmp_path / "missing.yaml")), REWARDS)


def test_heuristic_flags_a_jump(tmp_path):
    agent = build_agent(AgentConfig(backend="heuristic", heuristic_z=3.0, image_size=32), REWARDS)
    base, current, prompts = images()
    history = {
        "clip": [0.30, 0.31, 0.30, 0.31],
        "hps": [0.25, 0.26, 0.25, 0.40],
        "ict": [0.8, 0.8, 0.81, 0.2],
        "hp": [0.78] * 4,
    }
    d = agent.decide(300, base, current, prompts, state(), tmp_path, probe_history=history)
    assert (d.action, d.reward) == ("remove", "hps")  # ict jumped more but is strong
    calm = {k: v[:-1] + [v[-2]] for k, v in history.items()}
    d = agent.decide(400, base, current, prompts, state(), tmp_path, probe_history=calm)
    assert d.action == "continue" and d.error is None
    d = agent.decide(500, base, current, prompts, state(active_rewards=["ict", "hp"]), tmp_path, probe_history=calm)
    assert d.action == "switch"
    d = agent.decide(600, base, current, prompts, state(), tmp_path)
    assert (d.action, d.error) == ("continue", "no_scores")


def test_backend_none():
    assert build_agent(AgentConfig(backend="none"), REWARDS) is None


# --------------------------------------------------------------------------------------------
# Grids, state
# --------------------------------------------------------------------------------------------


def test_grids_pair_base_and_current_per_prompt():
    base, current, prompts = images(b=6)
    grids = make_grids(base, current, prompts, step=200, tile=32)
    assert [(p, n) for _, p, n in grids] == [("prompt 0", 2), ("prompt 1", 2), ("prompt 2", 2)]
    grid, _, _ = grids[1]  # images 2 and 3
    pixels = torch.from_numpy(np.array(grid))  # (H, W, 3) uint8
    # layout: a label column, then 32-px tiles; base row above the current row; boxes in the grid's metadata
    boxes = json.loads(grid.info["tiles"])  # [[x, y, w, h]] base tiles first, then current tiles
    assert len(boxes) == 4 and all(b[2:] == [32, 32] for b in boxes)
    assert boxes[0][1] == boxes[1][1] < boxes[2][1] == boxes[3][1] and boxes[0][0] == boxes[2][0] > 0

    def tile(row: int, col: int) -> torch.Tensor:
        x, y, w, h = boxes[row * 2 + col]
        return pixels[y : y + h, x : x + w]

    def as_uint8(image: torch.Tensor) -> torch.Tensor:
        return image.mul(255).round().to(torch.uint8).permute(1, 2, 0)

    for col, i in enumerate((2, 3)):
        assert torch.equal(tile(0, col), as_uint8(base[i]))  # exact: tiles are pasted unscaled
        assert torch.equal(tile(1, col), as_uint8(current[i]))
    with pytest.raises(ValueError, match="one prompt per image"):
        make_grids(base, current, prompts[:-1], step=1)
    with pytest.raises(ValueError, match="same shape"):
        make_grids(base, current[:, :, :8], prompts, step=1)


def test_state_apply_and_round_trip():
    """One state, one apply: what every process does with a decision (tested here, used by training)."""
    st = AgentState.initial(REWARDS, strategy="auto")
    assert st.active_rewards == NAMES and st.strategy == "offline" and st.strengths["hps"] == "weak"
    st.apply(Decision("continue", None, "r", "", step=100, cost=0.5), checkpoint="step-000100")
    assert st.approved == "step-000100" and st.cost == 0.5
    st.apply(Decision("remove", "hps", "r", "", step=200), checkpoint="step-000200", reverted_to=("step-000100", 100))
    assert st.approved == "step-000100", "a removal approves the checkpoint it reverted to"
    st.apply(Decision("continue", None, "endpoint down", "", step=300, error="http_500"), checkpoint="step-000300")
    assert st.approved == "step-000100", "only a checkpoint the agent really looked at is approved"
    st.apply(Decision("switch", None, "r", "", step=400), checkpoint="step-000400", act=False)
    assert st.strategy == "offline" and st.history[-1]["applied"] is False, "agent.act=false: logged, not applied"
    st.apply(Decision("switch", None, "r", "", step=800, cost=0.25), checkpoint="step-000800")
    assert st.active_rewards == ["clip", "ict", "hp"] and st.strategy == "online" and st.approved == "step-000800"
    assert st.removed == [{"step": 200, "reward": "hps", "reverted_to": 100}]
    assert [h["step"] for h in st.history] == [100, 200, 300, 400, 800] and st.cost == 0.75
    assert AgentState.from_dict(json.loads(json.dumps(st.to_dict()))) == st
    assert AgentState.from_dict({"step": 5}).active_rewards == []
    with pytest.raises(ValueError, match="reverted_to"):
        st.apply(Decision("remove", "clip", "r", "", step=900), checkpoint="step-000900")


# --------------------------------------------------------------------------------------------
# The parser, table-driven
# --------------------------------------------------------------------------------------------

PARSE_CASES = [
    # (reply, action, reward, strategy)
    ("Action: Continue\nStrategy: Offline", "continue", None, "offline"),
    ("action: CONTINUE\nstrategy: ONLINE", "continue", None, "online"),
    ("Analysis...\nAction: Remove HPS\nStrategy: Offline", "remove", "hps", "offline"),
    ("Final Output: [stripes] Action: Remove & Revert: HPS Strategy Maintenance: Offline", "remove", "hps", "offline"),
    ("**Action:** Remove/Revert HPS\n**Strategy:** Offline", "remove", "hps", "offline"),
    ("**Action**: remove the HPSv2 reward model", "remove", "hps", None),
    ("Action: Remove HPS v2.1", "remove", "hps", None),
    ("Action: Revert to step 100 and remove CLIP", "remove", "clip", None),
    ("Action: Remove CLIPScore", "remove", "clip", None),
    ("Action: Remove HP score\nStrategy: Offline", "remove", "hp", "offline"),
    ("Action: Remove HP", "remove", "hp", None),
    ("Action: Remove ICT.", "remove", "ict", None),
    ("Action: Remove Image Reward", "remove", "imagereward", None),
    ("Action: Remove Pick Score", "remove", "pickscore", None),
    ("Action: Switch\nStrategy: Online", "switch", None, "online"),
    ("Action: Switch to online training", "switch", None, None),
    ("Action: Continue (no removal needed)\nStrategy: Offline", "continue", None, "offline"),
    (
        "Action: Continue | Remove <reward> | Switch\nStrategy: Offline | Online\n\nAction: Remove CLIP\nStrategy: Offline",
        "remove",
        "clip",
        "offline",
    ),
    ("Action: [Remove / Revert / Continue]\nAnswer -> Action: Continue", "continue", None, None),
    ("<think>Action: Remove CLIP? no.</think>\nAction: Continue\nStrategy: Online", "continue", None, "online"),
    ("reasoning without opening tag</think>Action: Switch", "switch", None, None),
    ("Continue", "continue", None, None),
    ("Remove HPS.", "remove", "hps", None),
    (
        '```json\n{"action": "remove", "reward": "HPSv2", "strategy": "offline", "analysis": "stripes"}\n```',
        "remove",
        "hps",
        "offline",
    ),
    (
        'Here is my decision: {"Action": "Remove & Revert", "Reward": "clip", "Strategy": "Offline"}',
        "remove",
        "clip",
        "offline",
    ),
    ('{"action": "remove hps", "reward": null}', "remove", "hps", None),
    ('{"action": "switch"}', "switch", None, None),
    ('{"decision": {"action": "remove", "reward": "clip"}, "note": "{not json"}', "remove", "clip", None),
    ('{"action": "continue", "strategy": "online"}\nAction: Remove HPS', "continue", None, "online"),
    ("Action: Remove FOO", "remove", None, None),
]


@pytest.mark.parametrize(("reply", "action", "reward", "strategy"), PARSE_CASES)
def test_parse_reply_variants(reply, action, reward, strategy):
    parsed = parse_reply(reply, NAMES)
    assert (parsed.action, parsed.reward, parsed.strategy) == (action, reward, strategy)


@pytest.mark.parametrize(
    "reply",
    [
        "",
        "I cannot tell from these images.",
        "Action: [Remove / Revert / Continue]",
        '{"action": 3}\nblah blah blah blah',
    ],
)
def test_parse_reply_rejects(reply):
    with pytest.raises(ReplyError):
        parse_reply(reply, NAMES)


def test_parse_reply_keeps_analysis_and_reward_words():
    parsed = parse_reply("Training state analysis: HPS shows vertical stripes.\nAction: Remove FOO\n", NAMES)
    assert parsed.reward is None and parsed.reward_text == "FOO"
    assert parsed.analysis == "HPS shows vertical stripes."


# --------------------------------------------------------------------------------------------
# scripts/agent_accuracy.py (run as a program, as users do)
# --------------------------------------------------------------------------------------------


def test_accuracy_script_dry_run(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "diag"
    folder.mkdir()
    rows = []
    labels = ["healthy", "collapsed:hps", "collapsed: HPSv2", "healthy", "collapsed:clip"]
    for i, label in enumerate(labels):
        for kind in ("base", "cur"):
            Image.new("RGB", (24, 24), (40 * i, 100, 200 if kind == "base" else 250)).save(folder / f"{kind}{i}.png")
        rows.append({"base_path": f"base{i}.png", "current_path": f"cur{i}.png", "prompt": f"p{i}", "label": label})
    (folder / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    # row 1 continue (right), 2 remove hps (right), 3 remove clip (wrong), 4 switch (right: healthy), 5 nothing (wrong)
    script = tmp_path / "answers.yaml"
    script.write_text("2: {action: remove, reward: hps}\n3: remove CLIP\n4: switch\n")
    cmd = [sys.executable, "scripts/agent_accuracy.py", "--manifest", str(folder / "manifest.jsonl")]
    cmd += ["--backend", "scripted", "--script", str(script), "--log-dir", str(tmp_path / "logs")]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [*cmd, "--json", str(tmp_path / "r.json")], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["n"], result["correct"], result["accuracy"]) == (5, 3, 0.6)
    assert result["per_class"]["healthy"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert result["per_class"]["collapsed:hps"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert result["per_class"]["collapsed:clip"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    assert result["confusion"]["collapsed:hps -> collapsed:clip"] == 1
    assert "| accuracy | 60.0% (3/5) |" in out.stdout
    assert "| collapsed:hps | 0 | 1 | 0 | 1 | 0 |" in out.stdout  # columns: healthy, clip, ict, hps, hp
    assert (tmp_path / "logs" / "step-000003" / "decision.json").is_file()


# --------------------------------------------------------------------------------------------
# Reply shapes of OpenAI-compatible servers (vLLM, SGLang, reasoning models, legacy completions)
# --------------------------------------------------------------------------------------------


def shaped(message: dict | None, finish_reason: str | None = "stop", **choice) -> dict:
    """A chat-completions response whose choices[0] has ``message`` (None: no message) and ``choice`` fields."""
    first = {"index": 0, "finish_reason": finish_reason, **choice}
    if message is not None:
        first["message"] = {"role": "assistant", **message}
    return {"id": "x", "choices": [first], "usage": {"prompt_tokens": 100, "completion_tokens": 10}}


ANSWER = "Vertical stripes and over-saturation.\nAction: Remove HPS\nStrategy: Offline"
CALL = {"action": "remove", "reward": "hps", "strategy": "offline", "analysis": "vertical stripes"}
SHAPES = {
    "content": shaped({"content": ANSWER}),
    "reasoning_content_null_content": shaped({"content": None, "reasoning_content": ANSWER}),
    "reasoning_content_empty_content": shaped({"content": "", "reasoning_content": ANSWER}),
    "reasoning": shaped({"content": None, "reasoning": ANSWER}),
    "content_parts": shaped(
        {"content": [{"type": "text", "text": ANSWER[:20]}, {"type": "text", "text": ANSWER[20:]}]}
    ),
    "output_text_parts": shaped({"content": [{"type": "output_text", "text": ANSWER}]}),
    "thinking_part_then_text": shaped(
        {"content": [{"type": "thinking", "thinking": "Action: Continue?"}, {"type": "text", "text": ANSWER}]}
    ),
    "think_block": shaped({"content": "<think>maybe Action: Continue</think>\n" + ANSWER}),
    "unclosed_think": shaped({"content": "<think>Let me look. " + ANSWER}),
    "lone_closing_think": shaped({"content": "looking closely</think>" + ANSWER}),
    "content_wins_over_reasoning": shaped({"content": ANSWER, "reasoning_content": "Action: Continue"}),
    "tool_calls": shaped(
        {
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "decide", "arguments": json.dumps(CALL)}}
            ],
        },
        finish_reason="tool_calls",
    ),
    "function_call": shaped({"content": None, "function_call": {"name": "decide", "arguments": json.dumps(CALL)}}),
    "legacy_text": shaped(None, text=ANSWER),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_reply_shape_is_read_and_saved(vlm, key, tmp_path, shape):
    vlm.answer((200, SHAPES[shape], 0))
    decision = decide(build_agent(openai_cfg(vlm), REWARDS), 100, state(), tmp_path)
    assert (decision.action, decision.reward, decision.error) == ("remove", "hps", None), decision.reason
    reply = (tmp_path / "step-000100" / "reply.txt").read_text()
    assert reply == decision.raw and ("Remove HPS" in reply or '"reward": "hps"' in reply), reply
    if shape.startswith(("reasoning", "content_wins", "thinking", "think", "unclosed")):
        labels = [line for line in reply.splitlines() if line.startswith("[")]
        assert labels and all(line in ("[reasoning]", "[thinking]", "[content]") for line in labels), reply
    saved = json.loads((tmp_path / "step-000100" / "response.json").read_text())
    assert saved["choices"][0] == SHAPES[shape]["choices"][0]


@pytest.mark.parametrize(
    ("response", "error", "words", "saved"),
    [
        (
            shaped({"content": None, "refusal": "I can't help with that."}),
            "refusal",
            "refused to answer",
            "I can't help",
        ),
        (shaped({"content": None}, finish_reason="length"), "max_tokens", "Raise agent.max_tokens", ""),
        (
            shaped({"content": "", "reasoning_content": ""}, finish_reason="length"),
            "max_tokens",
            "agent.max_tokens=1024",
            "",
        ),
        (
            shaped(
                {"content": None, "reasoning_content": "Comparing image 1 with its base, the"}, finish_reason="length"
            ),
            "max_tokens",
            "only unfinished reasoning). Raise agent.max_tokens",
            "Comparing image 1",
        ),
        (  # still thinking when cut: a tentative action in the thoughts is no answer
            shaped({"content": "<think>Let me look. Action: Remove HPS"}, finish_reason="length"),
            "max_tokens",
            "Raise agent.max_tokens",
            "Let me look",
        ),
        (
            shaped({"content": "The first image shows stripes, the"}, finish_reason="length"),
            "parse",
            "cut off at agent.max_tokens=1024 (finish_reason: length): raise agent.max_tokens",
            "The first image shows",
        ),
        (  # a final answer without a decision: the reasoning's drafts are not read instead
            shaped({"content": "I cannot tell.", "reasoning_content": "Maybe Action: Remove HPS"}),
            "parse",
            "no 'Action:' line",
            "Maybe Action: Remove HPS",
        ),
        (shaped({"content": ""}), "empty", "no text in choices[0]", ""),
        (shaped({"content": None}, finish_reason="content_filter"), "content_filter", "content filter", ""),
        ({"choices": []}, "bad_response", "no choices[0].message", ""),
    ],
)
def test_replies_without_an_answer_say_why(vlm, key, tmp_path, caplog, response, error, words, saved):
    vlm.answer((200, response, 0))
    with caplog.at_level("WARNING", logger="pgot.agent"):
        decision = decide(build_agent(openai_cfg(vlm), REWARDS), 100, state(), tmp_path)
    assert (decision.action, decision.error) == ("continue", error)
    assert words in decision.reason and words in caplog.text
    reply = (tmp_path / "step-000100" / "reply.txt").read_text()
    assert saved in reply and reply == decision.raw
    assert json.loads((tmp_path / "step-000100" / "decision.json").read_text())["decision"]["error"] == error


# --------------------------------------------------------------------------------------------
# The key never leaves the process except in the request header
# --------------------------------------------------------------------------------------------


def echoes(headers: dict) -> str:
    """The request's Authorization header in every form an endpoint may echo it."""
    auth = headers.get("Authorization", "")
    key = auth.removeprefix("Bearer ")
    return "\n".join(
        [
            f"Authorization: {auth}",
            "url-encoded: " + urllib.parse.quote(auth, safe=""),
            "form-encoded: " + urllib.parse.quote_plus(key),
            "basic: Basic " + base64.b64encode(f"user:{key}".encode()).decode(),
            "basic-2: Basic " + base64.b64encode(f"me:{key}".encode()).decode(),
            "json-escaped: " + json.dumps(auth).replace("-", "\\u002d"),
            "split: " + key[:9] + "\\n" + key[9:],
        ]
    )


def leaks(text: str) -> list[str]:
    """The forms of KEY found in ``text``."""
    forms = {
        "plain": KEY,
        "url": urllib.parse.quote(KEY, safe=""),
        "b64": base64.b64encode(f"user:{KEY}".encode()).decode()[8:-4],
        "tail": KEY[9:],
        "head": KEY[:12],
    }
    return [name for name, form in forms.items() if form in text]


def error_body(headers: dict, pad: int = 0) -> dict:
    message = "x" * pad + " upstream failed for " + headers.get("Authorization", "")
    return {"error": {"message": message, "echo": echoes(headers)}}


def test_key_echoed_by_the_endpoint_is_never_logged_or_saved(vlm, key, tmp_path, caplog, monkeypatch):
    import logging

    late = io.StringIO()  # a handler added after the agent was built
    reply = lambda h: shaped({"content": f"I got {echoes(h)}\n" + ANSWER, "reasoning_content": echoes(h)})  # noqa: E731
    straddling = lambda h: error_body(h, pad=250)  # noqa: E731 - the key straddles the cut of error details at 300
    vlm.answer((500, straddling, 0), (500, error_body, 0), (200, reply, 0))
    agent = build_agent(openai_cfg(vlm, max_retries=1), REWARDS)
    handler = logging.StreamHandler(late)
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level("DEBUG"):
            first = decide(agent, 100, state(), tmp_path)  # two 500s: gives up
            second = decide(agent, 200, state(), tmp_path)  # echoes in the reply it acts on
            monkeypatch.setattr(
                type(agent), "_answer", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("bad " + KEY))
            )
            third = decide(agent, 300, state(), tmp_path)  # a backend bug with the key in its message (log.exception)
    finally:
        logging.getLogger().removeHandler(handler)
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in vlm.requests)  # it was sent, and echoed
    assert (first.error, second.action, second.reward, third.error) == ("http_500", "remove", "hps", "internal")
    assert "upstream failed for Bearer ***" in first.reason  # the second 500's body, redacted
    assert "x upstream failed for Bearer; retry 1/1" in caplog.text  # the first one's, redacted before the cut
    assert "retry 1/1" in caplog.text and "HTTP 500" in caplog.text and "RuntimeError: bad ***" in caplog.text
    for name, text in [
        ("caplog", caplog.text),
        ("late handler", late.getvalue()),
        ("files", all_logged_text(tmp_path)),
    ]:
        assert leaks(text) == [], (name, leaks(text))
    for d in (first, second, third):
        assert leaks(json.dumps(d.to_dict())) == []
    st = state()
    st.apply(second, checkpoint="step-000200", reverted_to=("step-000100", 100))
    assert leaks(json.dumps(st.to_dict())) == []
    assert "***" in (tmp_path / "step-000200" / "reply.txt").read_text()


@pytest.mark.parametrize(
    ("reply", "strategy", "reason"),
    [
        (
            "Analysis: Breakdown: quality 0.050 -> 0.020. No weak reward's signature matches it; continuing.\n"
            "Action: Continue\nStrategy: offline",
            "offline",
            "continue (the agent reported: Breakdown: quality 0.050 -> 0.020.)",
        ),
        ("Action: Continue\nStrategy: offline", "offline", "continue (the reply gives no analysis)"),
        (
            '{"analysis": "Images are stable. Only strong rewards remain.", "action": "switch", "strategy": "online"}',
            "offline",
            "switch from the offline to the online strategy (the agent reported: Images are stable.)",
        ),
        (
            "Analysis: Slight banding, below a breakdown.\nAction: Continue\nStrategy: online",
            "online",
            "continue with the online strategy (the agent reported: Slight banding, below a breakdown.)",
        ),
        (
            "Analysis: Neon colours, the HPS signature. Remove it.\nAction: Remove HPS\nStrategy: offline",
            "offline",
            "remove hps and revert to the last approved checkpoint (the agent reported: Neon colours, the HPS "
            "signature.)",
        ),
    ],
)
def test_decision_reason_reflects_the_reply(vlm, key, tmp_path, reply, strategy, reason):
    """The logged reason never contradicts the reply: a reply that reports a breakdown and continues is logged with
    its own words, not 'no breakdown detected'."""
    vlm.answer((200, chat(reply), 0))
    decision = decide(build_agent(openai_cfg(vlm), REWARDS), 300, state(strategy=strategy), tmp_path)
    assert decision.error is None and decision.reason == reason
    saved = json.loads((tmp_path / "step-000300" / "decision.json").read_text())
    assert saved["decision"]["reason"] == reason
