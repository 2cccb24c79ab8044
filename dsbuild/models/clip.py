"""Tiny CLIP (open_clip) and DINOv2 (transformers) models built from config: no download.

``register_tiny_clip`` adds a registered open_clip config named ``dsbuild-tiny-clip`` (a
32-dim ViT on 32x32 images and a 2-layer text tower using open_clip's bundled BPE tokenizer),
so the real ``open_clip.create_model_and_transforms`` / ``get_tokenizer`` paths build it.
``tiny_dino`` builds a ``Dinov2Model`` from a tiny ``Dinov2Config`` with a DINOv2-style
``BitImageProcessor`` made in memory. Random weights: scores are placeholders.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

TINY_CLIP_NAME = "dsbuild-tiny-clip"
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}
TINY_WARNING = ("warning: model 'tiny' has random weights built from config; its scores are "
                "placeholders with no meaning (use a real CLIP/DINOv2 checkpoint for data)")

_registered: Path | None = None


def warn_tiny(what: str = "tiny") -> None:
    """Say on stderr that a tiny random model makes placeholder scores."""
    print(TINY_WARNING.replace("'tiny'", f"'{what}'"), file=sys.stderr)


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


def tiny_clip(seed: int = 0):
    """(model, preprocess, tokenizer) of the tiny open_clip model with seeded random weights."""
    import open_clip
    import torch

    name = register_tiny_clip()
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def tiny_dino_processor():
    """DINOv2's preprocessing (resize, centre crop, ImageNet mean/std) at 32x32, in memory."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": 32}, resample=3, do_center_crop=True,
        crop_size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


def tiny_dino(seed: int = 0):
    """(Dinov2Model, image processor) with a tiny config and seeded random weights."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)
    return Dinov2Model(cfg).eval(), tiny_dino_processor()
