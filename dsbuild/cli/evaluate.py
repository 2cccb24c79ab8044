"""``dsbuild eval`` (models side by side on a split), ``dsbuild edit`` (one edit) and
``dsbuild eval-generator`` (a tuned generator against its base).

Options that are settings come from the settings models (:mod:`dsbuild.evaluate.settings`,
:mod:`dsbuild.core.settings.localize`) through :func:`dsbuild.cli.options.settings_options`;
the rest (inputs, outputs, --window's two values, the referring LLM) are written here.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def named_values(pairs: tuple[str, ...], option: str) -> dict[str, str]:
    """``NAME=VALUE`` options (``--suite-data magicbrush=DIR``) as a dict."""
    from dsbuild.evaluate.suites import SUITES

    out: dict[str, str] = {}
    for p in pairs:
        name, sep, value = p.partition("=")
        if not sep or not value or name not in SUITES or name == "export":
            raise DsbuildError(f"{option} {p!r}: write NAME=VALUE with NAME one of "
                               f"{', '.join(n for n in SUITES if n != 'export')}")
        out[name] = value
    return out


def suite_options(f):
    """``--suite`` and what the public suites read: local copies, splits, the judge."""
    from dsbuild.evaluate.suites import SUITES

    opts = [
        click.option("--suite", "suites", multiple=True, type=click.Choice(list(SUITES)),
                     help="a suite to score on (repeatable; default: export, the --data "
                          "split): export, magicbrush, emu-edit, gedit-bench, imgedit"),
        click.option("--suite-data", "suite_data", multiple=True, metavar="NAME=DIR",
                     help="a local copy of a suite in its Hub layout (repeatable)"),
        click.option("--suite-split", "suite_split", multiple=True, metavar="NAME=SPLIT",
                     help="another split of a suite (repeatable)"),
        click.option("--judge-model", default=None,
                     help="VLM judge of gedit-bench/imgedit (default gpt-4.1-2025-04-14)"),
        click.option("--judge-base-url", default=None,
                     help="its OpenAI-compatible endpoint (vLLM, OpenAI, ...)"),
        click.option("--judge-api-key-env", default=None,
                     help="env var holding its key (default OPENAI_API_KEY)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command("eval")
@renamed_option("--limit", "--rows", "rows", type=click.IntRange(min=1))
@renamed_option("--dtype", "--precision", "precision", type=click.Choice(PRECISIONS))
@click.argument("models", nargs=-1, required=True)
@click.option("--data", default=None, help="export folder or Hub dataset id (the export suite)")
@click.option("--out", default="dsbuild-eval", show_default=True,
              type=click.Path(file_okay=False), help="edits, eval.json/md, curve and grids; "
              "with --suite: report.json/md/png and a folder per suite")
@suite_options
@settings_options(EvalSettings, skip={"localize"})
@click.option("--offline", is_flag=True,
              help="tiny random CLIP/DINOv2 backbones: runs without downloads, scores are "
                   "placeholders")
@click.option("--json", "as_json", is_flag=True, help="print the result JSON on stdout")
@settings_options(LocalizeSettings, only=("region",))
@localize_options
@wait_folder
def eval_cmd(models, data, out, suites, suite_data, suite_split, judge_model, judge_base_url,
             judge_api_key_env, offline, as_json, region, localize, **values):
    """Edit every row of a split with each MODEL ('tiny', a folder, a Hub id); score and compare.
    With --suite, on public suites too (MagicBrush, Emu Edit, GEdit-Bench, ImgEdit), one
    report."""
    from dsbuild.evaluate.run import evaluate

    if offline:
        values.update(TINY_BACKBONES)
        values.update({f"suite_{k}": v for k, v in TINY_BACKBONES.items()})
    s = settings_from(EvalSettings, values, "dsbuild eval options")
    agent = None
    if region not in (None, "referred") and not localize:
        raise DsbuildError("--region needs --localize")
    if localize:
        s.localize, agent = localize_settings(values, region)
    suites = list(suites) or ["export"]
    if suites != ["export"] or suite_data or suite_split:
        return suite_eval(models, data, out, s, suites, suite_data, suite_split, as_json, agent,
                          {"model": judge_model, "base_url": judge_base_url,
                           "api_key_env": judge_api_key_env})
    if not data:
        raise DsbuildError("pass --data EXPORT (the split to edit), or name public suites "
                           "with --suite")
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


def suite_eval(models, data, out, s, suites, suite_data, suite_split, as_json, agent, judge):
    """``dsbuild eval --suite ...``: every model on every suite, the one report."""
    from dsbuild.evaluate.settings import SuiteJudgeSettings
    from dsbuild.evaluate.suites import suite
    from dsbuild.evaluate.suites.run import no_judge, run_suites

    judged = [n for n in suites if n != "export" and suite(n).needs_judge]
    js = None
    if judged:
        given = {k: v for k, v in judge.items() if v is not None}
        if "base_url" not in given and "model" not in given:
            raise no_judge(judged)
        js = SuiteJudgeSettings(**given)
    res = run_suites(list(models), suites, out, s, data=data,
                     sources=named_values(suite_data, "--suite-data"),
                     splits=named_values(suite_split, "--suite-split"), judge=js, agent=agent)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo((Path(out) / "report.md").read_text())
    click.echo(f"written: {out}/report.md, {out}/report.json, {out}/report.png, a folder per "
               "suite")


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
