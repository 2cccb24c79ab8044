"""``dsbuild eval`` (models side by side on a split) and ``dsbuild edit`` (one edit)."""

from __future__ import annotations

import json

import click

from dsbuild.core.errors import DsbuildError


def _floats(value: str, flag: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise DsbuildError(f"{flag}: expected numbers separated by commas (got {value!r})"
                           ) from None
    if not out:
        raise DsbuildError(f"{flag}: give at least one value")
    return out


def localize_options(f):
    """The ``--localize`` flags shared by ``dsbuild edit`` and ``dsbuild eval``."""
    opts = [
        click.option("--localize", is_flag=True,
                     help="confine the edit to the referred object (LIME attention penalty)"),
        click.option("--segmenter", default="CIDAS/clipseg-rd64-refined", show_default=True,
                     help="CLIPSeg checkpoint, 'tiny', or 'sam' (detector boxes + SAM)"),
        click.option("--mask-threshold", type=float, default=0.4, show_default=True,
                     help="CLIPSeg probability above which a pixel is the object"),
        click.option("--detector", default="google/owlv2-base-patch16-ensemble",
                     show_default=True,
                     help="with --segmenter sam: OWLv2/OWL-ViT checkpoint boxing the object, "
                          "or 'tiny'"),
        click.option("--sam-model", default="facebook/sam-vit-base", show_default=True,
                     help="with --segmenter sam: SAM checkpoint segmenting each box, or 'tiny'"),
        click.option("--box-threshold", type=click.FloatRange(0, 1), default=0.2,
                     show_default=True,
                     help="with --segmenter sam: detector score above which a box is segmented "
                          "(none: empty mask, nothing edited)"),
        click.option("--alpha", type=float, default=10000.0, show_default=True,
                     help="penalty on unrelated tokens' cross-attention logits in the mask"),
        click.option("--window", default="0,1", show_default=True,
                     help="start,end fractions of the steps that carry the penalty"),
        click.option("--layers", default="down,mid,up", show_default=True,
                     help="UNet parts whose cross-attention carries the penalty"),
        click.option("--llm-model", default=None,
                     help="chat model naming the referred object (default: rules, offline)"),
        click.option("--llm-base-url", default=None,
                     help="OpenAI-compatible endpoint for --llm-model (key: OPENAI_API_KEY)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def localize_settings(segmenter, mask_threshold, detector, sam_model, box_threshold, alpha,
                      window, layers, llm_model, llm_base_url):
    """``LocalizeSettings`` and the referring agent from the ``--localize`` flags."""
    from dsbuild.localize.referring import ReferringAgent
    from dsbuild.localize.settings import LocalizeSettings, RegularisationSettings

    w = _floats(window, "--window")
    if len(w) != 2:
        raise DsbuildError(f"--window: give start,end (got {window!r})")
    reg = RegularisationSettings(alpha=alpha, start=w[0], end=w[1],
                                 layers=tuple(x.strip() for x in layers.split(",") if x.strip()))
    reg.check()
    llm = None
    if llm_model or llm_base_url:
        from dsbuild.llm.settings import LLMSettings

        llm = LLMSettings(model=llm_model or "gpt-4o-mini", base_url=llm_base_url,
                          temperature=0.0, max_tokens=128)
    from pathlib import Path

    cache = Path.home() / ".cache" / "dsbuild" / "referring"
    return (LocalizeSettings(segmenter=segmenter, threshold=mask_threshold, detector=detector,
                             sam_model=sam_model, box_threshold=box_threshold,
                             regularisation=reg),
            ReferringAgent(llm, cache if llm else None))


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--data", required=True, help="export folder or Hub dataset id")
@click.option("--split", default="test", show_default=True)
@click.option("--out", default="dsbuild-eval", show_default=True,
              type=click.Path(file_okay=False), help="edits, eval.json/md, curve and grids")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="text guidance")
@click.option("--image-guidance", default="1.5", show_default=True,
              help="image guidance; comma-separated values sweep (e.g. 1.0,1.2,1.5,1.8)")
@click.option("--steps", type=int, default=50, show_default=True, help="denoising steps")
@click.option("--seed", type=int, default=0, show_default=True, help="row i uses seed+i")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--resolution", type=int, default=256, show_default=True)
@click.option("--limit", type=int, default=None, help="only the first N rows")
@click.option("--clip-model", default="ViT-L-14", show_default=True,
              help="open_clip name (as InstructPix2Pix), 'hf-hub:…', or 'tiny'")
@click.option("--clip-pretrained", default="openai", show_default=True)
@click.option("--dino-model", default="facebook/dinov2-base", show_default=True,
              help="DINOv2 Hub id, folder, or 'tiny'")
@click.option("--offline", is_flag=True,
              help="tiny random CLIP/DINOv2 backbones: runs without downloads, scores are "
                   "placeholders")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result JSON on stdout")
@click.option("--region", type=click.Choice(["referred", "truth"]), default="referred",
              show_default=True,
              help="with --localize: the penalty's region, the referred object segmented or the "
                   "data's edit_mask (P2P blend mask, ground truth)")
@localize_options
def eval_cmd(models, data, split, out, guidance, image_guidance, steps, seed, batch_size,
             resolution, limit, clip_model, clip_pretrained, dino_model, offline, device, dtype,
             as_json, region, localize, segmenter, mask_threshold, detector, sam_model,
             box_threshold, alpha, window, layers, llm_model, llm_base_url):
    """Edit every row of a split with each MODEL ('tiny', a folder, a Hub id); score and compare."""
    from dsbuild.evaluate.run import EvalSettings, evaluate

    if offline:
        clip_model, clip_pretrained, dino_model = "tiny", "none", "tiny"
    s = EvalSettings(split=split, guidance=guidance,
                     image_guidance=_floats(image_guidance, "--image-guidance"), steps=steps,
                     seed=seed, batch_size=batch_size, resolution=resolution, limit=limit,
                     clip_model=clip_model, clip_pretrained=clip_pretrained,
                     dino_model=dino_model, device=device, dtype=dtype)
    agent = None
    if region != "referred" and not localize:
        raise DsbuildError("--region needs --localize")
    if localize:
        s.localize, agent = localize_settings(segmenter, mask_threshold, detector, sam_model,
                                              box_threshold, alpha, window, layers, llm_model,
                                              llm_base_url)
        s.localize.region = region
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
               + (", curve.png" if len(s.image_guidance) > 1 else ""))


