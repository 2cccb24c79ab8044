"""Reading an export back: the parquet shards export writes, as a ``datasets.DatasetDict``.

Export writes them; training, evaluation and localization read them, so the reader sits in
core where every layer may use it (the columns are :mod:`dsbuild.core.schema`'s). Each shard's
footer and columns are checked before ``datasets`` reads them, so a truncated shard, or one
whose columns differ from the rest of its split, is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.split import SPLITS

REEXPORT = "re-export it (`dsbuild export BUILD --force`)"


def export_files(path: str | Path) -> dict[str, list[Path]]:
    """The shard files of each split the export at ``path`` has."""
    files = {k: sorted((Path(path) / "data").glob(f"{k}-*.parquet")) for k in SPLITS}
    return {k: v for k, v in files.items() if v}


def check_shards(files: list[Path]) -> None:
    """Every shard of one split a whole parquet file with the same columns as the first."""
    import pyarrow.parquet as pq

    first = None
    for f in files:
        try:
            cols = set(pq.read_schema(f).names)
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError: a damaged file
            raise DsbuildError(f"{f}: not a whole parquet file ({' '.join(str(exc).split())}); "
                               f"the export is damaged: {REEXPORT}") from None
        if first is None:
            first = (f, cols)
        elif cols != first[1]:
            missing, extra = sorted(first[1] - cols), sorted(cols - first[1])
            raise DsbuildError(f"{f}: its columns differ from {first[0].name}'s (missing: "
                               f"{', '.join(missing) or '-'}; extra: {', '.join(extra) or '-'}); "
                               f"{REEXPORT}")


def load_export(path: str | Path, splits: list[str] | None = None, **kwargs):
    """The export as a ``datasets.DatasetDict``: what ``load_dataset(DIR)`` gives, but with the
    shard files named, so offline mode never substitutes an older cached "export" dataset;
    ``splits``: only these (one split's columns need not match another's)."""
    datasets = require("datasets")
    path = Path(path)
    files = {k: v for k, v in export_files(path).items() if splits is None or k in splits}
    if not files:
        raise DsbuildError(f"{path} holds no export (no data/*.parquet); run `dsbuild export`")
    for shards in files.values():
        check_shards(shards)
    try:
        return datasets.load_dataset(
            "parquet", data_files={k: [str(f) for f in v] for k, v in files.items()}, **kwargs)
    except Exception as exc:  # noqa: BLE001 - DatasetGenerationError, ArrowInvalid: bad data
        cause = exc.__cause__ or exc
        raise DsbuildError(f"{path / 'data'}: cannot read the export ({type(cause).__name__}: "
                           f"{' '.join(str(cause).split())[:200]}); {REEXPORT}") from None


INFO_NAME = "export_info.json"  # an export's signature, counts, stats and where it was pushed


def export_info(path: str | Path) -> dict | None:
    """An export folder's export_info.json (None when absent or unreadable)."""
    import json

    f = Path(path) / INFO_NAME
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def pushed_to(path: str | Path) -> dict | None:
    """The last push of the export at ``path`` (``{repo_id, revision, commit, at}``, recorded
    by ``dsbuild push`` once the upload succeeded), else None."""
    pushes = (export_info(path) or {}).get("pushes") or []
    last = pushes[-1] if pushes else None
    return last if isinstance(last, dict) and last.get("repo_id") else None
