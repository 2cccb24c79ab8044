"""Settings of the generate stage (Prompt-to-Prompt on Stable Diffusion)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dsbuild.settings import StageSettings


class GenerateSettings(StageSettings):
    volatile: ClassVar[frozenset[str]] = frozenset({"device", "batch_size"})

    model: str = Field("tiny", description="diffusers SD 1.x/2.x dir or Hub id, or 'tiny'")
    scheduler: Literal["ddim", "euler_ancestral", "dpmsolver++"] = "euler_ancestral"
    steps: int = Field(50, ge=1)
    height: int = Field(512, ge=8)
    width: int = Field(512, ge=8)
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: str = "auto"
    batch_size: int = Field(8, ge=1)
    mode: Literal["self", "replace", "refine", "reweight", "auto"] = "self"
    sweep: Literal["random", "grid"] = "random"
    samples_object: int = Field(30, ge=1)
    samples_room: int = Field(50, ge=1)
    seed: int = 0
