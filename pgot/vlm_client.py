"""An OpenAI-compatible chat-completions client for the agent: timeouts, retries, cost, redaction of secrets.

Speaks to any endpoint of the ``/chat/completions`` shape (OpenAI, vLLM, SGLang). The API key is read from the
environment variable named by ``agent.api_key_env`` on every request and never stored. Retries with exponential
backoff ``agent.retry_backoff * 2**attempt`` after HTTP 408/409/429/5xx, timeouts and connection errors (a
429's ``Retry-After`` is honoured up to 60 s); other 4xx fail at once. Spending is computed from the reply's
``usage`` with ``agent.price_per_1k_input`` / ``agent.price_per_1k_output``. Failures raise
:class:`EndpointError` with a short ``kind`` (``http_500``, ``timeout``, ``connection``, ``bad_response``, ...).

**Reply shapes.** :class:`Answer` reads every field OpenAI-compatible servers put an answer in: ``message.content``
(a string or a list of parts with ``text``; ``<think>`` blocks inside it are set apart), ``reasoning_content``
(vLLM, SGLang, DeepSeek), ``reasoning`` (OpenRouter, newer vLLM), ``refusal`` (OpenAI), the arguments of
``tool_calls`` / ``function_call``, and the legacy completions ``choices[0].text``. A reply with none of them gets a
reason instead: cut off at ``agent.max_tokens`` (``finish_reason: length``), a refusal, a content filter, or empty.

**Secrets.** The key never leaves the process except in the request's ``Authorization`` header. :func:`protect`
(called by the ``openai`` agent) installs a log-record factory that redacts the key from every log record of the
process, whatever logger or handler writes it; :func:`redact` replaces it in text (exception messages, saved
files), also when an endpoint echoes it JSON-escaped (``\\u002d``), URL-encoded (``%2D``), split by escaped line
breaks, or base64-encoded (HTTP Basic auth), and before any text is cut short.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import logging
import os
import re
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgot.config import AgentConfig

log = logging.getLogger(__name__)

__all__ = [
    "REDACTED",
    "Answer",
    "ChatClient",
    "ChatResult",
    "EndpointError",
    "protect",
    "protected_secrets",
    "redact",
    "redact_obj",
    "release",
]


REDACTED = "***"
"""What a secret is replaced by in logs, files and messages."""

_MIN_SECRET = 4  # shorter values would redact ordinary words
_protected: dict[str, int] = {}  # environment variable -> how many active users protect it
_previous_factory: Callable[..., logging.LogRecord] | None = None


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def _char_pattern(c: str) -> str:
    """One character of a secret as it may be written: itself (after stray backslashes), a JSON / Python escape of
    it (\\u002d, \\x2d, doubled backslashes from nested JSON) or URL-encoded (%2D, + for a space)."""

    def hexes(h: str) -> str:
        return "".join(f"[{x.lower()}{x.upper()}]" if x.isalpha() else x for x in h)

    alts = [r"\\*" + re.escape(c)]
    code = ord(c)
    if code < 0x10000:
        alts.append(r"\\+u" + hexes(f"{code:04x}"))
    if code < 0x100:
        alts.append(r"\\+x" + hexes(f"{code:02x}"))
    alts.append("".join("%" + hexes(f"{b:02x}") for b in c.encode("utf-8")))
    if c == " ":
        alts.append(r"\+")
    return "(?:" + "|".join(alts) + ")"


@functools.lru_cache(maxsize=32)
def _secret_patterns(secret: str) -> tuple[re.Pattern, ...]:
    """Patterns that find ``secret`` in text: written out, escaped, URL-encoded, or base64-encoded inside a token.

    The written-out pattern allows each character in any of the forms of :func:`_char_pattern`, with whitespace or
    escaped line breaks between characters (a body wrapped or JSON-escaped by the endpoint). Base64 (HTTP Basic
    auth encodes ``user:key``): for each of the three alignments of the secret inside the encoded bytes, the
    characters that depend on the secret alone are searched for, and the whole base64 token around them is redacted.
    """
    gap = r"(?:\s|\\+[nrt])*"
    patterns = [re.compile(gap.join(_char_pattern(c) for c in secret))]
    data = secret.encode("utf-8")
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data).decode("ascii")
        first = -(-offset // 3) * 4  # the first 4-character group made of secret bytes only
        last = (offset + len(data)) // 3 * 4
        stable = encoded[first:last]
        if len(stable) >= 8:
            for core in {stable, stable.replace("+", "-").replace("/", "_")}:
                patterns.append(re.compile(r"[A-Za-z0-9+/_\-]*" + re.escape(core) + r"[A-Za-z0-9+/_\-]*=*"))
    return tuple(patterns)


def protected_secrets() -> list[str]:
    """The current values of the protected environment variables (see :func:`protect`)."""
    return [v for v in (os.environ.get(name) for name in _protected) if v and len(v) >= _MIN_SECRET]


def redact(text: str, extra: Sequence[str | None] = ()) -> str:
    """``text`` with every protected secret (and ``extra`` ones) replaced by ``***``, in any of the forms of
    :func:`_secret_patterns`."""
    if not text:
        return text
    for secret in dict.fromkeys([*protected_secrets(), *(s for s in extra if s and len(s) >= _MIN_SECRET)]):
        for pattern in _secret_patterns(secret):
            text = pattern.sub(REDACTED, text)
    return text


def redact_obj(obj: Any, extra: Sequence[str | None] = ()) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings, numbers) with every string passed through :func:`redact`."""
    if isinstance(obj, str):
        return redact(obj, extra)
    if isinstance(obj, dict):
        return {redact_obj(k, extra): redact_obj(v, extra) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v, extra) for v in obj)
    return obj


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a badly formatted record is logging's to report
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = redact(text)
        if clean != text:  # formatters print exc_text when set; nobody gets the raw exception any more
            record.exc_text, record.exc_info = clean, None
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def _install_record_factory() -> None:
    """Redact every log record of the process at its creation (all loggers, all handlers, added now or later)."""
    global _previous_factory
    if _previous_factory is not None:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _protected:
            _redact_record(record)
        return record

    _previous_factory = previous
    logging.setLogRecordFactory(factory)


