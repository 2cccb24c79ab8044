"""A localized edit: the region (a user mask, or the referred object segmented), then the
editor run with the LIME penalty on that region (``attention.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsbuild.core.settings.localize import LocalizeSettings, RegularisationSettings


def region(image, instruction: str, s: LocalizeSettings, mask: str | Path | None = None,
           agent=None) -> tuple[np.ndarray, list[str], str]:
    """(mask at the image's size, referred phrases, where they came from): the user's mask
    when given, else the referred object(s) segmented by the segmenter ``s`` names (at its
    own threshold: a detector box score for boxes + SAM, a CLIPSeg pixel probability
    otherwise); empty when nothing is found."""
    from dsbuild.localize.mask import load_mask, segmenter_for
    from dsbuild.localize.referring import ReferringAgent

    if mask is not None:
        return load_mask(mask, image.size), [], "user"
    agent = agent or ReferringAgent()
    ref = agent([instruction])[0]
    return segmenter_for(s).mask(image, ref.phrases), ref.phrases, ref.source


def region_line(mask: np.ndarray, phrases: list[str], source: str,
                mask_path: str | Path | None = None) -> str:
    """The one line ``dsbuild edit --localize`` prints: what was referred (or the user's mask)
    and how much of the image the region covers; an empty region says the edit is plain."""
    from dsbuild.localize.mask import coverage

    if source == "user":
        what = f"--mask {mask_path}"
    elif phrases:
        what = ", ".join(repr(p) for p in phrases)
    else:
        what = f"nothing referred ({source})"
    line = f"localize: {what} -> mask covers {100 * coverage(mask):.1f} % of the image"
    return line if mask.any() else f"{line}; nothing to confine, the edit is plain"


def localized_edit(pipe, prompts: list[str], images: list, masks: list[np.ndarray],
                   s: RegularisationSettings, controller=None, **call) -> list:
    """Edit ``images`` by ``prompts`` with the penalty inside ``masks`` (one per image, at the
    image's size); ``call`` goes to the pipeline (steps, guidance, generator...).
    ``controller``: a ``LocalizeController`` (subclass) to use instead of a new one on ``s``."""
    import torch

    from dsbuild.attention.lime import (
        LocalizeController,
        edit_token_mask,
        regularised,
        step_callback,
    )

    w, h = images[0].size
    f = getattr(pipe, "vae_scale_factor", 8)
    ctl = controller or LocalizeController(s)
    ctl.configure(torch.from_numpy(np.stack(masks)).float(),
                  edit_token_mask(pipe.tokenizer, prompts), call["num_inference_steps"],
                  (h // f, w // f))
    with regularised(pipe, ctl), torch.no_grad():
        return pipe(prompts, image=images, callback_on_step_end=step_callback(ctl),
                    **call).images
