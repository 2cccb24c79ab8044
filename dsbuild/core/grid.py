"""Images laid out in a labelled grid: the validation grids of training and the edit grids of
evaluation both draw them (PIL only, imported when a grid is drawn)."""

from __future__ import annotations


def edit_grid(rows, cell: int = 128):
    """A grid image: one line per row, ``(prompt, input, edit or [edits], truth)`` as columns."""
    lines = []
    for prompt, inp, edits, truth in rows:
        edits = edits if isinstance(edits, list) else [edits]
        lines.append((prompt, [inp, *edits, truth]))
    return image_grid(lines, cell)


def image_grid(lines, cell: int = 128):
    """A grid image: one line per ``(label, [images])``, the label above its images."""
    from PIL import Image, ImageDraw

    cols = max(len(c) for _, c in lines) if lines else 1
    band = 14
    grid = Image.new("RGB", (cols * cell, len(lines) * (cell + band)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, cells) in enumerate(lines):
        y = r * (cell + band)
        draw.text((2, y + 1), prompt[: cols * cell // 6], fill="black")
        for c, im in enumerate(cells):
            if im is not None:
                grid.paste(im.convert("RGB").resize((cell, cell)), (c * cell, y + band))
    return grid
