"""The OpenAI-compatible backend: chat completions through the openai SDK (AsyncOpenAI).

Works with OpenAI and with local servers that speak its API (vLLM, Ollama, llama.cpp) via
``captions.base_url``. Requests run under a concurrency limit, retry with exponential backoff
on 429, 5xx, timeouts, dropped connections and replies that are not a chat completion, and are
cached in the build, so an interrupted run resumes and a re-run makes no call twice. The API
key is read from the environment variable named by ``captions.api_key_env`` and is never
written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from dsbuild.captions.cache import RequestCache
from dsbuild.errors import DsbuildError, require
from dsbuild.settings.captions import CaptionsSettings

RETRY_STATUS = frozenset({408, 409, 429})


def api_key(settings: CaptionsSettings) -> str:
    """The key from the environment; a local server (base_url set) may go without one."""
    key = os.environ.get(settings.api_key_env)
    if key:
        return key
    if settings.base_url:
        return "EMPTY"
    raise DsbuildError(
        f"the openai captions backend needs an API key in the environment variable "
        f"{settings.api_key_env} (or set captions.base_url for a local server); "
        "use --backend template to write captions offline"
    )


@dataclass
class RequestStats:
    """What the backend did: calls made, served from cache, retried, failed; tokens used."""

    sent: int = 0
    cached: int = 0
    retries: int = 0
    failed: int = 0
    retry_reasons: Counter = field(default_factory=Counter)
    usage: Counter = field(default_factory=Counter)  # tokens paid in this run
    usage_cached: Counter = field(default_factory=Counter)  # tokens of cached replies
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "sent": self.sent, "cached": self.cached, "retries": self.retries,
            "failed": self.failed, "retry_reasons": dict(sorted(self.retry_reasons.items())),
            "usage": _usage(self.usage), "usage_cached": _usage(self.usage_cached),
            "errors": self.errors[:5],
        }


def _usage(c: Counter) -> dict:
    return {k: int(c.get(k, 0)) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


class OpenAIBackend:
    """Chat completions with concurrency, retries and a request cache."""

    name = "openai"

    def __init__(self, settings: CaptionsSettings, cache: RequestCache):
        self.openai = require("openai", "llm")
        self.settings = settings
        self.cache = cache
        self.stats = RequestStats()
        self.key = api_key(settings)
        self._client = None
        self._sem: asyncio.Semaphore | None = None

    @property
    def model(self) -> str:
        return self.settings.model

    def payload(self, messages: list[dict]) -> dict:
        s = self.settings
        return {"model": s.model, "messages": messages, "temperature": s.temperature,
                "max_tokens": s.max_tokens}

    async def __aenter__(self) -> OpenAIBackend:
        self._client = self.openai.AsyncOpenAI(
            api_key=self.key, base_url=self.settings.base_url, timeout=self.settings.timeout,
            max_retries=0,  # retries are ours: counted, logged and backed off explicitly
        )
        self._sem = asyncio.Semaphore(self.settings.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def complete(self, messages: list[dict], sample: int) -> dict | None:
        """The reply for (messages, sample) from the cache or the endpoint; None if it failed."""
        payload = self.payload(messages)
        # the endpoint is part of the key: another server with the same model name is not a hit
        key = self.cache.key({**payload, "base_url": self.settings.base_url}, sample)
        hit = self.cache.get(key)
        if hit is not None:
            self.stats.cached += 1
            self.stats.usage_cached.update(hit.get("usage") or {})
            return hit
        async with self._sem:
            reply = await self._call(payload)
        if reply is not None:
            self.stats.usage.update(reply["usage"])
            self.cache.put(key, reply)
        return reply

    async def _call(self, payload: dict) -> dict | None:
        o, s = self.openai, self.settings
        for attempt in range(s.max_retries + 1):
            wait = min(s.max_backoff, s.retry_backoff * (2 ** attempt))
            try:
                self.stats.sent += 1
                resp = await self._client.chat.completions.create(**payload)
            except o.APITimeoutError:
                reason = "timeout"
            except o.APIConnectionError:
                reason = "connection"
            except o.APIStatusError as exc:
                code = exc.status_code
                if code in (401, 403):
                    raise DsbuildError(
                        f"the endpoint refused the API key (HTTP {code}); check the environment "
                        f"variable {s.api_key_env}"
                    ) from None
                if code == 404:
                    raise DsbuildError(
                        f"the endpoint has no model {s.model!r} or no chat completions API "
                        f"(HTTP 404 at {s.base_url or 'api.openai.com'}); set captions.model / "
                        "captions.base_url"
                    ) from None
                if code not in RETRY_STATUS and code < 500:
                    raise DsbuildError(
                        f"the endpoint rejected the request (HTTP {code}): {exc.message}"
                    ) from None
                reason = str(code)
                wait = min(s.max_backoff, max(wait, _retry_after(exc)))
            except (o.APIError, ValueError):  # a body that is not JSON (a proxy's HTML page)
                reason = "bad_response"
            else:
                if getattr(resp, "choices", None):
                    return _reply(resp)
                reason = "bad_response"  # JSON, but not a chat completion: never cached
            if attempt == s.max_retries:
                self.stats.failed += 1
                self.stats.errors.append(f"gave up after {attempt + 1} attempts ({reason})")
                return None
            self.stats.retries += 1
            self.stats.retry_reasons[reason] += 1
            await asyncio.sleep(wait * random.uniform(1.0, 1.1))  # jitter: no thundering herd
        return None


def _retry_after(exc) -> float:
    """Seconds a server asked us to wait (Retry-After header), 0 when absent."""
    try:
        return float(exc.response.headers.get("retry-after", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        return 0.0


def _reply(resp) -> dict:
    """The cacheable part of a chat completion: text, finish reason, model, token usage."""
    choice = resp.choices[0] if resp.choices else None
    content = (choice.message.content if choice and choice.message else None) or ""
    usage = {}
    if resp.usage is not None:
        usage = {k: int(getattr(resp.usage, k, 0) or 0)
                 for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"content": content, "finish_reason": getattr(choice, "finish_reason", None),
            "model": resp.model, "usage": usage}
