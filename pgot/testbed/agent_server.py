"""An agent that can see, served as a local OpenAI-compatible chat-completions endpoint.

Training talks to it through pgot's real ``openai`` agent backend, exactly as it would talk to GPT-4o or a vLLM
server of Qwen-VL; behind the endpoint, the testbed's diagnosing logic (:func:`pgot.testbed.agent.diagnose`) looks at
the images with the ground-truth judge's eyes::

    python -m pgot.testbed.agent_server --port 8011
    pgot-train --config configs/debug.yaml agent.backend=openai agent.base_url=http://127.0.0.1:8011/v1 \\
        agent.api_key_env='' agent.every=10

In a test or a script, :func:`start_server` runs it in a thread on a free port (``with start_server() as server:
... server.base_url``).

**What it reads from a request** (``POST /v1/chat/completions``, the body :func:`pgot.agent.build_messages` makes):

* the diagnostic grids: the ``image_url`` parts that follow the training-state text, as ``data:image/png;base64``
  URLs. Each grid is a PNG made by :func:`pgot.agent.make_grids` (:func:`pgot.images.labelled_grid`) whose ``tiles``
  text chunk holds the box ``[x, y, width, height]`` of every tile, the base model's row first, then the current
  model's row, one column per seed. Reference images of ``agent.references`` (sent before the state text) are
  skipped. Tiles of another size than 32 x 32 (``agent.image_size`` below 32) are resized to it (bicubic);
* each grid's prompt: the caption line ``Image k: prompt "..."`` of the state text;
* the training state: ``- step:``, ``- strategy:`` and ``- active rewards: name (strength), ...`` lines; the
  strengths of every reward also from the system text's knowledge base (``- name (strength, active|removed): ...``).

**What it answers**: a chat completion (``choices[0].message.content``, ``finish_reason: stop``, ``usage``) whose
content is :func:`~pgot.testbed.agent.diagnose`'s reply: an ``Analysis:`` line, then ``Action: Continue | Remove
<reward> | Switch`` and ``Strategy: offline | online``. ``usage`` counts whitespace-separated words of the request's
texts and of the reply (images count nothing), so pgot's cost accounting sees plausible, tiny numbers.

**Memory.** For the switch rule ("the images change little") the server remembers, per request ``model`` name and set
of prompts, the current images of the last request and compares the next request's images with them when its step is
later (after an agent's revert the step goes back: the base images are the reference again). ``--stateless``
compares with the base images always. One run per server, or distinct ``agent.model`` names.

A request it cannot read (no grids, grids without a ``tiles`` chunk, a caption missing, a prompt outside the testbed
grammar) gets HTTP 400 with an OpenAI-style ``{"error": {"message": ...}}`` naming the problem: pgot's agent logs it
and training continues. With ``--api-key-env VAR`` the server requires ``Authorization: Bearer $VAR`` (HTTP 401
otherwise). ``GET /v1/models`` lists the one model, ``GET /health`` answers ``ok``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import io
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pgot.testbed.agent import THRESHOLDS, check_thresholds, diagnose
from pgot.testbed.scenes import RESOLUTION

log = logging.getLogger(__name__)

__all__ = ["MODEL_NAME", "AgentServer", "DiagnosisRequest", "RequestError", "parse_request", "start_server", "main"]

MODEL_NAME = "pgot-testbed-agent"
"""The model name ``GET /v1/models`` lists (any ``agent.model`` is accepted)."""

_CAPTION = re.compile(r'^Image (\d+): prompt "(.*)"(?:, \d+ sample\(s\))?\s*$')
_STATE_ACTIVE = re.compile(r"^- active rewards:\s*(.*)$")
_STATE_STRATEGY = re.compile(r"^- strategy:\s*(\w+)")
_STATE_STEP = re.compile(r"^- step:\s*(-?\d+)")
_REWARD_STRENGTH = re.compile(r"([A-Za-z0-9_.\-]+)\s*\((strong|weak|\?)\)")
_KNOWLEDGE_LINE = re.compile(r"^- ([A-Za-z0-9_.\-]+) \((strong|weak), (?:active|removed)\):")
_MAX_BODY = 64 << 20  # bytes: a request with a few grids of 32 px tiles is far smaller


class RequestError(ValueError):
    """A request the server cannot read (answered with HTTP 400)."""


@dataclass
class DiagnosisRequest:
    """What a chat-completions request says, read by :func:`parse_request`.

    Attributes:
        base_images: (B, 3, 32, 32) float32 in [0, 1], the base model's tiles of every grid, in grid order.
        current_images: (B, 3, 32, 32), the current model's tiles, same order (same prompt and seed row by row).
        prompts: B prompt texts (one per tile pair).
        active_rewards: the active reward names, in the order of the state text.
        strengths: reward name -> ``weak`` / ``strong`` (every reward the request names).
        strategy: ``offline`` or ``online``.
        step: the training step the request is about (-1 when the text does not say).
        model: the request's ``model`` field.
        words: whitespace-separated words of the request's texts (its ``usage.prompt_tokens``).
    """

    base_images: torch.Tensor
    current_images: torch.Tensor
    prompts: list[str]
    active_rewards: list[str]
    strengths: dict[str, str]
    strategy: str = "offline"
    step: int = -1
    model: str = ""
    words: int = 0


def _texts_and_images(messages: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """(system texts, user content parts as ``(kind, text or url)`` in order) of a chat-completions ``messages``."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("the request has no messages list.")
    system, parts = [], []
    for m in messages:
        if not isinstance(m, dict):
            raise RequestError("every message must be an object with a role and a content.")
        content = m.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list):
            raise RequestError(f"a {m.get('role')} message has content of type {type(content).__name__}.")
        for item in items:
            if not isinstance(item, dict):
                continue
            text = item.get("text") if item.get("type") == "text" and isinstance(item.get("text"), str) else None
            if m.get("role") == "system":
                system += [text] if text is not None else []
            elif text is not None:
                parts.append(("text", text))
            elif item.get("type") == "image_url":
                url = item.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                parts.append(("image", str(url or "")))
    return system, parts


