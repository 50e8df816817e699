"""pgot/testbed/agent_server.py: the testbed's diagnosing agent behind an OpenAI-compatible endpoint.

Oracles: the images pgot's agent put in its grids (recovered exactly, to 8 bits), pgot.testbed.agent.diagnose on
them (the same reply), pgot's real openai backend (its decisions read and applied), and a short training on the
shipped testbed model where a weak reward pushed hard is removed by the server's decision.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pgot.agent import AgentState, build_agent, build_messages, make_grids
from pgot.config import AgentConfig, RewardConfig
from pgot.images import png_bytes, to_uint8
from pgot.rewards import build
from pgot.testbed import proxies
from pgot.testbed.agent import diagnose
from pgot.testbed.agent_server import RequestError, parse_request, start_server
from pgot.testbed.scenes import all_prompts, render

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = all_prompts()[::7]  # 16 prompts: every shape, size, colour and background (as tests/test_testbed_agent.py)
REWARDS = ["saturation", "contrast", "tb_align", "tb_pref"]
KNOWLEDGE = {n: proxies.SIGNATURES[n] for n in REWARDS}


def _configs() -> list[RewardConfig]:
    return [RewardConfig(name=n) for n in REWARDS]


def _images(seed: int) -> tuple[torch.Tensor, list[str]]:
    """Exact renderings (jittered by ``seed``) with faint noise, as a base model's samples might be."""
    gen = torch.Generator().manual_seed(seed)
    noise = 0.002 * torch.randn(len(PROMPTS), 3, 32, 32, generator=gen)
    return (render(PROMPTS, seed=seed) + noise).clamp(1e-3, 1 - 1e-3), list(PROMPTS)


def _saturated(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A mild collapse of the saturation reward: a few pixel-space Adam steps on the global-target hinge
    relu(C - saturation(x)) (as tests/test_testbed_agent.py makes them)."""
    reward = build([RewardConfig(name="saturation")])[0]
    with torch.no_grad():
        target = float(reward(render(all_prompts()), all_prompts()).max())
    theta = torch.logit(images.clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(6):
        loss = torch.relu(target - reward(torch.sigmoid(theta), prompts)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(theta).detach()


def _body(state: AgentState, base: torch.Tensor, current: torch.Tensor, prompts: list[str], step: int = 5) -> dict:
    """The request body pgot's openai backend sends (pgot.agent.OpenAIAgent._answer, without the HTTP)."""
    grids = make_grids(base, current, prompts, step, tile=64)
    captions = [f'prompt "{p}", {n} sample(s)' for _, p, n in grids]
    urls = ["data:image/png;base64," + base64.b64encode(png_bytes(g)).decode("ascii") for g, _, _ in grids]
    return {"model": "m", "messages": build_messages(state, step, urls, captions, KNOWLEDGE)}


def _state(active=REWARDS, strategy="offline") -> AgentState:
    state = AgentState.initial(_configs(), strategy=strategy)
    state.active_rewards = list(active)
    return state


def _post(url: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "/chat/completions",
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --------------------------------------------------------------------------------------------
# Reading a request
# --------------------------------------------------------------------------------------------


def test_request_is_read_back_exactly():
    base, prompts = _images(seed=0)
    current = _saturated(base, prompts)
    state = _state(active=["saturation", "tb_align", "tb_pref"])
    req = parse_request(_body(state, base, current, prompts, step=7))
    # tiles recovered from the grids' 'tiles' chunk: the images, rounded to 8 bits
    assert torch.equal(req.base_images, torch.from_numpy(to_uint8(base)).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(req.current_images, torch.from_numpy(to_uint8(current)).permute(0, 3, 1, 2).float() / 255)
    assert req.prompts == prompts and req.step == 7 and req.strategy == "offline" and req.model == "m"
    assert req.active_rewards == ["saturation", "tb_align", "tb_pref"]
    # contrast is not active: its strength comes from the knowledge base of the system text
    assert req.strengths == {n: proxies.STRENGTHS[n] for n in REWARDS}
    assert req.words > 100
    # two seeds of each prompt: one grid per prompt, two columns, base row then current row
    twice = [p for p in PROMPTS[:3] for _ in range(2)]
    b2, c2 = render(twice, seed=3), _saturated(render(twice, seed=3), twice)
    req = parse_request(_body(state, b2, c2, twice))
    assert req.prompts == twice and len(_body(state, b2, c2, twice)["messages"][1]["content"]) == 1 + 3
    assert torch.equal(req.current_images, torch.from_numpy(to_uint8(c2)).permute(0, 3, 1, 2).float() / 255)


def test_reference_images_before_the_state_are_skipped_and_tiles_are_resized():
    base, prompts = _images(seed=0)
    base, prompts = base[:2], prompts[:2]
    state = _state()
    grids = make_grids(base, base, prompts, 3, tile=16)  # agent.image_size below 32: tiles downscaled to 16 px
    urls = ["data:image/png;base64," + base64.b64encode(png_bytes(g)).decode("ascii") for g, _, _ in grids]
    reference = "data:image/png;base64," + base64.b64encode(_png(1 - base[0])).decode()
    messages = build_messages(state, 3, urls, [f'prompt "{p}", 1 sample(s)' for p in prompts], KNOWLEDGE,
                              references=[("saturation", reference)])  # fmt: skip
    req = parse_request({"messages": messages})
    assert req.base_images.shape == (2, 3, 32, 32) and req.prompts == prompts
    assert (req.base_images - base).abs().mean() < 0.05  # 16 px and back: close, not exact


def _png(image: torch.Tensor) -> bytes:
    from pgot.images import to_pil

    return png_bytes(to_pil(image))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b["messages"][1]["content"].pop(), "has 1 grid(s) but captions for images [1, 2]"),
        (lambda b: b["messages"][1]["content"].__setitem__(0, {"type": "text", "text": "hi"}), "no 'Training state:'"),
        (lambda b: b["messages"][1]["content"][1]["image_url"].__setitem__("url", "https://x/y.png"), "data:image/png"),
        (
            lambda b: b["messages"][1]["content"][1]["image_url"].__setitem__(
                "url", "data:image/png;base64," + base64.b64encode(_png(torch.zeros(3, 8, 8))).decode()
            ),
            "no 'tiles' text chunk",
        ),
        (lambda b: b.__setitem__("messages", []), "no messages"),
    ],
    ids=["missing-grid", "no-state", "remote-url", "no-tiles", "no-messages"],
)
def test_unreadable_requests_say_why(mutate, message):
    base, prompts = _images(seed=0)
    body = _body(_state(), base[:2], base[:2], prompts[:2])
    mutate(body)
    with pytest.raises(RequestError, match=re.escape(message)):
        parse_request(body)


