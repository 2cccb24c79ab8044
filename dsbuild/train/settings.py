"""Settings of ``dsbuild train`` (InstructPix2Pix fine-tuning); see docs/train.md.

Defaults follow diffusers' InstructPix2Pix example as its README runs it (256 px, lr 5e-5,
conditioning dropout 0.05, max grad norm 1, random flips). Fields in ``volatile`` (where and
how often to checkpoint, how far to train, validation) may change on ``--resume``; every other
field is compared with the checkpoint's and a change is refused.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from dsbuild.core.settings import StageSettings


class TrainSettings(StageSettings):
    """One InstructPix2Pix fine-tuning run: data, base, method, optimiser, schedule."""

    volatile: ClassVar[frozenset[str]] = frozenset({
        "max_steps", "epochs", "checkpoint_every", "checkpoint_limit", "validate_every",
        "validation_rows", "validation_steps", "device", "cache_latents",
    })
    # read for one release: a folder trained before the rename resumes
    renamed: ClassVar[dict[str, str]] = {"mixed_precision": "precision"}
    old_values: ClassVar[dict[str, dict]] = {"precision": {"no": "fp32"}}

    data: str = Field(description="export folder written by `dsbuild export`, or a Hub dataset id")
    split: str = Field("train", description="split of DATA to train on")
    base: str = Field("tiny", description="SD 1.x/2.x or InstructPix2Pix checkpoint (folder or "
                      "Hub id), or 'tiny' (random, built from config)")
    method: Literal["full", "lora"] = "full"
    lora_rank: int = Field(16, ge=1)
    lora_alpha: int = Field(16, ge=1)
    resolution: int = Field(256, ge=8, description="training side in pixels (multiple of 8)")
    crop: Literal["center", "random"] = Field(
        "center", description="center: shorter side to RESOLUTION, centre crop; random: "
        "shorter side to 1.125×RESOLUTION, one random crop applied to both images")
    flip: bool = Field(True, description="random horizontal flip, the same for both images")
    batch_size: int = Field(4, ge=1, description="rows per device per micro-batch")
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = Field(False, description="bitsandbytes AdamW8bit (pip install "
                                "bitsandbytes)")
    max_grad_norm: float = Field(1.0, gt=0)
    conditioning_dropout: float = Field(0.05, ge=0, le=1 / 3, description="probability of "
                                        "each of: no text, no image, neither (InstructPix2Pix)")
    ema: bool = Field(True, description="keep an EMA of the trained weights; it is what's saved")
    ema_decay: float = Field(0.9999, gt=0, le=1)
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp32, or mixed precision fp16|bf16 (accelerate; the trained "
        "weights stay fp32)")
    gradient_checkpointing: bool = False
    seed: int = 42
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (wins over epochs)")
    epochs: int = Field(1, ge=1)
    checkpoint_every: int = Field(500, ge=1, description="save a resumable checkpoint every N "
                                  "steps (and at the last)")
    checkpoint_limit: int | None = Field(2, ge=1, description="checkpoints kept (oldest go)")
    validate_every: int = Field(0, ge=0, description="every N steps a grid of edits on fixed "
                                "rows (0: off)")
    validation_rows: int = Field(4, ge=1)
    validation_steps: int = Field(20, ge=1, description="denoising steps of validation edits")
    cache_latents: bool = Field(True, description="encode each row's latents (both flips) and "
                                "each prompt once; off, or with crop=random, encode every step")
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (got {self.resolution})")
        return self
