"""Reading an export back: the parquet shards export writes, as a ``datasets.DatasetDict``.

Export writes them; training, evaluation and localization read them, so the reader sits in
core where every layer may use it (the columns are :mod:`dsbuild.core.schema`'s).
"""

from __future__ import annotations

from pathlib import Path

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.split import SPLITS


def load_export(path: str | Path, **kwargs):
    """The export as a ``datasets.DatasetDict``: what ``load_dataset(DIR)`` gives, but with the
    shard files named, so offline mode never substitutes an older cached "export" dataset."""
    datasets = require("datasets")
    path = Path(path)
    files = {k: [str(f) for f in sorted((path / "data").glob(f"{k}-*.parquet"))] for k in SPLITS}
    files = {k: v for k, v in files.items() if v}
    if not files:
        raise DsbuildError(f"{path} holds no export (no data/*.parquet); run `dsbuild export`")
    return datasets.load_dataset("parquet", data_files=files, **kwargs)
