"""``dsbuild train`` and ``dsbuild train-generator``: options derived from their settings
models (:class:`dsbuild.train.settings.TrainSettings`, :class:`GeneratorTrainSettings`)."""

from __future__ import annotations

import functools

import click

from dsbuild.cli.options import renamed_option, settings_from, settings_options
from dsbuild.cli.util import wait_option
from dsbuild.train.generator_settings import GeneratorTrainSettings
from dsbuild.train.settings import TrainSettings

wait_folder = functools.partial(wait_option, what="this --out folder")
# --mixed-precision no|fp16|bf16 was --precision's old name ("no": fp32)
old_precision = renamed_option("--mixed-precision", "--precision", "precision",
                               values={"no": "fp32"}, type=click.Choice(["no", "fp16", "bf16"]))


def nothing_to_do(res, data: str) -> str:
    return (f"nothing to do: {res.out} is already trained with these settings ({res.steps} "
            f"steps on {data}); raise --max-steps or --epochs to train on")


@click.command("train")
@old_precision
@click.argument("data")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="output folder: checkpoints, then the pipeline, config and model card")
@click.option("--resume", default=None, metavar="latest|checkpoint-N",
              help="continue from a checkpoint in --out (settings must match)")
@settings_options(TrainSettings, skip={"data"})
@wait_folder
def train_cmd(data, out, resume, **given):
    """Fine-tune InstructPix2Pix on DATA (an export folder or a Hub dataset id)."""
    from dsbuild.train.trainer import train

    s = settings_from(TrainSettings, given, "dsbuild train options", data=data)
    res = train(s, out, resume=resume)
    if res.finished:
        click.echo(nothing_to_do(res, f"{res.rows} rows"))
        return
    start = f" (resumed at step {res.resumed_from})" if res.resumed_from is not None else ""
    last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
    click.echo(f"trained {res.steps} steps on {res.rows} rows{start}{last}; base "
               f"{s.base} ({res.base_kind}); model in {res.out}")


@click.command("train-generator")
@old_precision
@renamed_option("--mode", "--method", "method", type=click.Choice(["dreambooth", "lora"]))
@click.argument("photos", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="output folder: checkpoints, then the generator, config and model card")
@click.option("--resume", default=None, metavar="latest|checkpoint-N",
              help="continue from a checkpoint in --out (settings must match)")
@settings_options(GeneratorTrainSettings, skip={"photos"}, flags={"class_noun": "--class"})
@wait_folder
def train_generator_cmd(photos, out, resume, **given):
    """Tune a Stable Diffusion generator on PHOTOS (DreamBooth or LoRA); use it as
    generate.model."""
    from dsbuild.train.generator import train_generator

    s = settings_from(GeneratorTrainSettings, given, "dsbuild train-generator options",
                      photos=photos)
    res = train_generator(s, out, resume=resume)
    if res.finished:
        click.echo(nothing_to_do(res, f"{res.photos} photos"))
        return
    start = f" (resumed at step {res.resumed_from})" if res.resumed_from is not None else ""
    last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
    prior = f" + {res.class_images} class images" if res.class_images else ""
    click.echo(f"trained {res.steps} steps ({s.method}) on {res.photos} photos{prior}{start}"
               f"{last}; generator in {res.out} (use it as generate.model={res.out})")
