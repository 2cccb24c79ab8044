"""Prompt-to-Prompt's settings: the P2P mode, its sweep and local blend.

They sit at the top of the ``generate`` section (``generate.mode``, ``generate.sweep``, ...) as
they did before generate had other generators, so builds made then keep their settings and
signatures; :class:`dsbuild.generate.settings.GenerateSettings` inherits them.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dsbuild.core.settings import StageSettings
from dsbuild.core.settings.localize import SegmenterSettings

Range = tuple[float, float]


class P2PSettings(StageSettings):
    """How Prompt-to-Prompt edits the source: mode, sweep ranges or grid, local blend."""

    scheduler: Literal["ddim", "euler_ancestral", "euler", "lcm", "dpmsolver++"] = Field(
        "euler_ancestral", description="diffusers scheduler (euler: SDXL-Lightning; lcm: "
        "LCM-distilled models; Turbo checkpoints ship euler_ancestral)")
    mode: Literal["self", "replace", "refine", "reweight", "auto"] = "self"
    sweep: Literal["random", "grid"] = "random"
    # random sweep ranges (InstructPix2Pix: p ~ U[0.1, 0.9], guidance ~ U[7.5, 15])
    self_replace: Range = (0.1, 0.9)
    guidance: Range = (7.5, 15.0)
    cross_replace: Range = (0.4, 0.9)
    reweight: Range = (1.0, 3.0)
    # grid sweep values (seeds vary fastest last: every combination per seed)
    grid_self_replace: list[float] = Field(default_factory=lambda: [0.3, 0.5, 0.7])
    grid_guidance: list[float] = Field(default_factory=lambda: [7.5, 10.0])
    grid_cross_replace: list[float] = Field(default_factory=lambda: [0.8])
    grid_reweight: list[float] = Field(default_factory=lambda: [2.0])
    # local blend on the words that change between the captions
    blend: bool = False
    blend_threshold: float = Field(0.3, gt=0, lt=1)
    blend_start: float = Field(0.2, ge=0, le=1)
    blend_mask: Literal["attention", "segment"] = Field(
        "attention", description="attention: the words' accumulated cross-attention maps; "
        "segment: the source's blend words segmented (CLIPSeg, or detector boxes + SAM) in its "
        "predicted image at blend_start, kept for the remaining steps")
    # blend_mask=segment: the segmenter's fields, their defaults from SegmenterSettings
    segmenter: str = SegmenterSettings.model_fields["segmenter"]
    segment_threshold: float = SegmenterSettings.model_fields["threshold"]
    detector: str = SegmenterSettings.model_fields["detector"]
    sam_model: str = SegmenterSettings.model_fields["sam_model"]
    box_threshold: float = SegmenterSettings.model_fields["box_threshold"]
    # triples made from a real photo (sources/): how its latent is inverted (invert.py)
    inversion: Literal["negative-prompt", "null-text"] = Field(
        "negative-prompt", description="P2P on a real photo: negative-prompt (the caption's "
        "embedding as the unconditional one: one extra pass per photo) or null-text (the "
        "unconditional embedding optimised per step, up to 10 forward+backward passes each, "
        "per photo and guidance); cached per photo")

    def p2p_signature(self, data: dict) -> dict:
        """Attention blend (the default) signs as it did before segmented blend existed, so
        builds made then keep their generate markers; the segment settings sign only when
        used (and then only with generate.blend=true), the boxes + SAM ones only with
        segmenter=sam; the default inversion signs nothing (a build without photos signs as
        before)."""
        segment = self.blend and self.blend_mask == "segment"
        if data.get("inversion") == "negative-prompt":  # the default signs as before it existed
            data.pop("inversion")
        if not segment:
            for key in ("blend_mask", "segmenter", "segment_threshold"):
                data.pop(key, None)
        if not (segment and self.segmenter == "sam"):
            for key in ("detector", "sam_model", "box_threshold"):
                data.pop(key, None)
        return data

    @field_validator("self_replace", "cross_replace")
    @classmethod
    def _fraction(cls, v: Range) -> Range:
        if not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("expected [low, high] with 0 <= low <= high <= 1")
        return v

    @model_validator(mode="after")
    def _windows_have_steps(self):
        """Step windows are fractions of the run (``int(fraction * steps)`` steps, so 0.5 of 2
        steps is 1). Refuse a window that rounds to no step at all, which makes pairs with no
        edit: a grid value, or a range whose every value does (its high end); few-step models
        (1-4 steps) meet this first. A range's low values below one step make some pairs
        without that window, as a low p does in InstructPix2Pix's sweep."""
        steps = getattr(self, "steps", None)
        if steps is None or getattr(self, "generator", "p2p") != "p2p":
            return self
        kind = "self" if self.mode == "self" else "cross"
        if self.sweep == "grid":
            name = f"grid_{kind}_replace"
            value = min(getattr(self, name), default=1.0)
        else:
            name = f"{kind}_replace"
            value = getattr(self, name)[1]
        if int(value * steps) < 1:
            least = math.ceil(1000 / steps) / 1000
            raise ValueError(
                f"generate.{name}: a {kind}-attention window of {value:g} of {steps} step"
                f"{'s' if steps != 1 else ''} rounds to 0 steps, so its pairs would not be "
                f"edited; use {name}" + (f" >= {least:g}" if self.sweep == "grid" else
                                         f"=[low, high] with high >= {least:g}")
                + " or more generate.steps")
        return self

    @field_validator("guidance", "reweight")
    @classmethod
    def _ordered(cls, v: Range) -> Range:
        if v[0] > v[1]:
            raise ValueError("expected [low, high] with low <= high")
        return v
