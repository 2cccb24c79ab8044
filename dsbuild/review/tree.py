"""The design tree (``dsbuild tree``, ``dsbuild edit --session``): a session drawn as a tree,
images at the nodes, instructions on the edges, scores and verdicts on hover.

One renderer serves a build's sessions (its joined rows, one tree per generated run, the turns
that do not survive :func:`dsbuild.core.sessions.cut` dimmed) and a designer's session folder
(:mod:`dsbuild.evaluate.session`). Each page is one self-contained HTML file (images embedded
as ``data:`` URIs, plain HTML and CSS, a few lines of inline JS for the hover panel, no
network) beside a PNG of the same tree drawn with PIL, whose text layer
(:data:`dsbuild.core.grid.TEXT_KEY`) lists the nodes it draws.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dsbuild.core import sessions as S
from dsbuild.core.errors import DsbuildError

INDEX = f"{S.TREE_DIR}/index.html"
ROOT = "root"  # the root's node id on a page
EMBED_SIDE = 256  # the longest side of an image embedded in a page (px)
PNG_THUMB = 112  # a node's side in the PNG picture (px)
SCORES = ("clip_sim_dir", "clip_sim_image", "clip_sim_0", "clip_sim_1")


@dataclass
class Node:
    """A node of a drawn tree: the edit that made it (its edge) and its image."""

    id: str
    parent: str | None  # None: a child of the root
    instruction: str
    image: Path | None  # None: not generated in this run
    alive: bool = True
    label: str = ""  # a short line under the image
    details: list[str] = field(default_factory=list)  # shown on hover


@dataclass
class Tree:
    """One tree: a root image and its nodes (parents before children)."""

    title: str
    root_image: Path | None
    root_caption: str
    nodes: list[Node]
    key: str = ""  # the run's id (data-run), or the folder's name

    def children(self) -> dict[str | None, list[Node]]:
        out: dict[str | None, list[Node]] = defaultdict(list)
        for n in self.nodes:
            out[n.parent].append(n)
        return out


# ---------------------------------------------------------------- a build's sessions


def passes(row: dict, policy: str = "kept") -> bool:
    """Whether a session turn's row passes on its own (before its parent is considered): the
    filter kept it (or has not scored it yet), verify and review did not reject it and, with
    ``export.policy: accepted``, a curator accepted it."""
    if row.get("scored") and not row.get("filter_keep"):
        return False
    if row.get("verify") == "reject" or row.get("review") == "reject":
        return False
    return policy != "accepted" or row.get("review") == "accept"


def _why_not(row: dict, policy: str) -> str:
    if row.get("scored") and not row.get("filter_keep"):
        return f"filter: {row.get('filter_reason') or 'not kept'}"
    if row.get("verify") == "reject":
        return f"verify: {row.get('verify_reason') or 'reject'}"
    if row.get("review") == "reject":
        return f"review: {row.get('review_reason') or 'reject'}"
    if policy == "accepted" and row.get("review") != "accept":
        return "review: not accepted (export.policy accepted)"
    return ""


def _details(row: dict) -> list[str]:
    out = [f"{k} {row[k]:.3f}" for k in SCORES if isinstance(row.get(k), float)]
    if row.get("scored"):
        out.append("filter: " + ("keep" if row.get("filter_keep") else "drop")
                   + (f" ({row['filter_reason']})" if row.get("filter_reason") else "")
                   + (f", rank {row['filter_rank']}" if row.get("filter_rank") is not None
                      else ""))
    else:
        out.append("filter: not scored")
    out.append(f"verify: {row.get('verify') or 'not run'}"
               + (f" ({row['verify_reason']})" if row.get("verify_reason") else ""))
    out.append(f"review: {row.get('review') or 'none'}"
               + (f" ({row['review_reason']})" if row.get("review_reason") else ""))
    if row.get("corrected"):
        out.append(f"planned: {row.get('original_edit')}")
    out.append(f"caption: {row.get('edited_prompt')}")
    out.append(f"pair {row.get('pair_id')}")
    return out


def cut_mode(build) -> str:
    """The session cut mode of the build's export (``prefix`` until export declares it)."""
    return getattr(build.config.export, "session_cut", "prefix") or "prefix"


