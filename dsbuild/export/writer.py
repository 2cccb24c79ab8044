"""The export stage: rows → parquet shards + grid + card in a temp folder, renamed into place.

``run_export`` is the stage (declared in :mod:`dsbuild.core.stages`): it writes BUILD/export and
its completion marker through ``Build.run_stage``, like every other stage, so a re-run with
the same inputs (upstream signatures, export and split settings, decisions, the diversity
report) does nothing. ``export_build(build, to=OTHER)`` writes a one-off copy elsewhere; its
``export_info.json`` holds the signature it was made from.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dsbuild.core import locks
from dsbuild.core.build import Build, StageResult
from dsbuild.core.errors import DsbuildError
from dsbuild.core.records import write_json, write_text
from dsbuild.core.split import SPLITS
from dsbuild.export.card import GRID_NAME, card_text, check_public, grid_image
from dsbuild.export.dataset import check_installed, collect_rows, write_shards

INFO_NAME = "export_info.json"


@dataclass
class ExportResult:
    path: Path
    skipped: bool
    counts: dict
    stats: dict


def export_signature(build: Build) -> str:
    """What an export depends on: the export stage's signature (see ``stages``)."""
    return build.signature("export")


def default_export_dir(build: Build) -> Path:
    return build.output_dir("export")


def read_info(path: Path) -> dict | None:
    """An export folder's export_info.json (None when absent or unreadable)."""
    f = Path(path) / INFO_NAME
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _summary(path: Path, counts: dict) -> str:
    rows = ", ".join(f"{k} {v['rows']}" for k, v in counts.items())
    return f"{path} ({rows} rows)"


def run_export(build: Build, rank: int = 0, world_size: int = 1, *, force: bool = False
               ) -> StageResult:
    """The export stage: BUILD/export with its card, then the completion marker."""

    check_installed()  # the pip line before "run filter first"

    def work(_) -> dict:
        res = write_export(build, default_export_dir(build))
        return {"records": sum(v["rows"] for v in res.counts.values()), "counts": res.counts,
                "path": str(res.path), "summary": _summary(res.path, res.counts), **res.stats}

    return build.run_stage("export", rank, world_size, work, force=force)


def export_build(build: Build, to: str | Path | None = None, *, force: bool = False
                 ) -> ExportResult:
    """Export ``build`` into ``to`` (default: BUILD/export, through the export stage)."""
    default = default_export_dir(build)
    out = Path(to) if to else default
    if out.resolve() == default.resolve():
        res = run_export(build, force=force)
        return ExportResult(default, res.skipped, res.stats.get("counts", {}), res.stats)
    with locks.hold(out.parent / f".{out.name}.lock", f"the export into {out}"):
        info = read_info(out)
        if info and info.get("signature") == export_signature(build) and not force:
            return ExportResult(out, True, info.get("counts", {}), info.get("stats", {}))
        return write_export(build, out)


def write_export(build: Build, out: Path) -> ExportResult:
    """Write the export of ``build`` into ``out``, atomically (temp folder, then rename)."""
    build.require_complete("filter")
    sig = export_signature(build)
    info = read_info(out)
    if out.exists() and info is None and any(out.iterdir()):
        raise DsbuildError(f"{out} exists and is not a dsbuild export (no {INFO_NAME}); "
                           "choose an empty or new folder")
    rows = collect_rows(build)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed export
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        files = write_shards(build, rows, tmp, build.config.export.shard_mb)
        grid = grid_image(build, rows, tmp / GRID_NAME, build.config.export.grid_pairs)
        write_text(tmp / "README.md", card_text(build, rows, files, grid=grid))
        counts = {k: {"rows": len(v), "no_change": sum(r["no_change"] for r in v)}
                  for k, v in rows.splits.items()}
        write_json(tmp / INFO_NAME, {
            "signature": sig, "recipe": build.recipe.name, "counts": counts,
            "stats": rows.stats, "files": files,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        check_public(tmp, build)
        for f in tmp.rglob("*"):
            if f.is_dir():
                f.chmod(0o755)  # mkdtemp-style folders are private; an export is not
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, False, counts, rows.stats)


def split_captions(path: Path) -> dict[str, set[str]]:
    """Input and edited captions per split of an export (for leak checks)."""
    import pyarrow.parquet as pq

    from dsbuild.core.split import caption_key

    out: dict[str, set[str]] = {k: set() for k in SPLITS}
    for k in SPLITS:
        for f in sorted((path / "data").glob(f"{k}-*.parquet")):
            t = pq.read_table(f, columns=["original_prompt", "edited_prompt"])
            for col in ("original_prompt", "edited_prompt"):
                out[k] |= {caption_key(v) for v in t.column(col).to_pylist()}
    return out


__all__ = ["export_build", "run_export", "ExportResult", "split_captions"]
