"""Build -> FiftyOne: a grouped dataset per build, one group per pair, made or updated.

``build_dataset`` makes (or updates) a persistent grouped dataset with one group per pair and
the slices ``pair`` (the default: a tile with input | output side by side under the
instruction, :mod:`.tiles`), ``input``, ``output`` (and ``mask`` where a pair has
``images.mask``). Every field of the pair's joined row (:mod:`dsbuild.core.schema`: captions,
instruction, agent, level, operation, seed, the generator and its declared parameters, scores,
verify's verdict, the decision in force) is copied onto *every* slice's sample: FiftyOne's
sidebar counts and view stages only look at the active slice, so a field on one slice alone
would hide pairs from the other. Re-running adds only new pairs and rewrites only the fields
that changed; curators' tags are never touched.

A pair of a multi-turn session (:mod:`dsbuild.core.sessions`) also has the slice ``session``: its
session tile, the run's chain from the source image to this turn (:mod:`.tiles`), and the field
``session_tree``, the path of the session's design-tree page (``dsbuild tree`` writes it); the
saved view ``sessions`` lists session pairs by run, then turn. A build of single edits gets
neither.
"""

from __future__ import annotations

import os
from collections import defaultdict

from dsbuild.core import join
from dsbuild.core import sessions as S
from dsbuild.core.decisions import VERDICTS, current_by_slot, read_decisions
from dsbuild.review.fiftyone.dataset import (
    DEFAULT_SLICE,
    SLICES,
    TOOL,
    all_slices,
    dataset_name,
    declare_fields,
    open_dataset,
    sample_fields,
    set_sidebar,
)
from dsbuild.review.fiftyone.db import import_fiftyone
from dsbuild.review.fiftyone.operators import register_plugin
from dsbuild.review.fiftyone.tiles import ensure_session_tiles, ensure_tiles
from dsbuild.review.fiftyone.views import save_views


def _sample(build, row: dict, kind: str, convert: dict) -> dict:
    """A joined row as FiftyOne samples take it: absolute image paths per slice, fields."""
    values = {**row, "kind": kind, "in_build": True}
    out = {"pair_id": row["pair_id"],
           "images": {s: str((build.root / rel).resolve())
                      for s, rel in row["_images"].items() if s in SLICES and rel}}
    if S.is_session(row):
        values["session_tree"] = str((build.root / S.tree_page(row["session_id"])).resolve())
        source = row["_images"].get("session_source")
        out["session_source"] = str((build.root / source).resolve()) if source else None
    out["fields"] = {k: conv(values.get(k)) for k, (_, conv) in convert.items()}
    return out


def collect_rows(build) -> tuple[list[dict], dict]:
    """One row per pair (generate + augment): image paths per slice and every field; the
    stats carry the generators' parameter ``columns``."""
    reviews = join.Reviews.read(build)
    joined, columns = join.rows(build, policy="all", reviews=reviews)
    sessions = any(S.is_session(r) for r in joined)
    convert = sample_fields(columns, sessions)
    rows = [_sample(build, r, "pair", convert) for r in joined]
    stats = {"pairs": len(rows), "no_change": 0, "augment_skipped": 0,
             "scored": any(r["scored"] for r in joined), "columns": columns,
             "sessions": sessions}
    sources = {r["pair_id"]: r for r in joined}
    for r in join.no_change_rows(build, sources, require=False, reviews=reviews):
        if not r["pair_id"] or "input" not in r["_images"]:
            stats["augment_skipped"] += 1
            continue
        rows.append(_sample(build, r, "no_change", convert))
        stats["no_change"] += 1
    stats["missing_images"] = sorted(path for row in rows for path in row["images"].values()
                                     if not os.path.exists(path))
    return rows, stats


