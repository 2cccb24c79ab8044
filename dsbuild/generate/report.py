"""The generate report: ``reports/generate.json`` (pairs, captions cut), contact sheets under ``reports/generate_contact_sheet/`` (one PNG per
agent, a new page every ``PAGE_ROWS`` pairs; input | output, the instruction, both captions
and the parameters that are set, wrapped at word boundaries), ``reports/generate.md`` listing
the pages, and what ``dsbuild generate`` prints after a rank."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from dsbuild.core import join
from dsbuild.core.generators import generator_of, param_values
from dsbuild.core.grid import Row, grid, set_params
from dsbuild.core.join import Joined
from dsbuild.core.quiet import CUT_STAT, LIMIT_STAT, stage_cut
from dsbuild.core.records import write_image, write_json, write_text

THUMB = 160
PAGE_ROWS = 10  # pairs per page of an agent's contact sheet
TEXT_W = 520
SHEET_DIR = "generate_contact_sheet"


def _thumb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return Image.new("RGB", (THUMB, THUMB), (200, 0, 0))


def _slug(agent: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", agent).strip("._") or "agent"


def caption(pair: dict, triple: dict) -> str:
    """What a contact sheet says of one pair: instruction, captions, generator and the
    parameters that are set (one paragraph each)."""
    shown = set_params(param_values(pair))
    return (f"“{triple['edit']}”\nin: {triple['input']}\nout: {triple['output']}\n"
            f"{generator_of(pair)} seed={pair['seed']} {shown}".rstrip())


def contact_sheets(root: Path, pairs: Iterable[Joined], out_dir: Path, per_agent: int = 3,
                   note: str = "", by_generator: bool = False) -> dict[str, list[Path]]:
    """Write up to ``per_agent`` pairs (``join.all_pairs``) of each agent under ``out_dir``,
    ``<agent>.png`` then ``<agent>-p2.png``… every ``PAGE_ROWS`` pairs; returns the pages per
    agent (stale pages of earlier runs removed). ``by_generator`` (a build that mixes
    generators): up to ``per_agent`` pairs of each generator and agent, ``<generator>_<agent>``
    pages keyed ``<generator> / <agent>``."""
    by_agent: dict[str, list[Joined]] = {}
    for j in pairs:
        agent = j.triple.get("agent", "?")
        key = f"{generator_of(j.pair)} / {agent}" if by_generator else agent
        lst = by_agent.setdefault(key, [])
        if len(lst) < per_agent:
            lst.append(j)
    pages: dict[str, list[Path]] = {}
    for agent in sorted(by_agent):
        rows = by_agent[agent]
        chunks = [rows[i:i + PAGE_ROWS] for i in range(0, len(rows), PAGE_ROWS)]
        level = rows[0].triple.get("level")
        slug = _slug(agent.replace(" / ", "_"))
        for k, chunk in enumerate(chunks):
            path = out_dir / (f"{slug}.png" if k == 0 else f"{slug}-p{k + 1}.png")
            title = (f"dsbuild generate, {'generator / agent' if by_generator else 'agent'} "
                     f"{agent}" + (f" ({level})" if level else "")
                     + (f", page {k + 1} of {len(chunks)}" if len(chunks) > 1 else "")
                     + (f": {note}" if note else ""))
            sheet = grid([Row(caption(p, t), [_thumb(root / p["images"]["input"]),
                                               _thumb(root / p["images"]["output"])])
                          for p, t, _ in chunk],
                         cell=THUMB, title=title, headers=["input", "output"],
                         caption_side="right", text_width=TEXT_W,
                         text_header="instruction, captions, generator and parameters",
                         extra={"agent": agent, "page": k + 1, "pages": len(chunks)})
            write_image(path, sheet)
            pages.setdefault(agent, []).append(path)
    keep = {p for ps in pages.values() for p in ps}
    for old in out_dir.glob("*.png") if out_dir.is_dir() else []:
        if old not in keep:
            old.unlink()
    return pages


def markdown(pages: dict[str, list[Path]], reports_dir: Path, note: str = "") -> str:
    """reports/generate.md: the contact sheet pages, per agent."""
    lines = ["# Generate contact sheets", ""]
    if note:
        lines += [note, ""]
    mixed = any(" / " in key for key in pages)
    lines += ["| generator | agent | pages |" if mixed else "| agent | pages |",
              "|---|---|---|" if mixed else "|---|---|"]
    for agent, ps in pages.items():
        links = ", ".join(f"[{p.name}]({p.relative_to(reports_dir).as_posix()})" for p in ps)
        lines.append(f"| {agent.replace(' / ', ' | ')} | {links} |")
    return "\n".join(lines) + "\n"


def request_counts(marks: dict[int, dict]) -> dict:
    """What generators that call an endpoint (the images-edit API) asked and paid, summed over
    the ranks' markers: ``requests`` (sent, cached, retries, failed, tokens), ``images``
    (requested, billed, cached, cost) and ``bad_images`` by reason; empty for none."""
    from dsbuild.llm.client import sum_request_stats

    stats = []
    for m in marks.values():
        st = m.get("stats") or {}
        stats += [st, *(st.get("generators") or {}).values()]
    stats = [st for st in stats if st.get("requests")]
    if not stats:
        return {}
    images, bad = Counter(), Counter()
    for st in stats:
        images.update(st.get("images") or {})
        bad.update(st.get("bad_images") or {})
    return {"requests": sum_request_stats(st["requests"] for st in stats),
            "images": {k: round(v, 6) if isinstance(v, float) else v
                       for k, v in images.items()},
            "bad_images": dict(sorted(bad.items()))}


def write_counts(build) -> dict:
    """reports/generate.json: the pairs made and the captions the text encoder cut (longer
    than its token limit; docs/captions.md), summed over the ranks' markers; in a build that
    mixes generators also the pairs of each (``generators``)."""
    marks = build.markers("generate")
    cut, limit = stage_cut(marks)
    counts = {"pairs": sum(m.get("records", 0) for m in marks.values()), CUT_STAT: cut,
              LIMIT_STAT: limit}
    labels = build.config.generate.labels()
    if len(labels) > 1:  # a build that mixes generators: the pairs of each
        per_run = dict.fromkeys(labels, 0)
        for p in build.records("generate"):
            label = generator_of(p)
            label = label if label in per_run else f"{label}:{p.get('model')}"
            per_run[label] = per_run.get(label, 0) + 1
        counts["generators"] = per_run
    counts.update(request_counts(marks))
    write_json(build.reports_dir / "generate.json", counts)
    return counts


def write_report(build) -> dict | None:
    """reports/generate.json (:func:`write_counts`), reports/generate_contact_sheet/<agent>.png
    and reports/generate.md: a few pairs per agent (``generate.contact_sheet`` per agent; 0:
    none)."""
    counts = write_counts(build)
    s = build.config.generate
    if not s.contact_sheet:
        return counts
    runs = s.runs()
    note = "; ".join(f"generator={r.generator} model={r.model}" for r in runs)
    if any(r.model == "tiny" or r.model.startswith("tiny-") for r in runs):
        note += " (random tiny model: placeholder images)"
    reports = build.reports_dir
    pages = contact_sheets(build.root, join.all_pairs(build, scores=False),
                           reports / SHEET_DIR, s.contact_sheet, note, by_generator=len(runs) > 1)
    if not pages:
        return counts
    (reports / "generate_contact_sheet.png").unlink(missing_ok=True)  # the one-image sheet
    write_text(reports / "generate.md", markdown(pages, reports, note))
    return {**counts, "contact_sheets": [str(p) for ps in pages.values() for p in ps],
            "md": str(reports / "generate.md")}


def summary(build, result) -> list[str]:
    """What ``dsbuild generate`` prints after a rank: its speed and, once complete, the sheet."""
    st, lines = result.stats, []
    if st.get("pairs_per_s"):
        lines.append(f"  {st['pairs']} pairs from {st['sources']} sources, "
                     f"{st['pairs_per_s']} pairs/s")
    md = build.reports_dir / "generate.md"
    if md.exists() and build.is_complete("generate"):
        n = len(list((build.reports_dir / SHEET_DIR).glob("*.png")))
        lines.append(f"  contact sheets: {n} pages under {build.reports_dir / SHEET_DIR}, "
                     f"listed in {md}")
    return lines