def protect(env: str) -> None:
    """Keep the value of the environment variable ``env`` (an API key) out of every log record of the process from
    now on, whatever logger or handler writes it, and out of :func:`redact`'s results. Call :func:`release` when done
    (protections are counted)."""
    if not env:
        return
    _protected[env] = _protected.get(env, 0) + 1
    _install_record_factory()


def release(env: str) -> None:
    """Undo one :func:`protect` of ``env``."""
    if _protected.get(env, 0) > 1:
        _protected[env] -= 1
    else:
        _protected.pop(env, None)


class EndpointError(Exception):
    """Endpoint trouble: ``kind`` is a short tag, ``reason`` the explanation, ``attempts`` the requests sent."""

    def __init__(self, kind: str, reason: str, attempts: int = 0):
        reason = redact(reason)
        super().__init__(reason)
        self.kind, self.reason, self.attempts = kind, reason, attempts


# --------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------

_THINK = re.compile(r"<(think|thinking|reasoning)>(.*?)(?:</\1>|$)", re.S | re.I)


def _text_of(value: Any) -> tuple[str, str]:
    """``(answer, thoughts)`` of a message field: a string, or content parts (``{"type": "text", "text": ...}``,
    ``{"text": {"value": ...}}``, reasoning / thinking parts, plain strings), recursively."""
    if value is None:
        return "", ""
    if isinstance(value, str):
        return value, ""
    if isinstance(value, dict):
        kind = str(value.get("type", "")).lower()
        if kind in ("reasoning", "thinking", "redacted_thinking") or (
            "text" not in value and ("thinking" in value or "reasoning" in value)
        ):
            inner = next(
                (value[k] for k in ("thinking", "reasoning", "text", "content", "summary") if k in value), None
            )
            answer, thoughts = _text_of(inner)
            return "", "\n".join(t for t in (answer, thoughts) if t)
        return _text_of(next((value[k] for k in ("text", "content", "value") if k in value), None))
    if isinstance(value, (list, tuple)):
        parts = [_text_of(v) for v in value]
        return "".join(a for a, _ in parts), "\n".join(t for _, t in parts if t)
    return str(value), ""


