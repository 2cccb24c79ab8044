"""Click options derived from pydantic settings models: the one place a setting becomes an option.

One option per field (``--max-steps``, ``--flip/--no-flip``, choices for literals, comma-separated
values for lists), its help the field's description and its default the model's, so a command
and its settings model cannot drift apart. Every option defaults to None ("not given"), so the
model's own default applies and :func:`settings_from` can tell what the user chose.

:func:`renamed_option` keeps an old option name working for one release: hidden from --help
(docs/cli.md shows one name per idea), read into the new option's parameter, with a one-line
notice on stderr.
"""

from __future__ import annotations

import types
import typing

import click
from pydantic import BaseModel, ValidationError

from dsbuild.core.deprecation import renamed_option  # noqa: F401 - the commands' import
from dsbuild.core.errors import ConfigError
from dsbuild.core.settings import PRECISIONS  # noqa: F401 - the commands' import


def _shown(value) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _split(ctx, param, value):
    """Comma-separated values -> a list (None stays None: not given)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise click.BadParameter("give at least one value", ctx=ctx, param=param)
    return items


def settings_options(model: type[BaseModel], *, only: typing.Iterable[str] | None = None,
                     skip: typing.Iterable[str] = (), flags: dict[str, str] | None = None,
                     section: str | None = None):
    """A decorator adding one option per field of ``model`` (those in ``only``, less ``skip``),
    in the model's order; ``flags`` renames a field's option (``class_noun`` -> ``--class``).
    The command receives each value under the field's name, None when it was not given.
    ``section``: the values are saved into a build's dsbuild.yaml under it, so the help names
    the key instead of the model's default (a build keeps what it was given before)."""
    flags, skip = flags or {}, set(skip)
    names = [n for n in model.model_fields if n not in skip and (only is None or n in only)]

    def decorate(fn):
        for name in reversed(names):
            fn = _add(fn, model, name, flags.get(name, "--" + name.replace("_", "-")), section)
        return fn

    return decorate


def _add(fn, model: type[BaseModel], name: str, flag: str, section: str | None):
    f = model.model_fields[name]
    default = f.get_default(call_default_factory=True)
    shown = (f" (saved as {section}.{name}; default: the build's setting)" if section
             else "" if default is None else f" [default: {_shown(default)}]")
    kw: dict = {"default": None, "help": (f.description or "") + shown}
    ann = f.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    origin = typing.get_origin(ann)
    if ann is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, **kw)(fn)
    if origin is typing.Literal:
        kw["type"] = click.Choice(typing.get_args(ann))
    elif origin in (list, tuple):
        item = typing.get_args(ann)[0]
        kw["metavar"] = "A,B,..."
        kw["callback"] = _numbers(item) if item in (int, float) else _split
    elif ann in (int, float):
        kw["type"] = _number_type(ann, f.metadata)
    else:
        kw["type"] = str
    return click.option(flag, name, **kw)(fn)


def _number_type(kind, metadata):
    """``int``/``float``, or a click range carrying the field's bounds (ge, gt, le, lt), so a
    value out of range is a usage error naming the option."""
    b = {k: getattr(m, k) for m in metadata for k in ("ge", "gt", "le", "lt")
         if getattr(m, k, None) is not None}
    if not b:
        return kind
    rng = click.IntRange if kind is int else click.FloatRange
    return rng(min=b.get("ge", b.get("gt")), max=b.get("le", b.get("lt")),
               min_open="gt" in b, max_open="lt" in b)


def _numbers(kind):
    def parse(ctx, param, value):
        items = _split(ctx, param, value)
        if items is None:
            return None
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"expected numbers separated by commas (got {value!r})",
                                     ctx=ctx, param=param) from None
    return parse


def given(values: dict, model: type[BaseModel]) -> dict:
    """The fields of ``model`` among ``values`` that the user gave (not None)."""
    return {k: v for k, v in values.items() if k in model.model_fields and v is not None}


def settings_from(model: type[BaseModel], values: dict, what: str, **fixed):
    """``model`` from the given options (and ``fixed`` values); a bad value is a ConfigError
    naming the option's field."""
    try:
        return model(**fixed, **given(values, model))
    except ValidationError as exc:
        raise ConfigError(what, [(".".join(str(x) for x in e["loc"]), e["msg"])
                                 for e in exc.errors()]) from None

