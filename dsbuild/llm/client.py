"""One client for OpenAI-compatible chat endpoints, shared by every stage that asks an LLM.

Captions and augment (and later verify's judge) use ``ChatClient``: the official ``openai`` SDK
(``AsyncOpenAI``, so OpenAI and local servers that speak its API: vLLM, Ollama, llama.cpp),
an asyncio semaphore for ``concurrency``, a per-request ``timeout``, and retries with
exponential backoff on 429, 408/409, 5xx, timeouts, dropped connections and 200 replies that are
not a chat completion (a proxy's HTML page). Retries are ``tenacity``'s, not the SDK's: the SDK's
backoff is fixed (0.5-8 s), invisible to stats and blind to bad 200 bodies. Every reply is cached
in the build keyed by (endpoint, payload, sample), so a resumed or repeated run pays for nothing
twice; ``RequestStats`` counts what was sent, cached, retried and failed, and the tokens used.
A dead or hanging endpoint fails fast (``FailFast``): once ``fail_after_errors`` attempts in a row
have failed with a connection error, timeout, 5xx or a non-completion body over at least
``fail_after_s`` seconds, the stage stops with ``StageFailed`` naming the endpoint and the last
error, instead of working through every request's retries (an hour for a big rank).
The API key comes from the environment variable the settings name and is never written anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild.core.deps import check, require
from dsbuild.core.errors import DsbuildError, StageFailed
from dsbuild.core.hashing import content_id
from dsbuild.core.records import write_json
from dsbuild.llm.settings import LLMSettings

RETRY_STATUS = frozenset({408, 409, 429})
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
COUNT_KEYS = ("sent", "cached", "retries", "failed")
DEFAULT_ENDPOINT = "https://api.openai.com/v1"


def api_key(settings: LLMSettings, section: str, offline_hint: str = "") -> str:
    """The key from the environment; a local server (base_url set) may go without one."""
    key = os.environ.get(settings.api_key_env)
    if key:
        return key
    if settings.base_url:
        return "EMPTY"
    raise DsbuildError(
        f"the openai {section} backend needs an API key in the environment variable "
        f"{settings.api_key_env} (or set {section}.base_url for a local server)"
        + (f"; {offline_hint}" if offline_hint else "")
    )


def check_endpoint(settings: LLMSettings, section: str, offline_hint: str = "") -> None:
    """Fail before any work when the SDK or the key is missing, with the line that fixes it."""
    check("llm", what=section)
    api_key(settings, section, offline_hint)


class RequestCache:
    """Completed chat replies keyed by (endpoint, payload, sample); one file each, atomic.

    Entries live under ``<root>/<key[:2]>/<key>.json``: changing the prompt or a sampling
    setting asks again, while an interrupted run replays what it already got.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(payload: dict, sample: object) -> str:
        return content_id("chat.completions", payload, sample, length=32)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None

    def put(self, key: str, value: dict) -> None:
        write_json(self.path(key), value)


@dataclass
class RequestStats:
    """What the client did: calls made, served from cache, retried, failed; tokens used."""

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
    return {k: int(c.get(k, 0)) for k in USAGE_KEYS}


def sum_request_stats(parts: Iterable[dict | None]) -> dict | None:
    """``RequestStats.as_dict()`` of several attempts (a killed run, then its resume) as one:
    counts, retry reasons and tokens added up, the first five errors kept."""
    parts = [p for p in parts if p]
    if not parts:
        return None
    counts, reasons, usage, cached = Counter(), Counter(), Counter(), Counter()
    errors: list[str] = []
    for p in parts:
        counts.update({k: int(p.get(k, 0)) for k in COUNT_KEYS})
        reasons.update(p.get("retry_reasons") or {})
        usage.update(p.get("usage") or {})
        cached.update(p.get("usage_cached") or {})
        errors.extend(p.get("errors") or [])
    return {**{k: int(counts[k]) for k in COUNT_KEYS},
            "retry_reasons": dict(sorted(reasons.items())), "usage": _usage(usage),
            "usage_cached": _usage(cached), "errors": errors[:5]}


@dataclass(frozen=True)
class RetryEvent:
    """One failed attempt about to be retried: why, which attempt (1-based), the wait (s)."""

    reason: str  # "429", "503", "timeout", "connection", "bad_response"
    attempt: int
    wait: float
    error: str


class Retryable(Exception):
    """An attempt that failed in a way worth retrying; ``reason`` is what the stats count,
    ``error`` what happened, in words."""

    def __init__(self, reason: str, retry_after: float = 0.0, error: str = ""):
        super().__init__(error or reason)
        self.reason = reason
        self.retry_after = retry_after
        self.error = error or reason

    @property
    def endpoint_down(self) -> bool:
        """The endpoint failed (no answer, 5xx, not a completion), as opposed to a 429/408/409
        that says it is alive and busy: these count towards failing fast."""
        return self.reason in ("timeout", "connection", "bad_response") or (
            self.reason.isdigit() and int(self.reason) >= 500)