def _split_think(text: str) -> tuple[str, str]:
    """``(outside, inside)`` of ``<think>...</think>`` blocks (an unclosed block runs to the end; a lone closing tag
    ends a block whose opening tag the server dropped)."""
    inside = [m.group(2) for m in _THINK.finditer(text)]
    outside = _THINK.sub(" ", text)
    low = outside.lower()
    for tag in ("</think>", "</thinking>", "</reasoning>"):
        if tag in low:
            cut = low.rfind(tag)
            inside.insert(0, outside[:cut])
            outside, low = outside[cut + len(tag) :], low[cut + len(tag) :]
    return outside.strip(), "\n".join(t.strip() for t in inside if t.strip())


def _arguments(calls: Any) -> str:
    """The arguments of tool / function calls (JSON text), one per line."""
    if isinstance(calls, dict):
        calls = [calls]
    out = []
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        fn = call.get("function", call)
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if isinstance(args, (dict, list)):
            args = json.dumps(args)
        if isinstance(args, str) and args.strip():
            out.append(args.strip())
    return "\n".join(out)


@dataclass
class Answer:
    """Every text an OpenAI-compatible server may put the answer in, read from ``choices[0]``."""

    content: str = ""
    """``message.content`` (a string or the text parts of a list) outside ``<think>`` blocks."""
    thinking: str = ""
    """``<think>`` blocks inside the content, and reasoning / thinking content parts."""
    reasoning: str = ""
    """``message.reasoning_content`` (vLLM, SGLang, DeepSeek) and ``message.reasoning`` (OpenRouter, newer vLLM)."""
    refusal: str = ""
    """``message.refusal`` (OpenAI)."""
    tool_calls: str = ""
    """The arguments of ``message.tool_calls`` / the legacy ``message.function_call``."""
    text: str = ""
    """The legacy completions ``choices[0].text``."""
    finish_reason: str | None = None

    @classmethod
    def of(cls, choice: Mapping[str, Any]) -> Answer:
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        answer, thoughts = _text_of(message.get("content"))
        outside, inside = _split_think(answer)
        reasoning = ["\n".join(_text_of(message.get(k))) for k in ("reasoning_content", "reasoning")]
        legacy, legacy_thoughts = _split_think(_text_of(choice.get("text"))[0])
        return cls(
            content=outside,
            thinking="\n".join(t for t in (inside, thoughts, legacy_thoughts) if t),
            reasoning="\n".join(r.strip() for r in reasoning if r and r.strip()),
            refusal=_text_of(message.get("refusal"))[0].strip(),
            tool_calls=_arguments(message.get("tool_calls")) or _arguments(message.get("function_call")),
            text=legacy,
            finish_reason=choice.get("finish_reason"),
        )

    def candidates(self) -> list[str]:
        """Texts to read the decision from, in order: the final answer (content, tool-call arguments, legacy text);
        only when there is none, the reasoning (a server that files the whole answer as reasoning), unless the reply
        was cut off at the token limit (``finish_reason: length``): an unfinished thought is no answer."""
        final = [t for t in (self.content, self.tool_calls, self.text) if t.strip()]
        if final or self.finish_reason == "length":
            return final
        return [t for t in (self.reasoning, self.thinking) if t.strip()]

    def raw(self) -> str:
        """Every field with text, labelled (the content alone when nothing else is there): what ``reply.txt`` keeps."""
        fields = [
            ("reasoning", self.reasoning),
            ("thinking", self.thinking),
            ("content", self.content),
            ("tool_calls", self.tool_calls),
            ("refusal", self.refusal),
            ("text", self.text),
        ]
        present = [(k, v) for k, v in fields if v.strip()]
        if len(present) == 1 and present[0][0] in ("content", "text"):
            return present[0][1]
        return "\n\n".join(f"[{k}]\n{v.strip()}" for k, v in present)


