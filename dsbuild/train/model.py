"""The trainer's starting model: an SD base widened to InstructPix2Pix, an existing
InstructPix2Pix checkpoint as it is, or 'tiny' (random, built from config, for offline tests);
the checkpoints load through :mod:`dsbuild.models`.

Widening keeps the first conv's weights **and bias** and zeroes the four new input channels,
so the widened UNet starts out computing exactly what the SD UNet computed. diffusers' example
script rebuilds the conv on every base (an InstructPix2Pix checkpoint included) and drops the
bias (diffusers issue #3455); here an 8-channel UNet is used as it is.
"""

from __future__ import annotations

from dsbuild.models.sd import IP2P_CHANNELS


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


def load_base(base: str) -> tuple[dict, str]:
    """Components to fine-tune and what was done: 'tiny', 'widened' (SD, 4 → 8 channels, bias
    kept) or 'as is' (an InstructPix2Pix checkpoint: no surgery)."""
    if base == "tiny":
        from dsbuild.models.editor import tiny_editor_components
        from dsbuild.models.sd import warn_tiny

        comps = tiny_editor_components()
        comps["scheduler_config"] = dict(comps.pop("scheduler").config)
        warn_tiny()
        return comps, "tiny"
    from dsbuild.models.sd import load_sd_components

    comps = load_sd_components(base, "--base")
    if comps["unet"].config.in_channels == IP2P_CHANNELS:
        return comps, "as is"
    widen_conv_in(comps["unet"])
    return comps, "widened"
