"""The generate stage: triples in, pair records and PNGs out; resumable and shardable.

The stage runs the generator ``generate.generator`` names (:mod:`dsbuild.core.generators`;
Prompt-to-Prompt by default): the generator plans every pair of a triple (its sweep) and makes
the images, batching as it likes; the stage owns sharding, resuming and writing. Triples are
sharded by input caption, so every edit of a caption (and a source they share) stays on one
rank. For each pair both PNGs are written atomically before its record line, so a killed run
resumes with no duplicate pair and no half-written image.

This module imports without torch (``dsbuild run`` imports every stage's run function); the
generator's implementation, which needs its extra, is imported when the stage is run, so a
missing extra fails with its pip line before any work.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
from PIL import Image

from dsbuild.core import generators, sessions
from dsbuild.core.build import Build, StageResult, select_shard, shard_sizes
from dsbuild.core.deps import load_target
from dsbuild.core.errors import DsbuildError, StageFailed
from dsbuild.core.generators import Made
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress
from dsbuild.core.quiet import CUT_STAT, LIMIT_STAT
from dsbuild.core.records import write_bytes
from dsbuild.generate import STAGE


def check_installed(generator: str = generators.DEFAULT):
    """The generator's implementation class; its missing extra fails with the pip line."""
    return generators.get(generator).load_impl()


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


def _clean_temp(build: Build, triple_ids) -> None:
    """Drop temp files a killed run left beside its PNGs (finished PNGs are never partial)."""
    for tid in triple_ids:
        d = build.images_dir / tid
        if d.is_dir():
            for f in d.glob(".*.tmp"):
                f.unlink(missing_ok=True)


def pair_record(generator: str, made: Made, model: str, rel: str) -> dict:
    """The pair record (dsbuild.core.schema): ids, the generator and its params, images."""
    plan, t = made.plan, made.plan.triple
    return {
        "id": plan.id, "triple_id": t["id"], "seed": plan.seed, "generator": generator,
        "params": plan.params, "model": model,
        "images": {"input": f"{rel}_0.png", "output": f"{rel}_1.png"},
        "agent": t.get("agent"), "level": t.get("level"), "source_id": made.source_id,
    }


def _triples(build: Build) -> list[dict]:
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
    return triples


def _by_input(t: dict) -> str:
    # a rank owns every triple of an input caption (its source is shared) and every node of
    # a session (its turns feed each other)
    return t.get("session_id") or t["input"]


def todo_plans(plans: list, done) -> list:
    """The plans still to make. A session run (:func:`dsbuild.core.sessions.plan_run`) with any
    plan still to make is made whole, since its turns' images feed each other; the stage
    writes only the pairs not yet written."""
    open_runs = {sessions.plan_run(p) for p in plans
                 if p.id not in done and sessions.is_session(p.triple)}
    return [p for p in plans if p.id not in done or (
        sessions.is_session(p.triple) and sessions.plan_run(p) in open_runs)]


def expected(build: Build, world_size: int) -> list[int] | None:
    """Pairs each rank is to make (the generator's declared ``count`` per triple, no model
    loaded): the driver's bar total. None when the generator declares no count."""
    counts = []
    for run in build.config.generate.runs():
        count = generators.get(run.generator).count
        if count is None:
            return None
        counts.append((load_target(count, what=f"generator {run.generator}"), run))
    return shard_sizes(_triples(build), world_size, key=_by_input,
                       weight=lambda t: sum(per_triple(t, run) for per_triple, run in counts))


def plan_runs(gens: list, triples: list[dict], labels: list[str]) -> list[list]:
    """Every run's plans of these triples. A generator the build runs on several models gets
    its model in the pair ids after the first; ids that still meet across runs are refused."""
    out, seen, first = [], {}, set()
    for k, (gen, label) in enumerate(zip(gens, labels, strict=True)):
        name = label.partition(":")[0]
        salt = name in first  # a second model of one generator: its own ids
        first.add(name)
        plans = [p for t in triples for p in gen.plan(t)]
        if salt:
            plans = [dataclasses.replace(p, id=content_id(p.id, gen.model)) for p in plans]
        for p in plans:
            if seen.setdefault(p.id, k) != k:
                raise DsbuildError(f"generate: generators {labels[seen[p.id]]} and {label} "
                                   f"plan the same pair id {p.id}; give one of them other "
                                   "settings")
        out.append(plans)
    return out


