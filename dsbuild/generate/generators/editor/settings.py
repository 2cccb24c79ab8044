"""The editor generator's own settings, the ``generate.editor`` section: where the source
image comes from, and the sweep over seeds and the pipeline's guidance knobs.

Guidance means what the pipeline calls it: text guidance (``guidance_scale``) and image
guidance (``image_guidance_scale``) for InstructPix2Pix and SDXL InstructPix2Pix, the
embedded guidance of FLUX.1 Kontext (``guidance_scale``), the true CFG scale of
Qwen-Image-Edit (``true_cfg_scale``). Unset ranges take the pipeline's own (:data:`KNOBS`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dsbuild.core.errors import DsbuildError
from dsbuild.generate.generators.source import SourceGuidance, SourceSteps

Range = tuple[float, float]

# pipeline class -> (short name, default knobs: random ranges and grid values; None: no knob)
KNOBS: dict[str, dict] = {
    "StableDiffusionInstructPix2PixPipeline": {
        "family": "ip2p", "guidance": (5.0, 10.0), "image_guidance": (1.2, 2.0),
        "grid_guidance": [5.0, 7.5, 10.0], "grid_image_guidance": [1.2, 1.5, 2.0]},
    "StableDiffusionXLInstructPix2PixPipeline": {
        "family": "sdxl-ip2p", "guidance": (3.0, 7.5), "image_guidance": (1.2, 2.0),
        "grid_guidance": [3.0, 5.0, 7.5], "grid_image_guidance": [1.2, 1.5, 2.0]},
    "FluxKontextPipeline": {
        "family": "kontext", "guidance": (2.0, 4.0), "image_guidance": None,
        "grid_guidance": [2.0, 2.5, 3.5], "grid_image_guidance": None},
    "QwenImageEditPipeline": {
        "family": "qwen", "guidance": (3.0, 5.0), "image_guidance": None,
        "grid_guidance": [3.0, 4.0, 5.0], "grid_image_guidance": None},
}


class EditorSettings(BaseModel):
    """``generate.editor.*``: the source image, the sweep and its ranges or grid values."""

    model_config = ConfigDict(extra="forbid")

    source_model: str | None = Field(
        None, description="text-to-image model that makes each source image from the "
        "triple's input caption (SD 1.x/2.x folder or Hub id, or 'tiny'); default: 'tiny' "
        "with a tiny editor, else SD 1.5")
    source_steps: SourceSteps = None
    source_guidance: SourceGuidance = 7.5
    sweep: Literal["random", "grid"] = "random"
    variants: int = Field(3, ge=1, description="random sweep: edits per source image (one "
                          "draw of the knobs each); the grid makes every combination")
    guidance: Range | None = Field(None, description="random sweep range of the guidance "
                                   "knob (default: the pipeline's, see KNOBS)")
    image_guidance: Range | None = Field(None, description="random sweep range of image "
                                         "guidance (InstructPix2Pix only)")
    grid_guidance: list[float] | None = Field(None, min_length=1)
    grid_image_guidance: list[float] | None = Field(None, min_length=1)

    @field_validator("guidance", "image_guidance")
    @classmethod
    def _ordered(cls, v: Range | None) -> Range | None:
        if v is not None and v[0] > v[1]:
            raise ValueError("expected [low, high] with low <= high")
        return v

    def knobs(self, pipeline: str) -> dict:
        """The sweep's ranges and grid values for ``pipeline`` (unset: the pipeline's own);
        a knob the pipeline lacks, or a value it ignores, is one line naming the setting."""
        base = KNOBS[pipeline]
        out = {"family": base["family"]}
        for key in ("guidance", "image_guidance", "grid_guidance", "grid_image_guidance"):
            mine = getattr(self, key)
            if mine is not None and base[key] is None:
                raise DsbuildError(f"generate.editor.{key}: {pipeline} has no image guidance; "
                                   "unset it")
            out[key] = mine if mine is not None else base[key]
        if base["image_guidance"] is not None:  # the pipeline turns guidance off below these
            lows = [out["guidance"][0], *out["grid_guidance"]]
            if min(lows) <= 1.0:
                raise DsbuildError(f"generate.editor.guidance / grid_guidance: {pipeline} applies no guidance "
                                   f"at a text guidance <= 1 (got {min(lows)}); use values "
                                   "above 1")
            ilows = [out["image_guidance"][0], *out["grid_image_guidance"]]
            if min(ilows) < 1.0:
                raise DsbuildError(f"generate.editor.image_guidance / grid_image_guidance: {pipeline} needs image "
                                   f"guidance >= 1 (got {min(ilows)})")
        return out
