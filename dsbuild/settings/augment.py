"""Settings of the augment stage (no-change samples)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsbuild.settings import StageSettings


class AugmentSettings(StageSettings):
    ratio: float = Field(0.1, ge=0, le=1, description="no-change samples per kept pair")
    backend: Literal["template", "openai"] = Field(
        "template", description="template: from the recipe's vocabulary; openai: an "
        "OpenAI-compatible LLM, each reply checked, the template as fallback"
    )
    seed: int = 0
    # openai backend (retries and timeout are the captions settings')
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var with the key")
    temperature: float = Field(0.9, ge=0, le=2)