@click.command("edit")
@click.argument("model")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.argument("instruction")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="output image")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True, help="text guidance")
@click.option("--image-guidance", type=float, default=1.5, show_default=True)
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--resolution", type=int, default=None,
              help="fit the image to this side first (default: as it is, rounded to 8)")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
              show_default=True)
@localize_options
@click.option("--mask", type=click.Path(exists=True, dir_okay=False), default=None,
              help="with --localize: the region as a PNG (white = edit) instead of segmenting")
def edit_cmd(model, image, instruction, out, seed, guidance, image_guidance, steps, resolution,
             device, dtype, localize, segmenter, mask_threshold, detector, sam_model,
             box_threshold, alpha, window, layers, llm_model, llm_base_url, mask):
    """Edit IMAGE by INSTRUCTION with MODEL ('tiny', a folder or a Hub id); write --out."""
    from dsbuild.evaluate.edit import edit_image

    if mask and not localize:
        raise DsbuildError("--mask needs --localize")
    ls = agent = None
    if localize:
        ls, agent = localize_settings(segmenter, mask_threshold, detector, sam_model,
                                      box_threshold, alpha, window, layers, llm_model,
                                      llm_base_url)
    path = edit_image(model, image, instruction, out, seed=seed, guidance=guidance,
                      image_guidance=image_guidance, steps=steps, resolution=resolution,
                      device=device, dtype=dtype, localize=ls, mask=mask, agent=agent)
    click.echo(f"edited {image} -> {path}")
