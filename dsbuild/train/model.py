"""Models for the trainer and the editor: an SD base widened to InstructPix2Pix, an existing
InstructPix2Pix checkpoint as it is, or 'tiny' (random, built from config, for offline tests).

Widening keeps the first conv's weights **and bias** and zeroes the four new input channels,
so the widened UNet starts out computing exactly what the SD UNet computed. diffusers' example
script rebuilds the conv on every base (an InstructPix2Pix checkpoint included) and drops the
bias (diffusers issue #3455); here an 8-channel UNet is used as it is.
"""

from __future__ import annotations

from pathlib import Path

from dsbuild.core.errors import DsbuildError, require

IP2P_CHANNELS = 8
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def widen_conv_in(unet, channels: int = IP2P_CHANNELS) -> None:
    """Give ``unet.conv_in`` ``channels`` inputs: old weights and bias kept, new ones zero."""
    import torch

    old = unet.conv_in
    new = torch.nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                          bias=old.bias is not None, dtype=old.weight.dtype,
                          device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)


def tiny_components(seed: int = 0) -> dict:
    """dsbuild's tiny SD components with an 8-channel UNet: a tiny InstructPix2Pix model."""
    import torch
    from diffusers import UNet2DConditionModel

    from dsbuild.models import tiny_sd

    comps = tiny_sd.tiny_components(seed)
    torch.manual_seed(seed)
    comps["unet"] = UNet2DConditionModel.from_config(
        {**comps["unet"].config, "in_channels": IP2P_CHANNELS})
    return comps


def _local_or_hub(model: str, what: str) -> str:
    if Path(model).exists():
        return str(model)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise DsbuildError(f"{what}: {model!r} is neither 'tiny', an existing diffusers folder, "
                           "nor a Hub id like 'owner/name'")
    return model


def load_components(model: str, what: str = "--base") -> dict:
    """UNet, VAE, text encoder, tokenizer and scheduler config of an SD-shaped checkpoint."""
    require("diffusers", "train")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = _local_or_hub(model, what)
    loaders = {"unet": UNet2DConditionModel.from_pretrained, "vae": AutoencoderKL.from_pretrained,
               "text_encoder": CLIPTextModel.from_pretrained,
               "tokenizer": CLIPTokenizer.from_pretrained}
    comps: dict = {}
    for part, load in loaders.items():
        try:
            comps[part] = load(src, subfolder=part)
        except Exception as exc:  # noqa: BLE001 - missing folder, bad config, not SD at all
            raise DsbuildError(
                f"{what}: {model!r} is not a Stable Diffusion 1.x/2.x checkpoint: its {part}/ "
                f"does not load ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                f"a base needs {', '.join(p + '/' for p in SD_PARTS)}") from None
    try:
        comps["scheduler_config"] = dict(DDPMScheduler.load_config(src, subfolder="scheduler"))
    except Exception as exc:  # noqa: BLE001
        raise DsbuildError(f"{what}: {model!r} has no readable scheduler/ config "
                           f"({type(exc).__name__})") from None
    check_sd_shape(comps, model, what)
    return comps


def check_sd_shape(comps: dict, model: str, what: str) -> None:
    """Refuse what is not SD 1.x/2.x-shaped (SDXL, other latent sizes, mismatched towers)."""
    ucfg, vcfg = comps["unet"].config, comps["vae"].config
    problems = []
    if ucfg.get("addition_embed_type"):
        problems.append(f"its UNet has addition embeddings ({ucfg['addition_embed_type']}: "
                        "SDXL-style)")
    if ucfg.get("in_channels") not in (4, IP2P_CHANNELS):
        problems.append(f"its UNet takes {ucfg.get('in_channels')} channels (4 or 8 expected)")
    if ucfg.get("out_channels") != vcfg.get("latent_channels", 4):
        problems.append(f"UNet outputs {ucfg.get('out_channels')} channels, the VAE has "
                        f"{vcfg.get('latent_channels')} latent channels")
    hidden = comps["text_encoder"].config.hidden_size
    if ucfg.get("cross_attention_dim") != hidden:
        problems.append(f"UNet cross-attention takes {ucfg.get('cross_attention_dim')}-d text, "
                        f"the text encoder gives {hidden}-d")
    if problems:
        raise DsbuildError(f"{what}: {model!r} is not SD 1.x/2.x-shaped: " + "; ".join(problems))


def load_base(base: str) -> tuple[dict, str]:
    """Components to fine-tune and what was done: 'tiny', 'widened' (SD, 4 → 8 channels, bias
    kept) or 'as is' (an InstructPix2Pix checkpoint: no surgery)."""
    if base == "tiny":
        from dsbuild.models import tiny_sd

        comps = tiny_components()
        comps["scheduler_config"] = dict(comps.pop("scheduler").config)
        tiny_sd.warn_tiny()
        return comps, "tiny"
    comps = load_components(base)
    if comps["unet"].config.in_channels == IP2P_CHANNELS:
        return comps, "as is"
    widen_conv_in(comps["unet"])
    return comps, "widened"


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


def load_editor(model: str, device: str = "cpu", dtype: str = "fp32", quiet: bool = False):
    """An InstructPix2Pix pipeline from 'tiny', a folder (e.g. ``dsbuild train``'s output) or a
    Hub id; anything whose UNet does not take 8 channels is refused with what to do."""
    require("diffusers", "train")
    from dsbuild.models import torch_dtype

    td = torch_dtype(dtype)
    if model == "tiny":
        from dsbuild.models import tiny_sd

        comps = tiny_components()
        sched = comps.pop("scheduler")
        pipe = editor_pipeline(scheduler_config=dict(sched.config), **comps)
        if not quiet:
            tiny_sd.warn_tiny()
    else:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        from dsbuild.models import dtype_kwarg

        src = _local_or_hub(model, "model")
        try:
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                src, safety_checker=None, requires_safety_checker=False, **dtype_kwarg(td))
        except Exception as exc:  # noqa: BLE001
            raise DsbuildError(f"model {model!r}: cannot load an InstructPix2Pix pipeline "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                               ) from None
        pipe.set_progress_bar_config(disable=True)
    ch = pipe.unet.config.in_channels
    if ch != IP2P_CHANNELS:
        raise DsbuildError(f"model {model!r}: its UNet takes {ch} input channels, not 8: it is "
                           "not an InstructPix2Pix model (fine-tune it with `dsbuild train`)")
    pipe = pipe.to(device)
    if pipe.unet.dtype != td:
        pipe = pipe.to(dtype=td)
    return pipe
