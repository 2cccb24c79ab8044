"""Review of multi-turn sessions (issue 28): FiftyOne groups and tiles a session, Label Studio
shows a whole session run in one task with a verdict per turn, and a rejected turn drops its
subtree. Real servers (mongod, Label Studio), started as tests/test_fiftyone.py and
tests/test_labelstudio.py start them; builds from tests/builders.make_session_build.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import httpx
import pytest
from builders import FAILING_DIR, SESSIONS, make_build, make_session_build, write_scores
from test_labelstudio import TOKEN, ls_server, token  # noqa: F401 - fixtures

from dsbuild.core import join
from dsbuild.core import sessions as S
from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.core.decisions import latest_by_pair, read_decisions
from dsbuild.core.grid import text_layer
from dsbuild.review import labelstudio as ls

HAS_FIFTYONE = find_spec("fiftyone") is not None
if HAS_FIFTYONE:  # the module's mongod (importing it would skip this module without fiftyone)
    from test_fiftyone import mongod  # noqa: F401 - a fixture

pytestmark = [
    pytest.mark.filterwarnings("ignore:Passing a class to strawberry.scalar:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:No uuidRepresentation is specified:DeprecationWarning"),
]
needs_fiftyone = pytest.mark.skipif(not HAS_FIFTYONE, reason="fiftyone is not installed")


@pytest.fixture
def build(tmp_path, mini_recipe, request):
    b = Build.init(tmp_path / "build", load_recipe(mini_recipe), recipe_path=str(mini_recipe))
    b.update([f"review.dataset_name=t-{request.node.name}"])
    return b


def session_pairs(recs: dict) -> dict[str, dict]:
    return {p["id"]: p for p in recs["pairs"] if p.get("session_id")}


# ------------------------------------------------------------------ FiftyOne
@pytest.mark.server
@needs_fiftyone
def test_fiftyone_groups_and_tiles_a_session(mongod, build):  # noqa: F811
    from dsbuild.review import fiftyone as fr

    fo = fr.import_fiftyone()
    recs = make_session_build(build, runs=2)
    pairs = session_pairs(recs)
    r = fr.build_dataset(build)
    ds = fo.load_dataset(r["name"])
    n_session, n_all = len(pairs), len(recs["pairs"])
    assert set(ds.group_slices) == {"pair", "input", "output", "session"}
    assert r["tiles"]["sessions"] == {"rendered": n_session, "cached": 0}
    # the session fields are sample fields, on every slice of a session pair
    schema = ds.get_field_schema()
    assert {"session_id", "session_run", "turn", "node_id", "parent_id", "session_tree"} <= \
        set(schema)
    view = ds.select_group_slices(_allow_mixed=True)
    samples: dict[tuple[str, str], object] = {(s["pair_id"], s.group.name): s
                                              for s in view.iter_samples()}
    assert len(samples) == 3 * n_all + n_session
    for pid, p in pairs.items():
        for slice_name in ("pair", "input", "output", "session"):
            s = samples[(pid, slice_name)]
            assert (s["session_id"], s["session_run"], s["turn"], s["node_id"],
                    s["parent_id"]) == (p["session_id"], p["session_run"], p["turn"],
                                        p["node_id"], p["parent_id"])
            assert s["session_tree"] == str(
                (build.root / S.tree_page(p["session_id"])).resolve())
    singles = [p for p in recs["pairs"] if not p.get("session_id")]
    for p in singles:
        assert (p["id"], "session") not in samples
        assert samples[(p["id"], "pair")]["session_id"] is None

    # the tile of a run's third turn shows source -> turn 1 -> turn 2 -> turn 3, pixel-true
    by_run = S.by_run(recs["pairs"])
    deepest = max(pairs.values(), key=lambda p: p["turn"])
    run = {q["node_id"]: q for q in by_run[deepest["session_run"]]}
    chain, q = [], deepest
    while q:
        chain.append(q)
        q = run.get(q["parent_id"])
    chain.reverse()
    assert [c["turn"] for c in chain] == [1, 2, 3]
    tile = samples[(deepest["id"], "session")]["filepath"]
    layer = text_layer(tile)
    assert layer["headers"] == ["source", "turn 1", "turn 2", "turn 3 (this pair)"]
    assert layer["pairs"] == [c["id"] for c in chain]
    assert layer["rows"][0]["notes"][1:] == [
        next(t["edit"] for t in recs["triples"] if t["id"] == c["triple_id"]) for c in chain]
    _cells_show(tile, layer, [build.root / chain[0]["images"]["session_source"],
                              *(build.root / c["images"]["output"] for c in chain)])
    # a tree: each child's tile starts at the source and ends at itself
    tree = [p for p in pairs.values() if p["session_id"] == recs["triples"][3]["session_id"]]
    for p in tree:
        assert text_layer(samples[(p["id"], "session")]["filepath"])["pairs"][-1] == p["id"]
        assert len(text_layer(samples[(p["id"], "session")]["filepath"])["pairs"]) == p["turn"]

    # the saved view "sessions": session pairs only, by run then turn
    sv = ds.load_saved_view("sessions")
    got = sv.values(["session_run", "turn"])
    assert list(zip(*got, strict=True)) == sorted(
        (p["session_run"], p["turn"]) for p in pairs.values())
    groups = {g.name: g.paths for g in ds.app_config.sidebar_groups}
    assert {"session_run", "turn", "session_tree"} <= set(groups["session"])

    # again: nothing new, every tile cached; a changed output image re-renders its chain's
    again = fr.build_dataset(build)
    assert (again["added_samples"], again["updated_samples"]) == (0, 0)
    assert again["tiles"]["sessions"] == {"rendered": 0, "cached": n_session}
    first_turn = chain[0]
    out = build.root / first_turn["images"]["output"]
    out.write_bytes((build.root / first_turn["images"]["session_source"]).read_bytes())
    third = fr.build_dataset(build)
    below = S.subtree(run.values(), first_turn["node_id"])
    assert third["tiles"]["sessions"]["rendered"] == len(below)
    assert len(list((build.cache_dir / "fiftyone-tiles" / "sessions").glob("*.png"))) == \
        n_session


def _cells_show(tile: str, layer: dict, images: list[Path]) -> None:
    """Each cell of the tile holds its image (nearest-neighbour scaling keeps pixels)."""
    import numpy as np
    from PIL import Image

    with Image.open(tile) as im:
        sheet = np.asarray(im.convert("RGB"))
    for box, path in zip(layer["rows"][0]["cells"], images, strict=True):
        x0, y0, x1, y1 = box
        with Image.open(path) as src:
            want = np.asarray(src.convert("RGB").resize((x1 - x0, y1 - y0),
                                                        Image.Resampling.NEAREST))
        assert np.array_equal(sheet[y0:y1, x0:x1], want), path


@pytest.mark.server
@needs_fiftyone
def test_fiftyone_single_edit_build_has_no_session_parts(mongod, build):  # noqa: F811
    from dsbuild.review import fiftyone as fr

    fo = fr.import_fiftyone()
    make_build(build, samples=2)
    ds = fo.load_dataset(fr.build_dataset(build)["name"])
    assert set(ds.group_slices) == {"pair", "input", "output"}
    assert "session_tree" not in ds.get_field_schema()
    assert "sessions" not in ds.list_saved_views()
    assert "session" not in {g.name for g in ds.app_config.sidebar_groups}
    assert not (build.cache_dir / "fiftyone-tiles" / "sessions").exists()


# ------------------------------------------------------------------ Label Studio
def verdicts(client, task_id: int, answers: dict[int, tuple], *, user: int | None = None):
    """What the session screen sends on Submit: per turn i, verdict_i (+ reason_i,
    corrected_edit_i)."""
    result = []
    for i, (verdict, *rest) in answers.items():
        result.append({"from_name": f"verdict_{i}", "to_name": f"edit_{i}", "type": "choices",
                       "value": {"choices": [verdict]}})
        reasons = rest[0] if rest else ()
        if reasons:
            result.append({"from_name": f"reason_{i}", "to_name": f"edit_{i}",
                           "type": "choices", "value": {"choices": list(reasons)}})
        if len(rest) > 1 and rest[1]:
            result.append({"from_name": f"corrected_edit_{i}", "to_name": f"edit_{i}",
                           "type": "textarea", "value": {"text": [rest[1]]}})
    kwargs = {"completed_by": user} if user else {}
    return client.annotations.create(task_id, result=result, **kwargs)


def session_tasks(client, project_id: int) -> dict[str, object]:
    return {t.data["session_run"]: t
            for t in client.tasks.list(project=project_id, fields="all", page_size=100)}


def fetch(url: str, path: str) -> bytes:
    r = httpx.get(url + path, headers={"Authorization": f"Token {TOKEN}"})
    assert r.status_code == 200, path
    return r.content


@pytest.mark.server
def test_label_studio_reviews_a_session_run_per_turn(ls_server, build, token):  # noqa: F811
    from test_labelstudio import run_cli

    # session 0 (a 3-turn chain), run 1: its third turn fails the filter, so its task has two
    recs = make_session_build(build, runs=2, fail={(0, 1, 2)})
    pairs = session_pairs(recs)
    runs = S.by_run(recs["pairs"])
    url, client = ls_server.url, ls_server.client()
    res = run_cli("review", "push", str(build.root), "--url", url, "--project", "sessions")
    assert res.exit_code == 0, res.output
    singles = [p["id"] for p in recs["pairs"] if not p.get("session_id")]
    assert f"{len(singles)} pairs selected, {len(singles)} imported" in res.output
    assert "4 session runs (11 turns), 4 imported, 0 updated, 0 already there" in res.output
    state = json.loads((build.root / "review" / "labelstudio.json").read_text())
    assert state["session_title"] == "sessions · sessions"
    pair_tasks = {t.data["pair_id"] for t in client.tasks.list(project=state["project_id"])}
    assert pair_tasks == set(singles)  # session pairs are reviewed only as session tasks

    tasks = session_tasks(client, state["session_project_id"])
    assert set(tasks) == set(runs)
    for run, t in tasks.items():
        kept = [p for p in runs[run] if p["id"] not in recs["failing"]]
        want = [p["id"] for p in S.ordered(kept)]
        assert t.data["pair_ids"] == want == [x["pair_id"] for x in t.data["turns"]]
        assert [x["turn"] for x in t.data["turns"]] == sorted(x["turn"] for x in kept)
        for x in t.data["turns"]:
            p = pairs[x["pair_id"]]
            triple = next(tr for tr in recs["triples"] if tr["id"] == p["triple_id"])
            assert (x["edit_prompt"], x["original_prompt"], x["parent_id"]) == \
                (triple["edit"], triple["input"], p["parent_id"])
            if p["parent_id"]:  # the parent is named in the heading
                parent = next(q for q in runs[run] if q["node_id"] == p["parent_id"])
                parent_edit = next(tr["edit"] for tr in recs["triples"]
                                   if tr["id"] == parent["triple_id"])
                assert f"\u201c{parent_edit}\u201d" in x["heading"]
            else:
                assert "source image" in x["heading"]
    # images: the browser gets the build's files; a turn's input is its parent's output
    chain_run = next(r for r in runs if len(tasks[r].data["turns"]) == 3)
    turns = tasks[chain_run].data["turns"]
    for x in turns:
        p = pairs[x["pair_id"]]
        assert fetch(url, x["edited_image"]) == (build.root / p["images"]["output"]).read_bytes()
    assert fetch(url, turns[1]["input_image"]) == fetch(url, turns[0]["edited_image"])
    assert fetch(url, tasks[chain_run].data["source_image"]) == \
        (build.root / pairs[turns[0]["pair_id"]]["images"]["session_source"]).read_bytes()
    cut_run = next(r for r in runs if recs["failing"][0] in {p["id"] for p in runs[r]})
    assert [x["turn"] for x in tasks[cut_run].data["turns"]] == [1, 2]

    # re-push: nothing new anywhere
    again = ls.push(build, url, title="sessions")
    assert (again["imported"], again["already_there"]) == (0, len(singles))
    assert {k: again["sessions"][k] for k in ("imported", "updated", "already_there")} == \
        {"imported": 0, "updated": 0, "already_there": 4}
    assert len(session_tasks(client, state["session_project_id"])) == 4

    # a verdict per turn: accept turn 1, reject the middle turn, accept turn 3 (moot now)
    verdicts(client, tasks[chain_run].id, {0: ("accept",),
                                           1: ("reject", ["artefacts"], "make the sofa teal"),
                                           2: ("accept",)})
    tree_run = next(r for r in runs if recs["triples"][3]["session_id"] ==
                    runs[r][0]["session_id"])
    verdicts(client, tasks[tree_run].id, {0: ("reject", ["edit_not_applied"])})
    res = run_cli("review", "pull", str(build.root))
    assert res.exit_code == 0, res.output
    decisions = {d["pair_id"]: d for d in read_decisions(build)}
    assert len(decisions) == 4
    for i, verdict in enumerate(("accept", "reject", "accept")):
        d = decisions[turns[i]["pair_id"]]
        assert (d["verdict"], d["tool"], d["turn"], d["session_run"], d["project_id"]) == \
            (verdict, "labelstudio", turns[i]["turn"], chain_run, state["session_project_id"])
    middle = decisions[turns[1]["pair_id"]]
    assert (middle["reason"], middle["corrected_edit"]) == ("artefacts", "make the sofa teal")
    tree_first = tasks[tree_run].data["turns"][0]["pair_id"]
    assert decisions[tree_first]["verdict"] == "reject"
    assert ls.pull(build)["added"] == 0  # pulling twice adds nothing
    st = ls.status(build)
    assert (st["tasks"], st["done"], st["accept"], st["reject"]) == \
        (len(singles) + 11, 4, 2, 2)

    # what survives: the rejected middle turn drops its subtree, the first turn stays; in the
    # tree the rejected turn 1 drops its child, its sibling stays
    rows, _ = join.rows(build, policy="all")
    alive = S.cut(rows, lambda r: bool(r["filter_keep"]) and r["review"] != "reject",
                  "prefix", key="pair_id")
    assert turns[0]["pair_id"] in alive
    assert not {turns[1]["pair_id"], turns[2]["pair_id"]} & alive
    tree_turns = tasks[tree_run].data["turns"]
    below = S.subtree(runs[tree_run], pairs[tree_first]["node_id"])
    for x in tree_turns:
        assert (x["pair_id"] in alive) == (pairs[x["pair_id"]]["node_id"] not in below)
    _export_drops_the_subtree(build, alive, {p["id"] for p in recs["pairs"]})

    # an annotation deleted: the run's decisions are withdrawn, once
    (ann,) = client.tasks.get(str(tasks[tree_run].id)).annotations
    client.annotations.delete(ann["id"] if isinstance(ann, dict) else ann.id)
    res = ls.pull(build)
    assert (res["added"], res["withdrawn"]) == (1, 1)
    assert tree_first not in latest_by_pair(build)

    # every turn of a run with --policy all: the unreviewed run gets its third turn (updated),
    # the reviewed runs keep theirs
    full = ls.push(build, policy="all")
    assert {k: full["sessions"][k] for k in ("imported", "updated", "stale")} == \
        {"imported": 0, "updated": 1, "stale": 0}
    tasks = session_tasks(client, state["session_project_id"])
    assert len(tasks) == 4 and all(len(t.data["turns"]) == len(runs[r])
                                   for r, t in tasks.items())

    # --sessions pair: session pairs as per-pair tasks, no session project
    other = ls.push(build, title="as pairs", sessions="pair")
    assert "sessions" not in other
    left = {turns[1]["pair_id"], turns[2]["pair_id"]}  # rejected, cut: out of the review queue
    assert other["selected"] == len(recs["pairs"]) - len(recs["failing"]) - len(left)

    # the reviewed chain's third turn now fails the filter: that task stays as reviewed
    # (stale), the unreviewed run's task loses its third turn again (updated)
    failing = {*recs["failing"], turns[2]["pair_id"]}
    write_scores(build, recs["pairs"], [FAILING_DIR if p["id"] in failing else 0.3
                                        for p in recs["pairs"]], force=True)
    res = ls.push(build, title="sessions")
    assert {k: res["sessions"][k] for k in ("imported", "updated", "stale")} == \
        {"imported": 0, "updated": 1, "stale": 1}
    assert len(session_tasks(client, state["session_project_id"])[chain_run].data["turns"]) == 3

    # --sessions both: session pairs as per-pair tasks and as session tasks
    both = ls.push(build, title="both ways", sessions="both")
    assert both["selected"] == len(recs["pairs"]) - len(failing | left)
    assert (both["sessions"]["title"], both["sessions"]["imported"]) == \
        ("both ways · sessions", 4)


def _export_drops_the_subtree(build, alive: set[str], pair_ids: set[str]) -> None:
    """The real export, where it reads the session cut: exactly the surviving pairs."""
    if not hasattr(build.config.export, "session_cut"):
        return
    from dsbuild.export.dataset import collect_rows

    exported = {r["pair_id"] for split in collect_rows(build).splits.values() for r in split}
    assert exported & pair_ids == alive


# Tick the n-th visible choice labelled ``text``: true once it is checked, else click it.
NTH_LABEL = ("(() => {{ const l = [...document.querySelectorAll('label')].filter(x =>"
             " x.offsetParent !== null && x.textContent.trim().startsWith({text!r}))[{n}];"
             " const i = l && l.querySelector('input'); if (!i) return false;"
             " if (i.checked) return true; l.click(); return false; }})()")


@pytest.mark.server
def test_the_session_screen_renders_every_turn_and_submits_per_turn(
        ls_server, build, token, tmp_path):  # noqa: F811
    """session_review.xml in a real browser: one block per turn (both images, the
    instruction); what its Submit sends is what pull reads as per-turn decisions."""
    import base64
    import time

    from test_labelstudio import ADMIN, CHROMIUM, Chromium, login_cookies

    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    recs = make_session_build(build, runs=1, sessions=SESSIONS[:1], singles=[])
    res = ls.push(build, ls_server.url, title="session browser")
    client = ls_server.client()
    (run, task), = session_tasks(client, res["sessions"]["project_id"]).items()
    turns = task.data["turns"]
    assert len(turns) == 3
    cookies = login_cookies(ls_server.url, ADMIN, "admin-pass-123")
    browser = Chromium(tmp_path / "profile", size=(1400, 2400))
    try:
        browser.open(f"{ls_server.url}/projects/{res['sessions']['project_id']}/data"
                     f"?task={task.id}", cookies, ls_server.url)
        # every turn's two images loaded (Label Studio hands them to <img> as blob: URLs)
        browser.wait_for("[...document.images].filter(i => i.complete && i.naturalWidth > 0)"
                         ".length >= 6")
        for x in turns:
            assert browser.js(f"document.body.innerText.includes({json.dumps(x['edit_prompt'])})")
            assert browser.js(f"document.body.innerText.includes({json.dumps(x['heading'])})")
        browser.wait_for(NTH_LABEL.format(text="accept", n=0), timeout=20)
        browser.wait_for(NTH_LABEL.format(text="reject", n=1), timeout=20)
        browser.wait_for(NTH_LABEL.format(text="artefacts", n=0), timeout=10)  # turn 2's
        shot = browser.send("Page.captureScreenshot", format="png")["data"]
        (tmp_path / "session.png").write_bytes(base64.b64decode(shot))
        assert browser.js("(() => { const b = [...document.querySelectorAll('button')]"
                          ".find(x => x.textContent.trim() === 'Submit');"
                          " if (b) b.click(); return !!b; })()")
        deadline = time.time() + 30
        while not client.tasks.get(str(task.id)).annotations:
            if time.time() > deadline:
                raise AssertionError("the annotation never reached the server")
            time.sleep(0.5)
    finally:
        browser.close()
    assert ls.pull(build)["added"] == 2
    got = {d["pair_id"]: d for d in read_decisions(build)}
    assert (got[turns[0]["pair_id"]]["verdict"], got[turns[1]["pair_id"]]["verdict"]) == \
        ("accept", "reject")
    assert got[turns[1]["pair_id"]]["reasons"] == {"artefacts": 1}
    assert turns[2]["pair_id"] not in got  # no verdict given: pending
    assert len(recs["pairs"]) == 3
