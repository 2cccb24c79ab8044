"""Settings of an OpenAI-compatible endpoint, shared by every stage that asks an LLM.

Captions and augment each subclass this (``captions.*``, ``augment.*``), so both name the same
knobs the same way and ``dsbuild.llm.ChatClient`` reads one model. How requests are sent
(concurrency, timeout, retries) does not change what a stage writes, so it skips the signature.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dsbuild.settings import StageSettings

TRANSPORT = frozenset({"concurrency", "timeout", "max_retries", "retry_backoff", "max_backoff"})


class LLMSettings(StageSettings):
    volatile: ClassVar[frozenset[str]] = TRANSPORT

    # OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp ...)
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var with the key")
    temperature: float = Field(1.0, ge=0, le=2)
    max_tokens: int = Field(1024, ge=16)
    concurrency: int = Field(8, ge=1, description="requests in flight at once")
    max_retries: int = Field(5, ge=0)
    timeout: float = Field(60.0, gt=0, description="seconds per request before a retry")
    retry_backoff: float = Field(
        1.0, ge=0, description="first retry waits this long (s); each next one twice as long"
    )
    max_backoff: float = Field(60.0, ge=0, description="longest wait between two retries (s)")