def run_generate(build: Build, rank: int = 0, world_size: int = 1, *,
                 force: bool = False) -> StageResult:
    """Make this rank's pairs (skipping done ones) and commit the shard; the runner draws the
    contact sheet (the declared report) once every rank is done."""
    s = build.config.generate
    runs, labels = s.runs(), s.labels()
    impl_classes = [check_installed(run.generator) for run in runs]  # every extra, up front

    def work(writer) -> dict:
        from dsbuild.models import resolve_device, resolve_dtype

        mine = select_shard(_triples(build), rank, world_size, key=_by_input)
        if not mine:  # another rank has them all: a legitimately empty shard
            return {"pairs": 0, "sources": 0}
        gens, dtypes = [], []
        for run, impl_cls in zip(runs, impl_classes, strict=True):
            device = resolve_device(run.device)
            dtypes.append(resolve_dtype(run.dtype, device))
            gens.append(impl_cls(run, run.section(run.generator), device, dtypes[-1]))
            if hasattr(gens[-1], "use_cache"):  # one that pays per request keeps its replies
                gens[-1].use_cache(build.cache_dir / "generate" / run.generator)
            if hasattr(gens[-1], "use_build"):  # one that reads the build's photos
                gens[-1].use_build(build)
        planned = plan_runs(gens, mine, labels)
        todo = [todo_plans(plans, writer.done) for plans in planned]
        _clean_temp(build, {p.triple["id"] for plans in todo for p in plans})
        total = sum(map(len, planned))
        left = sum(1 for plans in todo for p in plans if p.id not in writer.done)
        per_run, png0 = {}, (None, b"")
        with progress(total=total, initial=total - left, desc=f"generate r{rank}",
                      unit=STAGE.unit) as bar:
            for run, gen, dtype, plans, label in zip(runs, gens, dtypes, todo, labels,
                                                     strict=True):
                t0, made, sources = time.perf_counter(), 0, set()
                for m in gen.generate(plans) if plans else ():
                    if m.plan.id in writer.done:  # a session run's turn made before a kill
                        continue
                    rel = f"pairs/img/{m.plan.triple['id']}/{m.plan.id}"
                    if png0[0] is not m.source:  # a shared source is encoded once
                        png0 = (m.source, png_bytes(m.source))
                    write_bytes(build.root / f"{rel}_0.png", png0[1])
                    write_bytes(build.root / f"{rel}_1.png", png_bytes(m.target))
                    rec = pair_record(run.generator, m, gen.model, rel)
                    rec["dtype"] = dtype
                    if m.mask is not None:  # what the generator let change (white)
                        write_bytes(build.root / f"{rel}_mask.png", mask_png(m.mask))
                        rec["images"]["mask"] = f"{rel}_mask.png"
                    for name, im in (m.images or {}).items():  # e.g. a photo's reconstruction
                        write_bytes(build.root / f"{rel}_{name}.png", png_bytes(im))
                        rec["images"][name] = f"{rel}_{name}.png"
                    rec.update(m.record or {})
                    writer.write(rec)
                    made += 1
                    sources.add(m.source_id)
                    bar.update(1)
                secs = time.perf_counter() - t0
                per_run[label] = {"pairs": made, "sources": len(sources),
                                  "seconds": round(secs, 3),
                                  "pairs_per_s": round(made / secs, 4) if secs > 0 else None,
                                  **gen.stats()}
        if len(per_run) == 1:  # one generator: its stats as they always were
            return next(iter(per_run.values()))
        made = sum(r["pairs"] for r in per_run.values())
        secs = sum(r["seconds"] for r in per_run.values())
        limits = [r[LIMIT_STAT] for r in per_run.values() if r.get(LIMIT_STAT)]
        return {"pairs": made, "sources": sum(r["sources"] for r in per_run.values()),
                "seconds": round(secs, 3),
                "pairs_per_s": round(made / secs, 4) if secs > 0 else None,
                CUT_STAT: sum(int(r.get(CUT_STAT) or 0) for r in per_run.values()),
                **({LIMIT_STAT: max(limits)} if limits else {}), "generators": per_run}

    return build.run_stage("generate", rank, world_size, work, force=force)
