"""Pictures that label themselves: images in a grid under a title and a header row, captions
wrapped at word boundaries (a row grows to fit them, or ends with "…" after a whole word), and
the text drawn recorded in the PNG as JSON (``TEXT_KEY``, an iTXt chunk that
``records.write_image`` keeps) so tests and tools read the labels without OCR.

Training's validation grids, evaluation's edit grids, generate's contact sheet and verify's
rejects all draw through :func:`grid` (PIL only, imported when a grid is drawn)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TEXT_KEY = "dsbuild:text"
BACKGROUND = (255, 255, 255)
HEADER_BG = (222, 228, 238)  # the header band: a tint, so it is visible even without text
INK = (20, 20, 20)
MUTED = (80, 80, 80)
PAD, GAP, FONT_SIZE = 6, 4, 12
ELLIPSIS = "…"


@dataclass
class Row:
    """One line of a grid: a caption (above the images, or beside them), the images (None: an
    empty cell) and, optionally, a note under each image."""

    caption: str = ""
    images: list = field(default_factory=list)
    notes: list[str] | None = None


def font(size: int = FONT_SIZE):
    """PIL's bundled font at ``size`` (its bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no sized default font
        return ImageFont.load_default()


def _width(text: str, fnt) -> float:
    return fnt.getlength(text)


def wrap(text: str, width: float, fnt=None, max_lines: int | None = None) -> list[str]:
    """``text`` as lines no wider than ``width`` px, broken between words only (a word wider
    than a whole line stands alone on its line); past ``max_lines`` the last line ends with
    "…" after a whole word. Newlines in ``text`` start new lines."""
    fnt = fnt or font()
    lines: list[str] = []
    for para in str(text).split("\n"):
        line = ""
        for word in para.split():
            trial = f"{line} {word}" if line else word
            if line and _width(trial, fnt) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        words = lines[-1].split()
        while words and _width(" ".join(words) + " " + ELLIPSIS, fnt) > width:
            words.pop()
        lines[-1] = " ".join([*words, ELLIPSIS])
    return lines