class FailFast:
    """Counts failed attempts in a row (any success resets); says when to stop: at least
    ``errors`` failures spanning at least ``seconds``, timed from the first one's start."""

    def __init__(self, errors: int, seconds: float):
        self.errors, self.seconds = errors, seconds
        self.count = 0
        self.since: float | None = None
        self.last = ""

    def success(self) -> None:
        self.count, self.since = 0, None

    def failure(self, started: float, error: str) -> bool:
        """Count one failed attempt that began at ``started`` (time.monotonic); True = stop."""
        self.count += 1
        self.since = started if self.since is None else min(self.since, started)
        self.last = error
        return (self.errors > 0 and self.count >= self.errors
                and self.elapsed() >= self.seconds)

    def elapsed(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


class ChatClient:
    """Chat completions from one endpoint with concurrency, retries, a request cache and stats.

    ``section`` names the settings in messages (``captions``, ``augment``). ``on_retry`` is
    called before each retry's wait with a ``RetryEvent``; a progress bar can show it, and a
    callback that raises stops that request. ``FailFast`` (the ``fail_after_*`` settings) raises
    ``StageFailed`` from the attempt that shows the endpoint is dead or hanging.
    """

    def __init__(self, settings: LLMSettings, cache: RequestCache | None, *, section: str,
                 offline_hint: str = "", on_retry: Callable[[RetryEvent], None] | None = None):
        self.openai = require("openai")
        self.tenacity = require("tenacity")
        self.settings = settings
        self.cache = cache
        self.section = section
        self.on_retry = on_retry
        self.stats = RequestStats()
        self.fail_fast = FailFast(settings.fail_after_errors, settings.fail_after_s)
        self.key = api_key(settings, section, offline_hint)
        self._client = None
        self._sem: asyncio.Semaphore | None = None

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def endpoint(self) -> str:
        return self.settings.base_url or DEFAULT_ENDPOINT

    def payload(self, messages: list[dict]) -> dict:
        s = self.settings
        return {"model": s.model, "messages": messages, "temperature": s.temperature,
                "max_tokens": s.max_tokens}

    async def __aenter__(self) -> ChatClient:
        self._client = self.openai.AsyncOpenAI(
            api_key=self.key, base_url=self.settings.base_url, timeout=self.settings.timeout,
            max_retries=0,  # tenacity retries (see the module docstring)
        )
        self._sem = asyncio.Semaphore(self.settings.concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def complete(self, messages: list[dict], sample: object) -> dict | None:
        """The reply for (messages, sample) from the cache or the endpoint; None if it failed.

        A reply is ``{content, finish_reason, model, usage}``; ``sample`` tells apart requests
        with the same payload (batch number, pair id) so each gets its own cached answer.
        """
        if self._sem is None:
            raise RuntimeError("use ChatClient inside 'async with'")
        payload = self.payload(messages)
        # the endpoint is part of the key: another server with the same model name is not a hit
        key = RequestCache.key({**payload, "base_url": self.settings.base_url}, sample)
        hit = self.cache.get(key) if self.cache is not None else None
        if hit is not None:
            self.stats.cached += 1
            self.stats.usage_cached.update(hit.get("usage") or {})
            return hit
        async with self._sem:
            reply = await self._request(payload)
        if reply is not None:
            self.stats.usage.update(reply["usage"])
            if self.cache is not None:
                self.cache.put(key, reply)
        return reply

    async def complete_in_order(self, requests: Sequence[tuple[list[dict], object]]
                                ) -> AsyncIterator[dict | None]:
        """Replies to (messages, sample) requests in their order, asked concurrently."""
        tasks = [asyncio.ensure_future(self.complete(m, s)) for m, s in requests]
        try:
            for task in tasks:
                yield await task
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _request(self, payload: dict) -> dict | None:
        t, s = self.tenacity, self.settings
        retrying = t.AsyncRetrying(
            stop=t.stop_after_attempt(s.max_retries + 1), wait=self._wait,
            retry=t.retry_if_exception_type(Retryable), before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            return await retrying(self._attempt, payload)
        except Retryable as exc:
            self.stats.failed += 1
            self.stats.errors.append(f"gave up after {s.max_retries + 1} attempts ({exc.error})")
            return None

    def _wait(self, state) -> float:
        """retry_backoff·2^(attempt-1), at least the server's Retry-After, capped at
        max_backoff, plus up to 10% jitter so clients that failed together do not retry so."""
        s = self.settings
        backoff = self.tenacity.wait_exponential(multiplier=s.retry_backoff, max=s.max_backoff)
        asked = getattr(state.outcome.exception(), "retry_after", 0.0)
        return min(s.max_backoff, max(backoff(state), asked)) * random.uniform(1.0, 1.1)

    def _before_retry(self, state) -> None:
        exc = state.outcome.exception()
        self.stats.retries += 1
        self.stats.retry_reasons[exc.reason] += 1
        if self.on_retry is not None:
            wait = state.next_action.sleep if state.next_action else 0.0
            self.on_retry(RetryEvent(exc.reason, state.attempt_number, wait, exc.error))

    async def _attempt(self, payload: dict) -> dict:
        """One HTTP request, fed to ``FailFast``: the reply, a Retryable, or StageFailed when
        the endpoint has been failing for too long."""
        started = time.monotonic()
        try:
            reply = await self._call(payload)
        except Retryable as exc:
            if exc.endpoint_down and self.fail_fast.failure(started, exc.error):
                raise self._endpoint_down() from None
            raise
        self.fail_fast.success()
        return reply

    def _not_json(self, text: str) -> str:
        """What a reply that is not JSON was: an HTML page (a proxy's, a login page: the
        base URL is not an OpenAI-compatible API), else its first characters."""
        url = self.settings.base_url or "api.openai.com"
        head = " ".join(text.split())
        if head[:1] == "<" and "html" in head[:200].lower():
            title = re.search(r"<title[^>]*>(.*?)</title>", head, re.IGNORECASE)
            what = f"an HTML page{f' ({title.group(1).strip()[:80]!r})' if title else ''}"
        else:
            what = f"a reply that is not JSON ({head[:80]!r})"
        return (f"{what} instead of a chat completion from {url}; set {self.section}.base_url "
                "to the OpenAI-compatible API (it usually ends in /v1)")

    def _endpoint_down(self) -> StageFailed:
        f, sec = self.fail_fast, self.section
        return StageFailed(
            f"{sec}: the endpoint {self.endpoint} failed {f.count} attempts in a row over "
            f"{f.elapsed():.1f} s (last error: {f.last}); stopped early instead of retrying every "
            f"request ({sec}.fail_after_errors={f.errors}, {sec}.fail_after_s={f.seconds:g}); "
            "nothing lost; run the same command again once the endpoint answers (replies "
            "already received are reused from the cache)"
        )

    async def _call(self, payload: dict) -> dict:
        """One HTTP request: the reply, a Retryable, or a DsbuildError saying what to fix."""
        resp = await self._send(self._client.chat.completions.create, payload)
        if isinstance(resp, str):  # the SDK hands back the text of a reply that is not JSON
            raise Retryable("bad_response", error=self._not_json(resp))
        if not getattr(resp, "choices", None):  # JSON, but not a chat completion: never cached
            raise Retryable("bad_response", error="a JSON reply that is not a chat completion")
        return _reply(resp)

    async def _send(self, create, payload: dict, api: str = "chat completions"):
        """``create(**payload)``, counted as sent: the SDK's reply, or its error as a
        Retryable or a DsbuildError saying what to fix (shared by every client of this
        module; ``api`` names the endpoint's API in messages)."""
        o, s = self.openai, self.settings
        self.stats.sent += 1
        try:
            return await create(**payload)
        except o.APITimeoutError:
            raise Retryable("timeout", error=f"no reply within {s.timeout:g} s") from None
        except o.APIConnectionError as exc:
            raise Retryable("connection", error=f"connection failed: {_root_cause(exc)}") from None
        except o.APIStatusError as exc:
            code = exc.status_code
            if code in (401, 403):
                raise DsbuildError(
                    f"the endpoint refused the API key (HTTP {code}); check the environment "
                    f"variable {s.api_key_env}"
                ) from None
            if code == 404:
                raise DsbuildError(
                    f"the endpoint has no model {s.model!r} or no {api} API "
                    f"(HTTP 404 at {s.base_url or 'api.openai.com'}); set {self.section}.model / "
                    f"{self.section}.base_url"
                ) from None
            if code not in RETRY_STATUS and code < 500:
                raise DsbuildError(
                    f"the endpoint rejected the request (HTTP {code}): {exc.message}"
                ) from None
            raise Retryable(str(code), _retry_after(exc),
                            f"HTTP {code}: {str(exc.message)[:200]}") from None
        except (o.APIError, ValueError):  # a body that is not JSON (a proxy's HTML page)
            raise Retryable("bad_response", error="a reply that is not JSON") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause of an SDK error ("[Errno 111] Connection refused"), for messages."""
    seen = exc
    for _ in range(20):  # chains are short; the bound only guards against a cycle
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    return str(seen) or type(seen).__name__


def _retry_after(exc) -> float:
    """Seconds a server asked us to wait (Retry-After header), 0 when absent."""
    try:
        return float(exc.response.headers.get("retry-after", 0) or 0)
    except (AttributeError, TypeError, ValueError):
        return 0.0


def _reply(resp) -> dict:
    """The cacheable part of a chat completion: text, finish reason, model, token usage."""
    choice = resp.choices[0]
    content = (choice.message.content if choice.message else None) or ""
    usage = {}
    if resp.usage is not None:
        usage = {k: int(getattr(resp.usage, k, 0) or 0) for k in USAGE_KEYS}
    return {"content": content, "finish_reason": getattr(choice, "finish_reason", None),
            "model": resp.model, "usage": usage}
