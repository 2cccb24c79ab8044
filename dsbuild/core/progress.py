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


def update_postfix(bar, refresh: bool = False, **fields) -> None:
    """Set some fields of a bar's postfix and keep the others (tqdm's set_postfix replaces
    them all), so e.g. rejections and retries show side by side. ``bar`` may be None."""
    if bar is None:
        return
    shown = bar.__dict__.setdefault("_dsbuild_postfix", {})
    shown.update(fields)
    bar.set_postfix(shown, refresh=refresh)


def retry_postfix(bar):
    """An ``on_retry`` hook for ``dsbuild.llm.client.ChatClient``: each retry shows on the bar as
    ``retries=N, last=<status>`` at once (a hanging endpoint otherwise looks like a still 0 %)."""
    count = 0

    def on_retry(event) -> None:
        nonlocal count
        count += 1
        update_postfix(bar, refresh=True, retries=count, last=event.reason)

    return on_retry
