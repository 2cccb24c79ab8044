"""Settings of the sources stage (``sources.*``): where the photos come from, how they are fitted
to the generation size, which are refused, and the VLM that captions photos given none."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsbuild.llm.settings import LLMSettings

FITS = ("center-crop", "resize", "pad")
ORIGINS = ("path", "dataset", "fiftyone")
CAPTION_PROMPT = (
    "Describe this photo in one dense sentence of at most 40 words, as a caption for an "
    "image-generation model: the kind of room or scene, its main objects with their colours, "
    "materials and places, and the light. Answer with the caption only."
)


class SourcesSettings(LLMSettings):
    """Real photos the build starts from: a folder, a datasets folder or Hub id, or a FiftyOne
    dataset (one of them turns the stage on; none: the stage is off and the build is synthetic).
    The VLM endpoint settings (model, base_url, ...) caption photos without a caption when
    ``vlm`` is on or ``base_url`` is set."""

    path: str | None = Field(None, description="a folder of photos (optional captions.jsonl "
                             "sidecar: image, caption, license, source, attribution per line)")
    dataset: str | None = Field(None, description="a datasets folder (save_to_disk) or Hub id "
                                "with an image column")
    split: str = Field("train", description="the split of sources.dataset to read")
    image_column: str = Field("image", description="sources.dataset's image column")
    caption_column: str | None = Field(
        None, description="sources.dataset's (or the FiftyOne dataset's) caption column/field")
    fiftyone: str | None = Field(None, description="a FiftyOne dataset name (its samples' "
                                 "filepath; caption_column, license, attribution fields)")
    license: str | None = Field(None, description="license of photos whose sidecar line or "
                                "row gives none (None: unknown)")
    source: str | None = Field(None, description="provenance label of photos that give none "
                               "(default: the folder, dataset or FiftyOne dataset named)")
    fit: Literal["center-crop", "resize", "pad"] = Field(
        "center-crop", description="how a photo meets generate.width x generate.height: "
        "center-crop (scale to cover, crop the middle), resize (stretch), pad (scale to fit, "
        "pad with black)")
    small: Literal["skip", "error"] = Field(
        "skip", description="a photo smaller than the generation size: skip (counted and "
        "named in the report) or error (the stage stops, naming the file)")
    phash_distance: int = Field(
        4, ge=-1, le=64, description="near-duplicates: a photo whose 64-bit DCT perceptual "
        "hash is within this Hamming distance of a kept photo's is dropped (-1: keep them)")
    require_license: bool = Field(False, description="refuse photos of unknown license "
                                  "(counted and named in the report)")
    vlm: bool = Field(False, description="caption photos that have no caption with the VLM "
                      "at sources.base_url / sources.model (also on when base_url is set)")
    prompt: str = Field(CAPTION_PROMPT, description="what the VLM is asked for each photo")
    max_tokens: int = Field(200, ge=16)
    temperature: float = Field(0.0, ge=0, le=2)

    @model_validator(mode="after")
    def _one_origin(self):
        given = [k for k in ORIGINS if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one photo source, not {' and '.join(f'sources.{k}' for k in given)}")
        return self

    @property
    def origin(self) -> str | None:
        """Which of path / dataset / fiftyone is set (None: the stage is off)."""
        return next((k for k in ORIGINS if getattr(self, k)), None)

    @property
    def captions_with_vlm(self) -> bool:
        return self.vlm or self.base_url is not None


def active(config) -> bool:
    """Whether a build runs the sources stage: it names photos (``Stage.active``)."""
    return config.stage_settings("sources").origin is not None


def check_config(config) -> None:
    """Before a config is saved (``Stage.check``): a photo folder that is not there is refused."""
    from pathlib import Path

    from dsbuild.core.errors import DsbuildError

    s = config.stage_settings("sources")
    if s.path is not None and not Path(s.path).expanduser().is_dir():
        raise DsbuildError(f"sources.path: {s.path} is not a folder of photos")
