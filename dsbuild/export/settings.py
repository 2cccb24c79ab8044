"""Settings of export and push."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dsbuild.core.settings import StageSettings


class ExportSettings(StageSettings):
    policy: Literal["kept", "accepted"] = Field(
        "kept", description="kept = filter's keep minus review rejects; accepted = only accepted"
    )
    no_change: bool = Field(True, description="include augment's no-change samples")
    license: str = "cc-by-4.0"
    language: str = Field("en", description="language code of the captions and instructions "
                          "(the card's `language`)")
    pretty_name: str | None = Field(None, description="dataset title (default: recipe name)")
    shard_mb: int = Field(400, ge=1, description="largest parquet shard, in MB")
    grid_pairs: int = Field(6, ge=0, description="sample pairs on the card's grid image")
    strict: bool = Field(False, description="stop at a missing or undecodable image instead "
                         "of dropping its row (counted in the export stats either way)")
