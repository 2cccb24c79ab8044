"""Rows of an export (policy, review corrections, split) and their parquet shards.

Shards are written with pyarrow under the ``datasets`` schema (``Image`` features carry the
PNG bytes, the path is a bare file name), so ``datasets.load_dataset(DIR)`` reads them as they
are and the files are self-contained anywhere. Layout as ``push_to_hub`` writes it:
``data/<split>-00000-of-0000N.parquet``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild.core import join, sessions
from dsbuild.core.build import Build
from dsbuild.core.deps import check, require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.generators import Param
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress
from dsbuild.core.records import image_problem
from dsbuild.core.schema import fields
from dsbuild.core.split import SPLITS, caption_key, row_nodes, split_rows
from dsbuild.core.survival import left_out

ROW_GROUP = 100  # rows per parquet row group (what the Hub's viewer pages by)
VALUE = {"string": "string", "json": "string", "int": "int64", "float": "float64",
         "bool": "bool"}  # schema field type -> datasets Value dtype


def check_installed() -> None:
    """Fail with the pip line before any work when the ``export`` extra is not installed."""
    check("export", what="dsbuild export")


def features(columns: dict[str, Param] | None = None):
    """The exported columns and their types: the joined row's exported fields
    (:data:`dsbuild.core.schema.FIELDS`) with the generators' declared parameter columns."""
    datasets = require("datasets")
    return datasets.Features({
        name: datasets.Image() if f.type == "image" else datasets.Value(VALUE[f.type])
        for name, f in fields(columns).items() if f.export})


@dataclass
class ExportRows:
    """The rows per split (joined rows, image paths still on disk), what was left out with
    reasons, and the parameter columns of the generators present."""

    splits: dict[str, list[dict]]
    stats: dict = field(default_factory=dict)
    columns: dict[str, Param] = field(default_factory=dict)


