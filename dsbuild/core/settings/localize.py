"""Settings of a localized edit (no heavy import: the CLI builds them before torch loads)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dsbuild.core.errors import DsbuildError

DEFAULT_SEGMENTER = "CIDAS/clipseg-rd64-refined"
SAM_SEGMENTER = "sam"  # the segmenter value that selects detector boxes + SAM
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_SAM = "facebook/sam-vit-base"
LAYER_GROUPS = ("down", "mid", "up")


@dataclass
class RegularisationSettings:
    """How strongly, when and where the penalty applies."""

    alpha: float = 10000.0  # LIME's "large value": unrelated tokens get ~0 weight in the mask
    start: float = 0.0  # fraction of steps before the penalty starts
    end: float = 1.0  # fraction of steps after which it stops
    layers: tuple[str, ...] = LAYER_GROUPS  # cross-attention layers of these UNet parts

    def check(self) -> None:
        if self.alpha < 0:
            raise DsbuildError(f"localize alpha must be >= 0 (got {self.alpha})")
        if not 0 <= self.start <= self.end <= 1:
            raise DsbuildError(f"localize window: need 0 <= start <= end <= 1 (got "
                               f"{self.start}, {self.end})")
        bad = [g for g in self.layers if g not in LAYER_GROUPS]
        if bad or not self.layers:
            raise DsbuildError(f"localize layers: choose from {', '.join(LAYER_GROUPS)} "
                               f"(got {', '.join(self.layers) or 'none'})")


@dataclass
class LocalizeSettings:
    """Where the region comes from and how the penalty applies."""

    segmenter: str = DEFAULT_SEGMENTER  # CLIPSeg checkpoint, 'tiny', or 'sam' (boxes + SAM)
    threshold: float = 0.4  # CLIPSeg: probability above which a pixel is the referred object
    detector: str = DEFAULT_DETECTOR  # segmenter 'sam': OWLv2/OWL-ViT checkpoint, or 'tiny'
    sam_model: str = DEFAULT_SAM  # segmenter 'sam': SAM checkpoint, or 'tiny'
    box_threshold: float = 0.2  # segmenter 'sam': detector score above which a box counts
    regularisation: RegularisationSettings = field(default_factory=RegularisationSettings)
    # eval only: where the penalty goes, "referred" (the instruction's object segmented) or
    # "truth" (the data's edit_mask column: the P2P local-blend mask the pair was made with)
    region: str = "referred"


