"""Rows of an export (policy, review corrections, split) and their parquet shards.

Shards are written with pyarrow under the ``datasets`` schema (``Image`` features carry the
PNG bytes, the path is a bare file name), so ``datasets.load_dataset(DIR)`` reads them as they
are and the files are self-contained anywhere. Layout as ``push_to_hub`` writes it:
``data/<split>-00000-of-0000N.parquet``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from dsbuild.core import join
from dsbuild.core.build import Build
from dsbuild.core.decisions import latest_by_pair
from dsbuild.core.errors import DsbuildError, require, require_installed
from dsbuild.core.hashing import content_id
from dsbuild.core.progress import progress
from dsbuild.core.records import image_problem
from dsbuild.core.split import SPLITS, caption_key, row_nodes, split_rows
from dsbuild.filter.settings import SCORE_KEYS

ROW_GROUP = 100  # rows per parquet row group (what the Hub's viewer pages by)


def check_installed() -> None:
    """Fail with the pip line before any work when the ``export`` extra is not installed."""
    require_installed("export", "datasets", "pyarrow", what="dsbuild export")


def features():
    """The exported columns and their types (DESIGN.md's contract, plus provenance)."""
    datasets = require("datasets", "export")
    V, Img = datasets.Value, datasets.Image
    cols = {
        "input_image": Img(), "edit_prompt": V("string"), "edited_image": Img(),
        "original_prompt": V("string"), "edited_prompt": V("string"),
        "pair_id": V("string"), "triple_id": V("string"), "source_pair_id": V("string"),
        "agent": V("string"), "level": V("string"), "operation": V("string"),
        "no_change": V("bool"), "corrected": V("bool"), "original_edit": V("string"),
        "review": V("string"),
        "seed": V("int64"), "model": V("string"),
        "p2p_mode": V("string"), "p2p_steps": V("int64"), "guidance": V("float64"),
        "cross_replace": V("float64"), "self_replace": V("float64"), "scheduler": V("string"),
        "p2p_params": V("string"), "edit_mask": Img(),
        "clip_sim_0": V("float64"), "clip_sim_1": V("float64"), "clip_sim_dir": V("float64"),
        "clip_sim_image": V("float64"), "dino": V("float64"), "filter_rank": V("int64"),
    }
    return datasets.Features(cols)


def public_name(value: str | None) -> str | None:
    """A model name or path as it may appear in public: local paths become their last part."""
    if not value:
        return value
    v = str(value)
    if v.startswith(("/", "~", "./", "../")) or (len(v) > 2 and v[1] == ":") or os.sep + os.sep in v:
        return "local:" + PurePosixPath(v.replace("\\", "/").rstrip("/")).name
    return v


@dataclass
class ExportRows:
    """The rows per split (image paths still on disk) and what was left out, with reasons."""

    splits: dict[str, list[dict]]
    stats: dict = field(default_factory=dict)


def _num(v):
    return None if v is None else float(v)


def pair_row(pair: dict, triple: dict, score: dict, decision: dict | None) -> dict:
    """One exported row of a generated pair.

    A reviewer's ``corrected_edit`` is authoritative: it becomes ``edit_prompt`` (what the
    pair shows) and ``corrected`` is true. ``original_prompt``/``edited_prompt`` stay the
    captions the images were generated from, which on a corrected row may not describe the
    edited image; ``original_edit`` keeps the planned instruction.
    """
    params = pair.get("params") or {}
    edit = triple["edit"]
    corrected = (decision or {}).get("corrected_edit")
    return {
        "pair_id": pair["id"], "triple_id": triple["id"], "source_pair_id": pair["id"],
        "agent": triple.get("agent"), "level": triple.get("level"),
        "operation": triple.get("operation"), "no_change": False,
        "edit_prompt": corrected or edit, "original_edit": edit,
        "corrected": bool(corrected) and corrected != edit,
        "original_prompt": triple["input"], "edited_prompt": triple["output"],
        "review": (decision or {}).get("verdict"),
        "seed": pair.get("seed"), "model": public_name(pair.get("model")),
        "p2p_mode": params.get("mode"), "p2p_steps": params.get("steps"),
        "guidance": _num(params.get("guidance")),
        "cross_replace": _num(params.get("cross_replace")),
        "self_replace": _num(params.get("self_replace")), "scheduler": params.get("scheduler"),
        "p2p_params": json.dumps(params, sort_keys=True, default=str),
        **{k: _num(score.get(k)) for k in SCORE_KEYS}, "filter_rank": score.get("rank"),
        "_images": (pair["images"]["input"], pair["images"]["output"]),
        # the local-blend mask (what P2P let change) when the pair was made with one
        "_mask": pair["images"].get("mask"),
    }


def no_change_row(sample: dict, source: dict, decision: dict | None) -> dict:
    """A no-change row: the source pair's provenance, its input image on both sides."""
    row = {k: v for k, v in source.items() if k not in SCORE_KEYS}
    edit = sample["edit"]
    row.update({
        "pair_id": sample["id"], "source_pair_id": sample["pair_id"], "no_change": True,
        "operation": sample.get("operation"), "edit_prompt": edit, "original_edit": edit,
        "corrected": False,
        "edited_prompt": sample["input"], "original_prompt": sample["input"],
        "review": (decision or {}).get("verdict"), "filter_rank": None,
        **{k: None for k in SCORE_KEYS},
        "_images": (sample["images"]["input"], sample["images"]["output"]),
        "_mask": None,  # nothing changes: there is no edit region
    })
    return row


def collect_rows(build: Build) -> ExportRows:
    """Apply the policy (filter keep, verify verdict, review verdicts, corrections) and split
    the rows."""
    check_installed()
    s = build.config.export
    build.require_complete("filter")
    decisions = latest_by_pair(build)
    stats = {"scored": 0, "kept": 0, "rejected_by_review": 0, "not_accepted": 0,
             "corrected": 0, "no_change_available": 0, "no_change_dropped": 0}
    # verify's verdict, where it ran: a rejected pair is dropped like a filter reject
    verified = {r["pair_id"]: r for r in build.records("verify")} \
        if build.is_complete("verify") else None
    stats["verify"] = "not run" if verified is None else "applied"
    stats["rejected_by_verify"] = 0
    rows: dict[str, dict] = {}
    for pair, triple, sc in join.scored_pairs(build):
        stats["scored"] += 1
        if not sc.get("keep"):
            continue
        stats["kept"] += 1
        if verified is not None and (verified.get(pair["id"]) or {}).get("verdict") == "reject":
            stats["rejected_by_verify"] += 1
            continue
        d = decisions.get(pair["id"])
        verdict = (d or {}).get("verdict")
        if verdict == "reject":
            stats["rejected_by_review"] += 1
            continue
        if s.policy == "accepted" and verdict != "accept":
            stats["not_accepted"] += 1
            continue
        if (d or {}).get("corrected_edit"):
            stats["corrected"] += 1
        rows[pair["id"]] = pair_row(pair, triple, sc, d)
    drop_unreadable(build, rows, stats)
    stats["with_edit_mask"] = sum(bool(r.get("_mask")) for r in rows.values())
    nodes = {rid: row_nodes(r["triple_id"], [r["original_prompt"], r["edited_prompt"]])
             for rid, r in rows.items()}
    row_split, node_split = split_rows(nodes, build.config.split.test_ratio,
                                       build.config.split.seed)
    splits: dict[str, list[dict]] = {k: [] for k in SPLITS}
    for rid, r in rows.items():
        splits[row_split[rid]].append(r)
    stats["augment"] = "not run"
    if s.no_change and build.is_complete("augment"):
        stats["augment"] = "included"
        for sample in build.records("augment"):
            stats["no_change_available"] += 1
            source = rows.get(sample.get("pair_id"))
            d = decisions.get(sample["id"])
            split = node_split.get(f"c:{caption_key(sample['input'])}")
            if source is None or split is None or (d or {}).get("verdict") == "reject":
                stats["no_change_dropped"] += 1
                continue
            splits[split].append(no_change_row(sample, source, d))
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
    return ExportRows(splits, stats)


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
    """The build files a row embeds: its two images and, when it has one, its blend mask."""
    return (*row["_images"], *((row["_mask"],) if row.get("_mask") else ()))


def _image(build: Build, rel: str, name: str, row: dict) -> dict:
    path = build.root / rel
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DsbuildError(f"pair {row['source_pair_id']}: image {rel} is missing from "
                           f"{build.root}; rerun `dsbuild generate`") from None
    return {"bytes": data, "path": name}


def encode_row(build: Build, row: dict) -> dict:
    """The row with both images (and the blend mask, else None) read as PNG bytes (paths
    reduced to bare file names)."""
    src, dst = row["_images"]
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out["input_image"] = _image(build, src, f"{row['pair_id']}_input.png", row)
    out["edited_image"] = _image(build, dst, f"{row['pair_id']}_edited.png", row)
    mask = row.get("_mask")
    out["edit_mask"] = _image(build, mask, f"{row['pair_id']}_mask.png", row) if mask else None
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
    pa = require("pyarrow", "export")
    pq = require("pyarrow.parquet", "export", "pyarrow")
    feats = features()
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


def load_export(path: str | Path, **kwargs):
    """The export as a ``datasets.DatasetDict``: what ``load_dataset(DIR)`` gives, but with the
    shard files named, so offline mode never substitutes an older cached "export" dataset."""
    datasets = require("datasets", "export")
    path = Path(path)
    files = {k: [str(f) for f in sorted((path / "data").glob(f"{k}-*.parquet"))] for k in SPLITS}
    files = {k: v for k, v in files.items() if v}
    if not files:
        raise DsbuildError(f"{path} holds no export (no data/*.parquet); run `dsbuild export`")
    return datasets.load_dataset("parquet", data_files=files, **kwargs)