def build_trees(build, session: str | None = None) -> dict[str, dict]:
    """The trees of a build's sessions (all, or ``session`` only): session id -> ``{"trees":
    [Tree per run], "triples": [...], "rows": [...], "alive": set of pair ids}``."""
    from dsbuild.core import join

    triples = [t for t in join.triples_by_id(build).values() if S.is_session(t)]
    by_session: dict[str, list[dict]] = defaultdict(list)
    for t in triples:
        by_session[t["session_id"]].append(t)
    if not by_session:
        raise DsbuildError(f"{build.root}: the build has no sessions; set "
                           "captions.sessions.share above 0 and rerun captions and generate")
    if session is not None and session not in by_session:
        known = sorted(by_session)
        raise DsbuildError(f"{build.root}: no session {session!r}; sessions: "
                           + ", ".join(known[:20]) + (f" (+{len(known) - 20} more)"
                                                      if len(known) > 20 else ""))
    rows, _ = join.rows(build, policy="all")
    rows = [r for r in rows if S.is_session(r)
            and (session is None or r["session_id"] == session)]
    mode, policy = cut_mode(build), getattr(build.config.export, "policy", "kept")
    alive = S.cut(rows, lambda r: passes(r, policy), mode, key="pair_id")
    rows_of: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        rows_of[r["session_id"]].append(r)
    out = {}
    for sid in sorted(by_session) if session is None else [session]:
        nodes = S.ordered(by_session[sid])
        runs = S.by_run(rows_of[sid])
        trees = [_run_tree(build, nodes, runs[run], alive, mode, policy, k)
                 for k, run in enumerate(sorted(runs, key=lambda r: (
                     min(x.get("seed") or 0 for x in runs[r]), r)), start=1)]
        out[sid] = {"trees": trees, "triples": nodes, "rows": rows_of[sid], "alive": alive,
                    "mode": mode}
    return out


def _run_tree(build, nodes: list[dict], run: list[dict], alive: set[str], mode: str,
              policy: str, k: int) -> Tree:
    row_of = {r["node_id"]: r for r in run}
    first = min(run, key=lambda r: r.get("turn") or 0)
    imgs = first["_images"]
    root = imgs.get("session_source") or (imgs.get("input") if first.get("turn") == 1 else None)
    out: list[Node] = []
    for t in nodes:
        r = row_of.get(t["node_id"])
        if r is None:
            out.append(Node(t["node_id"], t.get("parent_id"), t["edit"], None, False,
                            f"turn {t.get('turn')} · not generated",
                            [f"turn {t.get('turn')}: no pair in this run",
                             f"caption: {t['output']}"]))
            continue
        ok = r["pair_id"] in alive
        why = "" if ok else (_why_not(r, policy) or ("dropped: another turn of the run fails "
                                                     "(export.session_cut whole)"
                                                     if mode == "whole" else
                                                     "dropped: its parent turn does not survive"))
        out.append(Node(t["node_id"], t.get("parent_id"), r["edit_prompt"],
                        build.root / r["_images"]["output"], ok,
                        f"turn {r.get('turn')}" + ("" if ok else " · dropped"),
                        ([why] if why else []) + _details(r)))
    kept = sum(n.alive for n in out)
    seed = first.get("seed")
    guidance = json.loads(first.get("params") or "{}").get("guidance")
    title = (f"run {k} · seed {seed}" + (f" · guidance {guidance:.4g}"
                                          if isinstance(guidance, int | float) else "")
             + f" · {kept} of {len(out)} turns survive ({mode})")
    return Tree(title, build.root / root if root else None, nodes[0]["input"] if nodes else "",
                out, key=first.get("session_run") or "")


