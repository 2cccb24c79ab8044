"""DINO image encoder (transformers; filter, verify, eval) and its tiny DINOv2 build with random
weights. Any ViT backbone ``AutoModel`` loads (DINOv2 ``Dinov2Model``, DINO v1 ``ViTModel`` such
as MagicBrush's ``facebook/dino-vits16``). Embeddings are the CLS token of
``last_hidden_state`` (MagicBrush's formula), L2-normalised float32 on the CPU, computed under
autocast (fp16 on CUDA by default) inside ``torch.inference_mode``."""

from __future__ import annotations

import torch

from dsbuild.core import model_ids as ids
from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.metrics import normalize
from dsbuild.models import amp_dtype, autocast, checkpoint, resolve_device


def tiny_dino_processor():
    """DINOv2's preprocessing (resize, centre crop, ImageNet mean/std) at 32x32, in memory."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": 32}, resample=3, do_center_crop=True,
        crop_size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


PREPROCESS = ("model", "magicbrush")  # the settings' ``dino_preprocess`` values


class MagicBrushProcessor:
    """MagicBrush's DINO preprocessing (``evaluation/image_eval.py``), exactly: torchvision's
    ``Resize(256, bicubic)`` of the shorter side, ``CenterCrop(224)``, ``ToTensor`` and ImageNet
    mean/std, whatever the checkpoint's own processor says. Called like a transformers image
    processor (``processor(images=..., return_tensors="pt")["pixel_values"]``)."""

    def __init__(self, size: int = 256, crop: int = 224):
        from torchvision import transforms as T

        self.transform = T.Compose([
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
            T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def __call__(self, images, return_tensors: str = "pt") -> dict:
        images = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(im.convert("RGB"))
                                             for im in images])}


def magicbrush_processor() -> MagicBrushProcessor:
    return MagicBrushProcessor()


def tiny_dino(seed: int = 0):
    """(Dinov2Model, image processor) with a tiny config and seeded random weights."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
    return Dinov2Model(cfg).eval(), tiny_dino_processor()


class DinoEncoder:
    """A DINO ViT (transformers: DINOv2 or DINO v1) with its image processor; embeddings are
    the CLS token of ``last_hidden_state``."""

    def __init__(self, model, processor, device: str = "cpu", dtype: torch.dtype | None = None,
                 name: str = "dino"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.name = name

    @classmethod
    def load(cls, model: str = ids.DINO, device: str = "auto", dtype: str = "auto",
             quiet: bool = False, setting: str = "filter.dino_model",
             preprocess: str = "model") -> DinoEncoder:
        """Load from 'tiny', a folder saved with save_pretrained, or a Hub id; errors name
        ``setting``. ``preprocess``: ``model`` (the checkpoint's image processor) or
        ``magicbrush`` (:func:`magicbrush_processor`)."""
        require("transformers")
        if preprocess not in PREPROCESS:
            raise DsbuildError(f"DINO preprocessing {preprocess!r}: use one of "
                               f"{', '.join(PREPROCESS)}")
        device = resolve_device(device)
        if model == "tiny":
            from dsbuild.models.clip import warn_tiny

            m, proc = tiny_dino()
            if not quiet:
                warn_tiny("tiny (DINOv2)")
        else:
            src = checkpoint(model, setting, example=ids.DINO)
            from transformers import AutoImageProcessor, AutoModel

            try:
                proc = AutoImageProcessor.from_pretrained(src)
                m = AutoModel.from_pretrained(src)
            except Exception as exc:  # noqa: BLE001
                raise DsbuildError(f"{setting}: cannot load {model!r}: "
                                   f"{type(exc).__name__}: {exc}") from None
        if preprocess == "magicbrush":
            proc = magicbrush_processor()
        return cls(m, proc, device, amp_dtype(dtype, device), name=model)

    def preprocess_image(self, image) -> torch.Tensor:
        """One PIL image -> pixel_values (C, H, W) via the model's image processor."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images -> normalised CLS embeddings (n, d), float32 on CPU."""
        with autocast(self.device, self.dtype):
            out = self.model(pixel_values=pixels.to(self.device, non_blocking=True))
        # the CLS token of the (layer-normed) last hidden state for every ViT backbone: a
        # DINOv2 ``pooler_output`` is that same token, but a ``ViTModel``'s (DINO v1, e.g.
        # MagicBrush's facebook/dino-vits16) is a dense + tanh head on it, not the embedding
        return normalize(out.last_hidden_state[:, 0]).cpu()
