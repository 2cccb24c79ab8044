"""The design tree (issue 28): `dsbuild tree` pages of a build's sessions, rendered by headless
Chromium (every node in the DOM, a screenshot that is not blank), the PIL picture beside them,
and `dsbuild edit --session` growing a designer's own tree with a tiny InstructPix2Pix."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from builders import make_session_build
from click.testing import CliRunner

from dsbuild.cli import cli
from dsbuild.core import sessions as S
from dsbuild.core.grid import text_layer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


class Nodes(HTMLParser):
    """The elements of class ``node`` of a page: their data-node-id and classes."""

    def __init__(self):
        super().__init__()
        self.nodes: list[dict] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if "node" in classes:
            self.nodes.append({"id": a.get("data-node-id"), "classes": classes,
                               "title": a.get("title") or ""})
        if tag == "img":
            self.srcs.append(a.get("src") or "")


def parse(text: str) -> Nodes:
    p = Nodes()
    p.feed(text)
    return p


def chromium(page: Path, tmp_path: Path) -> tuple[Nodes, Path]:
    """The DOM Chromium renders from ``page`` (after its script ran) and a screenshot."""
    if CHROMIUM is None:
        pytest.skip("headless Chromium is not installed (/usr/bin/chromium)")
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,1600"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True,
                         timeout=300)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp_path / f"{page.stem}_screenshot.png"
    r = subprocess.run([*base, f"--screenshot={shot}", url], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    return parse(dom.stdout), shot


def assert_not_blank(png: Path) -> None:
    """A screenshot showing the node images: thousands of colours, not one background."""
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    # None: more than 2**20 colours, surely not blank
    assert colours is None or len(colours) > 1000, f"{png}: {len(colours)} colours"


def dsbuild(args: list[str], capsys) -> tuple[int, str]:
    """The dsbuild command in process, as the shell runs it: (exit status, its one error
    line, or '' on success)."""
    from dsbuild.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) <= 1, err
    return e.value.code, lines[0] if lines else ""


def sessions_of(made) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for t in made["triples"]:
        if S.is_session(t):
            out.setdefault(t["session_id"], []).append(t)
    return out


@pytest.fixture
def session_build(mini_build):
    """Two sessions (a 3-turn chain, a tree of 3 nodes), 2 runs each; in run 0 of the chain
    its middle turn fails the filter, so its subtree (turns 2 and 3) does not survive."""
    made = make_session_build(mini_build, runs=2, fail={(0, 0, 1)}, size=48)
    return mini_build, made


def test_tree_page_renders_every_node_of_every_run(session_build, tmp_path):
    build, made = session_build
    chain, tree = sessions_of(made).items()
    sid, nodes = chain
    r = CliRunner().invoke(cli, ["tree", str(build.root), sid])
    assert r.exit_code == 0, r.output
    page = build.root / S.tree_page(sid)
    assert page.is_file() and page.with_suffix(".png").is_file()
    assert not (build.root / "reports/sessions/index.html").exists()  # one session: no index

    page_nodes = parse(page.read_text())  # the page as written; Chromium's DOM below
    runs = 2
    assert len(page_nodes.nodes) == runs * (len(nodes) + 1)  # each run's nodes + its root
    assert sum("root" in n["classes"] for n in page_nodes.nodes) == runs
    assert sorted(n["id"] for n in page_nodes.nodes if "root" not in n["classes"]) == sorted(
        [t["node_id"] for t in nodes] * runs)
    # prefix cut: the failed middle turn of run 0 and the turn under it are dimmed, nothing else
    dropped = [n for n in page_nodes.nodes if "dropped" in n["classes"]]
    assert sorted(n["id"] for n in dropped) == sorted(t["node_id"] for t in nodes[1:])
    assert any(n["title"].startswith(nodes[1]["edit"]) and "filter:" in n["title"]
               for n in dropped)
    # scores on hover, images embedded: nothing the page loads from elsewhere
    kept = next(n for n in page_nodes.nodes if "root" not in n["classes"] and "dropped" not in
                n["classes"])
    assert "clip_sim_dir 0.300" in kept["title"] and "clip_sim_image 0.800" in kept["title"]
    assert page_nodes.srcs and all(s.startswith("data:image/") for s in page_nodes.srcs)
    assert "http://" not in page.read_text() and "https://" not in page.read_text()

    # the picture: the same nodes, drawn with PIL, listed in its text layer
    layer = text_layer(page.with_suffix(".png"))["nodes"]
    assert len(layer) == len(page_nodes.nodes)
    assert sorted(x["node"] for x in layer if not x["alive"]) == sorted(
        n["id"] for n in dropped)

    # what Chromium renders: every node, and a screenshot that shows them
    dom, shot = chromium(page, tmp_path)
    assert [(n["id"], n["classes"]) for n in dom.nodes] == [
        (n["id"], n["classes"]) for n in page_nodes.nodes]
    assert len(dom.srcs) == len(page_nodes.srcs)
    assert_not_blank(shot)


def test_tree_without_session_writes_every_page_and_an_index(session_build, tmp_path):
    build, made = session_build
    by_session = sessions_of(made)
    r = CliRunner().invoke(cli, ["tree", str(build.root)])
    assert r.exit_code == 0, r.output
    index = build.root / "reports/sessions/index.html"
    links = [line for line in index.read_text().split('href="')[1:]]
    assert sorted(x.split('"')[0] for x in links) == sorted(
        Path(S.tree_page(sid)).name for sid in by_session)
    for sid, nodes in by_session.items():
        page = build.root / S.tree_page(sid)
        assert len(parse(page.read_text()).nodes) == 2 * (len(nodes) + 1)
    # the tree session (a root with two children, one child with its own) renders whole
    sid = list(by_session)[1]
    dom, shot = chromium(build.root / S.tree_page(sid), tmp_path)
    assert len(dom.nodes) == 2 * (len(by_session[sid]) + 1)
    assert not [n for n in dom.nodes if "dropped" in n["classes"]]
    dom, _ = chromium(index, tmp_path)
    assert not dom.nodes and len(dom.srcs) == len(by_session)


def test_tree_whole_cut_dims_the_whole_run(session_build):
    from dsbuild.core.config import apply_overrides
    from dsbuild.review.tree import build_trees

    build, made = session_build
    build.config = apply_overrides(build.config, ["export.session_cut=whole"])
    sid = next(iter(sessions_of(made)))
    run0, run1 = build_trees(build, sid)[sid]["trees"]
    assert not any(n.alive for n in run0.nodes)  # one failed turn: the whole run goes
    assert all(n.alive for n in run1.nodes)


def test_a_rejected_turn_dims_its_subtree_in_its_run_only(session_build):
    """A curator's reject on turn 1 of the tree session's second run dims that node and the
    node under it, with the reason on hover; its sibling and the other run stay."""
    from dsbuild.core.decisions import add_decisions, make_decision
    from dsbuild.review.tree import build_trees

    build, made = session_build
    sid, nodes = list(sessions_of(made).items())[1]
    top = nodes[0]  # "make the armchair blue", parent of the third node
    runs = build_trees(build, sid)[sid]["trees"]
    victim = next(p for p in made["pairs"] if p["triple_id"] == top["id"]
                  and p["session_run"] == runs[1].key)
    add_decisions(build, [make_decision(victim["id"], "reject", tool="test",
                                        reason="the sofa is purple")])
    run0, run1 = build_trees(build, sid)[sid]["trees"]
    assert all(n.alive for n in run0.nodes)
    assert {n.id for n in run1.nodes if not n.alive} == S.subtree(nodes, top["id"])
    by_id = {n.id: n for n in run1.nodes}
    assert by_id[top["id"]].details[0] == "review: the sofa is purple"
    assert by_id[nodes[2]["id"]].details[0] == "dropped: its parent turn does not survive"


def test_tree_refuses_unknown_sessions_and_builds_without_sessions(session_build, mini_recipe,
                                                                    tmp_path, capsys):
    from builders import make_build

    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    build, made = session_build
    code, err = dsbuild(["tree", build.root, "nosuchsession"], capsys)
    assert code != 0 and "no session 'nosuchsession'; sessions: " in err
    assert all(sid in err for sid in sessions_of(made))
    plain = Build.init(tmp_path / "plain", load_recipe(mini_recipe),
                       recipe_path=str(mini_recipe))
    make_build(plain, samples=1)
    code, err = dsbuild(["tree", plain.root], capsys)
    assert code != 0 and "has no sessions; set captions.sessions.share" in err
    assert not (plain.root / S.TREE_DIR).exists()


# ---------------------------------------------------------------- dsbuild edit --session


def edit(*args):
    return CliRunner().invoke(cli, ["edit", "tiny", *args, "--steps", "2"])


def test_edit_session_grows_a_tree_from_any_node(tmp_path, capsys, one_torch_thread):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import numpy as np
    from PIL import Image

    from dsbuild.evaluate.edit import edit_image

    src = tmp_path / "room.png"
    Image.new("RGB", (40, 36), "red").save(src)
    d = tmp_path / "design"
    r = edit(str(src), "make the sofa blue", "--session", str(d))
    assert r.exit_code == 0, r.output
    r = edit(str(src), "add a floor lamp", "--session", str(d), "--from", "root", "--seed", "3")
    assert r.exit_code == 0, r.output
    sess = json.loads((d / "session.json").read_text())
    assert [(n["id"], n["parent"], n["turn"], n["instruction"], n["seed"])
            for n in sess["nodes"]] == [("n1", "root", 1, "make the sofa blue", 0),
                                        ("n2", "root", 1, "add a floor lamp", 3)]
    assert all({"image", "model", "time"} <= set(n) and (d / n["image"]).is_file()
               for n in sess["nodes"])

    page = parse((d / "tree.html").read_text())
    assert sorted(n["id"] for n in page.nodes) == ["n1", "n2", "root"]  # 1 root + 2 children
    assert not [n for n in page.nodes if "dropped" in n["classes"]]
    assert len(page.srcs) == 3 and all(s.startswith("data:image/") for s in page.srcs)
    assert [x["node"] for x in text_layer(d / "tree.png")["nodes"]] == ["root", "n1", "n2"]
    shown = tmp_path / "two-children.html"
    shutil.copy(d / "tree.html", shown)  # Chromium renders this state at the end

    # the default parent is the last node; a node's input is its parent's output
    r = edit(str(src), "paint the walls sage", "--session", str(d))
    assert r.exit_code == 0, r.output
    n3 = json.loads((d / "session.json").read_text())["nodes"][-1]
    assert (n3["id"], n3["parent"], n3["turn"]) == ("n3", "n2", 2)
    again = edit_image("tiny", d / "n2.png", "paint the walls sage", tmp_path / "again.png",
                       seed=0, steps=2)
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(d / "n3.png")))
    assert len(parse((d / "tree.html").read_text()).nodes) == 4

    # bad input: one clear line, nothing written
    before = (d / "session.json").read_text()

    def refused(*args) -> str:
        code, err = dsbuild(["edit", "tiny", *args, "--steps", "2"], capsys)
        assert code != 0
        return err

    err = refused(src, "add a rug", "--session", d, "--from", "n9")
    assert "--from 'n9': no such node in this session; nodes: root, n1, n2, n3" in err
    other = tmp_path / "other.png"
    Image.new("RGB", (40, 36), "green").save(other)
    assert "not the root image of the session" in refused(other, "add a rug", "--session", d)
    assert "give --out FILE (one edit) or --session DIR" in refused(
        src, "add a rug", "--session", d, "--out", tmp_path / "x.png")
    assert "--from needs --session" in refused(src, "add a rug", "--out", tmp_path / "x.png",
                                               "--from", "root")
    assert (d / "session.json").read_text() == before
    assert not (d / "n4.png").exists() and not (tmp_path / "x.png").exists()
    assert "has no session yet" in refused(src, "add a rug", "--session", tmp_path / "fresh",
                                           "--from", "n1")
    assert not (tmp_path / "fresh").exists()

    dom, shot = chromium(shown, tmp_path)  # the page Chromium renders shows every node
    assert sorted(n["id"] for n in dom.nodes) == ["n1", "n2", "root"]
    assert len(dom.srcs) == 3
    assert_not_blank(shot)
    dom, _ = chromium(d / "tree.html", tmp_path)
    assert sorted(n["id"] for n in dom.nodes) == ["n1", "n2", "n3", "root"]
