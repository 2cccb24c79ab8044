"""Pair tiles: the ``pair`` slice's image, input | output side by side under the instruction;
session tiles: the ``session`` slice's image, a session pair's chain from the run's source image
to its turn.

Rendered once per pair into ``cache/fiftyone-tiles/`` (session tiles into its ``sessions/``)
and again only when the pair's images or instructions change.
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


# ---------------------------------------------------------------------------- session tiles
SESSION_TILE_VERSION = 1  # bump when the session tile's layout changes
SESSION_CELL = 192


def session_tiles_dir(build) -> Path:
    return tiles_dir(build) / "sessions"


def session_chain(row: dict, rows_of_run: dict[str, dict]) -> list[dict]:
    """The rows from the run's first turn down to ``row`` (root first), following
    ``parent_id`` inside the run; stops where an ancestor is not among the rows."""
    chain, seen = [row], {row["fields"].get("node_id")}
    parent = row["fields"].get("parent_id")
    while parent and parent in rows_of_run and parent not in seen:
        seen.add(parent)
        chain.append(rows_of_run[parent])
        parent = rows_of_run[parent]["fields"].get("parent_id")
    return chain[::-1]


def render_session_tile(source: str | None, chain: list[dict], *, title: str = ""):
    """The session tile: the run's source image, then each turn's output down to this turn,
    each under its turn and with its instruction beneath (a grid, its text layer recorded:
    ``dsbuild.core.grid``). Where the chain does not reach turn 1, the first turn shown starts
    from its own input image."""
    from PIL import Image

    from dsbuild.core.grid import Row, grid

    def load(path):  # a missing image is an empty cell
        if not path:
            return None
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError:
            return None

    first = chain[0]["fields"]
    start = source if int(first.get("turn") or 1) == 1 else chain[0]["images"].get("input")
    images = [load(start)]
    headers = ["source" if int(first.get("turn") or 1) == 1
               else f"turn {int(first.get('turn') or 1) - 1}"]
    notes = [""]
    for r in chain:
        images.append(load(r["images"].get("output")))
        turn = int(r["fields"].get("turn") or 0)
        headers.append(f"turn {turn}" + (" (this pair)" if r is chain[-1] else ""))
        notes.append(r["fields"].get("edit_prompt") or "")
    return grid([Row("", images, notes)], cell=SESSION_CELL, title=title, headers=headers,
                extra={"session_run": chain[-1]["fields"].get("session_run"),
                       "pairs": [r["pair_id"] for r in chain]})


def ensure_session_tiles(build, rows: list[dict]) -> dict[str, int]:
    """Give every session row a ``session`` image: its session tile, rendered only when an
    image of its chain (path, size, mtime) or an instruction on it changed; older tiles of the
    pair go."""
    from dsbuild.core.progress import progress
    from dsbuild.core.records import write_image

    out = session_tiles_dir(build)
    have: dict[str, list[Path]] = defaultdict(list)
    if out.is_dir():
        for f in out.glob("*.png"):
            have[f.name.split(".", 1)[0]].append(f)
    runs: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        f = row["fields"]
        if f.get("session_run") and f.get("node_id") and f.get("kind") == "pair":
            runs[f["session_run"]][f["node_id"]] = row
    stats = {"rendered": 0, "cached": 0}
    todo = [row for run in runs.values() for row in run.values()]
    for row in progress(todo, desc="session tiles", unit="pair"):
        f = row["fields"]
        chain = session_chain(row, runs[f["session_run"]])
        source = row.get("session_source")
        key = content_id("session-tile", SESSION_TILE_VERSION, _stat_key(source or ""),
                         [(_stat_key(r["images"].get("input", "")),
                           _stat_key(r["images"].get("output", "")),
                           r["fields"].get("edit_prompt")) for r in chain])
        stem = content_id("session", row["pair_id"])
        path = out / f"{stem}.{key}.png"
        if path.is_file():
            stats["cached"] += 1
        else:
            title = f"{f.get('agent') or ''} session, turn {f.get('turn')}".strip()
            write_image(path, render_session_tile(source, chain, title=title))
            stats["rendered"] += 1
        for old in have.get(stem, []):
            if old != path:
                old.unlink(missing_ok=True)
        row["images"]["session"] = str(path.resolve())
    return stats
