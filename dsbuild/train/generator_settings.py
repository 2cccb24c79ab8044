"""Settings of ``dsbuild train-generator`` (DreamBooth / LoRA on the user's photos); see
docs/train-generator.md.

Defaults follow diffusers' DreamBooth examples (``train_dreambooth.py``: lr 5e-6, prior loss
weight 1, 100 class images; ``train_dreambooth_lora.py``: lr 1e-4, rank 4) at 512 px. Fields in
``volatile`` may change on ``--resume``; any other change is refused.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from dsbuild.core.settings import StageSettings


class GeneratorTrainSettings(StageSettings):
    """One generator fine-tuning run: photos, base, method, identifier, prior, optimiser."""

    volatile: ClassVar[frozenset[str]] = frozenset({
        "max_steps", "epochs", "checkpoint_every", "checkpoint_limit", "validate_every",
        "validation_steps", "device", "class_dir",
    })
    # read for one release: a folder trained before the rename resumes
    renamed: ClassVar[dict[str, str]] = {"mode": "method", "mixed_precision": "precision"}
    old_values: ClassVar[dict[str, dict]] = {"precision": {"no": "fp32"}}

    photos: str = Field(description="folder of photos (png/jpg/webp); with a captions.jsonl "
                        "({\"file\", \"caption\"} a line) each photo trains on its own caption")
    base: str = Field("tiny", description="SD 1.x/2.x checkpoint (folder or Hub id), or 'tiny'")
    method: Literal["dreambooth", "lora"] = Field(
        "lora", description="dreambooth: every UNet weight trains, a full pipeline is saved; "
        "lora: peft adapters, saved small and loaded by generate on their base")
    token: str = Field("sks", description="identifier token for the subject (a rare one)")
    class_noun: str | None = Field(None, description="class noun, e.g. 'armchair': prompts are "
                                   "'a photo of TOKEN CLASS'; enables prior preservation")
    instance_prompt: str | None = Field(None, description="prompt for every photo (default: 'a "
                                        "photo of TOKEN CLASS'); captions.jsonl wins")
    class_prompt: str | None = Field(None, description="prior prompt (default: 'a photo of "
                                     "CLASS')")
    prior_preservation: bool = Field(True, description="class images generated once by the "
                                     "base and trained on with weight prior_loss_weight "
                                     "(needs a class)")
    prior_loss_weight: float = Field(1.0, ge=0, description="λ of the class-prior loss")
    num_class_images: int = Field(100, ge=1, description="class images to generate (cached)")
    class_steps: int = Field(25, ge=1, description="denoising steps of each class image")
    class_dir: str | None = Field(None, description="where class images are cached (default: "
                                  "~/.cache/dsbuild/class-images/<base, prompt, size hash>)")
    train_text_encoder: bool = Field(False, description="train the text encoder too (LoRA on "
                                     "it with method lora)")
    lora_rank: int = Field(4, ge=1)
    lora_alpha: int = Field(4, ge=1)
    resolution: int = Field(512, ge=8, description="training side in pixels (multiple of 8); "
                            "photos must be at least this on their shorter side")
    flip: bool = Field(False, description="random horizontal flip")
    batch_size: int = Field(1, ge=1, description="photos per device per micro-batch")
    gradient_accumulation: int = Field(1, ge=1)
    learning_rate: float | None = Field(None, gt=0, description="default 5e-6 (dreambooth), "
                                        "1e-4 (lora)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = Field(1.0, gt=0)
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="fp32, or mixed precision fp16|bf16 (accelerate; the trained "
        "weights stay fp32)")
    gradient_checkpointing: bool = False
    seed: int = 42
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (wins over epochs)")
    epochs: int = Field(100, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    checkpoint_limit: int | None = Field(2, ge=1)
    validate_every: int = Field(0, ge=0, description="every N steps a grid of validation "
                                "prompts (0: off)")
    validation_steps: int = Field(25, ge=1)
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> GeneratorTrainSettings:
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (got {self.resolution})")
        if not self.token.strip() or " " in self.token.strip():
            raise ValueError(f"token must be one word (got {self.token!r})")
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate or (5e-6 if self.method == "dreambooth" else 1e-4)

    @property
    def prompt(self) -> str:
        """The prompt of a photo without a caption."""
        if self.instance_prompt:
            return self.instance_prompt
        return f"a photo of {self.token} {self.class_noun or ''}".strip()

    @property
    def prior_prompt(self) -> str | None:
        """The class prompt, or None when prior preservation is off."""
        if not (self.prior_preservation and self.class_noun and self.prior_loss_weight > 0):
            return None
        return self.class_prompt or f"a photo of {self.class_noun}"
