"""The edit's region: a mask the user gives (PNG in, PNG out), or the referring segmenter
(:mod:`dsbuild.models.segment`) that a ``LocalizeSettings`` names."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsbuild.core.errors import DsbuildError


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A user's mask PNG as an ``H x W`` bool array at ``size`` (W, H): pixels brighter than
    half are the region; alpha, if any, counts as opacity."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.convert("LA") if im.mode in ("RGBA", "LA", "PA") else im.convert("L")
            gray = gray.resize(size, Image.NEAREST)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DsbuildError(f"--mask {path}: unreadable image ({type(exc).__name__}: {exc})"
                           ) from None
    arr = np.asarray(gray, dtype=np.float32) / 255.0
    if arr.ndim == 3:  # luminance x alpha
        arr = arr[..., 0] * arr[..., 1]
    return arr > 0.5


def save_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a bool mask as a black/white PNG (atomically)."""
    from PIL import Image

    from dsbuild.core.records import write_image

    write_image(Path(path), Image.fromarray(mask.astype(np.uint8) * 255, "L"))
    return Path(path)


def check_segmenter(s) -> None:
    """One line naming the option, before any model loads, unless the segmenter a
    ``LocalizeSettings`` names can load ('tiny', a folder of the right kind, a cached or
    reachable Hub id): a bad --segmenter never waits for the editor to load first."""
    from dsbuild.core.settings.localize import SAM_SEGMENTER
    from dsbuild.models.available import check_model

    if s.segmenter == SAM_SEGMENTER:
        check_model("owl", s.detector, "--detector")
        check_model("sam", s.sam_model, "--sam-model")
    else:
        check_model("clipseg", s.segmenter, "--segmenter")


def coverage(mask: np.ndarray) -> float:
    """The share of the image a mask covers, in [0, 1] (0 for an empty mask)."""
    return float(mask.mean()) if mask.size else 0.0


def segmenter_for(s, device: str = "cpu"):
    """The segmenter a ``LocalizeSettings`` names (see :func:`dsbuild.models.load_segmenter`)."""
    from dsbuild.models import load_segmenter

    return load_segmenter(s.segmenter, s.threshold, s.detector, s.sam_model, s.box_threshold,
                          device)
