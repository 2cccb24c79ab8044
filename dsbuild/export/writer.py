"""``export_build``: rows → parquet shards + grid + card in a temp folder, renamed into place.

A re-run with the same inputs (stage signatures, export settings, decisions, diversity
report) finds ``export_info.json`` with the same signature and does nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dsbuild.build import Build
from dsbuild.errors import DsbuildError
from dsbuild.export.card import GRID_NAME, card_text, check_public, grid_image
from dsbuild.export.dataset import collect_rows, write_shards
from dsbuild.export.split import SPLITS
from dsbuild.hashing import signature
from dsbuild.records import write_json, write_text

INFO_NAME = "export_info.json"


@dataclass
class ExportResult:
    path: Path
    skipped: bool
    counts: dict
    stats: dict


def _file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else None


def export_signature(build: Build) -> str:
    """What an export depends on: upstream stages, settings the card shows, decisions, report."""
    cfg = build.config
    return signature({
        "filter": build.signature("filter"),
        "augment": build.signature("augment") if build.is_complete("augment") else None,
        "export": cfg.export.signature_dict(), "captions": cfg.captions.signature_dict(),
        "decisions": _file_hash(build.decisions_path),
        "diversity": _file_hash(build.reports_dir / "diversity.md"),
        "format": 1,
    })


def default_export_dir(build: Build) -> Path:
    return build.root / "export"


def _read_info(path: Path) -> dict | None:
    f = path / INFO_NAME
    if not f.exists():
        return None
    import json

    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def export_build(build: Build, to: str | Path | None = None, *, force: bool = False
                 ) -> ExportResult:
    """Write the export of ``build`` into ``to`` (default BUILD/export), atomically."""
    out = Path(to) if to else default_export_dir(build)
    sig = export_signature(build)
    info = _read_info(out)
    if out.exists() and info is None and any(out.iterdir()):
        raise DsbuildError(f"{out} exists and is not a dsbuild export (no {INFO_NAME}); "
                           "choose an empty or new folder")
    if info and info.get("signature") == sig and not force:
        return ExportResult(out, True, info.get("counts", {}), info.get("stats", {}))
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
            f.chmod(0o755 if f.is_dir() else 0o644)  # temp files are private; exports are not
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

    from dsbuild.export.split import caption_key

    out: dict[str, set[str]] = {k: set() for k in SPLITS}
    for k in SPLITS:
        for f in sorted((path / "data").glob(f"{k}-*.parquet")):
            t = pq.read_table(f, columns=["original_prompt", "edited_prompt"])
            for col in ("original_prompt", "edited_prompt"):
                out[k] |= {caption_key(v) for v in t.column(col).to_pylist()}
    return out


__all__ = ["export_build", "ExportResult", "split_captions"]
