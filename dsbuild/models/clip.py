"""open_clip image/text encoder (filter, verify, eval) and its tiny config built with random
weights (no download).

The encoder preprocesses images one of two ways (``PREPROCESS``): ``openclip`` (the default),
its model's own ``preprocess`` transform (PIL resize of the short side, antialiased, centre
crop, CLIP mean/std); ``ip2p``, InstructPix2Pix's metric preprocessing (its
``metrics/clip_similarity.py``): the whole image as a float tensor in [0, 1], resized to the
model's square input size by ``F.interpolate(mode="bicubic", align_corners=False)`` (no
antialias, no crop, the aspect not kept), then CLIP mean/std. It returns L2-normalised float32
embeddings on the CPU and runs under autocast (fp16 on CUDA by default) inside
``torch.inference_mode``. ``register_tiny_clip`` adds a registered open_clip config named
``dsbuild-tiny-clip`` (a 32-dim ViT on 32x32 images and a 2-layer text tower using open_clip's
bundled BPE tokenizer), so the real ``open_clip.create_model_and_transforms`` /
``get_tokenizer`` paths build it. Random weights: scores are placeholders.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from dsbuild.core import model_ids as ids
from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.metrics import normalize
from dsbuild.models import RANDOM_SEED, amp_dtype, autocast, resolve_device
from dsbuild.models import warn_tiny as _warn

TINY_CLIP_NAME = "dsbuild-tiny-clip"
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}
RANDOM_WEIGHTS = ("", "none", "random")
PREPROCESS = ("openclip", "ip2p")  # the settings' ``clip_preprocess`` values
# OpenAI CLIP's mean/std (InstructPix2Pix's constants), for a model that names none
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_registered: Path | None = None


def warn_tiny(what: str = "tiny") -> None:
    """Say on stderr that a tiny (or untrained) CLIP/DINOv2 model makes placeholder scores."""
    _warn(f"model '{what}'", "scores", "use a real CLIP/DINOv2 checkpoint for data")


def register_tiny_clip() -> str:
    """Register the tiny open_clip config (once per process) and return its model name."""
    global _registered
    import open_clip

    if _registered is None or TINY_CLIP_NAME not in open_clip.list_models():
        # open_clip reads configs from files; it keeps what it read, so the file can go
        with tempfile.TemporaryDirectory(prefix="dsbuild-tiny-clip-") as folder:
            cfg = Path(folder) / f"{TINY_CLIP_NAME}.json"
            cfg.write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(cfg)
        _registered = cfg
    return TINY_CLIP_NAME


def check_preprocess(preprocess: str) -> str:
    """``preprocess`` when it is one of ``PREPROCESS``; else a one-line error."""
    if preprocess not in PREPROCESS:
        raise DsbuildError(f"clip preprocess: {preprocess!r} is not one of "
                           f"{', '.join(PREPROCESS)}")
    return preprocess


def tiny_clip(seed: int = 0):
    """(model, preprocess, tokenizer) of the tiny open_clip model with seeded random weights."""
    import open_clip

    name = register_tiny_clip()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


class ClipEncoder:
    """An open_clip model with its preprocess transform and tokenizer; ``preprocessing``
    says which preprocessing ``preprocess_image`` does (``PREPROCESS``)."""

    def __init__(self, model, preprocess, tokenizer, device: str = "cpu",
                 dtype: torch.dtype | None = None, name: str = "clip",
                 preprocessing: str = "openclip"):
        check_preprocess(preprocessing)
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.name = name
        self.preprocessing = preprocessing
        visual = getattr(model, "visual", None)
        cfg = getattr(visual, "preprocess_cfg", None) or {}  # the model's size and mean/std
        size = cfg.get("size") or getattr(visual, "image_size", 224)
        self.size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        self.mean = torch.tensor(cfg.get("mean") or CLIP_MEAN).float()[:, None, None]
        self.std = torch.tensor(cfg.get("std") or CLIP_STD).float()[:, None, None]

    @classmethod
    def load(cls, model: str = ids.CLIP, pretrained: str | None = ids.CLIP_PRETRAINED,
             device: str = "auto", dtype: str = "auto", quiet: bool = False,
             setting: str = "filter.clip_model",
             pretrained_setting: str = "filter.clip_pretrained",
             preprocess: str = "openclip") -> ClipEncoder:
        """Load by open_clip name + tag/checkpoint file, 'hf-hub:'/'local-dir:' or 'tiny';
        errors name ``setting`` / ``pretrained_setting`` (what the caller's user changes).
        ``preprocess``: 'openclip' (the model's transform) or 'ip2p' (InstructPix2Pix's)."""
        check_preprocess(preprocess)
        open_clip = require("open_clip")
        device = resolve_device(device)
        name, pre, placeholder = model, pretrained, False
        if pre is not None and pre.strip().lower() in RANDOM_WEIGHTS:
            pre, placeholder = None, True
        if model == "tiny":
            name = register_tiny_clip()
            if pre is None or not Path(pre).is_file():
                pre, placeholder = None, True
        elif model.startswith(("hf-hub:", "local-dir:")):
            pre = None
        else:
            if name not in open_clip.list_models():
                raise DsbuildError(
                    f"{setting}: {model!r} is not an open_clip model name (see "
                    "open_clip.list_models()), 'hf-hub:owner/name', 'local-dir:PATH' or 'tiny'")
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pre is not None and not Path(pre).is_file() and pre not in tags:
                raise DsbuildError(
                    f"{pretrained_setting}: {pre!r} is neither a checkpoint file nor a "
                    f"pretrained tag of {name} (tags: {', '.join(tags) or 'none'}; 'none' "
                    "gives random weights)")
        root = logging.getLogger()
        was_disabled, root.disabled = root.disabled, True  # open_clip's root-logger chatter
        try:
            with torch.random.fork_rng(devices=[]):  # random weights: the same every run
                torch.manual_seed(RANDOM_SEED)
                m, _, transform = open_clip.create_model_and_transforms(
                    name, pretrained=pre, device=device)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear message
            raise DsbuildError(f"{setting}: cannot load {model!r} with pretrained "
                               f"{pretrained!r}: {type(exc).__name__}: {exc}") from None
        finally:
            root.disabled = was_disabled
        if placeholder and not quiet:
            warn_tiny(model if model == "tiny" else f"{model} without pretrained weights")
        return cls(m, transform, tokenizer, device, amp_dtype(dtype, device), name=model,
                   preprocessing=preprocess)

    def preprocess_image(self, image) -> torch.Tensor:
        """One PIL image -> the model's input tensor (C, H, W), the ``preprocessing`` way."""
        if self.preprocessing == "openclip":
            return self.preprocess(image)
        import numpy as np
        import torch.nn.functional as F

        # InstructPix2Pix: a float image in [0, 1], bicubic to the model's size (no
        # antialias, no crop), then CLIP's mean/std
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
        x = x.permute(2, 0, 1).float().div(255)[None]
        x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)[0]
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images -> normalised embeddings (n, d), float32 on CPU."""
        with autocast(self.device, self.dtype):
            emb = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return normalize(emb).cpu()

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> normalised embeddings (n, d), float32 on CPU (long ones truncated)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with autocast(self.device, self.dtype):
                emb = self.model.encode_text(tokens)
            out.append(normalize(emb).cpu())
        return torch.cat(out) if out else torch.empty(0)
