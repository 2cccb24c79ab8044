"""A ``dsbuild train-generator`` LoRA folder: a marker naming its base, and peft-format LoRA
weights merged into the base's modules when ``generate`` loads it (no peft needed there).

Folder: ``dsbuild-generator.json`` (``{"kind": "lora", "base": ..., "scale": alpha/rank}``),
``unet_lora.safetensors`` and, when the text encoder trained, ``text_encoder_lora.safetensors``.
A weight ``W`` of a module with ``lora_A`` (r×in) and ``lora_B`` (out×r) becomes
``W + scale · B·A``, which is what peft computes in its forward (and its ``merge``).
"""

from __future__ import annotations

import json
from pathlib import Path

from dsbuild.core.errors import DsbuildError

MARKER = "dsbuild-generator.json"
PARTS = ("unet", "text_encoder")


def read_marker(folder: str | Path) -> dict | None:
    """The marker of a LoRA generator folder, or None when ``folder`` is not one."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DsbuildError(f"{path}: unreadable ({exc}); retrain or delete the folder") from None
    if marker.get("kind") != "lora":
        return None
    if not marker.get("base"):
        raise DsbuildError(f"{path}: names no base model; retrain with `dsbuild train-generator`")
    return marker


def merge_lora(module, weights: dict, scale: float) -> int:
    """Add ``scale · B·A`` to each LoRA-targeted linear of ``module``; returns how many."""
    import torch

    suffix = ".lora_A.weight"
    merged = 0
    with torch.no_grad():
        for key, a in weights.items():
            if not key.endswith(suffix):
                continue
            path = key[: -len(suffix)]
            b = weights.get(path + ".lora_B.weight")
            if b is None:
                raise DsbuildError(f"LoRA weights: {path} has lora_A but no lora_B")
            try:
                target = module.get_submodule(path)
            except AttributeError:
                raise DsbuildError(f"LoRA weights: the base has no module {path}; this LoRA was "
                                   "trained on another base") from None
            delta = (b.float() @ a.float()) * scale
            if delta.shape != target.weight.shape:
                raise DsbuildError(f"LoRA weights: {path} is {tuple(delta.shape)}, the base's "
                                   f"is {tuple(target.weight.shape)}; another base?")
            target.weight += delta.to(target.weight.dtype).to(target.weight.device)
            merged += 1
    return merged


def apply_lora_folder(pipe, folder: str | Path, marker: dict) -> None:
    """Merge a LoRA generator folder's weights into ``pipe``'s UNet (and text encoder)."""
    from safetensors.torch import load_file

    for part in PARTS:
        path = Path(folder) / f"{part}_lora.safetensors"
        if path.exists():
            merge_lora(getattr(pipe, part), load_file(str(path)), float(marker["scale"]))
        elif part == "unet":
            raise DsbuildError(f"{folder}: {path.name} is missing; retrain the generator")
