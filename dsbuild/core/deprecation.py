"""Old names that keep working for one release: the one-line notice they print.

Options (``--dtype``) and setting keys (``captions.limit``) renamed for one vocabulary across
commands are still read: an option through :func:`renamed_option` (the CLI's and the
benches'), a setting key through its settings model's ``renamed``. Each prints ``dsbuild: OLD
is deprecated, use NEW (removed in the next release)`` once per command (the CLI calls
:func:`reset` when a command starts); a worker process of an executor prints nothing, its
driver already did.
"""

from __future__ import annotations

import functools
import os
import sys

_told: set[tuple[str, str]] = set()


def notice(old: str, new: str) -> None:
    """Print the deprecation line for ``old`` (once per command, never in a worker)."""
    if (old, new) in _told or os.environ.get("DSBUILD_WORKER", "main") != "main":
        return
    _told.add((old, new))
    print(f"dsbuild: {old} is deprecated, use {new} (removed in the next release)",
          file=sys.stderr, flush=True)


def reset() -> None:
    """Forget the notices printed so far (a new command starts)."""
    _told.clear()


def renamed_option(old: str, new: str, dest: str, values: dict | None = None, **kw):
    """A decorator adding ``old`` as a hidden alias of option ``new`` (parameter ``dest``):
    its value goes to ``dest`` (through ``values``, e.g. ``{"no": "fp32"}``), with the line
    "dsbuild: OLD is deprecated, use NEW (removed in the next release)" on stderr. Giving both
    with different values is a usage error. ``kw`` are the alias's click settings (its type)."""
    import click
    from click.core import ParameterSource

    key = "renamed_" + old.lstrip("-").replace("-", "_")

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            value = kwargs.pop(key, None)
            if value is not None:
                value = (values or {}).get(value, value)
                ctx = click.get_current_context()
                if (ctx.get_parameter_source(dest) not in (None, ParameterSource.DEFAULT)
                        and kwargs.get(dest) != value):
                    raise click.UsageError(f"{old} (the old name of {new}) and {new} disagree; "
                                           f"give {new} only")
                notice(old, new)
                kwargs[dest] = value
            return fn(*args, **kwargs)

        return click.option(old, key, default=None, hidden=True, **kw)(wrapper)

    return decorate
