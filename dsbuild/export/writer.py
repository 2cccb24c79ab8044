"""The export stage: rows → parquet shards + grid + card in a temp folder, renamed into place.

``run_export`` is the stage (declared in :mod:`dsbuild.core.stages`): it writes BUILD/export and
its completion marker through ``Build.run_stage``, like every other stage, so a re-run with
the same inputs (upstream signatures, export and split settings, decisions, the diversity
report) does nothing. ``export_build(build, to=OTHER)`` writes a one-off copy elsewhere; its
``export_info.json`` holds the signature it was made from.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from dsbuild.core import locks
from dsbuild.core.build import Build, StageResult
from dsbuild.core.errors import DsbuildError, WriteFailed
from dsbuild.core.exports import INFO_NAME, export_info
from dsbuild.core.records import DiskFull, write_json, write_text
from dsbuild.core.split import SPLITS
from dsbuild.export import card_notes as notes
from dsbuild.export.card import GRID_NAME, card_text, check_public, copy_tree_pages, grid_image
from dsbuild.export.dataset import check_installed, collect_rows, write_shards


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
    return export_info(path)


def _summary(path: Path, counts: dict) -> str:
    rows = ", ".join(f"{k} {v['rows']}" for k, v in counts.items())
    return f"{path} ({rows} rows)"


def run_export(build: Build, rank: int = 0, world_size: int = 1, *, force: bool = False
               ) -> StageResult:
    """The export stage: BUILD/export with its card, then the completion marker."""

    check_installed()  # the pip line before "run filter first"

    def work(_) -> dict:
        out = default_export_dir(build)
        res = None if force else whole_export(build, out)
        res = res or write_export(build, out)
        return {"records": sum(v["rows"] for v in res.counts.values()), "counts": res.counts,
                "path": str(res.path), "summary": _summary(res.path, res.counts), **res.stats}

    return build.run_stage("export", rank, world_size, work, force=force)


def whole_export(build: Build, out: Path) -> ExportResult | None:
    """``out`` as it is when it is already the export of these inputs, every file it lists in
    place (a kill after the swap, before the marker), else None."""
    recover(out)
    info = read_info(out)
    if not info or info.get("signature") != export_signature(build):
        return None
    listed = [f for split in (info.get("files") or {}).values() for f in split]
    if not all((out / f).is_file() for f in [*listed, "README.md"]):
        return None
    return ExportResult(out, False, info.get("counts", {}), info.get("stats", {}))


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
    """Write the export of ``build`` into ``out``, atomically: a temp folder beside it, then
    swapped into place, the old copy deleted only once the new one is there. A kill at any
    point leaves the old or the new export whole; a full disk leaves the old one as it was."""
    build.require_complete("filter")
    sig = export_signature(build)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    info = read_info(out)
    if out.exists() and info is None and any(out.iterdir()):
        raise DsbuildError(f"{out} exists and is not a dsbuild export (no {INFO_NAME}); "
                           "choose an empty or new folder")
    rows = collect_rows(build)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        files = write_shards(build, rows, tmp, build.config.export.shard_mb)
        grid = grid_image(build, rows, tmp / GRID_NAME, build.config.export.grid_pairs)
        if grid:  # the design trees the card's grid links (``dsbuild tree`` wrote them)
            copy_tree_pages(build, rows, tmp, build.config.export.grid_pairs)
        notes.copy_calibration_picture(build, rows, tmp)  # where the card shows it
        notes.draw_funnel(build, rows, tmp)
        # a folder pushed before keeps naming its Hub repo (and its push record)
        pushes = (info or {}).get("pushes") or []
        write_text(tmp / "README.md", card_text(build, rows, files, grid=grid,
                                                pushed=pushes[-1] if pushes else None,
                                                folder=export_name(build, out),
                                                funnel_picture=True))
        counts = {k: {"rows": len(v), "no_change": sum(r["no_change"] for r in v)}
                  for k, v in rows.splits.items()}
        edits = [r for v in rows.splits.values() for r in v if not r["no_change"]]
        by = {k: dict(sorted(Counter(str(r.get(k)) for r in edits).items()))
              for k in ("agent", "operation")}  # edit rows per agent / operation (the funnel)
        write_json(tmp / INFO_NAME, {
            "signature": sig, "recipe": build.recipe.name, "counts": counts, "by": by,
            "stats": rows.stats, "files": files,
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"pushes": pushes} if pushes else {}),
        })
        check_public(tmp, build)
        for f in tmp.rglob("*"):
            if f.is_dir():
                f.chmod(0o755)  # mkdtemp-style folders are private; an export is not
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            kept = f"the old export {out} is kept as it was" if out.exists() else \
                "nothing was exported"
            raise WriteFailed(f"no space left on the device while writing the export of "
                              f"{build.root} (into {tmp}); {kept}: free some space and run the "
                              "same command again") from None
        raise
    swap(tmp, out)
    return ExportResult(out, False, counts, rows.stats)


def export_name(build: Build, out: Path) -> str:
    """How the card names a local export folder (never an absolute path: the card is
    public): ``BUILD_NAME/export`` inside the build, else the folder's own name."""
    try:
        return (Path(build.root.name) / out.resolve().relative_to(build.root.resolve())
                ).as_posix()
    except ValueError:
        return out.name


def disk_full(exc: BaseException) -> bool:
    """Whether an error is the disk (or quota) filling: an OSError with ENOSPC/EDQUOT, or
    pyarrow's IO error, which names errno 28 only in its text."""
    if isinstance(exc, DiskFull):
        return True
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(exc).lower()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` where ``out`` is; the old ``out`` is deleted only after. One
    atomic exchange where the system has it; else two renames, whose window (no ``out``, the
    old copy at ``.out.old-PID``) ``recover`` closes on the next run, or the handler here."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # the old export, now at tmp's name
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover(out: Path) -> None:
    """Clean up after a killed export of ``out``: an old copy moved aside with nothing in its
    place goes back (the kill fell between the two renames of ``swap``); temp folders and
    old copies beside a whole export are deleted."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *olds]:
        shutil.rmtree(stale, ignore_errors=True)


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