def write_build_trees(build, session: str | None = None) -> list[Path]:
    """Write the page and picture of ``session`` (or of every session, and the index page);
    returns the pages written."""
    from dsbuild.core.records import write_text

    found = build_trees(build, session)
    pages = []
    for sid, info in found.items():
        t0 = info["triples"][0]
        title = f"session {sid}"
        sub = (f"{t0.get('recipe')} · {t0.get('agent')} · {len(info['triples'])} turns · "
               f"{len(info['trees'])} runs — {t0['input']}")
        page = build.root / S.tree_page(sid)
        write_tree(page, title, sub, info["trees"])
        pages.append(page)
    if session is None:
        write_text(build.root / INDEX, index_html(build, found))
    return pages


def index_html(build, found: dict[str, dict]) -> str:
    """The page that lists a build's sessions, each linked to its own page."""
    counts = S.tree_counts(t for info in found.values() for t in info["triples"])
    rows = []
    for sid, info in found.items():
        t0 = info["triples"][0]
        runs = info["trees"]
        pairs = [r["pair_id"] for r in info["rows"]]
        kept = sum(p in info["alive"] for p in pairs)
        thumb = runs[0].root_image if runs else None
        img = (f'<img src="{_data_uri(thumb, 64)}" alt="">' if thumb and thumb.is_file()
               else "")
        depth = max((int(t.get("turn") or 0) for t in info["triples"]), default=0)
        branch = sum(1 for v in S.children(info["triples"]).values() if len(v) > 1)
        link = Path(S.tree_page(sid)).name
        rows.append(
            f'<tr><td>{img}</td><td><a href="{html.escape(link)}">{html.escape(sid)}</a></td>'
            f"<td>{html.escape(str(t0.get('agent')))}</td><td>{html.escape(t0['input'])}</td>"
            f"<td>{len(info['triples'])}</td><td>{depth}</td><td>{branch}</td>"
            f"<td>{len(runs)}</td><td>{kept} / {len(pairs)}</td></tr>")
    head = ("<tr><th></th><th>session</th><th>agent</th><th>root caption</th><th>turns</th>"
            "<th>deepest</th><th>branch points</th><th>runs</th><th>surviving pairs</th></tr>")
    summary = (f"{counts['sessions']} sessions, {counts['turns']} turns, {counts['branches']} "
               f"branch points, deepest turn {counts['max_turn']}; cut: "
               f"{cut_mode(build)}")
    return _document(f"sessions of {build.root.name}", summary,
                     f'<table class="index">{head}{"".join(rows)}</table>', script=False)


# ---------------------------------------------------------------- the page


CSS = """
body{font:14px/1.35 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 4px}
.sub{color:#555;margin:0 0 8px}.legend{color:#555;font-size:12px}
.tree{overflow:auto;padding:8px 0;background:#fff;border:1px solid #ddd;border-radius:6px}
.tree ul{position:relative;display:flex;justify-content:center;margin:0;padding:20px 0 0}
.tree>ul{padding-top:0}
.tree li{list-style:none;position:relative;padding:20px 6px 0;display:flex;
 flex-direction:column;align-items:center}
.tree li::before,.tree li::after{content:"";position:absolute;top:0;right:50%;width:50%;
 height:20px;border-top:2px solid #aab}
.tree li::after{right:auto;left:50%;border-left:2px solid #aab}
.tree li:only-child::before,.tree li:only-child::after{display:none}
.tree li:only-child{padding-top:0}
.tree li:first-child::before,.tree li:last-child::after{border:0 none}
.tree li:last-child::before{border-right:2px solid #aab;border-radius:0 6px 0 0}
.tree li:first-child::after{border-radius:6px 0 0 0}
.tree ul ul::before{content:"";position:absolute;top:0;left:50%;height:20px;
 border-left:2px solid #aab}
.tree>ul>li{padding-top:0}.tree>ul>li::before,.tree>ul>li::after{display:none}
.edge{max-width:150px;font-size:12px;background:#eef2fb;border:1px solid #c9d3ea;
 border-radius:4px;padding:2px 5px;margin-bottom:4px}
.node{display:flex;flex-direction:column;align-items:center;background:#fff;
 border:2px solid #6b7fb3;border-radius:6px;padding:4px;cursor:default}
.node img{width:128px;height:auto;display:block;image-rendering:auto}
.node .empty{width:128px;height:96px;background:repeating-linear-gradient(45deg,#eee,#eee 6px,
 #f8f8f8 6px,#f8f8f8 12px)}
.node span{font-size:11px;color:#444;margin-top:2px}
.node.root{border-color:#333}
.node.dropped{opacity:.35;border-style:dashed;border-color:#999}
.node.dropped+ul .edge,.dropped-edge{opacity:.5}
#info{position:fixed;right:12px;bottom:12px;max-width:360px;white-space:pre-wrap;
 background:#222;color:#eee;font-size:12px;padding:8px 10px;border-radius:6px}
table.index{border-collapse:collapse;background:#fff}
table.index td,table.index th{border:1px solid #ddd;padding:4px 8px;text-align:left}
"""

