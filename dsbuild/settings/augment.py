"""Settings of the augment stage (no-change samples)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsbuild.settings import StageSettings


class AugmentSettings(StageSettings):
    ratio: float = Field(0.1, ge=0, le=1, description="no-change samples per kept pair")
    backend: Literal["template", "openai"] = "template"
    seed: int = 0