def build_dataset(build, name: str | None = None) -> dict:
    """Create or update the grouped dataset of ``build``; returns counts and the view names."""
    from dsbuild.core.progress import progress

    fo = import_fiftyone()  # first: a missing extra fails with its pip line before any work
    rows, stats = collect_rows(build)
    columns, sessions = stats.pop("columns"), stats.pop("sessions")
    tiles = ensure_tiles(build, rows)
    if sessions:
        tiles["sessions"] = ensure_session_tiles(build, rows)
    name = dataset_name(build, name)
    ds = open_dataset(fo, build, name, create=True)
    declare_fields(fo, ds, columns, sessions)
    fields = list(sample_fields(columns, sessions))

    existing: dict[tuple[str, str], str] = {}
    group_of: dict[str, str] = {}
    current: dict[str, dict] = {}
    if len(ds):
        view = all_slices(ds)
        ids, pids, slices, gids, paths, *vals = view.values(
            ["id", "pair_id", "group.name", "group.id", "filepath", *fields])
        for i, sid in enumerate(ids):
            existing[(pids[i], slices[i])] = sid
            group_of[pids[i]] = gids[i]
            current[sid] = {"filepath": paths[i], **{f: vals[j][i] for j, f in enumerate(fields)}}

    # a pair new to the dataset (or a dataset made anew) gets back the tags of its current
    # FiftyOne tag decisions, so the App shows them and the next pull does not withdraw them
    # (verdicts given through the plugin's operators are decisions, not tags)
    restore: dict[str, list[str]] = defaultdict(list)
    for (pid, tool, _), d in current_by_slot(read_decisions(build)).items():
        if tool == TOOL and d.get("verdict") in VERDICTS and d.get("source") != "operator":
            restore[pid] += [t for t in d.get("tags") or [d["verdict"]] if t not in restore[pid]]
    new_samples, changes = [], defaultdict(dict)
    wanted = set()
    for row in progress(rows, desc="fiftyone", unit="pair"):
        pid = row["pair_id"]
        new_pair = pid not in group_of
        group = fo.Group(id=group_of[pid]) if pid in group_of else fo.Group()
        group_of.setdefault(pid, group.id)
        for slice_name, path in row["images"].items():
            wanted.add((pid, slice_name))
            sid = existing.get((pid, slice_name))
            if sid is None:
                tags = list(restore.get(pid, [])) if new_pair else []
                new_samples.append(fo.Sample(filepath=path, group=group.element(slice_name),
                                             tags=tags, **row["fields"]))
                continue
            have = current[sid]
            for k, v in {"filepath": path, **row["fields"]}.items():
                if have.get(k) != v:
                    changes[k][sid] = v
    # samples of pairs no longer in the build keep their tags but say so
    for key, sid in existing.items():
        if key not in wanted and current[sid].get("in_build") is not False:
            changes["in_build"][sid] = False
    if new_samples:
        ds.add_samples(new_samples, progress=False)
    updated: set[str] = set()
    if changes:
        view = all_slices(ds)
        for field, values in changes.items():
            view.set_values(field, values, key_field="id")
            updated.update(values)
    if ds.default_group_slice != DEFAULT_SLICE and DEFAULT_SLICE in ds.group_slices:
        ds.default_group_slice = DEFAULT_SLICE  # a dataset made before pair tiles existed
    if ds.group_slice != DEFAULT_SLICE and DEFAULT_SLICE in ds.group_slices:
        ds.group_slice = DEFAULT_SLICE
    views = save_views(ds, build.config.review.queue)
    set_sidebar(fo, ds, columns, sessions)
    plugin = register_plugin(fo)
    added_pairs = {s["pair_id"] for s in new_samples} - {p for p, _ in existing}
    return {"name": name, "pairs": stats["pairs"], "no_change": stats["no_change"],
            "augment_skipped": stats["augment_skipped"], "scored": stats["scored"],
            "missing_images": stats["missing_images"],
            "added_pairs": len(added_pairs), "added_samples": len(new_samples),
            "updated_samples": len(updated),
            "stale_samples": sum(1 for k in existing if k not in wanted),
            "groups": len(ds.distinct("group.id")), "samples": len(all_slices(ds)),
            "slices": [s for s in SLICES if s in ds.group_slices], "tiles": tiles,
            "plugin": str(plugin), "views": views}
