"""Settings of a localized edit and of the segmenter that finds its region.

Plain pydantic models (no heavy import: the CLI builds them before torch loads). They sit in
core because three layers read them: the LIME processors (attention), the P2P generator's
segmented blend mask (generate) and ``edit``/``eval`` (localize). :class:`SegmenterSettings`
is the one home of the segmenter defaults; the generate stage's ``segment_threshold`` and the
``--mask-threshold`` option both take theirs from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsbuild.core import model_ids as ids
from dsbuild.core.errors import DsbuildError

DEFAULT_SEGMENTER = ids.CLIPSEG
SAM_SEGMENTER = "sam"  # the segmenter value that selects detector boxes + SAM
DEFAULT_DETECTOR = ids.OWL
DEFAULT_SAM = ids.SAM
SEGMENT_THRESHOLD = 0.4  # CLIPSeg probability above which a pixel is the referred object
BOX_THRESHOLD = 0.2  # detector score above which a box is segmented
LAYER_GROUPS = ("down", "mid", "up")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RegularisationSettings(_Settings):
    """How strongly, when and where the penalty applies."""

    alpha: float = Field(10000.0, description="penalty on unrelated tokens' cross-attention "
                         "logits in the mask (LIME's 'large value': they get ~0 weight)")
    start: float = Field(0.0, description="fraction of the steps before the penalty starts")
    end: float = Field(1.0, description="fraction of the steps after which it stops")
    layers: tuple[str, ...] = Field(LAYER_GROUPS, description="UNet parts whose "
                                    "cross-attention carries the penalty")

    def check(self) -> None:
        """Refuse values the controller cannot use (named by their option's idea)."""
        if self.alpha < 0:
            raise DsbuildError(f"localize alpha must be >= 0 (got {self.alpha})")
        if not 0 <= self.start <= self.end <= 1:
            raise DsbuildError(f"localize window: need 0 <= start <= end <= 1 (got "
                               f"{self.start}, {self.end})")
        bad = [g for g in self.layers if g not in LAYER_GROUPS]
        if bad or not self.layers:
            raise DsbuildError(f"localize layers: choose from {', '.join(LAYER_GROUPS)} "
                               f"(got {', '.join(self.layers) or 'none'})")


class SegmenterSettings(_Settings):
    """Which model segments the referred object, and where its mask is cut."""

    segmenter: str = Field(DEFAULT_SEGMENTER, description="CLIPSeg checkpoint, 'tiny', or "
                           "'sam' (detector boxes + SAM)", json_schema_extra={"loads": "clipseg"})
    threshold: float = Field(SEGMENT_THRESHOLD, gt=0, lt=1, description="CLIPSeg probability "
                             "above which a pixel is the object")
    detector: str = Field(DEFAULT_DETECTOR, description="with segmenter sam: OWLv2/OWL-ViT "
                          "checkpoint boxing the object, or 'tiny'",
                          json_schema_extra={"loads": "owl"})
    sam_model: str = Field(DEFAULT_SAM, description="with segmenter sam: SAM checkpoint "
                           "segmenting each box, or 'tiny'", json_schema_extra={"loads": "sam"})
    box_threshold: float = Field(BOX_THRESHOLD, ge=0, le=1, description="with segmenter sam: "
                                 "detector score above which a box is segmented (none: empty "
                                 "mask, nothing edited)")


class LocalizeSettings(SegmenterSettings):
    """Where the region comes from and how the penalty applies."""

    regularisation: RegularisationSettings = Field(default_factory=RegularisationSettings)
    # eval only: where the penalty goes, "referred" (the instruction's object segmented) or
    # "truth" (the data's edit_mask column: the P2P local-blend mask the pair was made with)
    region: Literal["referred", "truth"] = Field(
        "referred", description="with --localize: the penalty's region, the referred object "
        "segmented or the data's edit_mask (P2P blend mask, ground truth)")
