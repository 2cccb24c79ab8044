"""Settings of export and push."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsbuild.core.settings import StageSettings


class PreferenceSettings(BaseModel):
    """`dsbuild export --preferences`: the (chosen, rejected) dataset (docs/export.md)."""

    model_config = ConfigDict(extra="forbid")
    max_per_group: int = Field(4, ge=1, description="pairs per group (one input image and "
                               "instruction): the group's best against each of the worst it beats")
    min_margin: float = Field(0.0, ge=0, description="smallest judge-score or clip_sim_dir "
                              "difference that makes a pair (review/verify margins are 1)")


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
    preferences: PreferenceSettings = Field(default_factory=PreferenceSettings)

    def signature_dict(self) -> dict:
        data = super().signature_dict()
        # the defaults sign as before they existed
        for key, default in (("input_image", "photo"), ("session_cut", "prefix"),
                             ("edit_prompt", "generated")):
            if data.get(key) == default:
                data.pop(key)
        data.pop("preferences", None)  # only the --preferences dataset reads it
        return data
