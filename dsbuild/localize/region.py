"""``dsbuild eval --localize``: the region of every row, and scores inside and outside it
for the plain and the localized edits.

Two kinds of region: **referred**, the object the instruction names segmented in the input
(what an editor can know at edit time), and **truth**, the data's ``edit_mask`` column (the
Prompt-to-Prompt local-blend mask the pair was generated with: outside it the edited image
kept the input's latents, so it is where the edit really happened). The localized edit's
penalty goes on one of them (``LocalizeSettings.region``); scores are taken on every region
the run has, and where both exist their agreement (IoU) measures the referring segmentation.

Outside the mask (what should not change): L1 over the complement's pixels, and DINO between
input and edit with the region painted mid-grey. Inside (the edit itself): CLIP direction
between the region's bounding-box crops of input and edit and the caption change. A row whose
mask is empty has no inside score; its outside is the whole image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsbuild.core.hashing import content_id
from dsbuild.core.records import write_image, write_text

# (key, title); L1 prints as it is, cosines ×100 (as eval's main table)
REGION_COLUMNS = (("l1_outside", "L1 outside ↓"), ("dino_outside", "DINO outside ↑"),
                  ("clip_dir_inside", "CLIP_dir inside ↑"), ("l1_inside", "L1 inside"))


def _rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _pil(arr: np.ndarray):
    from PIL import Image

    return Image.fromarray((arr.clip(0, 1) * 255).round().astype(np.uint8))


def outside(arr: np.ndarray, mask: np.ndarray):
    """The image with the region painted mid-grey (what DINO compares outside the edit)."""
    out = arr.copy()
    out[mask] = 0.5
    return _pil(out)


def crop(arr: np.ndarray, mask: np.ndarray):
    """The region's bounding-box crop; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    return _pil(arr[ys.min():ys.max() + 1, xs.min():xs.max() + 1])


def eval_masks(rows, inputs: dict[int, Path], s, agent, out: Path, data: str, split: str,
               resolution: int) -> tuple[dict[int, np.ndarray], Path]:
    """Each row's region on its (fitted) input image, referred from its instruction; written
    as PNGs (and the phrases as ``referred.json``) under a folder named by the settings and
    the resolution the inputs were fitted to, so a re-run reuses them and another resolution
    segments its own inputs."""
    from PIL import Image

    from dsbuild.localize.mask import load_mask, save_mask, segmenter_for
    from dsbuild.localize.referring import ReferringAgent

    agent = agent or ReferringAgent()
    llm = agent.settings
    sig = content_id(data, split, s.segmenter, s.threshold,
                     None if llm is None else (llm.model, llm.base_url),
                     resolution,
                     *((s.detector, s.sam_model, s.box_threshold) if s.segmenter == "sam"
                       else ()), length=10)
    folder = out / f"masks-{sig}"
    todo = [r for r in rows if not (folder / f"{r.index:05d}.png").exists()]
    if todo:
        seg = segmenter_for(s)
        refs = agent([r.edit_prompt for r in todo])
        listed = folder / "referred.json"
        referred = json.loads(listed.read_text()) if listed.exists() else {}
        for r, ref in zip(todo, refs, strict=True):
            with Image.open(inputs[r.index]) as im:
                m = seg.mask(im.convert("RGB"), ref.phrases)  # at the threshold of its kind
            referred[f"{r.index:05d}"] = {"instruction": r.edit_prompt, "phrases": ref.phrases,
                                          "source": ref.source, "pixels": int(m.sum())}
            save_mask(folder / f"{r.index:05d}.png", m)
        write_text(listed, json.dumps(referred, indent=1, sort_keys=True))
    masks: dict[int, np.ndarray] = {}
    for r in rows:
        with Image.open(inputs[r.index]) as im:
            size = im.size
        masks[r.index] = load_mask(folder / f"{r.index:05d}.png", size)
    return masks, folder


def truth_masks(rows, inputs: dict[int, Path], resolution: int) -> dict[int, np.ndarray]:
    """The rows' ``edit_mask`` (ground-truth edit regions) fitted as their input images were
    (same resize and centre crop), as bool arrays; written as ``rows/<i>_edit_mask.png``.
    Rows without one (no-change rows, pairs made without local blend) are left out."""
    from dsbuild.localize.mask import save_mask
    from dsbuild.train.data import fit

    got: dict[int, np.ndarray] = {}
    for r in rows:
        if r.edit_mask is None or r.no_change:
            continue
        m = np.asarray(fit(r.edit_mask.convert("L"), resolution), dtype=np.float32) > 127.5
        save_mask(inputs[r.index].with_name(f"{r.index:05d}_edit_mask.png"), m)
        got[r.index] = m
    return got


