"""Settings of the filter stage (CLIP/DINO scoring, thresholds, top-k)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dsbuild.settings import StageSettings


class FilterSettings(StageSettings):
    volatile: ClassVar[frozenset[str]] = frozenset({"device", "batch_size"})

    clip_model: str = "ViT-L-14"
    clip_pretrained: str = "openai"
    dino: bool = False
    dino_model: str = "facebook/dinov2-base"
    clip_sim_0: float = 0.2
    clip_sim_1: float = 0.2
    clip_sim_dir: float = 0.2
    clip_sim_image: float = 0.7
    top_k: int = Field(4, ge=1)
    batch_size: int = Field(32, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
