"""The generate report: ``reports/generate_contact_sheet.png`` (a few pairs per agent, input |
output, with their captions) and what ``dsbuild generate`` prints after a rank."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw

from dsbuild.core import join
from dsbuild.core.generators import generator_of, param_values
from dsbuild.core.join import Joined
from dsbuild.core.records import write_image

THUMB = 160


def _thumb(path: Path) -> Image.Image:
    try:
        im = Image.open(path).convert("RGB")
    except OSError:
        im = Image.new("RGB", (THUMB, THUMB), (200, 0, 0))
    return im.resize((THUMB, THUMB), Image.Resampling.NEAREST
                     if min(im.size) < THUMB else Image.Resampling.LANCZOS)


def contact_sheet(root: Path, pairs: Iterable[Joined], out: Path, per_agent: int = 3,
                  note: str = "") -> Path | None:
    """Write ``out`` (PNG) with up to ``per_agent`` pairs (``join.all_pairs``) for each agent;
    None if no pairs."""
    by_agent: dict[str, list[Joined]] = {}
    for j in pairs:
        lst = by_agent.setdefault(j.triple.get("agent", "?"), [])
        if len(lst) < per_agent:
            lst.append(j)
    rows = [(a, j) for a in sorted(by_agent) for j in by_agent[a]]
    if not rows:
        return None
    text_w, row_h, head = 560, THUMB + 8, 28
    sheet = Image.new("RGB", (2 * THUMB + text_w + 24, head + row_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 8), f"dsbuild generate: input | output  {note}", fill="black")
    for r, (agent, (p, t, _)) in enumerate(rows):
        y = head + r * row_h
        sheet.paste(_thumb(root / p["images"]["input"]), (8, y))
        sheet.paste(_thumb(root / p["images"]["output"]), (16 + THUMB, y))
        shown = " ".join(f"{k}={v}" for k, v in param_values(p).items() if v is not None)
        lines = [f"[{agent}] {t['edit']}", f"in:  {t['input']}", f"out: {t['output']}",
                 f"{generator_of(p)} seed={p['seed']} {shown}"]
        for li, line in enumerate(lines):
            draw.text((24 + 2 * THUMB, y + 6 + 16 * li), line[:90], fill="black")
    write_image(out, sheet)
    return out


def write_report(build) -> dict | None:
    """reports/generate_contact_sheet.png: a few pairs per agent (``generate.contact_sheet``
    per agent; 0: none)."""
    s = build.config.generate
    if not s.contact_sheet:
        return None
    note = f"generator={s.generator} model={s.model}"
    if s.model == "tiny":
        note += " (random tiny model: placeholder images)"
    out = contact_sheet(build.root, join.all_pairs(build, scores=False),
                        build.reports_dir / "generate_contact_sheet.png", s.contact_sheet, note)
    return {"contact_sheet": str(out)} if out else None


def summary(build, result) -> list[str]:
    """What ``dsbuild generate`` prints after a rank: its speed and, once complete, the sheet."""
    st, lines = result.stats, []
    if st.get("pairs_per_s"):
        lines.append(f"  {st['pairs']} pairs from {st['sources']} sources, "
                     f"{st['pairs_per_s']} pairs/s")
    sheet = build.reports_dir / "generate_contact_sheet.png"
    if sheet.exists() and build.is_complete("generate"):
        lines.append(f"  contact sheet: {sheet}")
    return lines