def _decode(url: str, k: int) -> Image.Image:
    """The PIL image of a ``data:image/...;base64,`` URL (grid ``k``, 1-based, for messages)."""
    if not url.startswith("data:") or ";base64," not in url:
        raise RequestError(
            f"grid {k} is not a data:image/png;base64 URL (got {url[:40]!r}); this server reads only inline images."
        )
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=False)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise RequestError(f"grid {k} is not a readable image ({exc}).") from None
    return image


def _tiles(image: Image.Image, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, current) tiles (n, 3, 32, 32) of one grid, from its ``tiles`` PNG text chunk."""
    raw = image.info.get("tiles")
    if raw is None:
        raise RequestError(
            f"grid {k} has no 'tiles' text chunk: send the grids pgot.agent.make_grids makes (pgot.images.labelled_grid "
            "records each tile's box in it)."
        )
    try:
        boxes = [[int(v) for v in box] for box in json.loads(raw)]
    except (ValueError, TypeError):
        boxes = None
    if boxes is None or any(len(box) != 4 for box in boxes):
        raise RequestError(f"grid {k}: the 'tiles' chunk is not a JSON list of [x, y, width, height] boxes.")
    if not boxes or len(boxes) % 2:
        raise RequestError(
            f"grid {k} has {len(boxes)} tiles; a diagnostic grid has two rows of equal length (base, then current)."
        )
    rgb = image.convert("RGB")
    out = []
    for x, y, w, h in boxes:
        tile = rgb.crop((x, y, x + w, y + h))
        if tile.size != (RESOLUTION, RESOLUTION):
            tile = tile.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(tile, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0)
    stacked = torch.stack(out)  # (2n, 3, 32, 32)
    n = len(boxes) // 2
    return stacked[:n], stacked[n:]


def parse_request(body: Mapping[str, Any]) -> DiagnosisRequest:
    """Read the grids, prompts and training state of a chat-completions request made by pgot's ``openai`` agent.

    Args:
        body: the request's JSON body (``model``, ``messages``).

    Returns:
        The :class:`DiagnosisRequest`.

    Raises:
        RequestError: no state text, no grid, a grid that is not an inline PNG with a ``tiles`` chunk, or captions
            that do not match the grids (each message says which).
    """
    system, parts = _texts_and_images(body.get("messages"))
    state_at = next((i for i, (kind, text) in enumerate(parts) if kind == "text" and "Training state:" in text), None)
    if state_at is None:
        raise RequestError(
            "the request has no 'Training state:' text (the user message pgot.agent.build_messages makes)."
        )
    state = parts[state_at][1]
    captions: dict[int, str] = {}
    active: list[str] = []
    strengths: dict[str, str] = {}
    strategy, step = "offline", -1
    for line in state.splitlines():
        line = line.strip()
        if m := _CAPTION.match(line):
            captions[int(m.group(1))] = m.group(2)
        elif m := _STATE_ACTIVE.match(line):
            for name, strength in _REWARD_STRENGTH.findall(m.group(1)):
                active.append(name)
                if strength != "?":
                    strengths[name] = strength
        elif m := _STATE_STRATEGY.match(line):
            strategy = m.group(1).lower()
        elif m := _STATE_STEP.match(line):
            step = int(m.group(1))
    for text in system:
        for line in text.splitlines():
            if m := _KNOWLEDGE_LINE.match(line.strip()):
                strengths.setdefault(m.group(1), m.group(2))
    if strategy not in ("offline", "online"):
        raise RequestError(f"the state text gives strategy {strategy!r}; expected offline or online.")
    urls = [text for kind, text in parts[state_at + 1 :] if kind == "image"]
    if not urls:
        raise RequestError("the request has no diagnostic grid after the training-state text.")
    if sorted(captions) != list(range(1, len(urls) + 1)):
        raise RequestError(
            f"the request has {len(urls)} grid(s) but captions for images {sorted(captions) or 'none'}; each grid needs "
            "its line 'Image k: prompt \"...\"' in the state text."
        )
    base, current, prompts = [], [], []
    for k, url in enumerate(urls, start=1):
        b, c = _tiles(_decode(url, k), k)
        base.append(b)
        current.append(c)
        prompts += [captions[k]] * len(b)
    words = sum(len(t.split()) for t in system) + sum(len(t.split()) for kind, t in parts if kind == "text")
    return DiagnosisRequest(
        base_images=torch.cat(base),
        current_images=torch.cat(current),
        prompts=prompts,
        active_rewards=active,
        strengths=strengths,
        strategy=strategy,
        step=step,
        model=str(body.get("model", "")),
        words=words,
    )


@dataclass
class _Memory:
    """The current images of the last request per (model name, prompts), for the switch rule."""

    stateless: bool = False
    seen: dict[tuple, tuple[int, torch.Tensor]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def previous(self, req: DiagnosisRequest) -> torch.Tensor | None:
        """The images of an earlier step on the same prompts, and remember this request's."""
        if self.stateless:
            return None
        key = (req.model, tuple(req.prompts))
        with self.lock:
            before = self.seen.get(key)
            self.seen[key] = (req.step, req.current_images)
        if before is None or before[0] >= req.step or before[1].shape != req.current_images.shape:
            return None  # the first request, or a step replayed after a revert: compare with the base images
        return before[1]


