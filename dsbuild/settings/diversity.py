"""Settings of the diversity report."""

from __future__ import annotations

from pydantic import Field

from dsbuild.settings import StageSettings


class DiversitySettings(StageSettings):
    fields: list[str] = Field(default_factory=lambda: ["input", "edit", "output"])
    ngram: int = Field(3, ge=1)
    top_ngrams: int = Field(10, ge=1)
