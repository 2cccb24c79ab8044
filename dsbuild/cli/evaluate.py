"""``dsbuild eval`` (models side by side on a split), ``dsbuild edit`` (one edit) and
``dsbuild eval-generator`` (a tuned generator against its base).

Options that are settings come from the settings models (:mod:`dsbuild.evaluate.settings`,
:mod:`dsbuild.core.settings.localize`) through :func:`dsbuild.cli.options.settings_options`;
the rest (inputs, outputs, --window's two values, the referring LLM) are written here.
"""

from __future__ import annotations

import json

import click

from dsbuild.cli.options import PRECISIONS, renamed_option, settings_from, settings_options
from dsbuild.cli.train import wait_folder
from dsbuild.core.errors import DsbuildError
from dsbuild.core.settings.localize import LocalizeSettings, RegularisationSettings
from dsbuild.evaluate.settings import EvalSettings, GeneratorEvalSettings

SEGMENTER_FIELDS = ("segmenter", "threshold", "detector", "sam_model", "box_threshold")
TINY_BACKBONES = {"clip_model": "tiny", "clip_pretrained": "none", "dino_model": "tiny"}


def localize_options(f):
    """The ``--localize`` flags shared by ``dsbuild edit`` and ``dsbuild eval``."""
    opts = [
        click.option("--localize", is_flag=True,
                     help="confine the edit to the referred object (LIME attention penalty)"),
        settings_options(LocalizeSettings, only=SEGMENTER_FIELDS,
                         flags={"threshold": "--mask-threshold"}),
        settings_options(RegularisationSettings, only=("alpha",)),
        click.option("--window", default="0,1", show_default=True,
                     help="start,end fractions of the steps that carry the penalty"),
        settings_options(RegularisationSettings, only=("layers",)),
        click.option("--llm-model", default=None,
                     help="chat model naming the referred object (default: rules, offline)"),
        click.option("--llm-base-url", default=None,
                     help="OpenAI-compatible endpoint for --llm-model (key: OPENAI_API_KEY)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def localize_settings(values: dict, region: str | None = None):
    """``LocalizeSettings`` and the referring agent from the ``--localize`` flags."""
    from pathlib import Path

    from dsbuild.localize.referring import ReferringAgent

    window = values["window"]
    try:
        w = [float(v) for v in window.split(",") if v.strip()]
    except ValueError:
        w = []
    if len(w) != 2:
        raise DsbuildError(f"--window: give start,end (got {window!r})")
    reg = settings_from(RegularisationSettings, values, "--localize options", start=w[0],
                        end=w[1])
    reg.check()
    llm = None
    if values["llm_model"] or values["llm_base_url"]:
        from dsbuild.llm.settings import LLMSettings

        llm = LLMSettings(model=values["llm_model"] or "gpt-4o-mini",
                          base_url=values["llm_base_url"], temperature=0.0, max_tokens=128)
    cache = Path.home() / ".cache" / "dsbuild" / "referring"
    region = {"region": region} if region else {}
    return (settings_from(LocalizeSettings, values, "--localize options", regularisation=reg,
                          **region),
            ReferringAgent(llm, cache if llm else None))


@click.command("eval")
@renamed_option("--limit", "--rows", "rows", type=click.IntRange(min=1))
@renamed_option("--dtype", "--precision", "precision", type=click.Choice(PRECISIONS))
@click.argument("models", nargs=-1, required=True)
@click.option("--data", required=True, help="export folder or Hub dataset id")
@click.option("--out", default="dsbuild-eval", show_default=True,
              type=click.Path(file_okay=False), help="edits, eval.json/md, curve and grids")
@settings_options(EvalSettings, skip={"localize"})
@click.option("--offline", is_flag=True,
              help="tiny random CLIP/DINOv2 backbones: runs without downloads, scores are "
                   "placeholders")
@click.option("--json", "as_json", is_flag=True, help="print the result JSON on stdout")
@settings_options(LocalizeSettings, only=("region",))
@localize_options
@wait_folder
def eval_cmd(models, data, out, offline, as_json, region, localize, **values):
    """Edit every row of a split with each MODEL ('tiny', a folder, a Hub id); score and compare."""
    from dsbuild.evaluate.run import evaluate

    if offline:
        values.update(TINY_BACKBONES)
    s = settings_from(EvalSettings, values, "dsbuild eval options")
    agent = None
    if region not in (None, "referred") and not localize:
        raise DsbuildError("--region needs --localize")
    if localize:
        s.localize, agent = localize_settings(values, region)
    res = evaluate(list(models), data, out, s, agent=agent)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    from dsbuild.evaluate.report import markdown_table

    click.echo(markdown_table(res))
    if localize:
        from dsbuild.localize.region import region_table

        click.echo(region_table(res))
    click.echo(f"written: {out}/eval.json, {out}/eval.md, grids"
               + (", curve.png" if len(s.image_guidance) > 1 else "")
               + (", turns grids" if s.turns else ""))


@click.command("edit")
@renamed_option("--dtype", "--precision", "precision", type=click.Choice(PRECISIONS))
@click.argument("model")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.argument("instruction")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="output image (or --session)")
@click.option("--session", "session_dir", default=None, type=click.Path(file_okay=False),
              help="grow a design session in this folder instead: the first call makes it "
                   "from IMAGE, each call adds a node; session.json, tree.html, tree.png")
@click.option("--from", "start", default=None, metavar="NODE",
              help="with --session: the node to edit (default: the last one; 'root': IMAGE)")
@click.option("--seed", type=int, default=0, show_default=True)
@settings_options(EvalSettings, only=("guidance",))
@click.option("--image-guidance", type=float, default=1.5, show_default=True)
@settings_options(EvalSettings, only=("steps",))
@click.option("--resolution", type=int, default=None,
              help="fit the image to this side first (default: as it is, rounded to 8)")
@settings_options(EvalSettings, only=("device", "precision"))
@localize_options
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --localize: the region as a PNG (white = edit) instead of segmenting")
def edit_cmd(model, image, instruction, out, session_dir, start, seed, image_guidance,
             resolution, localize, mask, **values):
    """Edit IMAGE by INSTRUCTION with MODEL ('tiny', a folder or a Hub id); write --out, or
    add the edit to the design session --session DIR (under --from NODE)."""
    from dsbuild.evaluate.edit import edit_image

    if mask and not localize:
        raise DsbuildError("--mask needs --localize")
    if (out is None) == (session_dir is None):
        raise DsbuildError("give --out FILE (one edit) or --session DIR (a design session)")
    if start is not None and session_dir is None:
        raise DsbuildError("--from needs --session")
    ls = agent = None
    if localize:
        ls, agent = localize_settings(values)
    if session_dir is not None:
        return session_edit(model, image, instruction, session_dir, start, seed,
                            image_guidance, resolution, values, localize=ls, mask=mask,
                            agent=agent)
    s = settings_from(EvalSettings, values, "dsbuild edit options")
    path = edit_image(model, image, instruction, out, seed=seed, guidance=s.guidance,
                      image_guidance=image_guidance, steps=s.steps, resolution=resolution,
                      device=s.device, dtype=s.precision, localize=ls, mask=mask, agent=agent)
    click.echo(f"edited {image} -> {path}")


def session_edit(model, image, instruction, folder, start, seed, image_guidance, resolution,
                 values, **localized) -> None:
    """``dsbuild edit --session``: one node more in the design session, then its page."""
    from dsbuild.evaluate.session import grow
    from dsbuild.review.tree import write_folder_tree

    s = settings_from(EvalSettings, values, "dsbuild edit options")
    node = grow(folder, model, image, instruction, start=start, seed=seed,
                guidance=s.guidance, image_guidance=image_guidance, steps=s.steps,
                resolution=resolution, device=s.device, dtype=s.precision, **localized)
    page, png = write_folder_tree(folder)
    click.echo(f"node {node['id']} (turn {node['turn']}, from {node['parent']}): "
               f"{folder}/{node['image']}; tree: {page}, {png.name}")


@click.command("eval-generator")
@click.argument("tuned", type=click.Path(exists=True, file_okay=False))
@click.option("--base", default=None, help="the model to compare with (default: its base)")
@click.option("--out", default="dsbuild-eval-generator", show_default=True,
              type=click.Path(file_okay=False), help="images, eval.json/md and grid.png")
@click.option("--prompt", "prompts", multiple=True, help="another context prompt (repeatable)")
@settings_options(GeneratorEvalSettings, skip={"prompts"})
@click.option("--offline", is_flag=True, help="tiny random CLIP/DINOv2 backbones (placeholder "
              "scores, no downloads)")
@click.option("--json", "as_json", is_flag=True, help="print the result JSON on stdout")
@wait_folder
def eval_generator_cmd(tuned, base, out, prompts, offline, as_json, **values):
    """Score TUNED (a train-generator folder) against its base: CLIP-T, CLIP-I/DINO to the
    photos, language drift."""
    from dsbuild.evaluate.generator import evaluate_generator, markdown

    if offline:
        values.update(TINY_BACKBONES)
    s = settings_from(GeneratorEvalSettings, values, "dsbuild eval-generator options",
                      prompts=list(prompts))
    res = evaluate_generator(tuned, out, s, base=base)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(markdown(res))
    click.echo(f"written: {out}/eval.json, {out}/eval.md, {out}/grid.png")
