"""``dsbuild eval``: edit every row of a split with each model, then score the edits.

Against the input (LangDesign / Emu Edit): CLIP_im, CLIP_dir, CLIP_out, DINO. Against the
ground-truth edited image (MagicBrush): CLIP-I, DINO, L1. No-change rows are scored apart
(CLIP_im, DINO, L1 against the input: how much the editor leaves the image alone). Every
score comes from :mod:`dsbuild.core.metrics` on embeddings from the filter stage's encoders, so
eval and filter cannot disagree on a formula. JSON values are raw cosines (``scale:
cosine``); the markdown table prints them ×100.

Edits are written one PNG per row under ``edits/<model>-<signature>/`` (the signature covers
data, split, guidance, steps, seed and resolution), so a re-run skips what is done and a
changed setting never reuses a stale edit. Each row's generator is seeded by the row, so a
batch gives the edits one at a time would.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

from dsbuild.core.deps import check
from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress
from dsbuild.core.records import write_figure, write_image, write_json, write_text
from dsbuild.evaluate.settings import EvalSettings
from dsbuild.train import data as rows_mod
from dsbuild.train.loop import lock_out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/"))[-60:] or "model"


def edit_dir(out: Path, model: str, data: str, s: EvalSettings, ig: float) -> Path:
    sig = content_id(model, data, s.split, s.guidance, ig, s.steps, s.seed, s.resolution,
                     length=10)
    return out / "edits" / f"{slug(model)}-{sig}"


def make_edits(pipe, rows, folder: Path, s: EvalSettings, ig: float, desc: str,
               masks: dict | None = None) -> list[int]:
    """Edit the rows not yet in ``folder`` (batched; each row with its own seeded generator);
    with ``masks`` (row -> region), each edit carries the LIME penalty on its region. Returns
    the indices of the rows it edited."""
    import torch

    todo = [r for r in rows if not (folder / f"{r.index:05d}.png").exists()]
    with progress(total=len(rows), initial=len(rows) - len(todo), desc=desc, unit="row") as bar:
        for i in range(0, len(todo), s.batch_size):
            batch = todo[i:i + s.batch_size]
            images = [rows_mod.fit(r.input_image, s.resolution) for r in batch]
            gens = [torch.Generator().manual_seed(s.seed + r.index) for r in batch]
            call = dict(generator=gens, num_inference_steps=s.steps, guidance_scale=s.guidance,
                        image_guidance_scale=ig)
            if masks is not None:
                from dsbuild.localize.edit import localized_edit

                edits = localized_edit(pipe, [r.edit_prompt for r in batch], images,
                                       [masks[r.index] for r in batch],
                                       s.localize.regularisation, **call)
            else:
                with torch.no_grad():
                    edits = pipe([r.edit_prompt for r in batch], image=images, **call).images
            for r, im in zip(batch, edits, strict=True):
                write_image(folder / f"{r.index:05d}.png", im)
            bar.update(len(batch))
    return [r.index for r in todo]


def pixels(path: Path):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


def against_truth(edits: list[Path], truths: list[Path], emb: dict) -> dict:
    """Per-row metrics of edits against their ground truth (MagicBrush): CLIP-I, DINO, L1."""
    import torch

    from dsbuild.core import metrics

    def stack(paths, key):
        return torch.stack([emb[p][key] for p in paths])

    return {
        "clip_i": metrics.clip_image(stack(edits, "clip"), stack(truths, "clip")),
        "dino_gt": metrics.dino(stack(edits, "dino"), stack(truths, "dino")),
        "l1": torch.stack([metrics.l1_distance(pixels(a), pixels(b))
                           for a, b in zip(edits, truths, strict=True)]),
    }


def score(rows, edit_paths: dict[int, Path], inputs: dict[int, Path], truths: dict[int, Path],
          emb: dict, text: dict[str, object]) -> dict:
    """Mean metrics of one model at one image guidance: ``edit`` rows and ``no_change`` rows."""
    import torch

    from dsbuild.core import metrics

    def stack(paths, key):
        return torch.stack([emb[p][key] for p in paths])

    out: dict[str, dict] = {"edit": {}, "no_change": {}}
    edit_rows = [r for r in rows if not r.no_change]
    if edit_rows:
        e = [edit_paths[r.index] for r in edit_rows]
        x = [inputs[r.index] for r in edit_rows]
        t = [truths[r.index] for r in edit_rows]
        vals = {
            "clip_im": metrics.clip_image(stack(x, "clip"), stack(e, "clip")),
            "dino": metrics.dino(stack(x, "dino"), stack(e, "dino")),
            **against_truth(e, t, emb),
        }
        cap = [i for i, r in enumerate(edit_rows) if r.original_prompt and r.edited_prompt]
        if cap:
            i0, i1 = stack([x[i] for i in cap], "clip"), stack([e[i] for i in cap], "clip")
            t0 = torch.stack([text[edit_rows[i].original_prompt] for i in cap])
            t1 = torch.stack([text[edit_rows[i].edited_prompt] for i in cap])
            em = metrics.edit_metrics(i0, i1, t0, t1)
            vals["clip_dir"], vals["clip_out"] = em["CLIP_dir"], em["CLIP_out"]
        out["edit"] = metrics.mean_metrics(vals)
        out["edit"]["rows_with_captions"] = len(cap)
    nc = [r for r in rows if r.no_change]
    if nc:
        e = [edit_paths[r.index] for r in nc]
        x = [inputs[r.index] for r in nc]
        out["no_change"] = metrics.mean_metrics({
            "clip_im": metrics.clip_image(stack(x, "clip"), stack(e, "clip")),
            "dino": metrics.dino(stack(x, "dino"), stack(e, "dino")),
            "l1": torch.stack([metrics.l1_distance(pixels(a), pixels(b))
                               for a, b in zip(e, x, strict=True)]),
        })
    return out


def placeholder_backbones(ds, s: EvalSettings) -> EvalSettings:
    """Data made by dsbuild's tiny placeholder models (the offline demo) is scored with the
    tiny backbones too, unless backbones were chosen: real CLIP on noise means nothing, and
    the offline demo must run without downloads. Said on stderr."""
    default = EvalSettings()
    chosen = (s.clip_model, s.clip_pretrained, s.dino_model) != \
        (default.clip_model, default.clip_pretrained, default.dino_model)
    if chosen or "model" not in ds.column_names:
        return s
    made_by = set(ds.unique("model"))
    if made_by != {"tiny"}:
        return s
    print("note: this data was made with dsbuild's tiny placeholder models (offline demo); "
          "scoring it with the tiny CLIP/DINOv2 backbones too (placeholder scores). Pass "
          "--clip-model/--dino-model to choose others.", file=sys.stderr)
    return s.model_copy(update=dict(clip_model="tiny", clip_pretrained="none", dino_model="tiny"))


def load_encoders(s: EvalSettings):
    """The CLIP and DINOv2 encoders the filter stage scores with (the same loaders)."""
    from dsbuild.models import ClipEncoder, DinoEncoder

    hint = (" (offline? pass --offline for dsbuild's tiny backbones, placeholder scores, or "
            "point --clip-model/--dino-model at local copies)")
    try:
        clip = ClipEncoder.load(s.clip_model, s.clip_pretrained, device=s.device,
                                dtype=s.precision, setting="--clip-model",
                                pretrained_setting="--clip-pretrained",
                                preprocess=s.clip_preprocess)
        dino = DinoEncoder.load(s.dino_model, device=s.device, dtype=s.precision,
                                setting="--dino-model")
    except DsbuildError as exc:
        raise DsbuildError(f"eval backbones: {exc}{hint}") from None
    return clip, dino


def evaluate(models: list[str], data: str, out: str | Path, s: EvalSettings | None = None,
             update_cards: bool = True, agent=None) -> dict:
    """Edit and score; writes eval.json, eval.md, curve.png (a sweep) and grids under ``out``.
    With ``s.localize``, ``agent`` (a ``ReferringAgent``; rules when None) names each row's
    referred object. OUT is locked for the run; the inputs are checked before anything is
    written, and a failed run takes back the fitted rows it wrote (its finished edits stay,
    so a rerun resumes)."""
    check("train", what="dsbuild eval")
    from dsbuild.models import checkpoint

    s = s or EvalSettings()
    if not models:
        raise DsbuildError("name at least one MODEL to evaluate")
    if len(set(models)) != len(models):
        raise DsbuildError(f"a model is named twice: {' '.join(models)}")
    for model in models:
        if model != "tiny":
            checkpoint(model, "MODEL", "diffusers folder")
    if s.localize is not None and s.localize.region == "referred":
        from dsbuild.localize.mask import check_segmenter

        check_segmenter(s.localize)  # a bad --segmenter: one line before anything loads
    out = Path(out)
    ds = rows_mod.load_split(data, s.split)
    s = placeholder_backbones(ds, s)
    rows = rows_mod.read_rows(ds, f"{data} [{s.split}]", limit=s.rows)
    plan = None
    if s.turns:
        from dsbuild.evaluate.turns import plan_turns

        plan = plan_turns(rows, ds.column_names, f"{data} [{s.split}]")
    with lock_out(out, "eval"):
        fresh = {p: not p.exists() for p in (out, out / "rows")}
        try:
            return _evaluate(models, data, out, s, rows, update_cards, agent, plan)
        except BaseException:
            if fresh[out / "rows"]:
                shutil.rmtree(out / "rows", ignore_errors=True)
            if fresh[out] and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            raise


def _evaluate(models: list[str], data: str, out: Path, s: EvalSettings, rows, update_cards,
              agent, plan=None) -> dict:
    import torch

    from dsbuild.core.grid import edit_grid
    from dsbuild.core.schema import public_name
    from dsbuild.evaluate.report import curve_figure, markdown_table
    from dsbuild.models import ImageEmbedder, load_editor, resolve_device, resolve_dtype

    inputs = {r.index: out / "rows" / f"{r.index:05d}_input.png" for r in rows}
    truths = {r.index: out / "rows" / f"{r.index:05d}_truth.png" for r in rows}
    # the fitted rows are reused by a re-run, but not across data, split or resolution
    made_for = {"data": data, "split": s.split, "resolution": s.resolution}
    meta = out / "rows" / "rows.json"
    stale = not meta.exists() or json.loads(meta.read_text()) != made_for
    for r in rows:
        if stale or not inputs[r.index].exists():
            write_image(inputs[r.index], rows_mod.fit(r.input_image, s.resolution))
        if stale or not truths[r.index].exists():
            write_image(truths[r.index], rows_mod.fit(r.edited_image, s.resolution))
    if stale:
        write_json(meta, made_for)
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.precision, device)
    masks = mask_folder = None  # the region each localized edit is confined to
    regions: dict[str, dict] = {}  # region name -> {row index: mask} that scores are taken on
    if s.localize is not None:
        from dsbuild.localize.region import edit_regions, localized_dir

        masks, mask_folder, regions = edit_regions(rows, inputs, s.localize, agent, out, data,
                                                   s.split, s.resolution)
    folders: dict[tuple[str, float], Path] = {}
    local: dict[str, Path] = {}
    for model in models:
        pipe = None

        def editor(model=model):
            nonlocal pipe
            pipe = pipe or load_editor(model, device, dtype)
            return pipe

        remade: list[int] = []  # single-turn edits made at the main image guidance
        for ig in s.image_guidance:
            folder = folders[model, ig] = edit_dir(out, model, data, s, ig)
            if all((folder / f"{r.index:05d}.png").exists() for r in rows):
                continue
            made = make_edits(editor(), rows, folder, s, ig, f"edit {slug(model)} ig={ig}")
            if ig == s.main_image_guidance:
                remade = made
        if plan is not None:  # later turns on the model's own outputs (MagicBrush)
            from dsbuild.evaluate.turns import follow

            follow(editor, plan, folders[model, s.main_image_guidance], s,
                   s.main_image_guidance, set(remade), f"edit {slug(model)}", make_edits)
        if masks is not None:  # the localized run, at the main image guidance
            main = folders[model, s.main_image_guidance]
            folder = local[model] = localized_dir(main, s.localize)
            if not all((folder / f"{r.index:05d}.png").exists() for r in rows):
                make_edits(editor(), rows, folder, s, s.main_image_guidance,
                           f"edit {slug(model)} localized", masks=masks)
        del pipe, editor
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    clip, dino = load_encoders(s)
    embedder = ImageEmbedder({"clip": clip, "dino": dino}, batch_size=s.batch_size * 4)
    edit_paths = {key: {r.index: f / f"{r.index:05d}.png" for r in rows}
                  for key, f in folders.items()}
    local_paths = {m: {r.index: f / f"{r.index:05d}.png" for r in rows}
                   for m, f in local.items()}
    own: dict[str, dict[int, Path]] = {}  # model -> each session turn's own edit
    if plan is not None:
        from dsbuild.evaluate.turns import own_paths

        own = {m: own_paths(plan, folders[m, s.main_image_guidance]) for m in models}
    every = [*inputs.values(), *truths.values(),
             *(p for d in (*edit_paths.values(), *local_paths.values(), *own.values())
               for p in d.values())]
    every = list(dict.fromkeys(every))  # turn 1's own edits are single-turn edits
    emb, errors = embedder.embed(every)
    if errors:
        p, (kind, detail) = next(iter(errors.items()))
        raise DsbuildError(f"{p}: {kind} {detail}; delete it and run eval again")
    captions = sorted({c for r in rows for c in (r.original_prompt, r.edited_prompt) if c})
    text = dict(zip(captions, clip.encode_text(captions), strict=True)) if captions else {}
    result: dict = {
        "data": data, "split": s.split,
        "rows": {"edit": sum(not r.no_change for r in rows),
                 "no_change": sum(r.no_change for r in rows)},
        "scale": "cosine (L1: mean absolute difference of pixels in [0, 1])",
        "backbones": {"clip": f"{s.clip_model}/{s.clip_pretrained}", "dino": s.dino_model,
                      "clip_preprocess": s.clip_preprocess},
        "settings": {**s.model_dump(mode="json"), "main_image_guidance": s.main_image_guidance},
        "models": {},
    }
    if plan is not None:
        from dsbuild.evaluate.turns import turns_summary

        result["turns"] = turns_summary(plan, s.main_image_guidance)
    for model in models:
        sweep = [{"image_guidance": ig, **score(rows, edit_paths[model, ig], inputs, truths,
                                                emb, text)} for ig in s.image_guidance]
        main = next(p for p in sweep if p["image_guidance"] == s.main_image_guidance)
        result["models"][model] = {"edit": main["edit"], "no_change": main["no_change"],
                                   "sweep": sweep,
                                   "edits": str(folders[model, s.main_image_guidance])}
        if plan is not None:
            from dsbuild.evaluate.turns import TURNS_DIR, turn_scores

            result["models"][model]["turns"] = {
                **turn_scores(plan, own[model], truths, emb, against_truth),
                "edits": str(folders[model, s.main_image_guidance] / TURNS_DIR)}
        if masks is not None:
            from dsbuild.localize.region import region_scores

            m = result["models"][model]
            m["localized"] = {**score(rows, local_paths[model], inputs, truths, emb, text),
                              "edits": str(local[model])}
            # each region's scores; "referred" keeps its folder names from before truth regions
            m["regions"] = {
                name: {run: region_scores(
                    [r for r in rows if r.index in reg], reg, paths, inputs,
                    out / "region" / (f"{slug(model)}-{run}" if name == "referred"
                                      else f"{slug(model)}-{run}-{name}"), embedder, text)
                       for run, paths in (("plain", edit_paths[model, s.main_image_guidance]),
                                          ("localized", local_paths[model]))}
                for name, reg in regions.items()}
    if masks is not None:
        from dsbuild.localize.region import mask_agreement, region_coverage

        result["localize"] = {"region": s.localize.region, "regions": list(regions),
                              "coverage": region_coverage(rows, regions)}
        if mask_folder is not None:
            result["masks"] = str(mask_folder)
        if {"referred", "truth"} <= set(regions):
            result["mask_agreement"] = mask_agreement(rows, regions["referred"],
                                                      regions["truth"])
    md = markdown_table(result)
    if masks is not None:
        from dsbuild.localize.region import region_table

        md += region_table(result)
    write_json(out / "eval.json", result)
    write_text(out / "eval.md", md)
    if len(s.image_guidance) > 1:
        write_figure(out / "curve.png", curve_figure(result))
    show = rows[:8]
    headers = ["input", *(f"ig={ig}" for ig in s.image_guidance), "truth"]
    for model in models:
        grid = [(r.edit_prompt, rows_mod.fit(r.input_image, s.resolution),
                 [_open(edit_paths[model, ig][r.index]) for ig in s.image_guidance],
                 rows_mod.fit(r.edited_image, s.resolution)) for r in show]
        title = (f"{public_name(model)}: text guidance {s.guidance}, {s.steps} steps, "
                 f"seed {s.seed} (ig = image guidance)")
        write_image(out / f"grid-{slug(model)}.png", edit_grid(grid, title=title,
                                                               headers=headers))
        if plan is not None:
            from dsbuild.evaluate.turns import chain_grid

            write_image(out / f"turns-{slug(model)}.png", chain_grid(
                plan, own[model], truths, inputs,
                f"{public_name(model)}: session turns on its own outputs (image guidance "
                f"{s.main_image_guidance})"))
    if update_cards:
        from dsbuild.train.card import update_eval

        for model in models:
            if Path(model).is_dir():
                update_eval(Path(model), md)
    return result


def _open(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
