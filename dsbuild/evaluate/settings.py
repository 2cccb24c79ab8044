"""Settings of ``dsbuild eval`` and ``dsbuild eval-generator`` (pydantic, no heavy import:
the CLI derives its options from them and builds them before torch loads)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from dsbuild.core import model_ids as ids
from dsbuild.core.settings import Precision, StageSettings
from dsbuild.core.settings.localize import LocalizeSettings
from dsbuild.llm.settings import LLMSettings

ClipPreprocess = Literal["openclip", "ip2p"]  # dsbuild.models.clip.PREPROCESS
PREPROCESS_HELP = ("CLIP image preprocessing: openclip (the model's resize + centre crop) or "
                   "ip2p (InstructPix2Pix's metric: bicubic tensor resize, no crop)")


class EvalSettings(StageSettings):
    """How edits are made and scored (defaults: InstructPix2Pix's guidance, its CLIP)."""

    renamed: ClassVar[dict[str, str]] = {"limit": "rows", "dtype": "precision"}

    split: str = Field("test", description="split of DATA to edit")
    guidance: float = Field(7.5, description="text guidance")
    image_guidance: list[float] = Field([1.5], min_length=1, description="image guidance; "
                                        "comma-separated values sweep (e.g. 1.0,1.2,1.5,1.8)")
    steps: int = Field(50, ge=1, description="denoising steps")
    seed: int = Field(0, description="row i uses seed+i")
    batch_size: int = Field(8, ge=1)
    resolution: int = Field(256, ge=8)
    rows: int | None = Field(None, ge=1, description="only the first N rows")
    clip_model: str = Field(ids.CLIP, description="open_clip name (as InstructPix2Pix), "
                            "'hf-hub:…', or 'tiny'")
    clip_pretrained: str = ids.CLIP_PRETRAINED
    clip_preprocess: ClipPreprocess = Field("openclip", description=PREPROCESS_HELP)
    dino_model: str = Field(ids.DINO, description="DINO Hub id (DINOv2, or DINO v1 such as "
                            "facebook/dino-vits16), folder, or 'tiny'")
    device: str = "auto"
    precision: Precision = Field(
        "auto", description="auto: fp16 on CUDA, fp32 elsewhere")
    turns: bool = Field(False, description="also follow each session turn by turn on the "
                        "model's own outputs and score every turn and each chain's final turn "
                        "against its ground truth (MagicBrush's multi-turn protocol)")
    # also edit every row with the LIME penalty on its referred region and score both runs
    # inside and outside it (dsbuild.localize.region)
    localize: LocalizeSettings | None = None
    # public suites (--suite; dsbuild.evaluate.suites): each has its own resolution and
    # backbones, replaced only where these are set
    suite_resolution: int | None = Field(None, ge=8, description="edit resolution of the "
                                         "public suites (default: each suite's own, 512)")
    suite_clip_model: str | None = Field(None, description="CLIP of every public suite "
                                         "(default: each suite's own; 'tiny' offline)")
    suite_clip_pretrained: str | None = None
    suite_dino_model: str | None = Field(None, description="DINO of every public suite "
                                         "(default: each suite's own; 'tiny' offline)")
    gedit_language: Literal["en", "cn", "all"] = Field(
        "en", description="GEdit-Bench instructions scored: en (GEdit-Bench-EN), cn or all")

    @property
    def main_image_guidance(self) -> float:
        return 1.5 if 1.5 in self.image_guidance else self.image_guidance[0]


class SuiteJudgeSettings(LLMSettings):
    """The vision-language judge of the judged suites (GEdit-Bench's VIEScore, ImgEdit-Bench's
    rubric): an OpenAI-compatible endpoint; pin a dated snapshot, the report records both the
    model asked for and the one the server says answered."""

    model: str = Field("gpt-4.1-2025-04-14", description="judge model (GEdit-Bench's is "
                       "GPT-4.1; pin a snapshot)")
    temperature: float = Field(0.0, ge=0, le=2)
    max_tokens: int = Field(300, ge=16)
    concurrency: int = Field(4, ge=1, description="requests in flight at once")
    # GEdit-Bench's images are already about 512x512 pixels of area (VIEScore's size): a
    # longest side of 1024 sends a wide one as it is instead of shrinking it again
    image_side: int = Field(1024, ge=64, description="longest side of the images sent (pixels)")


class GeneratorEvalSettings(StageSettings):
    """How images are sampled and scored (defaults: DreamBooth-like, InstructPix2Pix's CLIP)."""

    prompts: list[str] = Field([], description="extra context prompts")
    images_per_prompt: int = Field(4, ge=1)
    steps: int = Field(25, ge=1, description="denoising steps")
    guidance: float = 7.5
    seed: int = Field(0, description="image j uses seed+j")
    resolution: int | None = Field(None, ge=8, description="default: the training resolution")
    clip_model: str = ids.CLIP
    clip_pretrained: str = ids.CLIP_PRETRAINED
    clip_preprocess: ClipPreprocess = Field("openclip", description=PREPROCESS_HELP)
    dino_model: str = ids.DINO
    device: str = "auto"
