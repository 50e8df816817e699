"""The agent inside training: tests/configs/tiny_debug.yaml (tiny SD3, analytic rewards) through pgot.cli.train_main.

A D.3-like schedule scaled to agent.every=1 (remove a weak reward and revert, remove another, switch to
online) must show in trainer_state.json, metrics.jsonl and agent/ at the right steps, also across a
resume; an OpenAI-compatible server (127.0.0.1) must have a well-formed decision applied, and an HTTP 500
must leave training running with the reason logged. A run interrupted in the middle of a decision resumes
exactly, with the records of the interrupted attempt replaced.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pgot.agent import prune_records
from pgot.cli import train_main
from pgot.tracking import metric_lines

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "tests" / "configs" / "tiny_debug.yaml"  # the fast world: tiny SD3, analytic rewards
ALL = ["colorfulness", "contrast", "sharpness"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store") / "frontier"  # precomputed by the first run (precompute_if_missing)


def train(out: Path, store: Path, *extra: str) -> int:
    overrides = [
        f"train.output_dir={out}",
        f"train.store={store}",
        f"precompute.store={store}",
        "precompute.samples_per_prompt=4",
        "prompts.limit=2",
        "model.resolution=16",
        "train.strategy=auto",
        "train.probe_every=0",
        "train.final_eval=false",
        "rewards.0.strength=weak",  # colorfulness and contrast may be removed; sharpness is strong
        "rewards.1.strength=weak",
        "agent.every=1",
        "agent.diagnostic_prompts=2",
        "agent.image_size=32",
        *extra,
    ]
    return train_main(["--config", str(DEBUG), *overrides, "--log-level", "WARNING"])


def last_state(out: Path) -> dict:
    folders = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.removeprefix("step-")))
    state = json.loads((folders[-1] / "trainer_state.json").read_text())
    return {**state, **state["agent"]}  # the agent's part (AgentState) is nested


def metrics(out: Path) -> list[tuple[int, str, list[str]]]:
    return [(d["step"], d["strategy"], d["active_rewards"]) for d in metric_lines(out / "metrics.jsonl")]


def decisions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "agent" / "decisions.jsonl").read_text().splitlines()]


def test_scripted_schedule_with_resume(tmp_path, store):
    script = tmp_path / "schedule.yaml"
    script.write_text(
        "2: {action: remove, reward: colorfulness, revert_to: 1}\n"  # D.3's step 200 (HPS, back to 100)
        "4: {action: remove, reward: contrast}\n"  # step 600 (CLIP), back to the last approved checkpoint
        "5: {action: switch}\n"  # step 800
    )
    out = tmp_path / "run"
    args = ("agent.backend=scripted", f"agent.script={script}")
    assert train(out, store, "train.max_steps=3", *args) == 0
    first = last_state(out)
    assert first["step"] == 3 and first["active_rewards"] == ["contrast", "sharpness"]
    assert first["removed"] == [{"step": 2, "reward": "colorfulness", "reverted_to": 1}]
    assert first["strategy"] == "offline"

    assert train(out, store, "train.max_steps=6", *args) == 0  # debug.yaml has train.resume=latest
    final = last_state(out)
    assert final["step"] == 6 and final["active_rewards"] == ["sharpness"] and final["strategy"] == "online"
    assert final["removed"] == [
        {"step": 2, "reward": "colorfulness", "reverted_to": 1},
        {"step": 4, "reward": "contrast", "reverted_to": 3},  # step 3 was the last approved checkpoint
    ]
    c, s = "offline", "online"
    assert metrics(out) == [
        (1, c, ALL),
        (2, c, ALL),  # collapse seen at step 2: remove, back to step 1
        (2, c, ["contrast", "sharpness"]),
        (3, c, ["contrast", "sharpness"]),
        (4, c, ["contrast", "sharpness"]),  # remove contrast, back to step 3
        (4, c, ["sharpness"]),
        (5, c, ["sharpness"]),  # switch
        (6, s, ["sharpness"]),
    ]
    got = [(d["step"], d["action"], d["reward"]) for d in decisions(out)]
    assert got == [
        (1, "continue", None),
        (2, "remove", "colorfulness"),
        (2, "continue", None),  # the replayed step meets an entry that no longer applies
        (3, "continue", None),
        (4, "remove", "contrast"),
        (4, "continue", None),
        (5, "switch", None),
        (6, "continue", None),
    ]
    # both decisions at the replayed step keep their images and records
    assert json.loads((out / "agent" / "step-000002" / "decision.json").read_text())["decision"]["action"] == "remove"
    assert (
        "not active"
        in json.loads((out / "agent" / "step-000002-2" / "decision.json").read_text())["decision"]["reason"]
    )
    assert len(list((out / "agent" / "step-000004").glob("grid-*.png"))) == 2


# --------------------------------------------------------------------------------------------
# An OpenAI-compatible server
# --------------------------------------------------------------------------------------------


def chat(content: str) -> dict:
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 50},
    }


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server API
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        srv.requests.append({"headers": dict(self.headers), "body": body})  # type: ignore[attr-defined]
        queue = srv.queue  # type: ignore[attr-defined]
        status, payload = queue.pop(0) if len(queue) > 1 else queue[0]
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_http_agent_applies_decisions_and_survives_500(tmp_path, store, monkeypatch):
    monkeypatch.setenv("PGOT_TEST_TRAIN_KEY", "sk-train-secret-key")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.block_on_close = False
    server.requests = []  # type: ignore[attr-defined]
    server.queue = [  # type: ignore[attr-defined]
        (200, chat("Images match the base.\nAction: Continue\nStrategy: Offline")),  # step 1
        (200, chat("Psychedelic rainbow hues.\nAction: Remove Colorfulness\nStrategy: Offline")),  # step 2
        (200, chat('{"analysis": "stable", "action": "continue", "strategy": "online"}')),  # step 2 again: switch
        (500, {"error": {"message": "model overloaded"}}),  # step 3
        (200, chat("Action: Continue\nStrategy: Online")),  # step 4
    ]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        out = tmp_path / "run"
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        code = train(
            out, store, "train.max_steps=4", "agent.backend=openai", f"agent.base_url={url}", "agent.model=test-vlm",
            "agent.api_key_env=PGOT_TEST_TRAIN_KEY", "agent.max_retries=0", "agent.timeout=5",
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0
    final = last_state(out)
    assert final["step"] == 4 and final["strategy"] == "online"
    assert final["active_rewards"] == ["contrast", "sharpness"]
    assert final["removed"] == [{"step": 2, "reward": "colorfulness", "reverted_to": 1}]
    assert [m[0] for m in metrics(out)] == [1, 2, 2, 3, 4]  # training went on after the 500
    assert metrics(out)[-1] == (4, "online", ["contrast", "sharpness"])
    got = [(d["step"], d["action"], d["reward"], d["error"]) for d in decisions(out)]
    assert got == [
        (1, "continue", None, None),
        (2, "remove", "colorfulness", None),
        (2, "switch", None, None),
        (3, "continue", None, "http_500"),
        (4, "continue", None, None),
    ]
    assert "model overloaded" in decisions(out)[3]["reason"]
    # the 500 at step 3 approved nothing: the checkpoint written there still points at step 2's (switch)
    step3 = json.loads((out / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert step3["agent"]["approved"] == "step-000002"
    assert any("HTTP 500" in h["reason"] for h in final["history"])
    assert len(server.requests) == 5  # type: ignore[attr-defined]
    for req in server.requests:  # type: ignore[attr-defined]
        assert req["headers"]["Authorization"] == "Bearer sk-train-secret-key"
        parts = req["body"]["messages"][1]["content"]
        assert sum(p["type"] == "image_url" for p in parts) == 2  # agent.diagnostic_prompts=2
    logged = "\n".join(p.read_text() for p in (out / "agent").rglob("*") if p.suffix in (".json", ".jsonl", ".txt"))
    assert "sk-train-secret-key" not in logged


# --------------------------------------------------------------------------------------------
# Records across interruptions
# --------------------------------------------------------------------------------------------


def test_a_run_killed_during_a_decision_decides_it_again_on_resume(tmp_path, store, monkeypatch):
    """The checkpoint of step 2 is written, the agent writes its records and is interrupted before its decision is
    applied: the rerun drops those records, makes the decision on that checkpoint, and ends as the run that was
    never interrupted (LoRA, metrics, decisions, records)."""
    from pgot import train as train_module

    script = tmp_path / "schedule.yaml"
    script.write_text("2: {action: remove, reward: colorfulness}\n")
    args = ("agent.backend=scripted", f"agent.script={script}", "train.max_steps=4")
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert train(ref, store, *args) == 0

    decide = train_module._decide

    def interrupted(r, step):
        decision = decide(r, step)  # records written
        if step == 2:
            raise KeyboardInterrupt
        return decision

    monkeypatch.setattr(train_module, "_decide", interrupted)
    assert train(out, store, *args) == 130
    assert (out / "agent" / "step-000002" / "decision.json").is_file() and len(decisions(out)) == 2
    monkeypatch.setattr(train_module, "_decide", decide)
    assert train(out, store, *args) == 0

    def fields(run: Path) -> list[tuple]:
        return [(d["step"], d["action"], d["reward"], Path(d["log_dir"]).name) for d in decisions(run)]

    assert fields(out) == fields(ref) and metrics(out) == metrics(ref)
    assert sorted(p.name for p in (out / "agent").iterdir()) == sorted(p.name for p in (ref / "agent").iterdir())
    assert last_state(out)["history"] == last_state(ref)["history"]
    a, b = (load_file(str(r / "final" / "pytorch_lora_weights.safetensors")) for r in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prune_records_keeps_the_decisions_of_the_checkpoint(tmp_path):
    agent_dir = tmp_path / "agent"
    names = ["step-000001", "step-000002", "step-000002-2", "step-000003"]
    for name in names:
        (agent_dir / name).mkdir(parents=True)
        (agent_dir / name / "decision.json").write_text("{}")
    lines = [json.dumps({"step": int(n[5:11]), "log_dir": str(agent_dir / n)}) + "\n" for n in names[:3]]
    (agent_dir / "decisions.jsonl").write_text("".join(lines) + '{"step": 3, "log_d')  # step 3's line cut by a kill
    assert prune_records(agent_dir, 2) == ["step-000002-2"]
    assert (agent_dir / "decisions.jsonl").read_text() == "".join(lines[:2])
    assert sorted(p.name for p in agent_dir.iterdir()) == [
        "decisions.jsonl",
        "step-000001",
        "step-000002",
        "step-000003",
    ]
    assert prune_records(tmp_path / "none", 0) == []


# --------------------------------------------------------------------------------------------
# The API key, echoed by the endpoint, never leaves the process except in the request header
# --------------------------------------------------------------------------------------------

SECRET = "sk-live-Zq9/Xw+v_8675309-KeepOut"


def _echoes(auth: str) -> str:
    key = auth.removeprefix("Bearer ")
    return "\n".join(
        [
            f"Authorization: {auth}",
            "url: " + urllib.parse.quote(auth, safe=""),
            "basic: Basic " + base64.b64encode(f"user:{key}".encode()).decode(),
            "json: " + json.dumps(auth).replace("-", "\\u002d").replace("/", "\\/"),
        ]
    )


class _EchoHandler(BaseHTTPRequestHandler):
    """500 with the request's Authorization header in the body, then a 200 reply that quotes it too."""

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv = self.server
        srv.count += 1  # type: ignore[attr-defined]
        auth = self.headers.get("Authorization", "")
        if srv.count % 2:  # type: ignore[attr-defined]
            status, payload = 500, {"error": {"message": f"upstream rejected {auth}", "echo": _echoes(auth)}}
        else:
            content = f"Your request carried:\n{_echoes(auth)}\nAction: Continue\nStrategy: Offline"
            message = {"role": "assistant", "content": content, "reasoning_content": _echoes(auth)}
            status, payload = 200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_api_key_never_leaves_a_real_pgot_train_process(tmp_path, store):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.count = 0  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    out = tmp_path / "run"
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    overrides = [
        f"train.output_dir={out}", f"train.store={store}", f"precompute.store={store}", "precompute.samples_per_prompt=4",
        "prompts.limit=2", "model.resolution=16", "train.probe_every=0", "train.final_eval=false", "train.max_steps=2",
        "agent.every=1", "agent.diagnostic_prompts=1", "agent.image_size=32", "agent.backend=openai",
        f"agent.base_url={url}", "agent.model=test-vlm", "agent.api_key_env=PGOT_TEST_SECRET_KEY",
        "agent.max_retries=1", "agent.retry_backoff=0", "agent.timeout=10",
    ]  # fmt: skip
    env = {**os.environ, "PGOT_TEST_SECRET_KEY": SECRET}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pgot", "train", "--config", str(DEBUG), *overrides,
             "--log-level", "DEBUG"],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert server.count == 4  # type: ignore[attr-defined] - step 1: 500 then the reply; step 2 the same
    output = proc.stdout + proc.stderr
    assert "HTTP 500" in output and "upstream rejected Bearer ***" in output  # the echo was logged, redacted
    forms = {
        "plain": SECRET,
        "url": urllib.parse.quote(SECRET, safe=""),
        "b64": base64.b64encode(f"user:{SECRET}".encode()).decode()[8:-4],
        "head": SECRET[:10],
        "tail": SECRET[-10:],
    }
    for name, form in forms.items():
        assert form not in output, name
        for f in out.rglob("*"):
            if f.is_file():
                assert form.encode() not in f.read_bytes(), (name, f)
    replies = sorted((out / "agent").glob("step-*/reply.txt"))
    assert replies and all("Authorization: Bearer ***" in f.read_text() for f in replies)
