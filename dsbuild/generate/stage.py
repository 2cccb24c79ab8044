"""The generate stage: triples in, pair records and PNGs out; resumable and shardable.

Triples are sharded by input caption, so every edit of a caption (and its shared source)
stays on one rank. For each pair both PNGs are written atomically before its record line, so
a killed run resumes with no duplicate pair and no half-written image.

This module imports without torch (``dsbuild run`` imports every stage's run function); the
P2P modules that need torch and diffusers are imported when there is work, and
``run_generate`` checks first that they are installed.
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from dsbuild.core import join
from dsbuild.core.build import Build, StageResult, select_shard
from dsbuild.core.errors import DsbuildError, StageFailed, require_installed
from dsbuild.core.progress import progress
from dsbuild.core.records import write_bytes

if TYPE_CHECKING:
    from dsbuild.generate.sweep import PairPlan

# what generating imports (the ``gen`` extra); checked before any work
GEN_MODULES = ("torch", "diffusers", "transformers")


def check_installed() -> None:
    """Fail with the pip line that fixes it when the ``gen`` extra is not installed."""
    require_installed("gen", *GEN_MODULES, what="dsbuild generate")


def png_bytes(image: np.ndarray) -> bytes:
    """Float [0, 1] image -> PNG bytes (deterministic)."""
    buf = io.BytesIO()
    Image.fromarray((image * 255).round().clip(0, 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """Boolean H x W mask -> 8-bit greyscale PNG bytes (255 where the edit may change pixels)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype("uint8") * 255).save(buf, format="PNG")  # 2-D uint8: mode L
    return buf.getvalue()


def group_plans(plans: list[PairPlan]) -> list[tuple[tuple, list[PairPlan]]]:
    """Pairs grouped by (input caption, seed, guidance): each group shares one source image."""
    groups: OrderedDict[tuple, list[PairPlan]] = OrderedDict()
    for p in sorted(plans, key=lambda p: (p.group_key, p.triple["id"], p.index)):
        groups.setdefault(p.group_key, []).append(p)
    return list(groups.items())


def _chunks(groups, batch_size: int):
    """Consecutive groups filling about one UNet batch (a big group is split by the sampler)."""
    chunk, rows = [], 0
    for key, plans in groups:
        if chunk and rows + 1 + len(plans) > batch_size:
            yield chunk
            chunk, rows = [], 0
        chunk.append((key, plans))
        rows += 1 + len(plans)
    if chunk:
        yield chunk


def _clean_temp(build: Build, triple_ids) -> None:
    """Drop temp files a killed run left beside its PNGs (finished PNGs are never partial)."""
    for tid in triple_ids:
        d = build.images_dir / tid
        if d.is_dir():
            for f in d.glob(".*.tmp"):
                f.unlink(missing_ok=True)


def pair_record(plan: PairPlan, model: str, rel: str) -> dict:
    t = plan.triple
    return {
        "id": plan.id, "triple_id": t["id"], "seed": plan.seed, "params": plan.params,
        "model": model, "images": {"input": f"{rel}_0.png", "output": f"{rel}_1.png"},
        "agent": t.get("agent"), "level": t.get("level"),
        "source_id": hash_source(plan, model),
    }


def hash_source(plan: PairPlan, model: str) -> str:
    from dsbuild.core.hashing import content_id

    inp, seed, guidance = plan.group_key
    p = plan.params
    return content_id(model, inp, seed, guidance, p["steps"], p["scheduler"], p["height"],
                      p["width"])


