"""Inpainting pipelines: the diffusers pipelines that repaint a masked region (SD and SDXL
inpainting, FLUX.1 Fill, FLUX.1 Kontext inpainting), their class read from model_index.json,
and ``tiny-inpaint``, an SD inpainting model built from config (random weights, a 9-channel
UNet: noisy latents + mask + masked image latents).

A plain SD or SDXL checkpoint (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` in
its model_index.json, or 'tiny') loads into the matching inpainting pipeline: a 4-channel UNet
inpaints by the pipeline's latent blend (outside the mask the latents are the image's at
every step), a 9-channel one as it was trained.
"""

from __future__ import annotations

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.quiet import install as hide_library_noise
from dsbuild.models import checkpoint, dtype_kwarg, torch_dtype

INPAINT_CHANNELS = 9  # an SD inpainting UNet's input: latents + mask + masked-image latents
SD_INPAINT, SDXL_INPAINT, FLUX_FILL, KONTEXT_INPAINT = (
    "StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline", "FluxFillPipeline",
    "FluxKontextInpaintPipeline")
INPAINT_PIPELINES = (SD_INPAINT, SDXL_INPAINT, FLUX_FILL, KONTEXT_INPAINT)
# text-to-image pipelines whose checkpoints load into an inpainting pipeline (latent blend)
FROM_TEXT_TO_IMAGE = {"StableDiffusionPipeline": SD_INPAINT,
                      "StableDiffusionXLPipeline": SDXL_INPAINT,
                      "FluxKontextPipeline": KONTEXT_INPAINT}
# built-in models with random weights built from config
TINY_INPAINTERS = {"tiny-inpaint": SD_INPAINT, "tiny": SD_INPAINT, "tiny-sdxl": SDXL_INPAINT}


def tiny_inpaint_components(seed: int = 0) -> dict:
    """dsbuild's tiny SD components with a 9-channel UNet: a tiny SD inpainting model (as
    diffusers' fast inpainting tests build theirs)."""
    import torch
    from diffusers import UNet2DConditionModel

    from dsbuild.models.sd import tiny_sd_components

    comps = tiny_sd_components(seed)
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel.from_config(
        {**comps["unet"].config, "in_channels": INPAINT_CHANNELS})
    return comps


def inpaint_pipeline_class(model: str, setting: str = "generate.model") -> str:
    """The inpainting pipeline class ``model`` loads into: a built-in tiny model's, else from
    its ``model_index.json`` ``_class_name`` (a folder, or a Hub repo's cached or fetched
    file); anything else is one line naming ``setting``."""
    from dsbuild.models.hub import pipeline_class_name

    if model in TINY_INPAINTERS:
        return TINY_INPAINTERS[model]
    src = checkpoint(model, setting, "diffusers folder", "black-forest-labs/FLUX.1-Fill-dev")
    found = pipeline_class_name(src, setting, "inpainting")
    if found in INPAINT_PIPELINES:
        return found
    if found in FROM_TEXT_TO_IMAGE:
        return FROM_TEXT_TO_IMAGE[found]
    raise DsbuildError(f"{setting}: {model!r} is a {found!r}, which dsbuild cannot inpaint with "
                       f"(model_index.json _class_name); give one of "
                       f"{', '.join(INPAINT_PIPELINES)} (or an SD / SDXL checkpoint), or "
                       f"{', '.join(TINY_INPAINTERS)}")


def load_inpaint_pipeline(model: str, dtype: str = "fp32", device: str = "cpu",
                          quiet: bool = False, setting: str = "generate.model"):
    """The inpainting pipeline ``model`` names (:func:`inpaint_pipeline_class`): 'tiny-inpaint'
    (9-channel UNet), 'tiny' / 'tiny-sdxl' (4-channel: latent blend), a folder or a Hub id.
    Errors are one line naming ``setting``."""
    require("diffusers")
    import diffusers

    hide_library_noise()
    cls_name = inpaint_pipeline_class(model, setting)
    cls = getattr(diffusers, cls_name)
    td = torch_dtype(dtype)
    if model in TINY_INPAINTERS:
        if not quiet:
            from dsbuild.models import warn_tiny

            warn_tiny(f"model {model!r}", "images", "use a real inpainting pipeline for data")
        if model == "tiny-inpaint":
            pipe = cls(**tiny_inpaint_components(), safety_checker=None,
                       feature_extractor=None, requires_safety_checker=False)
        else:  # the tiny text-to-image model's modules in the inpainting pipeline
            from dsbuild.models.sd import load_sd_pipeline

            pipe = cls.from_pipe(load_sd_pipeline(model, "fp32", "cpu", quiet=True,
                                                  setting=setting))
    else:
        kw = ({"safety_checker": None, "requires_safety_checker": False}
              if cls_name == SD_INPAINT else {})
        try:
            pipe = cls.from_pretrained(checkpoint(model, setting, "diffusers folder"), **kw,
                                       **dtype_kwarg(td))
        except Exception as exc:  # noqa: BLE001 - missing part, bad config, wrong weights
            raise DsbuildError(f"{setting}: cannot load {cls_name} from {model!r} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                               ) from None
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if pipe.dtype != td:
        pipe = pipe.to(dtype=td)
    return pipe