def _completion(content: str, model: str, prompt_words: int, counter: int) -> dict:
    words = len(content.split())
    return {
        "id": f"chatcmpl-pgot-testbed-{counter}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model or MODEL_NAME,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": words, "total_tokens": prompt_words + words},
    }


class _Handler(BaseHTTPRequestHandler):
    server: AgentServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": None}})

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path = self._path()
        if path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "owned_by": "pgot"}]})
        else:
            self._error(404, f"no route GET {path}; this server answers POST /v1/chat/completions.", "not_found")

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        path = self._path()
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self.close_connection = True  # the body is left unread
            self._error(404, f"no route POST {path}; this server answers POST /v1/chat/completions.", "not_found")
            return
        key = os.environ.get(self.server.api_key_env) if self.server.api_key_env else None
        if self.server.api_key_env and self.headers.get("Authorization", "") != f"Bearer {key}":
            self.close_connection = True
            self._error(401, "missing or wrong API key (Authorization: Bearer ...).", "authentication_error")
            return
        raw_length = self.headers.get("Content-Length") or "0"
        try:
            length = int(raw_length)
        except ValueError:
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            self._error(400, f"Content-Length must be a whole number of bytes, got {raw_length[:40]!r}.")
            return
        if not 0 < length <= _MAX_BODY:
            self.close_connection = True
            self._error(
                400 if length <= 0 else 413, f"the request body must hold 1 to {_MAX_BODY} bytes, got {length}."
            )
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object.")
            req = parse_request(body)
            reply = diagnose(
                req.base_images,
                req.current_images,
                req.prompts,
                req.active_rewards,
                req.strengths,
                strategy=req.strategy,
                previous_images=self.server.memory.previous(req),
                **self.server.thresholds,
            )
        except json.JSONDecodeError as exc:
            self._error(400, f"the request body is not JSON: {exc}.")
            return
        except (ValueError, TypeError) as exc:  # RequestError, or diagnose's (a prompt outside the grammar, shapes)
            log.warning("agent server: 400: %s", exc)
            self._error(400, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must answer 500, never drop the connection
            log.error("agent server: 500: %s: %s", type(exc).__name__, exc)
            self._error(500, f"the agent server failed on this request ({type(exc).__name__}: {exc}).", "server_error")
            return
        with self.server.lock:
            self.server.served += 1
            counter = self.server.served
        action = next((line for line in reply.splitlines() if line.startswith("Action:")), "")
        log.info("agent server: step %d, %d image pair(s): %s", req.step, len(req.prompts), action)
        self.server.replies.append({"step": req.step, "reply": reply})
        self._send(200, _completion(reply, req.model, req.words, counter))

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server API
        log.debug("agent server: " + format, *args)


class AgentServer(ThreadingHTTPServer):
    """The endpoint (a :class:`http.server.ThreadingHTTPServer`); start one with :func:`start_server` or :func:`main`.

    Attributes:
        base_url: ``http://host:port/v1``, the value of ``agent.base_url``.
        replies: ``{"step", "reply"}`` of the requests answered, in order (the last 1000).
        served: requests answered with a decision.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        stateless: bool = False,
        api_key_env: str = "",
        quality_tol: float = THRESHOLDS["quality_tol"],
        component_tol: float = THRESHOLDS["component_tol"],
        change_tol: float = THRESHOLDS["change_tol"],
    ):
        check_thresholds(quality_tol, component_tol, change_tol)
        super().__init__((host, port), _Handler)
        self.memory = _Memory(stateless=stateless)
        self.api_key_env = api_key_env
        self.thresholds = {"quality_tol": quality_tol, "component_tol": component_tol, "change_tol": change_tol}
        self.lock = threading.Lock()
        self.served = 0
        self.replies: collections.deque[dict] = collections.deque(maxlen=1000)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        """Stop serving (when started in a thread) and release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()

    def __enter__(self) -> AgentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_server(host: str = "127.0.0.1", port: int = 0, **options: Any) -> AgentServer:
    """Start the agent server in a daemon thread of this process; ``port=0`` picks a free port.

    Args:
        host: interface to listen on.
        port: TCP port (0: a free one; read it back from ``server.base_url``).
        **options: :class:`AgentServer` keywords: ``stateless``, ``api_key_env``, and the thresholds of
            :func:`pgot.testbed.agent.diagnose` (``quality_tol``, ``component_tol``, ``change_tol``).

    Returns:
        The running server; ``with start_server() as server:`` closes it at the end of the block.

    Raises:
        OSError: the port is taken.
    """
    server = AgentServer(host, port, **options)
    server._thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="pgot-agent-server", daemon=True
    )
    server._thread.start()
    return server


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _port(text: str) -> int:
    """``--port``: a TCP port, 0 to 65535 (0: a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (0: a free one), got {port}")
    return port


def _threshold(key: str):
    """An argparse type for the threshold ``key`` of :func:`~pgot.testbed.agent.check_thresholds`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        values = dict(THRESHOLDS, **{key: value})
        try:
            check_thresholds(**values)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(" (default")[0].removeprefix(f"{key} ")) from None
        return value

    parse.__name__ = key  # argparse names the type in "invalid <name> value" messages
    return parse


