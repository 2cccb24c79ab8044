"""Model loaders: Stable Diffusion from 'tiny', an SD-shaped random build, a dir or a Hub id."""

from __future__ import annotations

from pathlib import Path

from dsbuild.core.errors import DsbuildError, require

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

_LOADED: dict[str, tuple[tuple, object]] = {}


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


def torch_dtype(name: str):
    """torch dtype for 'fp32' | 'fp16' | 'bf16'."""
    torch = require("torch", "gen")
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
    torch = require("torch", "gen")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _lora_marker(model: str) -> dict | None:
    from dsbuild.models.lora import read_marker

    return read_marker(model) if Path(model).is_dir() else None


def load_sd_pipeline(model: str, dtype: str = "fp32", device: str = "cpu", quiet: bool = False):
    """A StableDiffusionPipeline (no safety checker) from 'tiny', 'arch:small', 'arch:sd15'
    (random weights built from config), a dir or a Hub id; a LoRA folder written by
    ``dsbuild train-generator`` loads its base and merges the LoRA into it."""
    require("diffusers", "gen")
    from diffusers import StableDiffusionPipeline

    from dsbuild.models import tiny_sd

    td = torch_dtype(dtype)
    built = {"tiny": tiny_sd.tiny_components, "arch:small": tiny_sd.small_components,
             "arch:sd15": tiny_sd.sd15_components}
    if model in built:
        comps = built[model]()
        if model == "tiny" and not quiet:
            tiny_sd.warn_tiny()
        pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif (marker := _lora_marker(model)) is not None:  # `dsbuild train-generator --mode lora`
        from dsbuild.models.lora import apply_lora_folder

        pipe = load_sd_pipeline(marker["base"], "fp32", "cpu", quiet=quiet)
        apply_lora_folder(pipe, model, marker)
    else:
        local = Path(model)
        if not local.exists() and (model.startswith((".", "/")) or model.count("/") != 1):
            raise DsbuildError(f"generate.model: {model!r} is neither 'tiny', an existing "
                               "diffusers folder, nor a Hub id like 'owner/name'")
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(model), **dtype_kwarg(td), safety_checker=None,
                requires_safety_checker=False)
        except (OSError, ValueError) as exc:
            raise DsbuildError(f"generate.model: cannot load Stable Diffusion from {model!r}: "
                               f"{exc}") from None
    pipe = pipe.to(device)
    if pipe.unet.dtype != td:
        pipe = pipe.to(dtype=td)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dtype_kwarg(dtype) -> dict:
    """``dtype=`` where diffusers takes it (it deprecates ``torch_dtype=``), else the old name."""
    try:
        from diffusers.utils import deprecation_utils

        if hasattr(deprecation_utils, "_resolve_dtype"):
            return {"dtype": dtype}
    except ImportError:
        pass
    return {"torch_dtype": dtype}
