"""``dsbuild train``: options derived from :class:`dsbuild.train.settings.TrainSettings`."""

from __future__ import annotations

import typing

import click
from pydantic import ValidationError

from dsbuild.core.errors import ConfigError
from dsbuild.train.settings import TrainSettings

SKIP = {"data"}


def settings_options(model, skip=frozenset(), flags: dict[str, str] | None = None):
    """One option per settings field of ``model`` (``--max-steps``, ``--flip/--no-flip``,
    choices for literals), so a command and its settings model cannot drift apart; ``flags``
    renames a field's option (``class_noun`` -> ``--class``)."""
    flags = flags or {}

    def decorate(fn):
        for name, f in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            flag = flags.get(name, "--" + name.replace("_", "-"))
            ann = f.annotation
            args = typing.get_args(ann)
            kw: dict = {"default": None,
                        "help": (f.description or "") + f" [default: {f.default}]"}
            if ann is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", name, **kw)(fn)
                continue
            if typing.get_origin(ann) is typing.Literal:
                kw["type"] = click.Choice(args)
            else:
                inner = [a for a in args if a is not type(None)] or [ann]
                kw["type"] = {int: int, float: float}.get(inner[0], str)
            fn = click.option(flag, name, **kw)(fn)
        return fn

    return decorate


_settings_options = settings_options(TrainSettings, SKIP)


def settings_from(data: str, given: dict) -> TrainSettings:
    values = {k: v for k, v in given.items() if v is not None}
    try:
        return TrainSettings(data=data, **values)
    except ValidationError as exc:
        raise ConfigError("dsbuild train options", [
            (".".join(str(x) for x in e["loc"]), e["msg"]) for e in exc.errors()]) from None


@click.command("train")
@click.argument("data")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="output folder: checkpoints, then the pipeline, config and model card")
@click.option("--resume", default=None, metavar="latest|checkpoint-N",
              help="continue from a checkpoint in --out (settings must match)")
@_settings_options
def train_cmd(data, out, resume, **given):
    """Fine-tune InstructPix2Pix on DATA (an export folder or a Hub dataset id)."""
    from dsbuild.train.trainer import train

    s = settings_from(data, given)
    res = train(s, out, resume=resume)
    start = f" (resumed at step {res.resumed_from})" if res.resumed_from is not None else ""
    last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
    click.echo(f"trained {res.steps} steps on {res.rows} rows{start}{last}; base "
               f"{s.base} ({res.base_kind}); model in {res.out}")
