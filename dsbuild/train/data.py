"""Edit rows for training and evaluation: an export folder or a Hub dataset, checked up front.

Rows keep ``input_image, edit_prompt, edited_image`` (the columns diffusers' InstructPix2Pix
training reads), plus the captions, the ``no_change`` flag and a session turn's ids where the
export has them (every turn of a session is a row like any pair).
Images are decoded and checked before any training step, so a bad row fails the run at once
with its index and what to fix, not hours in.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError

REQUIRED = ("input_image", "edit_prompt", "edited_image")
SESSION_COLUMNS = ("session_id", "session_run", "turn", "node_id", "parent_id")
MODES = ("RGB", "RGBA", "L", "P")  # modes that convert to RGB without guessing


@dataclass
class EditRow:
    """One row: both images as RGB PIL images, the instruction, captions when known."""

    index: int
    input_image: object
    edited_image: object
    edit_prompt: str
    original_prompt: str | None = None
    edited_prompt: str | None = None
    no_change: bool = False
    # the pair's ground-truth edit region (export column ``edit_mask``: the P2P local-blend
    # mask, white = may change) as a mode-L image, when the data has one
    edit_mask: object | None = None
    # a turn of a multi-turn session (dsbuild.core.sessions; export columns of the same names),
    # when the data has session columns: training reads it as any pair, ``eval --turns``
    # follows its session
    session_id: str | None = None
    session_run: str | None = None
    turn: int | None = None
    node_id: str | None = None
    parent_id: str | None = None


def load_split(data: str, split: str):
    """The ``datasets.Dataset`` of one split of an export folder or a Hub dataset id."""
    datasets = require("datasets")
    path = Path(data)
    if path.exists():
        from dsbuild.core.exports import export_files, load_export

        if not path.is_dir():
            raise DsbuildError(f"{data}: expected an export folder (with data/*.parquet)")
        have = export_files(path)
        if have and split not in have:
            raise DsbuildError(f"{data} has no split {split!r} (splits: {', '.join(have)})")
        dd = load_export(path, splits=[split])  # only this split's shards are read
    else:
        if data.startswith((".", "/", "~")) or data.count("/") != 1:
            raise DsbuildError(f"{data!r} is neither an export folder nor a Hub dataset id "
                               "like 'owner/name'")
        try:
            dd = datasets.load_dataset(data)
        except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: one message
            raise DsbuildError(f"cannot load Hub dataset {data!r}: {type(exc).__name__}: "
                               f"{exc}") from None
    if split not in dd:
        raise DsbuildError(f"{data} has no split {split!r} (splits: {', '.join(dd)})")
    ds = dd[split]
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DsbuildError(f"{data} [{split}] lacks column(s) {', '.join(missing)}; an editing "
                           f"dataset needs {', '.join(REQUIRED)} (it has: "
                           f"{', '.join(ds.column_names)})")
    if len(ds) == 0:
        raise DsbuildError(f"{data} [{split}] has no rows")
    return ds


def decode_image(value, where: str):
    """A PIL image from a datasets Image cell (decoded image, or {'bytes', 'path'}) or a
    file path."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            im = value
        elif isinstance(value, (str, Path)):
            im = Image.open(value)
        elif isinstance(value, dict) and value.get("bytes"):
            im = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            im = Image.open(value["path"])
        else:
            raise ValueError("empty image cell")
        im.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DsbuildError(f"{where}: unreadable image ({type(exc).__name__}: {exc}); fix or "
                           "drop the row") from None
    return im


def read_rows(ds, where: str = "data", limit: int | None = None) -> list[EditRow]:
    """Decode and check every row (or the first ``limit``): images readable, both images of a
    row in the same colour mode (a convertible one), a non-empty instruction."""
    from datasets import Image as ImageFeature

    ds = ds.cast_column("input_image", ImageFeature(decode=False))
    ds = ds.cast_column("edited_image", ImageFeature(decode=False))
    cols = set(ds.column_names)
    if "edit_mask" in cols:
        ds = ds.cast_column("edit_mask", ImageFeature(decode=False))
    if isinstance(ds.features.get("source_image"), ImageFeature):  # read by nothing here
        ds = ds.cast_column("source_image", ImageFeature(decode=False))
    n = len(ds) if limit is None else min(limit, len(ds))
    rows: list[EditRow] = []
    for i in range(n):
        r = ds[i]
        a = decode_image(r["input_image"], f"{where} row {i} input_image")
        b = decode_image(r["edited_image"], f"{where} row {i} edited_image")
        for im, col in ((a, "input_image"), (b, "edited_image")):
            if im.mode not in MODES:
                raise DsbuildError(f"{where} row {i} {col}: colour mode {im.mode} is not one of "
                                   f"{', '.join(MODES)}; convert the images to RGB")
        if a.mode != b.mode:
            raise DsbuildError(f"{where} row {i}: input_image is {a.mode} but edited_image is "
                               f"{b.mode}; both images of a pair must share a colour mode "
                               "(convert both to RGB)")
        prompt = r["edit_prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DsbuildError(f"{where} row {i}: empty edit_prompt")
        mask = r.get("edit_mask") if "edit_mask" in cols else None
        if mask is not None:
            mask = decode_image(mask, f"{where} row {i} edit_mask").convert("L")
        rows.append(EditRow(
            index=i, input_image=a.convert("RGB"), edited_image=b.convert("RGB"),
            edit_prompt=prompt,
            original_prompt=r.get("original_prompt") if "original_prompt" in cols else None,
            edited_prompt=r.get("edited_prompt") if "edited_prompt" in cols else None,
            no_change=bool(r.get("no_change")) if "no_change" in cols else False,
            edit_mask=mask,
            **{k: r.get(k) if k in cols else None for k in SESSION_COLUMNS},
        ))
        if rows[-1].turn is not None:
            try:
                rows[-1].turn = int(rows[-1].turn)
            except (TypeError, ValueError):
                raise DsbuildError(f"{where} row {i}: turn {rows[-1].turn!r} is not a whole "
                                   "number (1 = an edit of the session's source image)") from None
    return rows


def fit(image, size: int, crop_box: tuple[int, int] | None = None, scale: float = 1.0):
    """Resize the shorter side to ``size·scale`` (bicubic) and crop ``size``×``size``: at
    ``crop_box`` (left, top) or centred. The same call on both images keeps them aligned."""
    from PIL import Image

    w, h = image.size
    short = round(size * scale)
    nw, nh = (short, max(short, round(h * short / w))) if w <= h else (
        max(short, round(w * short / h)), short)
    im = image.resize((nw, nh), Image.Resampling.BICUBIC)
    if crop_box is None:
        crop_box = ((nw - size) // 2, (nh - size) // 2)
    left, top = crop_box
    return im.crop((left, top, left + size, top + size))


def crop_range(image, size: int, scale: float) -> tuple[int, int]:
    """How far a crop may move (x, y) after ``fit``'s resize at ``scale``."""
    w, h = image.size
    short = round(size * scale)
    nw, nh = (short, max(short, round(h * short / w))) if w <= h else (
        max(short, round(w * short / h)), short)
    return nw - size, nh - size


def to_tensor(images):
    """PIL images -> float tensor (n, 3, H, W) in [-1, 1], as the VAE takes them."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