def collect_rows(build: Build) -> ExportRows:
    """Apply the policy (filter keep, verify verdict, review verdicts, corrections) and split
    the rows."""
    check_installed()
    s = build.config.export
    build.require_complete("filter")
    # rejected_by_review: edit pairs a reject verdict left out; no-change samples a reject
    # left out are no_change_rejected_by_review (part of no_change_dropped, with those whose
    # source pair is not exported: no_change_source_dropped); review_rejects: every reject
    # verdict in force, also those on pairs the filter or verify had already left out
    stats = {"scored": 0, "kept": 0, "rejected_by_review": 0, "not_accepted": 0,
             "corrected": 0, "no_change_available": 0, "no_change_dropped": 0,
             "no_change_source_dropped": 0, "no_change_rejected_by_review": 0}
    # verify's verdict, where it ran: a rejected pair is dropped like a filter reject
    stats["verify"] = "applied" if build.is_complete("verify") else "not run"
    stats["rejected_by_verify"] = 0
    reviews = join.Reviews.read(build)
    verdicts = [d.get("verdict") for d in reviews.in_force.values()]
    stats["review_decisions"] = sum(reviews.counts.values())
    stats["review_rejects"] = verdicts.count("reject")
    stats["review_accepts"] = verdicts.count("accept")
    joined, columns = join.rows(build, policy="scored", reviews=reviews)
    passing: dict[str, dict] = {}
    unchanged = 0  # left out: the re-captioner saw no change (export.edit_prompt=recaptioned)
    for r in joined:
        stats["scored"] += 1
        why = left_out(r, s.policy, s.edit_prompt)
        if why != "filter":
            stats["kept"] += 1
        if why in ("verify", "review", "not_accepted"):
            stats[{"verify": "rejected_by_verify", "review": "rejected_by_review"}.get(
                why, why)] += 1
        if why == "recaption":
            unchanged += 1
        if why is None:
            passing[r["pair_id"]] = r
    if s.input_image == "reconstruction":  # photo rows: the inverted source branch's image
        for r in passing.values():
            if r["_images"].get("reconstruction"):
                r["_images"]["input"] = r["_images"]["reconstruction"]
    drop_unreadable(build, passing, stats)
    # a session turn survives only with its parent turn (export.session_cut)
    alive = sessions.cut(joined, lambda r: r["pair_id"] in passing, s.session_cut,
                         key="pair_id")
    rows = {rid: r for rid, r in passing.items() if rid in alive}
    if any(sessions.is_session(r) for r in joined):
        stats["session_cut"] = s.session_cut
        stats["dropped_with_session"] = len(passing) - len(rows)
        stats["session_runs"] = {str(k): v for k, v in sorted(
            sessions.run_lengths(rows.values()).items())}
    stats["corrected"] = sum(bool(r["corrected_edit"]) for r in rows.values())
    stats["with_edit_mask"] = sum(bool(r["_images"].get("mask")) for r in rows.values())
    recaption_stats(stats, joined, rows.values(), s.edit_prompt, unchanged)
    nodes = {rid: row_nodes(r["triple_id"], [r["original_prompt"], r["edited_prompt"]],
                            session=r.get("session_id"))
             for rid, r in rows.items()}
    row_split, node_split = split_rows(nodes, build.config.split.test_ratio,
                                       build.config.split.seed)
    splits: dict[str, list[dict]] = {k: [] for k in SPLITS}
    for rid, r in rows.items():
        splits[row_split[rid]].append(r)
    stats["augment"] = "not run"
    if s.no_change and build.is_complete("augment"):
        stats["augment"] = "included"
        for r in join.no_change_rows(build, rows, reviews=reviews):
            stats["no_change_available"] += 1
            split = node_split.get(f"c:{caption_key(r['original_prompt'])}")
            if r["source_pair_id"] not in rows or split is None:
                stats["no_change_dropped"] += 1
                stats["no_change_source_dropped"] += 1
                continue
            if r["review"] == "reject":
                stats["no_change_dropped"] += 1
                stats["no_change_rejected_by_review"] += 1
                continue
            splits[split].append(r)
    elif not s.no_change:
        stats["augment"] = "excluded (export.no_change=false)"
    for k in SPLITS:
        splits[k].sort(key=lambda r: content_id("order", build.config.split.seed, r["pair_id"]))
    if not splits["train"]:
        raise DsbuildError(
            f"nothing to export from {build.root}: {stats['scored']} pairs scored, "
            f"{stats['kept']} kept by the filter, {stats['rejected_by_verify']} rejected by "
            f"verify, {stats['rejected_by_review']} rejected in "
            f"review, {stats['not_accepted']} not accepted (policy {s.policy!r})")
    return ExportRows(splits, stats, columns)


def recaption_stats(stats: dict, joined: list[dict], rows: Iterable[dict], prompt: str,
                    unchanged: int) -> None:
    """``edit_prompt`` (the setting), ``recaptioned`` (exported rows with a re-caption),
    ``recaption_differs`` (... unlike the generated instruction but for case, spacing and
    punctuation) and ``dropped_unchanged`` (left out: the re-captioner saw no change); only
    where re-captioning ran or the setting asks for it, so builds without it report as
    before."""
    if prompt == "generated" and not any(r.get("recaption_unchanged") is not None
                                         for r in joined):
        return
    from dsbuild.llm.recaption import same

    rows = list(rows)
    rc = [r for r in rows if r.get("edit_prompt_recaptioned")]
    stats.update(edit_prompt=prompt, recaptioned=len(rc),
                 recaption_differs=sum(not same(r["edit_prompt_recaptioned"],
                                                r["edit_prompt_generated"]) for r in rc),
                 dropped_unchanged=unchanged)