def edit_regions(rows, inputs: dict[int, Path], s, agent, out: Path, data: str, split: str,
                 resolution: int) -> tuple[dict[int, np.ndarray], Path | None, dict]:
    """(each row's penalty region, the referred masks' folder or None, the regions scores are
    taken on: name -> {row: mask}). ``s.region`` "truth" confines each edit to the data's
    ``edit_mask`` (an empty region, so a plain edit, for rows without one) and segments nothing."""
    from dsbuild.core.errors import DsbuildError

    truth = truth_masks(rows, inputs, resolution)
    regions: dict[str, dict] = {}
    folder = None
    if s.region == "truth":
        if not truth:
            raise DsbuildError(
                f"--region truth: {data} [{split}] has no edit_mask (the P2P local-blend mask); "
                "export a build generated with generate.blend=true, or use --region referred")
        empty = np.zeros((resolution, resolution), dtype=bool)  # inputs are fitted square
        masks = {r.index: truth.get(r.index, empty) for r in rows}
    elif s.region == "referred":
        masks, folder = eval_masks(rows, inputs, s, agent, out, data, split, resolution)
        regions["referred"] = masks
    else:
        raise DsbuildError(f"localize region must be 'referred' or 'truth' (got {s.region!r})")
    if truth:
        regions["truth"] = truth
    return masks, folder, regions


def region_coverage(rows, regions: dict[str, dict[int, np.ndarray]]) -> dict:
    """Per region (referred, truth): how many edit rows have one, how many of those are empty,
    and the mean share of the image they cover (``mean``, in [0, 1])."""
    from dsbuild.localize.mask import coverage

    out = {}
    for name, masks in regions.items():
        got = [masks[r.index] for r in rows if not r.no_change and r.index in masks]
        out[name] = {"rows": len(got), "empty": sum(not m.any() for m in got),
                     "mean": float(np.mean([coverage(m) for m in got])) if got else None}
    return out


def mask_agreement(rows, referred: dict[int, np.ndarray], truth: dict[int, np.ndarray]) -> dict:
    """How well the referred regions match the ground truth, over edit rows that have both:
    mean IoU, and how many referred masks came out empty while the truth was not."""
    ious, empty = [], 0
    for r in rows:
        if r.no_change or r.index not in truth or r.index not in referred:
            continue
        a, b = referred[r.index], truth[r.index]
        union = int((a | b).sum())
        if not union:
            continue
        ious.append(int((a & b).sum()) / union)
        empty += int(not a.any())
    return {"iou": float(np.mean(ious)) if ious else None, "rows": len(ious),
            "referred_empty": empty}


def localize_signature(s) -> str:
    """What the localized edits depend on. Settings added since the first localized evals
    sign only when they differ from what those evals did, so their folders keep their names;
    with the truth region the segmenter plays no part."""
    d = s.model_dump()
    if d.get("region", "referred") == "referred":
        d.pop("region", None)
        if d.get("segmenter") != "sam":
            for key in ("detector", "sam_model", "box_threshold"):
                d.pop(key, None)
    else:
        d = {"region": d["region"], "regularisation": d["regularisation"]}
    return content_id(d, length=8)


def localized_dir(plain: Path, s) -> Path:
    """The localized edits' folder: next to the plain one, signed by the region and penalty."""
    return plain.with_name(f"{plain.name}-loc-{localize_signature(s)}")


