"""Settings of the augment stage (no-change samples)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsbuild.llm.settings import LLMSettings


class AugmentSettings(LLMSettings):
    """The openai backend's endpoint settings (``model``, ``base_url``, retries ...) come from
    LLMSettings; augment has its own, so it never reads the captions stage's."""

    ratio: float = Field(0.1, ge=0, le=1, description="no-change samples per kept pair")
    backend: Literal["template", "openai"] = Field(
        "template", description="template: from the recipe's vocabulary; openai: an "
        "OpenAI-compatible LLM, each reply checked, the template as fallback"
    )
    seed: int = 0
    temperature: float = Field(0.9, ge=0, le=2)
    max_tokens: int = Field(120, ge=16)
