"""Where the sources stage's photos come from: a folder (with its ``captions.jsonl`` sidecar),
a datasets folder or Hub id, or a FiftyOne dataset, each as a list of :class:`Candidate`s in a
stable order; and the fingerprint of that input the stage signs. Light imports only at the top
(``dsbuild status`` signs the stage); datasets and fiftyone are imported when read."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dsbuild.core.errors import DsbuildError

SIDECAR = "captions.jsonl"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
SIDECAR_KEYS = frozenset({"image", "caption", "license", "source", "attribution"})


@dataclass
class Candidate:
    """One photo before the checks: how it is named (``path``), how to read its bytes, and
    what its origin says about it (None: not given)."""

    path: str
    read: Callable[[], bytes]
    caption: str | None = None
    caption_source: str | None = None  # sidecar | given
    license: str | None = None
    source: str | None = None
    attribution: str | None = None
    where: str = ""  # where its metadata would be given, for messages


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_sidecar(folder: Path, files: set[str]) -> dict[str, dict]:
    """``captions.jsonl`` of a photo folder: file (relative to the folder) -> its line's
    fields. A bad line is an error naming the file and line."""
    f = folder / SIDECAR
    if not f.exists():
        return {}
    out: dict[str, dict] = {}
    for n, raw in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        at = f"{f}:{n}"
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DsbuildError(f"{at}: not a JSON object ({exc.msg}); each line is "
                               '{"image": "FILE", "caption": "...", "license": "...", '
                               '"source": "...", "attribution": "..."}') from None
        if not isinstance(rec, dict):
            raise DsbuildError(f"{at}: not a JSON object; each line is "
                               '{"image": "FILE", "caption": "...", ...}')
        unknown = sorted(set(rec) - SIDECAR_KEYS)
        if unknown:
            raise DsbuildError(f"{at}: unknown key(s) {unknown}; a line may have "
                               f"{sorted(SIDECAR_KEYS)}")
        image = rec.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DsbuildError(f'{at}: no "image" (the photo\'s file name in {folder})')
        for key in SIDECAR_KEYS - {"image"}:
            value = rec.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise DsbuildError(f'{at}: "{key}" must be a non-empty string or null '
                                   f"(got {value!r})")
        image = Path(image).as_posix()
        if image not in files:
            raise DsbuildError(f"{at}: {image!r} is not a photo in {folder}")
        if image in out:
            raise DsbuildError(f"{at}: {image!r} is given twice (first on line "
                               f"{out[image]['_line']})")
        out[image] = {**{k: (v.strip() if isinstance(v, str) else v) for k, v in rec.items()},
                      "_line": n}
    return out


def from_folder(folder: Path, default_source: str) -> list[Candidate]:
    if not folder.is_dir():
        raise DsbuildError(f"sources.path: {folder} is not a folder of photos")
    files = _folder_files(folder)
    if not files:
        raise DsbuildError(f"sources.path: {folder} holds no photos "
                           f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    rel = {p.relative_to(folder).as_posix(): p for p in files}
    side = read_sidecar(folder, set(rel))
    out = []
    for name, p in rel.items():
        meta = side.get(name, {})
        out.append(Candidate(
            path=str(folder / name), read=p.read_bytes, caption=meta.get("caption"),
            caption_source="sidecar" if meta.get("caption") else None,
            license=meta.get("license"), source=meta.get("source") or default_source,
            attribution=meta.get("attribution"),
            where=(f"{folder / SIDECAR}:{meta['_line']}" if meta
                   else f"no line in {folder / SIDECAR}")))
    return out


def _load_dataset(name: str, split: str):
    from dsbuild.core.deps import require

    datasets = require("datasets", what="sources.dataset")
    if Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DsbuildError(f"sources.dataset: {name} has no split {split!r} (splits: "
                                   f"{', '.join(ds)}); set sources.split")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # the Hub's or the loader's error, named with the setting
        raise DsbuildError(f"sources.dataset: cannot load {name!r} split {split!r} "
                           f"({type(exc).__name__}: {str(exc)[:200]})") from None


def from_dataset(settings, default_source: str) -> list[Candidate]:
    from dsbuild.core.deps import require

    datasets = require("datasets", what="sources.dataset")
    name = settings.dataset
    ds = _load_dataset(name, settings.split)
    cols = ds.column_names
    for key in ("image_column", "caption_column"):
        col = getattr(settings, key)
        if col is not None and col not in cols:
            raise DsbuildError(f"sources.{key}: {name} has no column {col!r} (columns: "
                               f"{', '.join(cols)})")
    if isinstance(ds.features[settings.image_column], datasets.Image):
        ds = ds.cast_column(settings.image_column, datasets.Image(decode=False))
    out = []
    for i, row in enumerate(ds):
        value = row[settings.image_column]
        out.append(Candidate(
            path=f"dataset:{name}#{i}", read=_dataset_bytes(value, f"{name} row {i}"),
            caption=_text(row.get(settings.caption_column)) if settings.caption_column else None,
            caption_source="given", license=_text(row.get("license")),
            source=_text(row.get("source")) or default_source,
            attribution=_text(row.get("attribution")),
            where=f"{name} row {i}, column {settings.caption_column or '(no caption_column)'}"))
        if out[-1].caption is None:
            out[-1].caption_source = None
    return out


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _dataset_bytes(value, where: str) -> Callable[[], bytes]:
    """The encoded image of a dataset cell: Image(decode=False) gives {bytes, path}; a string
    is a file path; a PIL image is encoded as PNG."""
    def read() -> bytes:
        if isinstance(value, dict) and value.get("bytes"):
            return value["bytes"]
        path = value.get("path") if isinstance(value, dict) else value
        if isinstance(path, str):
            return Path(path).read_bytes()
        if hasattr(value, "save"):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue()
        raise DsbuildError(f"sources.dataset: {where} holds no image (got {type(value).__name__})")
    return read


def from_fiftyone(settings, default_source: str) -> list[Candidate]:
    from dsbuild.core.deps import require

    fo = require("fiftyone", what="sources.fiftyone")
    name = settings.fiftyone
    if name not in fo.list_datasets():
        raise DsbuildError(f"sources.fiftyone: no FiftyOne dataset {name!r} (datasets: "
                           f"{', '.join(fo.list_datasets()) or 'none'})")
    ds = fo.load_dataset(name)
    has = set(ds.get_field_schema())
    cap = settings.caption_column or "caption"
    out = []
    for sample in ds.sort_by("filepath"):
        def field(key, sample=sample):
            return _text(sample[key]) if key in has else None

        path = sample.filepath
        out.append(Candidate(
            path=path, read=Path(path).read_bytes, caption=field(cap),
            caption_source="given" if field(cap) else None, license=field("license"),
            source=field("source") or default_source, attribution=field("attribution"),
            where=f"FiftyOne dataset {name}, field {cap!r}"))
    return out


def candidates(settings) -> list[Candidate]:
    """The configured photos in a stable order (a folder: by file name)."""
    origin = settings.origin
    if origin == "path":
        folder = Path(settings.path).expanduser()
        return from_folder(folder, settings.source or folder.name)
    if origin == "dataset":
        return from_dataset(settings, settings.source or settings.dataset)
    if origin == "fiftyone":
        return from_fiftyone(settings, settings.source or f"fiftyone:{settings.fiftyone}")
    raise DsbuildError("sources: no photos configured; set sources.path=FOLDER, "
                       "sources.dataset=NAME or sources.fiftyone=NAME")


def fingerprint(build) -> dict | None:
    """What the stage signs of its input besides its settings: a folder's photo names and
    sizes and its sidecar's hash (a photo added, removed or replaced reruns the stage and what
    reads it); a datasets folder's fingerprints; a Hub id or FiftyOne dataset by name only."""
    s = build.config.stage_settings("sources")
    if s.origin == "path":
        folder = Path(s.path).expanduser()
        if not folder.is_dir():
            return {"missing": str(folder)}
        files = [[p.relative_to(folder).as_posix(), p.stat().st_size]
                 for p in _folder_files(folder)]
        side = folder / SIDECAR
        return {"files": files, "sidecar": hashlib.sha256(side.read_bytes()).hexdigest()[:16]
                if side.exists() else None}
    if s.origin == "dataset" and Path(s.dataset).is_dir():
        states = sorted(Path(s.dataset).rglob("state.json"))
        return {"state": [json.loads(f.read_text()).get("_fingerprint") for f in states]}
    return None
