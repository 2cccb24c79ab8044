"""Settings of the verify stage (detector checks per operation, near-copy bound, optional
vision-language judge); see docs/verify.md."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from dsbuild.core import model_ids as ids
from dsbuild.core.settings import StageSettings
from dsbuild.llm.rubric import Criterion, Rubric, resolve
from dsbuild.llm.settings import TRANSPORT, LLMSettings

DEFAULT_DETECTOR = ids.OWL


class JudgeSettings(LLMSettings):
    """A vision-language model asked to score each pair 0-10 on each item of a rubric
    (:mod:`dsbuild.llm.rubric`; default ``dsbuild``: the instruction was followed, nothing else
    changed, the edited image is sound), with weights, minimums and a threshold."""

    enabled: bool = Field(False, description="ask the judge (needs an endpoint that takes images)")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(300, ge=16)
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    image_side: int = Field(512, ge=64, description="longest side of the images sent (pixels)")
    rubric: str | list[Criterion] = Field(
        "dsbuild", description="a preset (dsbuild: instruction/preserve/quality with the *_min "
        "minimums; pico-banana: Pico-Banana-400K's weighted four items, threshold 0.7) or a "
        "list of criteria {name, description, weight, min}")
    threshold: float | None = Field(None, ge=0, le=1, description="min weighted rubric score "
                                    "in [0, 1] (unset: the preset's; 0 for own criteria)")
    instruction_min: int = Field(6, ge=0, le=10, description="min 'instruction followed' score")
    preserve_min: int = Field(6, ge=0, le=10, description="min 'nothing else changed' score")
    quality_min: int = Field(5, ge=0, le=10, description="min 'image quality' score")

    def resolved(self) -> Rubric:
        """The rubric these settings name (``dsbuild``'s minimums from the ``*_min`` fields)."""
        mins = {"instruction": self.instruction_min, "preserve": self.preserve_min,
                "quality": self.quality_min} if self.rubric == "dsbuild" else None
        return resolve(self.rubric, self.threshold, mins)
    optional: bool = Field(False, description="accept a judge that scores no pair (every "
                           "reply unusable): its pairs pass unchecked instead of the stage "
                           "failing")


class RecaptionSettings(LLMSettings):
    """After the checks, a vision-language model shown both images and the instruction writes
    the instruction that describes what actually changed (or says nothing changed)."""

    enabled: bool = Field(False, description="re-caption the pairs that passed verify (needs "
                          "an endpoint that takes images)")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(200, ge=16)
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    image_side: int = Field(512, ge=64, description="longest side of the images sent (pixels)")


class VerifySettings(StageSettings):
    """Per-operation detector checks, the change check, the near-copy bound and the judge."""

    volatile: ClassVar[frozenset[str]] = frozenset({"device", "batch_size", "workers"})

    detector: str = Field(DEFAULT_DETECTOR, description="OWLv2/OWL-ViT Hub id or folder, or "
                          "'tiny' (random, built from config: placeholder scores)",
                          json_schema_extra={"loads": "owl"})
    present_min: float = Field(0.2, ge=0, le=1, description="detector score at which a "
                               "target phrase counts as present")
    absent_max: float = Field(0.1, ge=0, le=1, description="... and at or below which it counts "
                              "as absent (in between: unsure, the check fails)")
    count_gain: bool = Field(True, description="add/remove also pass when the number of "
                             "detections grew/shrank although the thing was there before/after")
    nms_iou: float = Field(0.5, gt=0, le=1, description="boxes overlapping more are one thing")
    change_dir_min: float = Field(0.1, ge=-1, le=1, description="min CLIP direction of the "
                                  "detected region (image change vs caption change)")
    rest_min: float = Field(0.8, ge=-1, le=1, description="min DINO cosine of the two images "
                            "with the edited region painted out (the rest stayed)")
    near_copy_max: float = Field(0.995, ge=0, le=1, description="max pixel similarity "
                                 "(1 - mean absolute difference) of an edit pair; above it the "
                                 "output is a near copy of the input")
    preserve_min: float = Field(0.95, ge=0, le=1, description="photo pairs with an edit mask: "
                                "min pixel similarity (1 - mean absolute difference) of the "
                                "photo and the edited image outside the mask")
    clip_model: str = Field(ids.CLIP, description="open_clip model of the change check",
                            json_schema_extra={"loads": "clip"})
    clip_pretrained: str = Field(ids.CLIP_PRETRAINED,
                                 description="open_clip tag, checkpoint or 'none'",
                                 json_schema_extra={"loads": "clip_pretrained"})
    dino_model: str = Field(ids.DINO, description="DINOv2 of the change check",
                            json_schema_extra={"loads": "dino"})
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    recaption: RecaptionSettings = Field(default_factory=RecaptionSettings)
    batch_size: int = Field(16, ge=1)
    workers: int = Field(4, ge=0, description="threads that decode and preprocess images")
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    def signature_dict(self) -> dict[str, Any]:
        """The judge's transport settings never count, nor whether it may score nothing (the
        records are the same); a disabled judge counts not at all."""
        data = super().signature_dict()
        if self.preserve_min == type(self).model_fields["preserve_min"].default:
            data.pop("preserve_min")  # signs only when changed: builds made before keep theirs
        judge = self.judge.model_dump(mode="json")
        data["judge"] = ({k: v for k, v in judge.items() if k not in TRANSPORT | {"optional"}}
                         if self.judge.enabled else None)
        if data["judge"] is not None:  # the default rubric signs as before rubrics existed
            if data["judge"].get("rubric") == "dsbuild":
                data["judge"].pop("rubric")
            if data["judge"].get("threshold") is None:
                data["judge"].pop("threshold")
        if self.recaption.enabled:  # a disabled re-captioner signs not at all (builds before)
            data["recaption"] = {k: v for k, v in self.recaption.model_dump(mode="json").items()
                                 if k not in TRANSPORT}
        else:
            data.pop("recaption", None)
        return data
