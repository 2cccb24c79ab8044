"""One edit from the shell (``dsbuild edit``): the Python call behind it."""

from __future__ import annotations

import sys
from pathlib import Path

from dsbuild.core.deps import check
from dsbuild.core.errors import DsbuildError


def edit_image(model: str, image: str | Path, instruction: str, out: str | Path, seed: int = 0,
               guidance: float = 7.5, image_guidance: float = 1.5, steps: int = 50,
               resolution: int | None = None, device: str = "auto", dtype: str = "auto",
               pipe=None, localize=None, mask: str | Path | None = None, agent=None) -> Path:
    """Edit ``image`` by ``instruction``; the result is written atomically to ``out``.
    ``localize`` (a ``LocalizeSettings``) confines the edit to ``mask`` or, without one, to the
    referred object segmented (``agent``: the referring LLM; rules without it); the region is
    written next to ``out`` as ``<stem>_mask.png``."""
    check("train", what="dsbuild edit")
    import torch
    from PIL import Image

    from dsbuild.core.records import write_image
    from dsbuild.models import load_editor, resolve_device, resolve_dtype
    from dsbuild.train.data import fit

    if not instruction.strip():
        raise DsbuildError("the instruction is empty")
    if localize is not None and mask is None:
        from dsbuild.localize.mask import check_segmenter

        check_segmenter(localize)  # a bad --segmenter: one line before any model loads
    try:
        with Image.open(image) as im:
            src = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DsbuildError(f"{image}: unreadable image ({type(exc).__name__}: {exc})") from None
    if resolution:
        src = fit(src, resolution)
    else:
        w, h = src.size
        src = src.resize((max(8, w - w % 8), max(8, h - h % 8)))
    out = Path(out)
    if localize is not None:  # the region first: the segmenter loads before the editor
        from dsbuild.localize.edit import region, region_line
        from dsbuild.localize.mask import save_mask

        m, phrases, source = region(src, instruction, localize, mask=mask, agent=agent)
        print(region_line(m, phrases, source, mask), file=sys.stderr)
    if pipe is None:
        dev = resolve_device(device)
        pipe = load_editor(model, dev, resolve_dtype(dtype, dev))
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(out.suffix.lower(), "PNG")
    call = dict(num_inference_steps=steps, guidance_scale=guidance,
                image_guidance_scale=image_guidance, generator=torch.Generator().manual_seed(seed))
    if localize is not None:
        from dsbuild.localize.edit import localized_edit

        edited = localized_edit(pipe, [instruction], [src], [m], localize.regularisation,
                                **call)[0]
    else:
        with torch.no_grad():
            edited = pipe(instruction, image=src, **call).images[0]
    write_image(out, edited, format=fmt)
    if localize is not None:
        save_mask(out.with_name(f"{out.stem}_mask.png"), m)
    return out
