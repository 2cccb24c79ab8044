"""Settings of the captions stage (LLM agents or the offline template backend)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dsbuild.settings import StageSettings


class CaptionsSettings(StageSettings):
    volatile: ClassVar[frozenset[str]] = frozenset(
        {"concurrency", "timeout", "max_retries", "retry_backoff", "max_backoff"}
    )

    backend: Literal["auto", "template", "openai"] = Field(
        "auto", description="auto = openai when an endpoint is configured, else template"
    )
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="cap on triples per agent (demo builds)")
    count_scale: float = Field(1.0, gt=0, description="multiply every agent's target count")
    # OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, llama.cpp ...)
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var with the key")
    temperature: float = Field(1.0, ge=0, le=2)
    max_tokens: int = Field(1024, ge=16)
    per_request: int = Field(10, ge=1, le=100, description="triples asked for per request")
    concurrency: int = Field(8, ge=1)
    max_retries: int = Field(5, ge=0)
    timeout: float = Field(60.0, gt=0, description="seconds per request before a retry")
    retry_backoff: float = Field(
        1.0, ge=0, description="first retry waits this long (s); each next one twice as long"
    )
    max_backoff: float = Field(60.0, ge=0, description="longest wait between two retries (s)")
    max_rounds: int = Field(
        0, ge=0, description="request rounds per agent before giving up (0 = auto: 8)"
    )
    # validator
    max_changed_fraction: float = Field(
        0.6, gt=0, le=1, description="max share of output words that may differ from input"
    )
    max_diff_spans: int = Field(2, ge=1, description="max separate changed spans input→output")
