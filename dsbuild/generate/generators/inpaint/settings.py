"""The inpaint generator's own settings, the ``generate.inpaint`` section: which triples it
edits, how the region's mask is found and grown, whether the outside is pasted back, where a
synthetic source comes from, and the sweep over seeds, guidance and strength.

The mask: the phrases the instruction refers to (``dsbuild.core.referring``: "remove the lamp"
-> lamp, "replace the sofa with ..." -> sofa, "add a vase on the table" -> table) segmented on
the source image by the segmenter (CLIPSeg, or ``sam``: detector boxes + SAM), grown by
``dilate`` pixels. Where no phrase is named ("add a plant") or the segmenter finds nothing,
the mask is ``default_region`` (a box in fractions of the image), and the pair records
``mask_from: default``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from dsbuild.core.errors import DsbuildError
from dsbuild.core.settings.localize import SegmenterSettings
from dsbuild.generate.generators.source import SourceGuidance, SourceSteps

Range = tuple[float, float]
OPERATIONS = ("add", "remove", "replace", "change")

# pipeline class -> default knobs: random ranges and grid values
KNOBS: dict[str, dict] = {
    "StableDiffusionInpaintPipeline": {"guidance": (5.0, 9.0), "strength": (0.85, 1.0),
                                       "grid_guidance": [5.0, 7.5, 9.0],
                                       "grid_strength": [0.9, 1.0]},
    "StableDiffusionXLInpaintPipeline": {"guidance": (5.0, 9.0), "strength": (0.85, 0.99),
                                         "grid_guidance": [5.0, 7.5, 9.0],
                                         "grid_strength": [0.9, 0.99]},
    "FluxFillPipeline": {"guidance": (20.0, 40.0), "strength": (1.0, 1.0),
                         "grid_guidance": [20.0, 30.0, 40.0], "grid_strength": [1.0]},
    "FluxKontextInpaintPipeline": {"guidance": (2.0, 4.0), "strength": (0.85, 1.0),
                                   "grid_guidance": [2.0, 2.5, 3.5],
                                   "grid_strength": [0.9, 1.0]},
}


class InpaintSettings(SegmenterSettings):
    """``generate.inpaint.*``: the region, the source image, the sweep."""

    segmenter: str | None = Field(
        None, description="CLIPSeg checkpoint, 'tiny', or 'sam' (detector boxes + SAM) that "
        "segments the edit's region; default: 'tiny' with a tiny inpainting model, else "
        "CLIPSeg", json_schema_extra={"loads": "clipseg"})
    operations: list[Literal["add", "remove", "replace", "change"]] = Field(
        ["add", "remove", "replace"], min_length=1, description="triple operations this "
        "generator makes pairs of (others get none)")
    dilate: int = Field(8, ge=0, description="pixels the segmented mask is grown by, so the "
                        "repainted region covers the object's edge and shadow")
    default_region: tuple[float, float, float, float] = Field(
        (0.25, 0.25, 0.75, 0.75), description="mask where no phrase is named or none is "
        "found: a box [x0, y0, x1, y1] in fractions of the image")
    composite: bool = Field(True, description="paste the source's pixels back outside the "
                            "mask, so they stay the photo's exactly (off: the pipeline's "
                            "output as it is, the VAE's round trip outside)")
    source_model: str | None = Field(
        None, description="text-to-image model that makes each source image of a triple "
        "without a photo from its input caption (SD 1.x/2.x folder or Hub id, or 'tiny'); "
        "default: 'tiny' with a tiny inpainting model, else SD 1.5")
    source_steps: SourceSteps = None
    source_guidance: SourceGuidance = 7.5
    sweep: Literal["random", "grid"] = "random"
    variants: int = Field(3, ge=1, description="random sweep: edits per source image (one "
                          "draw of the knobs each); the grid makes every combination")
    guidance: Range | None = Field(None, description="random sweep range of the guidance "
                                   "scale (default: the pipeline's, see KNOBS)")
    strength: Range | None = Field(None, description="random sweep range of strength (how "
                                   "far the region is noised; 1: from noise)")
    grid_guidance: list[float] | None = Field(None, min_length=1)
    grid_strength: list[float] | None = Field(None, min_length=1)

    @field_validator("guidance", "strength")
    @classmethod
    def _ordered(cls, v: Range | None) -> Range | None:
        if v is not None and v[0] > v[1]:
            raise ValueError("expected [low, high] with low <= high")
        return v

    @model_validator(mode="after")
    def _region(self) -> InpaintSettings:
        x0, y0, x1, y1 = self.default_region
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError("default_region: expected [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 "
                             "and 0 <= y0 < y1 <= 1")
        return self

    def knobs(self, pipeline: str) -> dict:
        """The sweep's ranges and grid values for ``pipeline`` (unset: the pipeline's own)."""
        base = KNOBS[pipeline]
        out = {k: (getattr(self, k) if getattr(self, k) is not None else base[k])
               for k in ("guidance", "strength", "grid_guidance", "grid_strength")}
        strengths = [*out["strength"], *out["grid_strength"]]
        if min(strengths) <= 0 or max(strengths) > 1:
            raise DsbuildError("generate.inpaint.strength / grid_strength: values must be in "
                               f"(0, 1] (got {min(strengths)}..{max(strengths)})")
        return out