def _log_level(text: str) -> str:
    """``--log-level``: one of :data:`_LOG_LEVELS`, any case."""
    if text.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_LOG_LEVELS)} (any case), got {text!r}")
    return text.upper()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pgot.testbed.agent_server",
        description="The testbed's diagnosing agent as an OpenAI-compatible chat-completions endpoint for pgot's "
        "agent.backend=openai (agent.base_url=http://HOST:PORT/v1, agent.api_key_env='').",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8011, help="TCP port (default 8011; 0: a free one, printed)")
    parser.add_argument("--stateless", action="store_true", help="compare with the base images only (no memory)")
    parser.add_argument(
        "--api-key-env", default="", help="require 'Authorization: Bearer $VAR' with the key in this variable"
    )
    helps = {
        "quality_tol": "mean quality drop that is a breakdown, as a share of the base images' mean quality",
        "component_tol": "mean drop of one judge component that is a breakdown",
        "change_tol": "mean absolute pixel change below which images are stable",
    }
    for key, default in THRESHOLDS.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=_threshold(key), default=default, help=f"{helps[key]} (default %(default)s)")
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default="INFO",
        help="logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO: one line per decision)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pgot.testbed.agent_server``: serve until interrupted (Ctrl-C).

    Every option is checked before anything starts: a bad one prints one ``error:`` line (argparse's usage line
    first) and exits 2 -- ``--port`` from 0 to 65535, thresholds as :func:`~pgot.testbed.agent.check_thresholds`
    (finite, >= 0, ``--quality-tol`` at most 1), ``--log-level`` a logging level name.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    if args.api_key_env and not os.environ.get(args.api_key_env):
        print(f"error: --api-key-env {args.api_key_env}: the variable is not set.", file=sys.stderr)
        return 2
    try:
        server = AgentServer(
            args.host,
            args.port,
            stateless=args.stateless,
            api_key_env=args.api_key_env,
            quality_tol=args.quality_tol,
            component_tol=args.component_tol,
            change_tol=args.change_tol,
        )
    except OSError as exc:
        print(
            f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}. Pick another --port.",
            file=sys.stderr,
        )
        return 2
    print(f"pgot testbed agent serving on {server.base_url} (agent.base_url={server.base_url})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