@dataclass
class ChatResult:
    """A parsed chat-completions response."""

    response: dict[str, Any]
    """The endpoint's JSON object."""
    text: str
    """The answer: the first of :meth:`Answer.candidates` ("" when the reply holds no text at all)."""
    attempts: int = 1
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    """Dollars, from ``usage`` and the configured prices."""
    meta: dict[str, Any] = field(default_factory=dict)
    answer: Answer = field(default_factory=Answer)
    """Every text field of the reply."""
    problem: EndpointError | None = None
    """Why the reply holds no answer (``max_tokens``, ``refusal``, ``content_filter``, ``empty``), else None."""

    @property
    def raw(self) -> str:
        """The full raw answer, every text field labelled (what ``reply.txt`` keeps)."""
        return self.answer.raw()


@dataclass
class ChatClient:
    """The chat-completions endpoint of ``agent.base_url``; build with :meth:`from_config`."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 3
    retry_backoff: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 0
    price_per_1k_input: float = 0.0
    price_per_1k_output: float = 0.0

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> ChatClient:
        """The client of the ``agent`` config section."""
        return cls(
            base_url=cfg.base_url,
            model=cfg.model,
            api_key_env=cfg.api_key_env,
            timeout=cfg.timeout,
            max_retries=cfg.max_retries,
            retry_backoff=cfg.retry_backoff,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            price_per_1k_input=cfg.price_per_1k_input,
            price_per_1k_output=cfg.price_per_1k_output,
        )

    @property
    def url(self) -> str:
        """The chat-completions URL."""
        return self.base_url.rstrip("/") + "/chat/completions"

    def key(self) -> str | None:
        """The API key from ``$agent.api_key_env`` (None when unset or when no key variable is configured)."""
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None

    def redact(self, text: str) -> str:
        """``text`` with the API key (and every protected secret) replaced by ``***``, in any form :func:`redact`
        finds (written out, JSON-escaped, URL-encoded, base64)."""
        return redact(text, [self.key()])

    def body(self, messages: list[dict]) -> dict[str, Any]:
        """The request body for ``messages``."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens > 0:
            body["max_tokens"] = self.max_tokens
        return body

    def logged_headers(self) -> dict[str, str]:
        """The request headers as they may be logged: the key replaced by the name of its variable."""
        headers = {"Content-Type": "application/json"}
        if self.key():
            headers["Authorization"] = f"Bearer <${self.api_key_env}>"
        return headers

    def complete(self, messages: list[dict]) -> ChatResult:
        """Send ``messages``; the parsed result.

        Raises:
            EndpointError: no key in ``$api_key_env``, HTTP errors after the retries, timeouts, unreachable
                endpoint, or a response without ``choices[0].message``.
        """
        key = self.key()
        if self.api_key_env and not key:
            raise EndpointError(
                "no_key",
                f"the environment variable {self.api_key_env} (agent.api_key_env) is not set; no request sent. "
                "Export the key, or set agent.api_key_env='' for a local server without authentication.",
            )
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        response, attempts = self._post(self.url, json.dumps(self.body(messages)).encode(), headers)
        usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
        tokens_in, tokens_out = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
        cost = tokens_in / 1000 * self.price_per_1k_input + tokens_out / 1000 * self.price_per_1k_output
        choices = response.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict) or not (isinstance(choice.get("message"), dict) or "text" in choice):
            raise EndpointError(
                "bad_response",
                self.redact(
                    "the endpoint's response has no choices[0].message (nor a completions choices[0].text): "
                    f"{json.dumps(response)[:300]}"
                ),
                attempts,
            )
        answer = Answer.of(choice)
        candidates = answer.candidates()
        return ChatResult(
            response=response,
            text=candidates[0] if candidates else "",
            attempts=attempts,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=cost,
            answer=answer,
            problem=None if candidates else self._no_answer(answer, attempts),
        )

    def _no_answer(self, answer: Answer, attempts: int) -> EndpointError:
        """Why a reply holds no text to read a decision from, and what to change."""
        if answer.refusal:
            return EndpointError(
                "refusal",
                self.redact(
                    f"the model refused to answer: {answer.refusal[:300]!r}. Check agent.model and the request "
                    "(request.txt next to the reply), or use another model."
                ),
                attempts,
            )
        if answer.finish_reason == "length":
            limit = f"agent.max_tokens={self.max_tokens}" if self.max_tokens > 0 else "the server's token limit"
            return EndpointError(
                "max_tokens",
                f"the reply was cut off at {limit} before it gave an answer (finish_reason: length; no content, "
                f"{'only unfinished reasoning' if answer.reasoning or answer.thinking else 'no text'}). Raise "
                "agent.max_tokens: reasoning models spend thousands of tokens before answering.",
                attempts,
            )
        if answer.finish_reason == "content_filter":
            return EndpointError(
                "content_filter",
                "the endpoint's content filter withheld the reply (finish_reason: content_filter).",
                attempts,
            )
        return EndpointError(
            "empty",
            f"the endpoint answered with no text in choices[0] (content, reasoning_content, reasoning, refusal, "
            f"tool_calls, text are all empty; finish_reason: {answer.finish_reason}).",
            attempts,
        )

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[dict, int]:
        """POST with retries on 408/409/429/5xx, timeouts and connection errors; ``(json, attempts)``."""
        host = urllib.parse.urlsplit(url).hostname or ""
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        opener = urllib.request.build_opener(*handlers)
        attempts, last = 0, ("", "")
        for attempt in range(self.max_retries + 1):
            attempts += 1
            wait = self.retry_backoff * 2**attempt
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with opener.open(request, timeout=self.timeout) as resp:
                    payload = resp.read()
                try:
                    data = json.loads(payload)
                except ValueError:
                    text = self.redact(payload.decode("utf-8", "replace"))  # redacted before it is cut
                    raise EndpointError(
                        "bad_response", f"the endpoint answered non-JSON: {text[:200]!r}", attempts
                    ) from None
                if not isinstance(data, dict):
                    raise EndpointError("bad_response", "the endpoint answered JSON that is not an object.", attempts)
                return data, attempts
            except urllib.error.HTTPError as exc:
                try:
                    detail = exc.read(1 << 16).decode("utf-8", "replace")
                except Exception:  # noqa: BLE001 - the body is only for the log
                    detail = ""
                # an endpoint may echo the request (Authorization header included) in its error body: redact the
                # whole body before cutting it, so that no part of a key survives the cut
                detail = self.redact(detail).strip()[:300]
                last = (f"http_{exc.code}", self.redact(f"HTTP {exc.code} from {url}: {detail}"))
                if exc.code not in (408, 409, 429) and exc.code < 500:
                    hint = (
                        " Check the key in $" + self.api_key_env + "."
                        if exc.code in (401, 403) and self.api_key_env
                        else ""
                    )
                    raise EndpointError(last[0], last[1] + hint, attempts) from None
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if retry_after:
                    try:
                        wait = min(max(float(retry_after), wait), 60.0)
                    except ValueError:
                        pass
            except TimeoutError as exc:
                last = ("timeout", self.redact(f"no reply from {url} within agent.timeout={self.timeout:g} s ({exc})."))
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    last = ("timeout", f"no reply from {url} within agent.timeout={self.timeout:g} s.")
                else:
                    last = ("connection", self.redact(f"cannot reach {url}: {exc.reason}."))
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = ("connection", self.redact(f"connection to {url} failed: {type(exc).__name__}: {exc}."))
            if attempt < self.max_retries:
                log.info("agent: %s; retry %d/%d in %.2f s", last[1], attempt + 1, self.max_retries, wait)
                time.sleep(wait)
        raise EndpointError(
            last[0],
            f"{self.redact(last[1])} Gave up after {attempts} attempt(s) (agent.max_retries={self.max_retries}).",
            attempts,
        )


def _count(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