SCRIPT = """
(function(){var info=document.getElementById('info');
document.querySelectorAll('.node').forEach(function(n){
n.addEventListener('mouseenter',function(){info.textContent=n.getAttribute('data-details');
info.hidden=false;});
n.addEventListener('mouseleave',function(){info.hidden=true;});});})();
"""


def _data_uri(path: Path, side: int = EMBED_SIDE, cache: dict | None = None) -> str:
    """The image at ``path`` as a data: URI: as it is where it is a PNG no larger than
    ``side``, else a ``side`` thumbnail (JPEG)."""
    if cache is not None and (path, side) in cache:
        return cache[(path, side)]
    from PIL import Image

    raw = path.read_bytes()
    with Image.open(io.BytesIO(raw)) as im:
        if im.format == "PNG" and max(im.size) <= side:
            uri = "data:image/png;base64," + base64.b64encode(raw).decode()
        else:
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    if cache is not None:
        cache[(path, side)] = uri
    return uri


def _node_html(node_id: str, image: Path | None, label: str, details: list[str], *,
               classes: str, cache: dict) -> str:
    tip = html.escape("\n".join(details), quote=True)
    if image is not None and image.is_file():
        pic = f'<img src="{_data_uri(image, cache=cache)}" alt="{html.escape(label, True)}">'
    else:
        pic = '<div class="empty"></div>'
    return (f'<div class="{classes}" data-node-id="{html.escape(node_id, True)}" '
            f'title="{tip}" data-details="{tip}">{pic}<span>{html.escape(label)}</span></div>')


def tree_html(tree: Tree, cache: dict | None = None) -> str:
    """One tree as nested lists (CSS draws the connectors): every node, the root included,
    is an element of class ``node`` with ``data-node-id``."""
    cache = {} if cache is None else cache
    kids = tree.children()

    def branch(parent: str | None) -> str:
        items = []
        for n in kids.get(parent, []):
            cls = "node" + ("" if n.alive else " dropped") + ("" if n.image else " missing")
            edge_cls = "edge" + ("" if n.alive else " dropped-edge")
            items.append(f'<li><div class="{edge_cls}">{html.escape(n.instruction)}</div>'
                         + _node_html(n.id, n.image, n.label, [n.instruction, *n.details],
                                      classes=cls, cache=cache)
                         + branch(n.id) + "</li>")
        return f"<ul>{''.join(items)}</ul>" if items else ""

    root = _node_html(ROOT, tree.root_image, "source", [f"source: {tree.root_caption}"],
                      classes="node root", cache=cache)
    return (f'<section class="run" data-run="{html.escape(tree.key, True)}">'
            f"<h2>{html.escape(tree.title)}</h2><div class=\"tree\"><ul><li>{root}"
            f"{branch(None)}</li></ul></div></section>")


def _document(title: str, sub: str, body: str, *, script: bool = True) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"sub\">{html.escape(sub)}</p>{body}"
            + ('<div id="info" hidden></div><script>' + SCRIPT + "</script>" if script else "")
            + "</body></html>\n")


BUILD_LEGEND = ("instructions on the edges; hover a node for its scores and verdicts; dimmed, "
                "dashed nodes do not survive (a failed turn, or one under it)")
