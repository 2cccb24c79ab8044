"""Settings of an OpenAI-compatible endpoint, shared by every stage that asks an LLM.

Captions and augment each subclass ``LLMSettings`` (``captions.*``, ``augment.*``), so both name the same
knobs the same way and ``dsbuild.llm.client.ChatClient`` reads one model. How requests are sent
(concurrency, timeout, retries, when to give up on a dead endpoint) does not change what a stage
writes, so it skips the signature.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dsbuild.core.settings import StageSettings

TRANSPORT = frozenset({"concurrency", "timeout", "max_retries", "retry_backoff", "max_backoff",
                       "fail_after_errors", "fail_after_s"})


class EndpointSettings(StageSettings):
    """An OpenAI-compatible endpoint and how requests go to it: what every client of
    :mod:`dsbuild.llm.client` reads (chat: :class:`LLMSettings`; image edits: generate.api)."""

    volatile: ClassVar[frozenset[str]] = TRANSPORT

    # OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp ...)
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var with the key")
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    max_retries: int = Field(5, ge=0)
    timeout: float = Field(60.0, gt=0, description="seconds per request before a retry")
    retry_backoff: float = Field(
        1.0, ge=0, description="first retry waits this long (s); each next one twice as long"
    )
    max_backoff: float = Field(60.0, ge=0, description="longest wait between two retries (s)")
    # fail fast: a dead or hanging endpoint stops the stage in about a minute, not an hour
    fail_after_errors: int = Field(
        5, ge=0, description="stop the stage after this many attempts in a row fail with a "
        "connection error, timeout or 5xx (0 = never; each request still retries)"
    )
    fail_after_s: float = Field(
        60.0, ge=0, description="... and only once that run of failures spans at least this "
        "many seconds (from the start of its first attempt)"
    )


class LLMSettings(EndpointSettings):
    """A chat endpoint: the endpoint's settings and how to sample."""

    temperature: float = Field(1.0, ge=0, le=2)
    max_tokens: int = Field(1024, ge=16)