def region_scores(rows, masks: dict[int, np.ndarray], edits: dict[int, Path],
                  inputs: dict[int, Path], folder: Path, embedder, text: dict) -> dict:
    """Mean region scores of one set of edits (see the module docstring); ``folder`` holds the
    grey-filled and cropped images that are embedded."""
    import torch

    from dsbuild.core import metrics

    rows = [r for r in rows if not r.no_change]
    l1_out, l1_in, pairs_out, pairs_in = [], [], [], []
    for r in rows:
        x, e, m = _rgb(inputs[r.index]), _rgb(edits[r.index]), masks[r.index]
        diff = np.abs(e - x).mean(-1)
        l1_out.append(float(diff[~m].mean()) if (~m).any() else float("nan"))
        l1_in.append(float(diff[m].mean()) if m.any() else float("nan"))
        if (~m).any():  # a region covering the whole image leaves nothing outside to compare
            po = (folder / f"{r.index:05d}_in_out.png", folder / f"{r.index:05d}_edit_out.png")
            write_image(po[0], outside(x, m))
            write_image(po[1], outside(e, m))
            pairs_out.append(po)
        cx, ce = crop(x, m), crop(e, m)
        if cx is not None and r.original_prompt and r.edited_prompt:
            pi = (folder / f"{r.index:05d}_in_crop.png", folder / f"{r.index:05d}_edit_crop.png")
            write_image(pi[0], cx)
            write_image(pi[1], ce)
            pairs_in.append((r, pi))
    if not rows:
        return {}
    emb, errors = embedder.embed([p for pair in pairs_out for p in pair]
                                 + [p for _, pair in pairs_in for p in pair])
    if errors:
        p, (kind, detail) = next(iter(errors.items()))
        raise RuntimeError(f"{p}: {kind} {detail}")
    vals = {"l1_outside": torch.tensor(l1_out), "l1_inside": torch.tensor(l1_in),
            "dino_outside": metrics.dino(torch.stack([emb[a]["dino"] for a, _ in pairs_out]),
                                         torch.stack([emb[b]["dino"] for _, b in pairs_out]))
            if pairs_out else torch.tensor([float("nan")])}
    if pairs_in:
        vals["clip_dir_inside"] = metrics.clip_direction(
            torch.stack([emb[a]["clip"] for _, (a, _) in pairs_in]),
            torch.stack([emb[b]["clip"] for _, (_, b) in pairs_in]),
            torch.stack([text[r.original_prompt] for r, _ in pairs_in]),
            torch.stack([text[r.edited_prompt] for r, _ in pairs_in]))
    out = metrics.mean_metrics(vals)
    out["rows_with_region"] = int(sum(bool(masks[r.index].any()) for r in rows))
    return out


REGION_TITLES = {"referred": "referred (segmented)", "truth": "truth (edit_mask)"}


def region_table(result: dict) -> str:
    """The markdown section comparing plain and localized edits inside and outside each
    region, and how well the referred regions match the ground truth."""
    from dsbuild.core.schema import public_name

    def fmt(k, v):
        if v is None or v != v:
            return "–"
        return f"{v:.4f}" if k.startswith("l1") else f"{100 * v:.2f}"

    loc = result.get("localize") or {}
    where = ("the data's edit_mask (P2P local-blend mask)" if loc.get("region") == "truth"
             else "the referred object's segmentation")
    lines = ["", f"Localized edits (`--localize`, penalty on {where}): change outside the region "
             "(L1, DINO on the image with the region greyed) and the edit inside it (CLIP_dir "
             "on the region's crop), plain editing next to the LIME-regularised one:", "",
             "| model | run | region | " + " | ".join(t for _, t in REGION_COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(REGION_COLUMNS)]
    for name, m in result["models"].items():
        for region, runs in (m.get("regions") or {}).items():
            for run in ("plain", "localized"):
                reg = runs.get(run) or {}
                lines.append(f"| {public_name(name)} | {run} | {REGION_TITLES.get(region, region)}"
                             f" ({reg.get('rows_with_region', 0)} rows) | "
                             + " | ".join(fmt(k, reg.get(k)) for k, _ in REGION_COLUMNS) + " |")
    if any("| –" in line for line in lines):
        lines += ["", "– : undefined (no pixel outside the region in any row, e.g. masks "
                  "covering the whole image, or no row with a region and captions)."]
    for region, c in (loc.get("coverage") or {}).items():
        if c.get("mean") is not None:
            lines += ["", f"{REGION_TITLES.get(region, region)}: the mask covers "
                      f"{100 * c['mean']:.1f} % of the image on average over {c['rows']} "
                      f"rows ({c['empty']} empty)."]
    agree = result.get("mask_agreement")
    if agree and agree.get("rows"):
        lines += ["", f"Referred vs ground-truth region: mean IoU {agree['iou']:.3f} over "
                  f"{agree['rows']} rows; {agree['referred_empty']} referred masks empty where "
                  "the truth is not."]
    return "\n".join(lines) + "\n"