FOLDER_LEGEND = ("instructions on the edges; hover a node for its seed, model and time; grow "
                 "it with `dsbuild edit MODEL IMAGE INSTRUCTION --session DIR --from NODE`")


def page_html(title: str, sub: str, trees: list[Tree], legend: str = BUILD_LEGEND) -> str:
    """A self-contained page of ``trees`` (one per run)."""
    cache: dict = {}
    body = "".join(tree_html(t, cache) for t in trees) or "<p>no generated run yet</p>"
    return _document(title, sub, f'<p class="legend">{html.escape(legend)}</p>{body}')


def write_tree(page: Path, title: str, sub: str, trees: list[Tree],
               legend: str = BUILD_LEGEND) -> tuple[Path, Path]:
    """Write ``page`` (HTML) and its picture (the same path with ``.png``), atomically."""
    from dsbuild.core.records import write_image, write_text

    write_text(page, page_html(title, sub, trees, legend))
    png = page.with_suffix(".png")
    write_image(png, tree_picture(title, trees))
    return page, png


# ---------------------------------------------------------------- the picture


def _layout(tree: Tree) -> tuple[dict[str | None, float], dict[str | None, int], int]:
    """Columns (leaves one apart, a parent over the middle of its children) and depths of
    the root (key None) and every node; the number of leaf columns."""
    kids = tree.children()
    col: dict[str | None, float] = {}
    depth: dict[str | None, int] = {None: 0}
    nxt = [0]

    def place(key: str | None) -> None:
        cs = kids.get(key, [])
        for c in cs:
            depth[c.id] = depth[key] + 1
            place(c.id)
        if cs:
            col[key] = (col[cs[0].id] + col[cs[-1].id]) / 2
        else:
            col[key] = nxt[0]
            nxt[0] += 1

    place(None)
    return col, depth, nxt[0]


