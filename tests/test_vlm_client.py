"""pgot/vlm_client.py: reply fields, redaction of the API key in every form, and the log-record protection.

End-to-end reply shapes against a real HTTP server are in tests/test_agent.py; here the client is checked against
a local server for what only it sees (non-JSON bodies, error bodies cut short), and the pieces are checked alone.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pgot.vlm_client import REDACTED, Answer, ChatClient, EndpointError, protect, redact, redact_obj, release

KEY = "sk-proj-Ab3/xY+z_0123456789-QrSt"  # '/', '+', '-' and '_' change under URL, JSON and base64 encodings
ENV = "PGOT_TEST_VLM_KEY"


@pytest.mark.parametrize(
    "form",
    [
        KEY,
        f"Bearer {KEY}",
        urllib.parse.quote(KEY, safe=""),
        re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), urllib.parse.quote(KEY, safe="")),  # %2f
        urllib.parse.quote_plus(KEY),
        json.dumps(KEY).replace("-", "\\u002d").replace("/", "\\/"),
        json.dumps(json.dumps({"auth": KEY.replace("_", "\\u005f")})),  # JSON inside a JSON string
        KEY[:10] + "\\n" + KEY[10:],  # wrapped, JSON-escaped line break
        KEY[:10] + "\n  " + KEY[10:],
        repr(KEY.encode()),
        *(base64.b64encode(f"{user}:{KEY}".encode()).decode() for user in ("u", "us", "usr", "")),
        base64.urlsafe_b64encode(f"user:{KEY}".encode()).decode(),
    ],
)
def test_redact_finds_every_form_of_the_key(form):
    text = f'{{"detail": "request had {form} in it", "n": 1}}'
    clean = redact(text, [KEY])
    assert REDACTED in clean and clean.startswith('{"detail": "request had ') and clean.endswith(' in it", "n": 1}')
    for piece in (KEY[:8], KEY[-8:], urllib.parse.quote(KEY, safe="")[4:14]):
        assert piece not in clean
    assert redact(text) == text  # nothing protected, nothing given: unchanged


def test_redact_obj_and_short_values(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    protect(ENV)
    try:
        obj = {"a": [KEY, {"b": f"x {KEY} y"}], KEY: 3, "n": 1.5}
        assert redact_obj(obj) == {"a": [REDACTED, {"b": f"x {REDACTED} y"}], REDACTED: 3, "n": 1.5}
    finally:
        release(ENV)
    assert redact("abc and abc", ["abc"]) == "abc and abc"  # too short to be a key: left alone


def test_protect_redacts_every_log_record_until_released(monkeypatch, caplog):
    monkeypatch.setenv(ENV, KEY)
    stream = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            stream.append(self.format(record))

    protect(ENV)
    handler = Keep()  # added after protect(): still covered
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level("DEBUG"):
            logging.getLogger("some.library").warning("auth header was %s", f"Bearer {KEY}")
            logging.getLogger("pgot.train").info("url %s", urllib.parse.quote(KEY, safe=""))
            try:
                raise RuntimeError(f"boom {KEY}")
            except RuntimeError:
                logging.getLogger("pgot").exception("failed")
        release(ENV)
        logging.getLogger("pgot").warning("after release: %s", KEY)
    finally:
        logging.getLogger().removeHandler(handler)
    text = "\n".join(stream)
    assert "auth header was Bearer ***" in text and "url ***" in text and "RuntimeError: boom ***" in text
    assert KEY not in caplog.text.split("after release")[0] and KEY in text.split("after release")[1]


def test_answer_fields():
    a = Answer.of(
        {
            "message": {
                "content": [{"type": "text", "text": "<think>hm</think>Action: Switch"}, "!"],
                "reasoning_content": "first thoughts",
                "refusal": None,
            },
            "finish_reason": "stop",
        }
    )
    assert (a.content, a.thinking, a.reasoning) == ("Action: Switch!", "hm", "first thoughts")
    assert a.candidates() == ["Action: Switch!"]  # the final answer; reasoning only when there is none
    thinking_only = {"content": "<think>Action: Switch</think>", "reasoning_content": "Action: Continue"}
    assert Answer.of({"message": thinking_only, "finish_reason": "stop"}).candidates() == [
        "Action: Continue",
        "Action: Switch",
    ]
    assert Answer.of({"message": thinking_only, "finish_reason": "length"}).candidates() == []
    assert a.raw() == "[reasoning]\nfirst thoughts\n\n[thinking]\nhm\n\n[content]\nAction: Switch!"
    assert Answer.of({"message": {"content": "plain"}}).raw() == "plain"
    calls = {"tool_calls": [{"function": {"arguments": {"action": "continue"}}}]}
    assert Answer.of({"message": {"content": None, **calls}}).candidates() == ['{"action": "continue"}']


# --------------------------------------------------------------------------------------------
# The client against a local server
# --------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server API
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.answer(dict(self.headers))  # type: ignore[attr-defined]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _client(srv, **kw) -> ChatClient:
    base = {"base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1", "model": "m", "api_key_env": ENV}
    return ChatClient(**{**base, "max_retries": 0, "retry_backoff": 0.0, "timeout": 5.0, **kw})


@pytest.mark.parametrize("status", [200, 500])
def test_echoed_key_is_redacted_before_bodies_are_cut(server, monkeypatch, status):
    monkeypatch.setenv(ENV, KEY)
    # a non-JSON 200 body or an error body, the key straddling the place where the detail is cut
    pad = "x" * (180 if status == 200 else 280)
    server.answer = lambda h: (status, pad + " " + h["Authorization"] + " " + h["Authorization"])
    with pytest.raises(EndpointError) as info:
        _client(server).complete([{"role": "user", "content": "hi"}])
    err = info.value
    assert err.kind == ("bad_response" if status == 200 else "http_500")
    for piece in (KEY[:6], KEY[-6:], KEY[6:12]):
        assert piece not in err.reason and piece not in str(err)


def test_empty_reply_with_length_names_max_tokens(server, monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    reply = {"choices": [{"message": {"content": None, "reasoning_content": ""}, "finish_reason": "length"}]}
    server.answer = lambda h: (200, json.dumps(reply))
    result = _client(server, max_tokens=64).complete([{"role": "user", "content": "hi"}])
    assert result.text == "" and result.problem is not None and result.problem.kind == "max_tokens"
    assert "agent.max_tokens=64" in result.problem.reason and "Raise agent.max_tokens" in result.problem.reason
