"""Whether the model a setting names can load, checked before the setting is saved.

A command that changes a model setting (``generate.model``, ``filter.clip_model``,
``verify.detector``, ...) checks it here first, so a name that cannot load is refused with one
line and never frozen into dsbuild.yaml. The check reads only small files: a built-in name
('tiny', 'arch:...'), a folder of the right kind (its ``model_index.json`` or ``config.json``),
or a Hub id whose config is in the local Hugging Face cache (offline: ``HF_HUB_OFFLINE``) or
on the Hub. Which settings name models is declared with them: a settings field's
``json_schema_extra={"loads": KIND}``, and for ``generate.model`` the generator's ``model``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsbuild.core import generators, stages
from dsbuild.core.errors import DsbuildError
from dsbuild.models import checkpoint
from dsbuild.models.editor import EDIT_PIPELINES, TINY_EDITORS
from dsbuild.models.hub import HubUnreachable, offline  # noqa: F401 - HubUnreachable: part of this module's errors
from dsbuild.models.hub import config_file as _config_file
from dsbuild.models.inpaint import FROM_TEXT_TO_IMAGE, INPAINT_PIPELINES, TINY_INPAINTERS

# kind -> (config file that names the architecture, its key, accepted values, what it is)
KINDS = {
    "sd": ("model_index.json", "_class_name",
           ("StableDiffusionPipeline", "StableDiffusionXLPipeline"),
           "a Stable Diffusion 1.x/2.x or SDXL pipeline"),
    "dino": ("config.json", "model_type", ("dinov2",), "a DINOv2 model"),
    "owl": ("config.json", "model_type", ("owlv2", "owlvit"), "an OWLv2/OWL-ViT detector"),
    "clipseg": ("config.json", "model_type", ("clipseg",), "a CLIPSeg segmenter"),
    "sam": ("config.json", "model_type", ("sam",), "a SAM model"),
    "clip": ("open_clip_config.json", None, (), "an open_clip model"),
    "editor": ("model_index.json", "_class_name", EDIT_PIPELINES,
               "a diffusers editing pipeline (InstructPix2Pix, SDXL InstructPix2Pix, FLUX.1 "
               "Kontext, Qwen-Image-Edit)"),
    "inpaint": ("model_index.json", "_class_name", (*INPAINT_PIPELINES, *FROM_TEXT_TO_IMAGE),
                "a diffusers inpainting pipeline (SD/SDXL inpainting, FLUX.1 Fill, FLUX.1 "
                "Kontext) or an SD/SDXL checkpoint"),
}
BUILT_IN = {"sd": ("tiny", "tiny-sdxl", "arch:small", "arch:small-sdxl", "arch:sd15"),
            "clipseg": ("tiny", "sam"),
            "editor": tuple(TINY_EDITORS), "inpaint": tuple(TINY_INPAINTERS)}
RANDOM_WEIGHTS = ("", "none", "random")  # clip_pretrained values that mean no weights


def model_settings(config) -> dict[str, tuple[str, object]]:
    """``section.key`` -> (kind, value) of every setting of ``config`` that names a model."""
    out = {}
    for st in stages.all_stages():
        settings = config.stage_settings(st.name)
        for key, info in type(settings).model_fields.items():
            extra = info.json_schema_extra
            kind = extra.get("loads") if isinstance(extra, dict) else None
            value = getattr(settings, key)
            if kind == "clip_pretrained":  # checked again when its clip model changes
                value = (value, getattr(settings, key.replace("pretrained", "model")))
            if kind:
                out[f"{st.name}.{key}"] = (kind, value)
        gen = getattr(settings, "generator", None)
        if st.name == "generate" and gen in generators.names() and generators.get(gen).model:
            out["generate.model"] = (generators.get(gen).model, settings.model)
        for i, run in enumerate(settings.runs()[1:] if st.name == "generate" else []):
            if generators.get(run.generator).model:  # generate.mix's entries
                out[f"generate.mix[{i}].model"] = (generators.get(run.generator).model,
                                                   run.model)
    return out


def check_models(old, new) -> None:
    """Refuse ``new`` (a BuildConfig) when a model setting it changes from ``old`` cannot load;
    settings left as they were are not checked again."""
    before = model_settings(old) if old is not None else {}
    for setting, (kind, value) in model_settings(new).items():
        if before.get(setting) != (kind, value):
            check_model(kind, value, setting)


def check_model(kind: str, model, setting: str) -> None:
    """One line naming ``setting`` unless ``model`` of ``kind`` can load (for
    'clip_pretrained': the pair (pretrained, its clip model))."""
    if kind == "clip_pretrained":
        return _check_pretrained(*model, setting)
    if not isinstance(model, str) or model in ("tiny", *BUILT_IN.get(kind, ())):
        return
    if kind not in KINDS:
        raise DsbuildError(f"{setting} declares model kind {kind!r}; known kinds: "
                           f"{', '.join([*KINDS, 'clip_pretrained'])}")
    file, key, accepted, what = KINDS[kind]
    if kind == "clip":
        return _check_clip(model, setting)
    if kind == "sd" and (base := _lora_base(model)) is not None:
        return check_model("sd", base, f"{setting} (its LoRA base)")
    src = checkpoint(model, setting, "folder" if kind != "sd" else "diffusers folder")
    _check_kind(_config_file(src, file, setting), key, accepted, what, model, setting)


def _lora_base(model: str) -> str | None:
    """The base a LoRA folder of ``dsbuild train-generator`` names, else None."""
    from dsbuild.models.lora import read_marker

    marker = read_marker(model) if Path(model).is_dir() else None
    return marker["base"] if marker else None


def _check_kind(path: Path, key: str | None, accepted: tuple, what: str, model: str,
                setting: str) -> None:
    if key is None:
        return
    try:
        found = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError) as exc:
        raise DsbuildError(f"{setting}: {path} is unreadable ({exc}); give {what}") from None
    if found not in accepted:
        raise DsbuildError(f"{setting}: {model!r} is {found!r}, not {what} ({path.name} "
                           f"{key}); give {what}")


def _check_clip(model: str, setting: str) -> None:
    """'hf-hub:ID', 'local-dir:PATH' or an open_clip architecture name."""
    if model.startswith("hf-hub:"):
        _config_file(checkpoint(model[len("hf-hub:"):], setting), KINDS["clip"][0], setting)
    elif model.startswith("local-dir:"):
        _config_file(model[len("local-dir:"):], KINDS["clip"][0], setting)
    elif model not in _open_clip().list_models():
        raise DsbuildError(f"{setting}: {model!r} is not an open_clip model name (see "
                           "open_clip.list_models()), 'hf-hub:owner/name', 'local-dir:PATH' "
                           "or 'tiny'")


def _check_pretrained(pre, model: str, setting: str) -> None:
    """A clip_pretrained value of ``model``: no weights, a checkpoint file, or a tag of the
    model (offline: with its weights in the cache)."""
    if pre is None or str(pre).strip().lower() in RANDOM_WEIGHTS or Path(pre).is_file():
        return
    if model == "tiny" or model.startswith(("hf-hub:", "local-dir:")):
        return
    open_clip = _open_clip()
    if model not in open_clip.list_models():
        return  # the model setting's own check names it
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pre not in tags:
        raise DsbuildError(f"{setting}: {pre!r} is neither a checkpoint file nor a pretrained "
                           f"tag of {model} (tags: {', '.join(tags) or 'none'}; 'none' gives "
                           "random weights)")
    repo = (open_clip.get_pretrained_cfg(model, pre) or {}).get("hf_hub", "").strip("/")
    if offline() and repo and not _cached(repo):
        raise DsbuildError(f"{setting}: the {model} {pre!r} weights ({repo}) are not in the "
                           "local Hugging Face cache and HF_HUB_OFFLINE is set; download them "
                           f"first (`hf download {repo}`), or unset HF_HUB_OFFLINE")


def _cached(repo: str) -> bool:
    """Some snapshot of Hub model ``repo`` is in the local cache."""
    from huggingface_hub import constants

    snaps = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snaps.is_dir() and any(snaps.iterdir())


def _open_clip():
    from dsbuild.core.deps import require

    return require("open_clip")