def _panel(tree: Tree, thumb: int, layer: list[dict]):
    """One run's tree drawn with PIL; appends what it draws to ``layer``."""
    from PIL import Image, ImageDraw

    from dsbuild.core.grid import INK, MUTED, font, wrap

    fnt, small = font(12), font(11)
    cell_w, band, label_h, pad = thumb + 40, 44, 16, 10
    level_h = band + thumb + label_h  # each level below the root: its edges' band first
    col, depth, leaves = _layout(tree)
    w = max(leaves * cell_w, int(fnt.getlength(tree.title)) + 2 * pad) + 2 * pad
    h = 24 + (max(depth.values()) + 1) * level_h - band + 2 * pad
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.text((pad, 4), tree.title, fill=INK, font=fnt)
    x0 = (w - leaves * cell_w) / 2
    box = {k: (x0 + c * cell_w + cell_w / 2, 24 + pad + depth[k] * level_h)
           for k, c in col.items()}
    by_id = {n.id: n for n in tree.nodes}
    for key in [None, *by_id]:
        n = by_id.get(key)
        cx, top = box[key]
        if n is not None:  # the edge from the parent, its instruction in the band
            px, ptop = box[n.parent]
            ybot, ymid = ptop + thumb + label_h, top - band + 4
            line = (150, 150, 170) if n.alive else (205, 205, 205)
            d.line([(px, ybot), (px, ymid), (cx, ymid), (cx, top)], fill=line, width=2)
            ty = ymid + 4
            for ln in wrap(n.instruction, cell_w - 8, small, max_lines=2):
                tw = small.getlength(ln)
                d.rectangle([cx - tw / 2 - 2, ty - 1, cx + tw / 2 + 2, ty + 13],
                            fill=(238, 242, 251))
                d.text((cx - tw / 2, ty), ln, fill=INK if n.alive else MUTED, font=small)
                ty += 14
        image = tree.root_image if n is None else n.image
        alive = True if n is None else n.alive
        left = int(cx - thumb / 2)
        if image is not None and image.is_file():
            with Image.open(image) as src:
                pic = src.convert("RGB")
            scale = thumb / max(pic.size)  # fit the box, small images scaled up too
            pic = pic.resize((max(1, round(pic.width * scale)), max(1, round(pic.height * scale))),
                             Image.Resampling.LANCZOS)
            if not alive:
                pic = Image.blend(pic, Image.new("RGB", pic.size, (255, 255, 255)), 0.65)
            im.paste(pic, (left + (thumb - pic.width) // 2, int(top) + (thumb - pic.height) // 2))
        else:
            d.rectangle([left, top, left + thumb, top + thumb * 3 // 4], fill=(236, 236, 236))
        edge = (51, 51, 51) if n is None else ((107, 127, 179) if alive else (190, 190, 190))
        d.rectangle([left - 2, top - 2, left + thumb + 1, top + thumb + 1], outline=edge,
                    width=2)
        label = "source" if n is None else n.label
        d.text((cx - small.getlength(label) / 2, top + thumb + 2), label,
               fill=INK if alive else MUTED, font=small)
        layer.append({"run": tree.key, "node": ROOT if n is None else n.id,
                      "instruction": None if n is None else n.instruction, "alive": alive})
    return im


def tree_picture(title: str, trees: list[Tree], thumb: int = PNG_THUMB):
    """The trees drawn with PIL, one panel per run in a near-square grid;
    ``info[TEXT_KEY]`` lists every node drawn (run, node, instruction, alive)."""
    from PIL import Image, ImageDraw

    from dsbuild.core.grid import INK, TEXT_KEY, font

    layer: list[dict] = []
    panels = [_panel(t, thumb, layer) for t in trees]
    if not panels:  # a session no run was generated for yet: its title and a note
        panels = [Image.new("RGB", (max(320, int(font(14).getlength(title)) + 20), 40),
                            (255, 255, 255))]
        ImageDraw.Draw(panels[0]).text((10, 10), "no generated run", fill=INK, font=font(12))
    cols = max(1, math.ceil(len(panels) ** 0.5))
    grid_rows = [panels[i:i + cols] for i in range(0, len(panels), cols)]
    width = max(sum(p.width for p in r) for r in grid_rows)
    height = 28 + sum(max(p.height for p in r) for r in grid_rows)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(sheet).text((10, 6), title, fill=INK, font=font(14))
    y = 28
    for r in grid_rows:
        x = 0
        for p in r:
            sheet.paste(p, (x, y))
            x += p.width
        y += max(p.height for p in r)
    sheet.info[TEXT_KEY] = json.dumps({"title": title, "nodes": layer}, ensure_ascii=False)
    return sheet


# ---------------------------------------------------------------- a designer's session folder


def folder_tree(folder: str | Path) -> Tree:
    """The tree of a designer's session folder (``dsbuild edit --session``)."""
    from dsbuild.evaluate.session import load_session

    folder = Path(folder)
    sess = load_session(folder)
    nodes = []
    for n in sess["nodes"]:
        details = [f"node {n['id']} (turn {n.get('turn')})", f"seed {n.get('seed')}",
                   f"model {n.get('model')}", f"at {n.get('time')}"]
        for k in ("guidance", "image_guidance", "steps"):
            if n.get(k) is not None:
                details.append(f"{k} {n[k]}")
        nodes.append(Node(n["id"], None if n.get("parent") == ROOT else n.get("parent"),
                          n["instruction"], folder / n["image"], True,
                          f"{n['id']} · turn {n.get('turn')}", details))
    root = sess["root"]
    return Tree(f"{folder.name}: {len(nodes)} edits", folder / root["image"],
                root.get("source") or root["image"], nodes, key=folder.name)


def write_folder_tree(folder: str | Path) -> tuple[Path, Path]:
    """Write ``tree.html`` and ``tree.png`` of a designer's session folder."""
    folder = Path(folder)
    tree = folder_tree(folder)
    return write_tree(folder / "tree.html", f"design session {folder.name}",
                      f"{len(tree.nodes)} edits from {tree.root_caption}", [tree],
                      FOLDER_LEGEND)
