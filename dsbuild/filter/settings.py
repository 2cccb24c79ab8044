"""Settings of the filter stage (CLIP/DINO scoring, thresholds, top-k); see docs/filter.md."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from dsbuild.core import model_ids as ids
from dsbuild.core.settings import StageSettings

# the scores with a minimum, in InstructPix2Pix's check order (the first one failed is the reason)
THRESHOLDS: tuple[str, ...] = ("clip_sim_image", "clip_sim_dir", "clip_sim_0", "clip_sim_1")

# a cosine is never below -1, so a minimum at -1 (or lower) passes every pair: that is "off"
OFF = -1.0


def threshold_off(minimum: float | None) -> bool:
    """Whether a threshold passes every pair (None, or a cosine minimum at or below -1)."""
    return minimum is None or minimum <= OFF


class FilterSettings(StageSettings):
    """InstructPix2Pix's filter: thresholds on four CLIP scores, then top k per triple."""

    volatile: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "workers"})

    clip_model: str = Field(ids.CLIP, description="open_clip name, 'hf-hub:…', "
                            "'local-dir:…', or 'tiny' (random built-in, placeholder scores)",
                            json_schema_extra={"loads": "clip"})
    clip_pretrained: str = Field(ids.CLIP_PRETRAINED, description="open_clip tag, a "
                                 "checkpoint file, or 'none' for random weights",
                                 json_schema_extra={"loads": "clip_pretrained"})
    clip_preprocess: Literal["openclip", "ip2p"] = Field(
        "openclip", description="CLIP image preprocessing: openclip (the model's resize + "
        "centre crop) or ip2p (InstructPix2Pix's metric: bicubic tensor resize, no crop)")
    dino: bool = Field(False, description="also score DINOv2 CLS cosine of the two images")
    dino_model: str = Field(ids.DINO, description="transformers Hub id, a "
                            "local folder, or 'tiny'", json_schema_extra={"loads": "dino"})
    clip_sim_0: float = Field(0.2, description="min cos(image 0, input caption); -1: off")
    clip_sim_1: float = Field(0.2, description="min cos(image 1, output caption); -1: off")
    clip_sim_dir: float = Field(0.2, description="min cos(image change, caption change); "
                                "-1: off")
    clip_sim_image: float = Field(0.7, description="min cos(image 0, image 1); -1: off")
    dino_min: float | None = Field(None, description="min DINO cosine (None: not a filter)")
    top_k: int = Field(4, ge=1, description="pairs kept per triple, best clip_sim_dir first")
    batch_size: int = Field(32, ge=1)
    workers: int = Field(4, ge=0, description="threads that decode and preprocess images")
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    def signature_dict(self) -> dict[str, Any]:
        """``clip_preprocess`` signs only when changed: builds made before keep theirs."""
        data = super().signature_dict()
        if self.clip_preprocess == "openclip":
            data.pop("clip_preprocess")
        return data