def drop_unreadable(build: Build, rows: dict[str, dict], stats: dict) -> None:
    """Decode every image a row needs; a row with a missing or broken one is dropped and
    counted with its reason (``export.strict``: the export stops instead, naming the file).
    A corrupt image never reaches a parquet file."""
    seen: dict[str, str | None] = {}
    dropped: list[str] = []
    for rid in list(rows):
        for rel in _files(rows[rid]):
            if rel not in seen:
                seen[rel] = image_problem(build.root / rel)
            why = seen[rel]
            if why is None:
                continue
            remedy = (f"run `dsbuild repair {build.root} generate` (drops pairs whose images "
                      f"are broken), then `dsbuild generate {build.root}` to make them again")
            if build.config.export.strict:
                raise DsbuildError(f"pair {rid}: {why}; {remedy}")
            dropped.append(f"{rid}: {why.replace(str(build.root) + os.sep, '')}")
            del rows[rid]
            break
    stats["unreadable_images"] = len(dropped)
    if dropped:
        stats["unreadable_examples"] = dropped[:5]
        print(f"warning: {len(dropped)} pairs dropped from the export: an image is missing or "
              f"cannot be decoded (e.g. {dropped[0]} in {build.root}); "
              f"`dsbuild repair {build.root} generate` "
              "then `dsbuild generate` makes them again", file=sys.stderr)


def _files(row: dict) -> tuple[str, ...]:
    """The build files a row embeds: its two images and, when it has them, its blend mask and
    its session's source image."""
    im = row["_images"]
    return (im["input"], im["output"], *(im[k] for k in ("mask", "session_source")
                                         if im.get(k)))


def _image(build: Build, rel: str, name: str, row: dict) -> dict:
    path = build.root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DsbuildError(f"pair {row['source_pair_id']}: image {rel} is missing from "
                           f"{build.root}; rerun `dsbuild generate`") from None
    return {"bytes": data, "path": name}


def encode_row(build: Build, row: dict) -> dict:
    """The row's columns with both images (and the blend mask and a session turn's source
    image, else None) read as PNG bytes (paths reduced to bare file names)."""
    im = row["_images"]
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out["input_image"] = _image(build, im["input"], f"{row['pair_id']}_input.png", row)
    out["edited_image"] = _image(build, im["output"], f"{row['pair_id']}_edited.png", row)
    mask = im.get("mask")
    out["edit_mask"] = _image(build, mask, f"{row['pair_id']}_mask.png", row) if mask else None
    src = im.get("session_source")
    out["source_image"] = (_image(build, src, f"{row['pair_id']}_source.png", row) if src
                           and row.get("session_id") else None)
    return out


def shard_count(build: Build, rows: list[dict], shard_mb: int) -> int:
    size = 0
    for r in rows:
        for rel in _files(r):
            p = build.root / rel
            size += p.stat().st_size if p.exists() else 0
    return max(1, math.ceil(size / (shard_mb * 1_000_000)))


def write_shards(build: Build, rows: ExportRows, out_dir: Path, shard_mb: int
                 ) -> dict[str, list[str]]:
    """Write ``data/<split>-iiiii-of-nnnnn.parquet`` under out_dir; returns files per split."""
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    feats = features(rows.columns)
    schema = feats.arrow_schema
    names = list(feats)
    written: dict[str, list[str]] = {}
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    total = sum(len(v) for v in rows.splits.values())
    with progress(total=total, desc="export", unit="row") as bar:
        for split, split_rows_ in rows.splits.items():
            if not split_rows_:
                continue
            n = min(shard_count(build, split_rows_, shard_mb), len(split_rows_))
            written[split] = []
            for i in range(n):
                rel = f"data/{split}-{i:05d}-of-{n:05d}.parquet"
                lo, hi = i * len(split_rows_) // n, (i + 1) * len(split_rows_) // n
                chunk = split_rows_[lo:hi]
                with pq.ParquetWriter(out_dir / rel, schema) as writer:
                    for j in range(0, len(chunk), ROW_GROUP):
                        batch = [encode_row(build, r) for r in chunk[j:j + ROW_GROUP]]
                        cols = feats.encode_batch({k: [b[k] for b in batch] for k in names})
                        writer.write_table(pa.Table.from_pydict(cols, schema=schema))
                        bar.update(len(batch))
                written[split].append(rel)
    return written

