"""``dsbuild train-generator`` (options derived from :class:`GeneratorTrainSettings`) and
``dsbuild eval-generator`` (base vs tuned side by side)."""

from __future__ import annotations

import json

import click
from pydantic import ValidationError

from dsbuild.core.errors import ConfigError
from dsbuild.train.cli import settings_options
from dsbuild.train.generator_settings import GeneratorTrainSettings


def settings_from(photos: str, given: dict) -> GeneratorTrainSettings:
    values = {k: v for k, v in given.items() if v is not None}
    try:
        return GeneratorTrainSettings(photos=photos, **values)
    except ValidationError as exc:
        raise ConfigError("dsbuild train-generator options", [
            (".".join(str(x) for x in e["loc"]), e["msg"]) for e in exc.errors()]) from None


@click.command("train-generator")
@click.argument("photos", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="output folder: checkpoints, then the generator, config and model card")
@click.option("--resume", default=None, metavar="latest|checkpoint-N",
              help="continue from a checkpoint in --out (settings must match)")
@settings_options(GeneratorTrainSettings, {"photos"}, {"class_noun": "--class"})
def train_generator_cmd(photos, out, resume, **given):
    """Tune a Stable Diffusion generator on PHOTOS (DreamBooth or LoRA); use it as
    generate.model."""
    from dsbuild.train.generator import train_generator

    s = settings_from(photos, given)
    res = train_generator(s, out, resume=resume)
    start = f" (resumed at step {res.resumed_from})" if res.resumed_from is not None else ""
    last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
    prior = f" + {res.class_images} class images" if res.class_images else ""
    click.echo(f"trained {res.steps} steps ({s.mode}) on {res.photos} photos{prior}{start}"
               f"{last}; generator in {res.out} (use it as generate.model={res.out})")


@click.command("eval-generator")
@click.argument("tuned", type=click.Path(exists=True, file_okay=False))
@click.option("--base", default=None, help="the model to compare with (default: its base)")
@click.option("--out", default="dsbuild-eval-generator", show_default=True,
              type=click.Path(file_okay=False), help="images, eval.json/md and grid.png")
@click.option("--prompt", "prompts", multiple=True, help="another context prompt (repeatable)")
@click.option("--images-per-prompt", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=25, show_default=True, help="denoising steps")
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="image j uses seed+j")
@click.option("--resolution", type=int, default=None, help="default: the training resolution")
@click.option("--clip-model", default="ViT-L-14", show_default=True)
@click.option("--clip-pretrained", default="openai", show_default=True)
@click.option("--dino-model", default="facebook/dinov2-base", show_default=True)
@click.option("--offline", is_flag=True, help="tiny random CLIP/DINOv2 backbones (placeholder "
              "scores, no downloads)")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result JSON on stdout")
def eval_generator_cmd(tuned, base, out, prompts, images_per_prompt, steps, guidance, seed,
                       resolution, clip_model, clip_pretrained, dino_model, offline, device,
                       as_json):
    """Score TUNED (a train-generator folder) against its base: CLIP-T, CLIP-I/DINO to the
    photos, language drift."""
    from dsbuild.evaluate.generator import GeneratorEvalSettings, evaluate_generator, markdown

    if offline:
        clip_model, clip_pretrained, dino_model = "tiny", "none", "tiny"
    s = GeneratorEvalSettings(prompts=list(prompts), images_per_prompt=images_per_prompt,
                              steps=steps, guidance=guidance, seed=seed, resolution=resolution,
                              clip_model=clip_model, clip_pretrained=clip_pretrained,
                              dino_model=dino_model, device=device)
    res = evaluate_generator(tuned, out, s, base=base)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(markdown(res))
    click.echo(f"written: {out}/eval.json, {out}/eval.md, {out}/grid.png")
