"""An OpenAI-compatible chat-completions client for the agent: timeouts, retries, cost, redaction of secrets.

Speaks to any endpoint of the ``/chat/completions`` shape (OpenAI, vLLM, SGLang). The API key is read from the
environment variable named by ``agent.api_key_env`` on every request and never stored. Retries with exponential
backoff ``agent.retry_backoff * 2**attempt`` after HTTP 408/409/429/5xx, timeouts and connection errors (a
429's ``Retry-After`` is honoured up to 60 s); other 4xx fail at once. Spending is computed from the reply's
``usage`` with ``agent.price_per_1k_input`` / ``agent.price_per_1k_output``. Failures raise
:class:`EndpointError` with a short ``kind`` (``http_500``, ``timeout``, ``connection``, ``bad_response``, ...).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgot.config import AgentConfig

log = logging.getLogger(__name__)

__all__ = ["ChatClient", "ChatResult", "EndpointError"]


class EndpointError(Exception):
    """Endpoint trouble: ``kind`` is a short tag, ``reason`` the explanation, ``attempts`` the requests sent."""

    def __init__(self, kind: str, reason: str, attempts: int = 0):
        super().__init__(reason)
        self.kind, self.reason, self.attempts = kind, reason, attempts


@dataclass
class ChatResult:
    """A parsed chat-completions response."""

    response: dict[str, Any]
    """The endpoint's JSON object."""
    text: str
    """The answer text of ``choices[0].message``."""
    attempts: int = 1
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    """Dollars, from ``usage`` and the configured prices."""
    meta: dict[str, Any] = field(default_factory=dict)


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
        """``text`` with the API key replaced by ``***``."""
        key = self.key()
        return text.replace(key, "***") if key and len(key) >= 4 else text

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
        usage = response.get("usage") or {}
        tokens_in, tokens_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        cost = tokens_in / 1000 * self.price_per_1k_input + tokens_out / 1000 * self.price_per_1k_output
        try:
            message = response["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(
                "bad_response", "the endpoint's response has no choices[0].message.", attempts
            ) from None
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return ChatResult(
            response=response,
            text=content or "",
            attempts=attempts,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=cost,
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
                    raise EndpointError(
                        "bad_response", self.redact(f"the endpoint answered non-JSON: {payload[:200]!r}"), attempts
                    ) from None
                if not isinstance(data, dict):
                    raise EndpointError("bad_response", "the endpoint answered JSON that is not an object.", attempts)
                return data, attempts
            except urllib.error.HTTPError as exc:
                try:
                    detail = exc.read()[:300].decode("utf-8", "replace")
                except Exception:  # noqa: BLE001 - the body is only for the log
                    detail = ""
                # an endpoint may echo the request (Authorization header included) in its error body
                last = (f"http_{exc.code}", self.redact(f"HTTP {exc.code} from {url}: {detail.strip()}"))
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
                last = ("timeout", f"no reply from {url} within agent.timeout={self.timeout:g} s ({exc}).")
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError):
                    last = ("timeout", f"no reply from {url} within agent.timeout={self.timeout:g} s.")
                else:
                    last = ("connection", f"cannot reach {url}: {exc.reason}.")
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                last = ("connection", self.redact(f"connection to {url} failed: {type(exc).__name__}: {exc}."))
            if attempt < self.max_retries:
                log.info("agent: %s; retry %d/%d in %.2f s", last[1], attempt + 1, self.max_retries, wait)
                time.sleep(wait)
        raise EndpointError(
            last[0], f"{last[1]} Gave up after {attempts} attempt(s) (agent.max_retries={self.max_retries}).", attempts
        )
