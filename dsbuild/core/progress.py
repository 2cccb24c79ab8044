"""Progress bars with rate and ETA (tqdm), shown only where someone watches them.

The rule (docs/concepts.md, "Progress bars"): ``DSBUILD_NO_PROGRESS=1`` turns every bar off and
``DSBUILD_NO_PROGRESS=0`` turns them on; otherwise they are off when stderr is not a terminal
(a log file, a pipe, a worker's log) or the ``CI`` variable is set (GitHub Actions, GitLab CI
and most others set it), so a log never fills with ``\r`` lines. The libraries' own bars
(datasets, transformers, diffusers, the Hub's downloads) follow the same rule
(:func:`dsbuild.core.quiet.install`).
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

NO_PROGRESS_ENV = "DSBUILD_NO_PROGRESS"


def _false(value: str) -> bool:
    return value.strip().lower() in ("", "0", "false", "no", "off")


def enabled() -> bool:
    """Whether bars show: DSBUILD_NO_PROGRESS=1 never, =0 always; else only on a terminal's
    stderr and outside CI."""
    forced = os.environ.get(NO_PROGRESS_ENV)
    if forced is not None and forced.strip() != "":
        return _false(forced)
    if not _false(os.environ.get("CI", "")):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0):
    """A tqdm bar on stderr showing count, rate and ETA (off by :func:`enabled`'s rule)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                mininterval=0.5, smoothing=0.1, disable=not enabled())


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
