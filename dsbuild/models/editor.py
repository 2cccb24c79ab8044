"""The InstructPix2Pix editor: a pipeline over given modules, the loader of a checkpoint
('tiny', a folder such as ``dsbuild train``'s output, or a Hub id), and its tiny build."""

from __future__ import annotations

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.models import checkpoint, dtype_kwarg, torch_dtype
from dsbuild.models.sd import IP2P_CHANNELS


def tiny_editor_components(seed: int = 0) -> dict:
    """dsbuild's tiny SD components with an 8-channel UNet: a tiny InstructPix2Pix model."""
    import torch
    from diffusers import UNet2DConditionModel

    from dsbuild.models.sd import tiny_sd_components

    comps = tiny_sd_components(seed)
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel.from_config(
        {**comps["unet"].config, "in_channels": IP2P_CHANNELS})
    return comps


def editor_pipeline(unet, vae, text_encoder, tokenizer, scheduler_config: dict):
    """A StableDiffusionInstructPix2PixPipeline over these modules (Euler ancestral, as the
    published InstructPix2Pix model ships; no safety checker)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    sched = EulerAncestralDiscreteScheduler.from_config(scheduler_config)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_editor(model: str, device: str = "cpu", dtype: str = "fp32", quiet: bool = False,
                setting: str = "model"):
    """An InstructPix2Pix pipeline from 'tiny', a folder (e.g. ``dsbuild train``'s output) or a
    Hub id; anything whose UNet does not take 8 channels is refused with what to do. Errors
    name ``setting``."""
    require("diffusers")
    td = torch_dtype(dtype)
    if model == "tiny":
        from dsbuild.models.sd import warn_tiny

        comps = tiny_editor_components()
        sched = comps.pop("scheduler")
        pipe = editor_pipeline(scheduler_config=dict(sched.config), **comps)
        if not quiet:
            warn_tiny()
    else:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        src = checkpoint(model, setting, "diffusers folder")
        try:
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                src, safety_checker=None, requires_safety_checker=False, **dtype_kwarg(td))
        except Exception as exc:  # noqa: BLE001
            raise DsbuildError(f"{setting} {model!r}: cannot load an InstructPix2Pix pipeline "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                               ) from None
        pipe.set_progress_bar_config(disable=True)
    ch = pipe.unet.config.in_channels
    if ch != IP2P_CHANNELS:
        raise DsbuildError(f"{setting} {model!r}: its UNet takes {ch} input channels, not 8: it "
                           "is not an InstructPix2Pix model (fine-tune it with `dsbuild train`)")
    pipe = pipe.to(device)
    if pipe.unet.dtype != td:
        pipe = pipe.to(dtype=td)
    return pipe
