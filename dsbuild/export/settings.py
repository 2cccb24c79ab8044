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
    input_image: Literal["photo", "reconstruction"] = Field(
        "photo", description="rows made from a real photo by P2P through inversion: their "
        "input_image is the photo itself, or its reconstruction (the inverted source branch)")
    session_cut: Literal["prefix", "whole"] = Field(
        "prefix", description="multi-turn sessions: prefix = a failed or rejected turn drops "
        "itself and its subtree, the turns before it stay; whole = a session run is exported "
        "only when every turn passes")
    edit_prompt: Literal["generated", "recaptioned"] = Field(
        "generated", description="the instruction a row's edit_prompt shows: the one the "
        "captions stage wrote, or verify's re-caption of what actually changed where there is "
        "one (verify.recaption); the other stays in edit_prompt_generated / "
        "edit_prompt_recaptioned, and a curator's correction wins over both")

    def signature_dict(self) -> dict:
        data = super().signature_dict()
        # the defaults sign as before they existed
        for key, default in (("input_image", "photo"), ("session_cut", "prefix"),
                             ("edit_prompt", "generated")):
            if data.get(key) == default:
                data.pop(key)
        return data
