"""Progress bars with rate and ETA (tqdm), quiet when DSBUILD_NO_PROGRESS is set."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0):
    """A tqdm bar on stderr showing count, rate and ETA."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                mininterval=0.5, smoothing=0.1,
                disable=os.environ.get("DSBUILD_NO_PROGRESS") == "1")