def set_params(values: dict) -> str:
    """``k=v`` for each parameter that is set (None and empty values left out; floats to four
    significant digits, so 0.1 + 0.2 prints 0.3)."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in values.items()
                    if v is not None and v != "" and v != [] and v != {})


def _fit(im, w: int, h: int):
    """``im`` scaled to fit inside w×h (aspect kept): NEAREST when enlarging (tiny images stay
    sharp), LANCZOS when shrinking."""
    from PIL import Image

    im = im.convert("RGB")
    scale = min(w / im.width, h / im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    if size == im.size:
        return im
    return im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def grid(rows: list[Row], *, cell: int | tuple[int, int] = 128, title: str = "",
         headers: list[str] | None = None, caption_side: str = "above", text_width: int = 0,
         text_header: str = "", caption_lines: int | None = None, note_lines: int = 4,
         extra: dict | None = None):
    """A labelled grid image: ``title`` on top, then a header band (``headers``, one per image
    column, and ``text_header`` over the caption column when captions sit on the right), then
    each row: its caption (``caption_side`` "above" the images or "right" of them, in a column
    ``text_width`` px wide), its images in cells of ``cell`` px, a note under each image.

    The text layer (title, headers, captions, the lines drawn, the header band and each cell's
    box) is in ``image.info[TEXT_KEY]``; ``extra`` adds keys to it."""
    from PIL import Image, ImageDraw

    if caption_side not in ("above", "right"):
        raise ValueError(f"caption_side must be above or right, not {caption_side!r}")
    cw, ch = (cell, cell) if isinstance(cell, int) else cell
    fnt, bold = font(), font(FONT_SIZE + 2)
    lh = round(FONT_SIZE * 1.35)
    headers = [str(h) for h in headers or []]
    cols = max([len(r.images) for r in rows] + [len(headers), 1])
    images_w = cols * cw + (cols - 1) * GAP
    side_w = text_width if caption_side == "right" else 0
    width = 2 * PAD + images_w + (GAP + side_w if side_w else 0)
    cap_w = side_w if side_w else images_w

    title_lines = wrap(title, width - 2 * PAD, bold) if title else []
    head_lines = [wrap(h, cw - 4, fnt, 3) for h in headers]
    text_head_lines = wrap(text_header, side_w - 4, fnt, 3) if side_w and text_header else []
    head_n = max([len(x) for x in head_lines] + [len(text_head_lines)] + [0])
    title_h = PAD + len(title_lines) * round((FONT_SIZE + 2) * 1.35) if title_lines else 0
    head_h = head_n * lh + PAD if head_n else 0

    laid = []
    for r in rows:
        cap = wrap(r.caption, cap_w, fnt, caption_lines) if r.caption else []
        notes = [wrap(n, cw, fnt, note_lines) if n else [] for n in (r.notes or [])]
        notes_h = max([len(n) for n in notes] + [0]) * lh
        cap_h = len(cap) * lh
        body = ch + notes_h
        height = (cap_h + (2 if cap else 0) + body) if not side_w else max(body, cap_h)
        laid.append((r, cap, notes, height))
    top = title_h + head_h + PAD
    total_h = top + sum(h + GAP + PAD for *_, h in laid) + PAD

    sheet = Image.new("RGB", (width, total_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, font=bold, fill=INK)
        y += round((FONT_SIZE + 2) * 1.35)
    band = None
    if head_h:
        band = [title_h + PAD // 2, title_h + PAD // 2 + head_h]
        draw.rectangle((0, band[0], width - 1, band[1] - 1), fill=HEADER_BG)
        for c, lines in enumerate(head_lines):
            for i, line in enumerate(lines):
                x = PAD + c * (cw + GAP) + (cw - _width(line, fnt)) / 2
                draw.text((x, band[0] + PAD // 2 + i * lh), line, font=fnt, fill=INK)
        for i, line in enumerate(text_head_lines):
            draw.text((PAD + images_w + GAP, band[0] + PAD // 2 + i * lh), line, font=fnt,
                      fill=INK)
    y = top
    layer_rows = []
    for r, cap, notes, height in laid:
        cap_x, cap_y = (PAD, y) if not side_w else (PAD + images_w + GAP, y)
        for i, line in enumerate(cap):
            draw.text((cap_x, cap_y + i * lh), line, font=fnt, fill=INK)
        img_y = y + (len(cap) * lh + 2 if cap and not side_w else 0)
        boxes = []
        for c, im in enumerate(r.images):
            x = PAD + c * (cw + GAP)
            if im is None:
                boxes.append(None)
                continue
            im = _fit(im, cw, ch)
            ox, oy = x + (cw - im.width) // 2, img_y + (ch - im.height) // 2
            sheet.paste(im, (ox, oy))
            boxes.append([ox, oy, ox + im.width, oy + im.height])
        for c, lines in enumerate(notes):
            for i, line in enumerate(lines):
                draw.text((PAD + c * (cw + GAP), img_y + ch + i * lh), line, font=fnt,
                          fill=MUTED)
        layer_rows.append({"caption": r.caption, "caption_lines": cap,
                           "notes": list(r.notes or []), "note_lines": notes, "cells": boxes})
        y += height + GAP + PAD
    layer = {"title": title, "title_lines": title_lines, "headers": headers,
             "header_lines": head_lines, "text_header": text_header, "header_band": band,
             "caption_width": cap_w, "cell_width": cw, "rows": layer_rows, **(extra or {})}
    sheet.info[TEXT_KEY] = json.dumps(layer, ensure_ascii=False)
    return sheet


def edit_grid(rows, cell: int = 128, *, title: str = "", headers: list[str] | None = None):
    """Edits on fixed rows: one line per ``(instruction, input, edit or [edits], truth)``,
    the instruction above its images; ``headers`` name the columns (default input | edit |
    truth, or input | edit 1 … | truth)."""
    lines = []
    for prompt, inp, edits, truth in rows:
        edits = edits if isinstance(edits, list) else [edits]
        lines.append(Row(prompt, [inp, *edits, truth]))
    if headers is None:
        n = max((len(r.images) for r in lines), default=3) - 2
        headers = ["input", *(["edit"] if n == 1 else [f"edit {i + 1}" for i in range(n)]),
                   "truth"]
    return grid(lines, cell=cell, title=title, headers=headers)


def image_grid(lines, cell: int = 128, *, title: str = "", headers: list[str] | None = None):
    """One line per ``(caption, [images])``, the caption above its images."""
    return grid([Row(label, list(cells)) for label, cells in lines], cell=cell, title=title,
                headers=headers)


def text_layer(image_or_path) -> dict:
    """The text layer a grid recorded (see :func:`grid`); {} when it has none."""
    from PIL import Image

    if isinstance(image_or_path, str | Path):
        with Image.open(image_or_path) as im:
            im.load()
            raw = im.info.get(TEXT_KEY)
    else:
        raw = image_or_path.info.get(TEXT_KEY)
    return json.loads(raw) if raw else {}
