"""Settings of the diversity report (``dsbuild report diversity``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from dsbuild.core.settings import StageSettings

TEXT_FIELDS = ("input", "edit", "output")


class DiversitySettings(StageSettings):
    fields: list[Literal["input", "edit", "output"]] = Field(
        default_factory=lambda: list(TEXT_FIELDS), min_length=1,
        description="triple text fields to measure",
    )
    ngram: int = Field(3, ge=1, description="n of the most-repeated n-grams")
    top_ngrams: int = Field(10, ge=1, description="how many repeated n-grams to list per field")
    mtld_threshold: float = Field(
        0.72, gt=0, lt=1, description="MTLD factor threshold (McCarthy & Jarvis 2010: 0.72)"
    )
    min_tokens_mtld: int = Field(
        100, ge=1, description="below this many tokens a corpus gets an 'MTLD unstable' warning"
    )
    semantic_sample: int = Field(
        2000, ge=2, description="most values per field embedded for semantic diversity"
    )
    seed: int = Field(0, description="seed of the semantic sample")

    @field_validator("fields")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("fields must not repeat")
        return v
