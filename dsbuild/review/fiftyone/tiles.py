"""Pair tiles: the ``pair`` slice's image, input | output side by side under the instruction.

Rendered once per pair into ``cache/fiftyone-tiles/`` and again only when the pair's images or
instruction change.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from dsbuild.core.hashing import content_id

TILE_HEIGHT = 256  # images shorter than this are scaled up (nearest: pixels stay true)
TILE_MAX_HEIGHT = 512  # and taller ones down (Lanczos)
TILE_GAP = 8
TILE_VERSION = 1  # bump when the layout changes: every tile is rendered again
TILE_BG, TILE_FG, TILE_BANNER = (24, 24, 24), (255, 255, 255), (40, 40, 40)


def tile_height(sizes: list[tuple[int, int]]) -> int:
    """The height both sides of a tile are scaled to."""
    return min(max(TILE_HEIGHT, max(h for _, h in sizes)), TILE_MAX_HEIGHT)


def _scaled(im, height: int):
    from PIL import Image

    if im.height == height:
        return im
    width = max(1, round(im.width * height / im.height))
    method = Image.Resampling.NEAREST if height > im.height else Image.Resampling.LANCZOS
    return im.resize((width, height), method)


def _wrap(draw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + " …"
    return lines or [""]


def render_tile(input_path: str | Path, output_path: str | Path, instruction: str):
    """Input | output side by side (same height) under a banner with the instruction; a
    missing image becomes a grey box that says so."""
    from PIL import Image, ImageDraw, ImageFont

    sides = []
    for p in (input_path, output_path):
        try:
            with Image.open(p) as im:
                sides.append(im.convert("RGB"))
        except OSError:
            sides.append(None)
    known = [im.size for im in sides if im is not None] or [(TILE_HEIGHT, TILE_HEIGHT)]
    height = tile_height(known)
    for i, im in enumerate(sides):
        if im is None:
            im = Image.new("RGB", (height, height), (128, 128, 128))
            ImageDraw.Draw(im).text((8, 8), "image missing", fill=TILE_FG)
        sides[i] = _scaled(im, height)
    width = sides[0].width + TILE_GAP + sides[1].width
    font = ImageFont.load_default(size=max(14, height // 16))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, instruction or "(no instruction)", font, width - 16)
    line_h = round(font.size * 1.3)
    banner = 8 + line_h * len(lines) + 4
    tile = Image.new("RGB", (width, banner + height), TILE_BG)
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, width, banner - 1), fill=TILE_BANNER)
    for i, line in enumerate(lines):
        draw.text((8, 6 + i * line_h), line, font=font, fill=TILE_FG)
    tile.paste(sides[0], (0, banner))
    tile.paste(sides[1], (sides[0].width + TILE_GAP, banner))
    return tile


def tile_layout(tile_size: tuple[int, int], input_size: tuple[int, int],
                output_size: tuple[int, int]) -> dict[str, tuple[int, int, int, int]]:
    """Where ``render_tile`` put each side: name -> (left, top, right, bottom)."""
    height = tile_height([input_size, output_size])
    w_in = max(1, round(input_size[0] * height / input_size[1]))
    w_out = max(1, round(output_size[0] * height / output_size[1]))
    top = tile_size[1] - height
    return {"input": (0, top, w_in, top + height),
            "output": (w_in + TILE_GAP, top, w_in + TILE_GAP + w_out, top + height)}


def _stat_key(path: str) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)
    return (path, st.st_size, st.st_mtime_ns)


def tiles_dir(build) -> Path:
    return build.cache_dir / "fiftyone-tiles"


def ensure_tiles(build, rows: list[dict]) -> dict[str, int]:
    """Give every row a ``pair`` image: its tile, rendered only when the pair's images
    (path, size, mtime) or instruction changed since the last one; older tiles of the pair go.
    """
    from dsbuild.core.progress import progress
    from dsbuild.core.records import write_image

    out = tiles_dir(build)
    have: dict[str, list[Path]] = defaultdict(list)
    if out.is_dir():
        for f in out.glob("*.png"):
            have[f.name.split(".", 1)[0]].append(f)
    stats = {"rendered": 0, "cached": 0}
    for row in progress(rows, desc="pair tiles", unit="pair"):
        images = row["images"]
        if "input" not in images or "output" not in images:
            continue
        edit = row["fields"].get("edit_prompt") or ""
        key = content_id("tile", TILE_VERSION, _stat_key(images["input"]),
                         _stat_key(images["output"]), edit)
        stem = content_id("pair", row["pair_id"])  # pair ids may hold any character
        path = out / f"{stem}.{key}.png"
        if path.is_file():
            stats["cached"] += 1
        else:
            write_image(path, render_tile(images["input"], images["output"], edit))
            stats["rendered"] += 1
        for old in have.get(stem, []):
            if old != path:
                old.unlink(missing_ok=True)
        images["pair"] = str(path.resolve())
    return stats