def run_generate(build: Build, rank: int = 0, world_size: int = 1,
                 force: bool = False) -> StageResult:
    """Make this rank's pairs (skipping done ones), commit the shard, draw the contact sheet."""
    check_installed()
    s = build.config.generate

    def work(writer) -> dict:
        from dsbuild.generate.p2p import P2PGenerator
        from dsbuild.generate.sweep import plan_triple
        from dsbuild.models import (
            keep_loaded,
            load_sd_pipeline,
            model_key,
            resolve_device,
            resolve_dtype,
        )

        triples = [t for t in build.records("captions") if not t.get("no_change")]
        for t in triples:
            missing = [f for f in ("id", "input", "output") if not t.get(f)]
            if missing:
                raise DsbuildError(f"triples of {build.root}: triple {t.get('id', '?')} has no "
                                   f"{', '.join(missing)}; re-run `dsbuild captions --force`")
        if not triples:  # "done, 0 pairs" would pass an empty dataset on to every later stage
            raise StageFailed(
                f"generate: the captions of {build.root} hold no triple to make pairs from, so "
                "generate has nothing to do; no completion marker written. Rerun `dsbuild "
                "captions --force` (see reports/captions.json for why its lines were rejected)"
            )
        mine = select_shard(triples, rank, world_size, key=lambda t: t["input"])
        if not mine:  # another rank has them all: a legitimately empty shard
            return {"pairs": 0, "sources": 0}
        device = resolve_device(s.device)
        dtype = resolve_dtype(s.dtype, device)
        pipe = keep_loaded("generate", (*model_key(s.model), dtype, device),
                           lambda: load_sd_pipeline(s.model, dtype, device))
        segmenter = None
        if s.blend and s.blend_mask == "segment":
            from dsbuild.localize.mask import load_segmenter

            key = (*model_key(s.segmenter), s.segment_threshold, *model_key(s.detector),
                   *model_key(s.sam_model), s.box_threshold, device)
            segmenter = keep_loaded("generate-segmenter", key, lambda: load_segmenter(
                s.segmenter, s.segment_threshold, s.detector, s.sam_model, s.box_threshold,
                device))
        gen = P2PGenerator(pipe, s.scheduler, s.blend_threshold, s.blend_start, segmenter)
        plans = [p for t in mine for p in plan_triple(t, s, pipe.tokenizer)]
        todo = [p for p in plans if p.id not in writer.done]
        _clean_temp(build, {p.triple["id"] for p in todo})
        groups = group_plans(todo)
        t0, made = time.perf_counter(), 0
        with progress(total=len(plans), initial=len(plans) - len(todo),
                      desc=f"generate r{rank}", unit="pair") as bar:
            for chunk in _chunks(groups, s.batch_size):
                src = [_group(key, plans_g) for key, plans_g in chunk]
                results = gen.generate(src, s.steps, s.height, s.width, s.batch_size)
                for (_, plans_g), res in zip(chunk, results, strict=True):
                    png0 = png_bytes(res.source)
                    for plan, image, mask in zip(plans_g, res.targets, res.masks, strict=True):
                        rel = f"pairs/img/{plan.triple['id']}/{plan.id}"
                        write_bytes(build.root / f"{rel}_0.png", png0)
                        write_bytes(build.root / f"{rel}_1.png", png_bytes(image))
                        rec = pair_record(plan, s.model, rel)
                        rec["dtype"] = dtype
                        if mask is not None:  # what local blend let change (white)
                            write_bytes(build.root / f"{rel}_mask.png", mask_png(mask))
                            rec["images"]["mask"] = f"{rel}_mask.png"
                        writer.write(rec)
                        made += 1
                    bar.update(len(plans_g))
        secs = time.perf_counter() - t0
        return {"pairs": made, "sources": len(groups), "seconds": round(secs, 3),
                "pairs_per_s": round(made / secs, 4) if secs > 0 else None,
                "captions_encoded": gen.encoded}

    result = build.run_stage("generate", rank, world_size, work, force=force)
    if s.contact_sheet and build.is_complete("generate"):
        write_contact_sheet(build)
    return result


def _group(key, plans: list[PairPlan]):
    from dsbuild.generate.p2p import SourceGroup

    caption, seed, guidance = key
    return SourceGroup(caption, seed, guidance, [p.target() for p in plans])


def write_contact_sheet(build: Build):
    """reports/generate_contact_sheet.png: a few pairs per agent."""
    from dsbuild.generate.contact import contact_sheet

    note = f"model={build.config.generate.model}"
    if build.config.generate.model == "tiny":
        note += " (random tiny model: placeholder images)"
    return contact_sheet(build.root, join.all_pairs(build, scores=False),
                         build.reports_dir / "generate_contact_sheet.png",
                         build.config.generate.contact_sheet, note)