# --------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------


def test_endpoint_answers_diagnose_in_chat_completion_shape():
    base, prompts = _images(seed=0)
    current = _saturated(base, prompts)
    body = _body(_state(), base, current, prompts)
    with start_server() as server:
        status, reply = _post(server.base_url, body)
    assert status == 200 and reply["object"] == "chat.completion" and reply["model"] == "m"
    content = reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["prompt_tokens"] > 100 and reply["usage"]["completion_tokens"] == len(content.split())
    req = parse_request(body)
    assert content == diagnose(req.base_images, req.current_images, prompts, REWARDS, proxies.STRENGTHS)
    assert "Action: Remove saturation" in content


def test_errors_auth_routes_and_models(monkeypatch):
    base, prompts = _images(seed=0)
    base, prompts = base[:2], prompts[:2]
    outside = _body(_state(), base, base, ["a photo of a cat", "a photo of a dog"])
    monkeypatch.setenv("PGOT_TEST_SERVER_KEY", "sk-local")
    with start_server(api_key_env="PGOT_TEST_SERVER_KEY") as server:
        status, err = _post(server.base_url, _body(_state(), base, base, prompts))
        assert status == 401 and err["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer sk-local"}
        status, err = _post(server.base_url, outside, auth)
        assert status == 400 and "outside the testbed grammar" in err["error"]["message"]
        status, err = _post(server.base_url, b"{not json", auth)
        assert status == 400 and "not JSON" in err["error"]["message"]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(server.base_url + "/models", timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "pgot-testbed-agent"
        with pytest.raises(urllib.error.HTTPError) as missing:
            opener.open(server.base_url.removesuffix("/v1") + "/v1/embeddings", data=b"{}", timeout=10)
        assert missing.value.code == 404
        assert server.served == 0


def test_memory_lets_a_stable_run_switch_and_a_revert_forgets():
    """Only strong rewards left, pictures that differ from the base (another jitter) but not between two checks: the
    second check switches to online; a check at an earlier step (after a revert) compares with the base again."""
    base, prompts = _images(seed=0)
    current, _ = _images(seed=1)  # the same scenes, moved: quality as high, pixels far from the base's
    state = _state(active=["tb_align", "tb_pref"])
    with start_server() as server:
        actions = []
        for step in (5, 6, 4):
            status, reply = _post(server.base_url, _body(state, base, current, prompts, step=step))
            assert status == 200
            actions.append(reply["choices"][0]["message"]["content"].splitlines()[1])
        assert actions == ["Action: Continue", "Action: Switch", "Action: Continue"]
    with start_server(stateless=True) as server:
        for step in (5, 6):
            _, reply = _post(server.base_url, _body(state, base, current, prompts, step=step))
            assert "Action: Continue" in reply["choices"][0]["message"]["content"]


def test_pgot_openai_backend_reads_and_checks_the_decision(tmp_path):
    """pgot's real agent (ChatClient, parsing, checks) against the server: a saturated current model is a removal of
    saturation; the strong rewards are never removed; the records say what was sent and answered."""
    base, prompts = _images(seed=0)
    with start_server() as server:
        cfg = AgentConfig(
            backend="openai", base_url=server.base_url, api_key_env="", knowledge=KNOWLEDGE, image_size=64
        )
        agent = build_agent(cfg, _configs())
        try:
            state = _state()
            decision = agent.decide(5, base, _saturated(base, prompts), prompts, state, tmp_path / "agent")
            assert (decision.action, decision.reward, decision.error) == ("remove", "saturation", None)
            assert decision.tokens_in > 100 and "collapse signature of saturation" in decision.analysis
            state.active_rewards = ["tb_align", "tb_pref"]
            same = agent.decide(6, base, base, prompts, state, tmp_path / "agent")
            # strong rewards only, no breakdown, pictures stable: the switch, read by pgot's parser
            assert (same.action, same.strategy, same.error) == ("switch", "online", None)
        finally:
            agent.close()
    request = json.loads((tmp_path / "agent" / "step-000005" / "request.json").read_text())
    assert request["url"] == server.base_url + "/chat/completions"
    assert "Action: Remove saturation" in (tmp_path / "agent" / "step-000005" / "reply.txt").read_text()


def test_command_line_serves_on_a_free_port(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgot.testbed.agent_server", "--port", "0", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("pgot testbed agent serving on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[5]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url.removesuffix("/v1") + "/health", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run(
        [sys.executable, "-m", "pgot.testbed.agent_server", "--api-key-env", "PGOT_TEST_UNSET_VARIABLE"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "PGOT_TEST_UNSET_VARIABLE" in bad.stderr


# --------------------------------------------------------------------------------------------
# In training, through the real openai backend
# --------------------------------------------------------------------------------------------


def test_training_applies_the_servers_decisions(tmp_path):
    """A short run on the shipped testbed model where the weighted sum pushes every reward hard (learning rate 3e-2):
    the server sees the weak rewards' collapse at step 2 and removes them (reverting each time); every agent step gets
    a valid decision, applied and logged; the strong rewards are never removed."""
    from pgot.cli import train_main
    from pgot.tracking import metric_lines

    out = tmp_path / "run"
    with start_server() as server:
        code = train_main([
            "--config", str(ROOT / "configs" / "debug.yaml"), f"train.output_dir={out}",
            "train.objective=weighted_sum", "train.target_form=linear", "train.store=", "train.precompute_if_missing=false",
            "train.learning_rate=3e-2", "train.max_steps=4", "train.checkpoint_every=0", "train.probe_every=0",
            "train.final_eval=false", "prompts.limit=2", "train.prompts_per_step=1", "train.samples_per_prompt=2",
            "agent.backend=openai", f"agent.base_url={server.base_url}", "agent.api_key_env=", "agent.every=2",
            "agent.diagnostic_prompts=2", "agent.max_retries=0", "agent.timeout=60",
            "agent.knowledge=" + json.dumps(KNOWLEDGE), "--log-level", "WARNING",
        ])  # fmt: skip
        replies = list(server.replies)
    assert code == 0
    decisions = [json.loads(line) for line in (out / "agent" / "decisions.jsonl").read_text().splitlines()]
    assert decisions and all(d["error"] is None and d["backend"] == "openai" for d in decisions)
    assert len(replies) == len(decisions)  # one request per agent step, every one answered
    assert [d["raw"] for d in decisions] == [r["reply"] for r in replies]
    removed = [d["reward"] for d in decisions if d["action"] == "remove"]
    assert removed and set(removed) <= {"saturation", "contrast"}  # weak ones, the first at the first check
    assert decisions[0]["action"] == "remove" and decisions[0]["step"] == 2
    state = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json").read_text())
    assert state["step"] == 4
    assert [r["reward"] for r in state["agent"]["removed"]] == removed  # applied, in order
    assert state["agent"]["active_rewards"] == [r for r in REWARDS if r not in removed]
    assert {"tb_align", "tb_pref"} <= set(state["agent"]["active_rewards"])
    lines = metric_lines(out / "metrics.jsonl")
    assert lines[-1]["active_rewards"] == state["agent"]["active_rewards"]


def test_thresholds_are_diagnose_defaults_everywhere():
    """One place sets the agent's thresholds (pgot.testbed.agent.THRESHOLDS): diagnose, the server and its command
    line all default to them."""
    import inspect

    from pgot.testbed import agent_server
    from pgot.testbed.agent import THRESHOLDS

    params = inspect.signature(diagnose).parameters
    assert {k: params[k].default for k in THRESHOLDS} == THRESHOLDS
    with agent_server.AgentServer() as server:
        assert server.thresholds == THRESHOLDS
    args = agent_server._parser().parse_args([])
    assert {k: getattr(args, k) for k in THRESHOLDS} == THRESHOLDS


def test_any_failure_answers_500_and_the_connection_survives(monkeypatch, caplog):
    """A bug behind the endpoint (any exception, not only ValueError) answers HTTP 500 with an OpenAI-style error and
    one log line; the server keeps serving. A Content-Length that is not a number answers 400."""
    import http.client
    import logging

    from pgot.testbed import agent_server

    base, prompts = _images(seed=0)
    body = _body(_state(), base[:2], base[:2], prompts[:2])

    def broken(*args, **kwargs):
        raise ZeroDivisionError("float division by zero")

    with start_server() as server:
        monkeypatch.setattr(agent_server, "diagnose", broken)
        with caplog.at_level(logging.ERROR, logger="pgot.testbed.agent_server"):
            status, err = _post(server.base_url, body)
        assert status == 500 and err["error"]["type"] == "server_error"
        assert "ZeroDivisionError: float division by zero" in err["error"]["message"]
        assert [r.getMessage() for r in caplog.records] == [
            "agent server: 500: ZeroDivisionError: float division by zero"
        ]
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.putrequest("POST", "/v1/chat/completions")
        conn.putheader("Content-Length", "abc")
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 400
        assert (
            json.loads(resp.read())["error"]["message"] == "Content-Length must be a whole number of bytes, got 'abc'."
        )
        conn.close()
        monkeypatch.setattr(agent_server, "diagnose", diagnose)
        status, reply = _post(server.base_url, body)  # still serving
        assert status == 200 and reply["choices"][0]["message"]["content"].startswith("Analysis:")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quality-tol", "-1"], "argument --quality-tol: must be a finite number >= 0, got -1.0"),
        (["--quality-tol", "nan"], "argument --quality-tol: must be a finite number >= 0, got nan"),
        (["--quality-tol", "1.5"], "argument --quality-tol: must be at most 1 (a share of the base images' quality)"),
        (["--component-tol", "inf"], "argument --component-tol: must be a finite number >= 0, got inf"),
        (["--change-tol", "x"], "argument --change-tol: must be a number, got 'x'"),
        (["--port", "99999"], "argument --port: must be from 0 to 65535 (0: a free one), got 99999"),
        (["--port", "-1"], "argument --port: must be from 0 to 65535"),
        (["--log-level", "verbose"], "argument --log-level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_command_line_refuses_bad_options_with_one_error_line(argv, message, capsys):
    from pgot.testbed import agent_server

    with pytest.raises(SystemExit) as exit_:
        agent_server.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_server_refuses_thresholds_diagnose_cannot_use():
    from pgot.testbed import agent_server

    with pytest.raises(ValueError, match=r"^component_tol must be a finite number >= 0, got -0.1 \(default 0.15\)\.$"):
        agent_server.AgentServer(component_tol=-0.1)
    assert agent_server._parser().parse_args(["--log-level", "debug"]).log_level == "DEBUG"
