"""The models layer: every model loader and tiny random builder, one module per family, and
what they share (device and dtype rules, the checkpoint-name check, the per-worker cache).

Families: :mod:`~dsbuild.models.sd` (Stable Diffusion), :mod:`~dsbuild.models.editor`
(InstructPix2Pix and the diffusers editing pipelines), :mod:`~dsbuild.models.clip` (open_clip), :mod:`~dsbuild.models.dino`
(DINOv2), :mod:`~dsbuild.models.owl` (OWLv2 / OWL-ViT), :mod:`~dsbuild.models.segment`
(CLIPSeg, detector boxes + SAM), :mod:`~dsbuild.models.sentence` (sentence embeddings);
:mod:`dsbuild.core.model_ids` names each default model once (settings read it too).
The public loaders are re-exported here lazily (``from dsbuild.models import ClipEncoder``)
so importing this package stays free of torch.
"""

from __future__ import annotations

import importlib
import sys
from contextlib import nullcontext
from pathlib import Path

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
RANDOM_SEED = 0  # seeds models built with random weights ('tiny', pretrained 'none')

# public name -> the family module that defines it (imported on first use)
PUBLIC = {"load_sd_pipeline": "sd", "load_sd_components": "sd", "load_editor": "editor",
          "editor_pipeline": "editor", "load_edit_pipeline": "editor",
          "edit_pipeline_class": "editor", "ClipEncoder": "clip", "DinoEncoder": "dino",
          "ImageEmbedder": "embed", "OwlDetector": "owl", "Segmenter": "segment",
          "SamSegmenter": "segment", "load_segmenter": "segment"}

_LOADED: dict[str, tuple[tuple, object]] = {}


def __getattr__(name: str):
    if name in PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keep_loaded(kind: str, key: tuple, load):
    """The model of ``kind`` this process loaded last for ``key``, else ``load()`` (which
    replaces it; one model per kind is kept). An executor's worker runs shard after shard in
    one process, so a stage's models load once per worker, not once per shard."""
    held = _LOADED.get(kind)
    if held is not None and held[0] == key:
        return held[1]
    _LOADED.pop(kind, None)  # let the old one go before the new one is built
    obj = load()
    _LOADED[kind] = (key, obj)
    return obj


def model_key(model: str) -> tuple:
    """A model name plus, for a folder, when it last changed (a retrained folder reloads)."""
    path = Path(model)
    return (model, path.stat().st_mtime_ns if path.exists() else None)


def checkpoint(model: str, setting: str, folder: str = "folder",
               example: str = "owner/name") -> str:
    """``model`` when it is an existing local folder or looks like a Hub id ('owner/name'),
    else a one-line error naming ``setting`` (callers handle 'tiny' and built names first)."""
    if Path(model).exists():
        return str(model)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise DsbuildError(f"{setting}: {model!r} is neither 'tiny', an existing {folder}, "
                           f"nor a Hub id like {example!r}")
    return model


def warn_tiny(subject: str, output: str, remedy: str) -> None:
    """Say on stderr that ``subject`` has random weights, so its ``output`` mean nothing."""
    print(f"warning: {subject} has random weights built from config; its {output} are "
          f"placeholders with no meaning ({remedy})", file=sys.stderr)


def torch_dtype(name: str):
    """torch dtype for 'fp32' | 'fp16' | 'bf16'."""
    torch = require("torch")
    if name not in DTYPES:
        raise DsbuildError(f"dtype must be one of {sorted(DTYPES)} (got {name!r})")
    return getattr(torch, DTYPES[name])


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' → fp16 on CUDA (as diffusers users run SD), fp32 on CPU and MPS."""
    if dtype != "auto":
        return dtype
    return "fp16" if str(device).startswith("cuda") else "fp32"


def resolve_device(device: str = "auto") -> str:
    """'auto' → cuda when available, else mps, else cpu."""
    torch = require("torch")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def amp_dtype(dtype: str, device: str):
    """Autocast dtype (None for fp32) of a ``dtype`` setting: 'auto' is fp16 on CUDA, fp32
    elsewhere (the same rule as generate.dtype)."""
    import torch

    td = torch_dtype(resolve_dtype(dtype, device))
    return None if td is torch.float32 else td


def autocast(device: str, dtype):
    """torch.autocast for the device type, or a no-op for fp32 (``dtype`` None)."""
    if dtype is None:
        return nullcontext()
    import torch

    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def dtype_kwarg(dtype) -> dict:
    """``dtype=`` where diffusers takes it (it deprecates ``torch_dtype=``), else the old name."""
    try:
        from diffusers.utils import deprecation_utils

        if hasattr(deprecation_utils, "_resolve_dtype"):
            return {"dtype": dtype}
    except ImportError:
        pass
    return {"torch_dtype": dtype}
