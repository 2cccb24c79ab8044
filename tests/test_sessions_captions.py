"""Sessions in the captions stage (issue 28, item 1): template and openai sessions, each turn
validated against the caption it edits, ids and parents, counts, resume, share=0 unchanged."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from openai_server import OpenAIServer, chat

from dsbuild.captions.prompt import NOT_JSON
from dsbuild.captions.sessions import check_session
from dsbuild.captions.settings import SessionSettings
from dsbuild.captions.stage import run_captions
from dsbuild.captions.validate import Validator
from dsbuild.core import sessions as S
from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.core.errors import ConfigError

SESSION_SETS = ["captions.backend=template", "captions.sessions.share=0.5",
                "captions.sessions.turns=4", "captions.sessions.min_turns=2",
                "captions.sessions.branches=3", "captions.sessions.branch_share=0.5"]


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def new_build(root: Path, recipe: Path, sets=()) -> Build:
    return Build.init(root, load_recipe(recipe), recipe_path=str(recipe), overrides=list(sets))


def by_session(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if S.is_session(r):
            out[r["session_id"]].append(r)
    return dict(out)


def check_tree(nodes: list[dict], recipe: str, turns: int, min_turns: int,
               branches: int) -> None:
    """One session's nodes as dsbuild.core.sessions says: ids, parents, turns, inputs."""
    ids = {n["node_id"]: n for n in nodes}
    assert len(ids) == len(nodes)
    roots = {n["input"] for n in nodes if n["parent_id"] is None}
    assert len(roots) == 1  # every turn-1 node edits the one root caption
    (root,) = roots
    sid = nodes[0]["session_id"]
    for n in nodes:
        assert n["id"] == n["node_id"] == S.node_id(
            recipe, n["agent"], n["input"], n["edit"], n["output"], sid, n["parent_id"])
        if n["parent_id"] is None:
            assert n["turn"] == 1 and n["input"] == root
        else:
            up = ids[n["parent_id"]]  # the parent is a node of the same session
            assert n["turn"] == up["turn"] + 1
            assert n["input"] == up["output"]  # a turn edits its parent's output
    kids = S.children(nodes)
    assert set(kids) <= {None, *ids}
    assert all(len(k) <= branches for k in kids.values())
    assert min_turns <= max(n["turn"] for n in nodes) <= turns
    assert S.ordered(nodes) == sorted(nodes, key=lambda n: (n["turn"], n["node_id"]))


def test_template_sessions_share_turns_branches_and_rules_per_turn(tmp_path, mini_recipe):
    b = new_build(tmp_path / "b", mini_recipe, SESSION_SETS)
    run_captions(b, show_progress=False)
    recs = list(b.records("captions"))
    recipe = load_recipe(mini_recipe)
    assert len(recs) == 24  # the targets hold: 12 per agent, sessions and single edits
    per_agent = Counter((r["agent"], S.is_session(r)) for r in recs)
    for agent in ("chairs", "living-room"):
        # about half of each agent's 12 are session turns (the last session may run over)
        assert 6 <= per_agent[(agent, True)] <= 6 + 3
        assert per_agent[(agent, True)] + per_agent[(agent, False)] == 12
    sessions = by_session(recs)
    for nodes in sessions.values():
        check_tree(nodes, "mini", turns=4, min_turns=2, branches=3)
        assert len({n["agent"] for n in nodes}) == 1
    counts = S.tree_counts(recs)
    assert counts["branches"] >= 1  # branch_share 0.5: some sessions are trees
    # every turn passes the validator against the caption it applies to (add/remove rules)
    fresh = Validator()
    agents = {a.name: a for a in recipe.agents}
    for r in recs:
        agent = agents[r["agent"]]
        res = fresh.check({k: r[k] for k in ("input", "edit", "output", "operation")}, agent)
        assert res.ok, (r, res.reason)
        assert res.operation == r["operation"]
    singles = [r for r in recs if not S.is_session(r)]
    assert all(not any(k in r for k in S.SESSION_FIELDS) for r in singles)
    rep = json.loads((b.reports_dir / "captions.json").read_text())
    ss = rep["sessions"]
    assert (ss["sessions"], ss["turns"], ss["branches"]) == (
        counts["sessions"], counts["turns"], counts["branches"])
    assert ss["by_length"] == {str(k): v for k, v in sorted(Counter(
        max(n["turn"] for n in nodes) for nodes in sessions.values()).items())}
    assert sum(rep["agents"][a]["sessions"]["turns"] for a in rep["agents"]) == ss["turns"]
    assert rep["kept"] == 24

    # chains only: no node has two children
    c = new_build(tmp_path / "c", mini_recipe, [*SESSION_SETS, "captions.sessions.branches=1",
                                                "captions.sessions.turns=3"])
    run_captions(c, show_progress=False)
    chains = by_session(list(c.records("captions")))
    assert chains and S.tree_counts(list(c.records("captions")))["branches"] == 0
    for nodes in chains.values():
        check_tree(nodes, "mini", turns=3, min_turns=2, branches=1)


def test_share_zero_leaves_triples_and_signature_unchanged(tmp_path, mini_recipe):
    plain = new_build(tmp_path / "plain", mini_recipe, ["captions.backend=template"])
    zero = new_build(tmp_path / "zero", mini_recipe, ["captions.backend=template",
                                                     "captions.sessions.share=0"])
    for b in (plain, zero):
        run_captions(b, show_progress=False)
    assert "sessions" not in plain.config.captions.signature_dict()
    assert plain.signature("captions") == zero.signature("captions")
    a, z = list(plain.records("captions")), list(zero.records("captions"))
    assert a == z and not any(S.is_session(r) for r in a)
    rep = json.loads((plain.reports_dir / "captions.json").read_text())
    assert "sessions" not in rep and all("sessions" not in v for v in rep["agents"].values())
    # sessions on: the single edits come after the sessions, the template's own stream
    on = new_build(tmp_path / "on", mini_recipe, SESSION_SETS)
    assert on.signature("captions") != plain.signature("captions")


def test_min_turns_above_turns_is_a_clear_error():
    with pytest.raises(ValueError, match="min_turns=4 is more than captions.sessions.turns=3"):
        SessionSettings(turns=3, min_turns=4)


def test_config_error_names_the_setting(tmp_path, mini_recipe):
    with pytest.raises(ConfigError, match="min_turns"):
        new_build(tmp_path / "b", mini_recipe, ["captions.sessions.min_turns=5"])


ROOT = "a modern living room with a grey sofa and no rug"


def test_a_turn_that_breaks_a_rule_is_counted_and_cuts_its_subtree(mini_recipe):
    agent = next(a for a in load_recipe(mini_recipe).agents if a.name == "living-room")
    settings = SessionSettings(share=0.5, turns=3, min_turns=2, branches=2)

    def check(cand, index=0):
        return check_session(cand, agent, Validator(), settings, "mini", index)

    good = {"input": ROOT, "turns": [
        {"edit": "add a rug", "output": "a modern living room with a grey sofa and a rug",
         "parent": None},
        {"edit": "make the sofa green",
         "output": "a modern living room with a green sofa and a rug", "parent": 0},
        {"edit": "remove the rug", "output": "a modern living room with a green sofa",
         "parent": 1},
        {"edit": "take away the sofa", "output": "a modern living room with a rug",
         "parent": 0}]}
    res = check(good)
    assert res.ok and res.rejected == [] and res.cut == 0 and res.depth == 3
    assert [n["turn"] for n in res.nodes] == [1, 2, 3, 2]
    assert res.nodes[1]["parent_id"] == res.nodes[3]["parent_id"] == res.nodes[0]["node_id"]
    assert res.session_id == S.session_id("mini", "living-room", ROOT, 0)
    assert check(good, 1).session_id != res.session_id  # the agent's next session

    # turn 1 adds a rug the root does not say is absent; turn 2 is cut under it; the branch
    # from the root that is valid survives but is one turn deep: the session is dropped
    bad = {"input": "a modern living room with a grey sofa and a rug", "turns": [
        {"edit": "add a rug", "output": "a modern living room with a grey sofa and two rugs",
         "parent": None},
        {"edit": "make the sofa green",
         "output": "a modern living room with a green sofa and two rugs", "parent": 0},
        {"edit": "remove the rug", "output": "a modern living room with a grey sofa",
         "parent": None}]}
    res = check(bad)
    assert [r for r, _ in res.rejected] == ["add_not_absent_in_input"]
    assert res.cut == 1 and res.dropped and not res.ok and len(res.nodes) == 1

    # a remove whose input (the parent's output) no longer names the thing
    gone = {"input": ROOT, "turns": [
        {"edit": "add a rug", "output": "a modern living room with a grey sofa and a rug",
         "parent": None},
        {"edit": "remove the rug", "output": "a modern living room with a grey sofa",
         "parent": 0},
        {"edit": "remove the rug", "output": "a modern living room with a grey sofa and no rug",
         "parent": 1}]}
    res = check(gone)
    assert [r for r, _ in res.rejected] == ["remove_not_in_input"] and res.ok
    assert res.depth == 2

    # structure: parents, inputs, depth and branching limits
    odd = {"input": ROOT, "turns": [
        {"edit": "add a rug", "output": "a modern living room with a grey sofa and a rug",
         "parent": None},
        {"edit": "make the sofa green", "input": "a modern living room with a sofa",
         "output": "a modern living room with a green sofa and a rug", "parent": 0},
        {"edit": "make the sofa white",
         "output": "a modern living room with a white sofa and a rug", "parent": 5},
        {"edit": "make the sofa white",
         "output": "a modern living room with a white sofa and a rug", "parent": True},
        {"edit": "make the sofa white",
         "output": "a modern living room with a white sofa and a rug", "parent": 0},
        {"edit": "remove the rug", "output": "a modern living room with a white sofa",
         "parent": 4},
        {"edit": "make the sofa green", "output": "a modern living room with a green sofa",
         "parent": 5},
        {"edit": "make the sofa black",
         "output": "a modern living room with a black sofa and a rug", "parent": 0},
        {"edit": "make the sofa green",
         "output": "a modern living room with a green sofa and a rug", "parent": 0},
        {"edit": "make the sofa white",
         "output": "a modern living room with a white sofa and no rug", "parent": None},
        {"edit": "make the sofa black",
         "output": "a modern living room with a black sofa and no rug", "parent": None},
        "not a turn"]}
    res = check(odd)
    assert Counter(r for r, _ in res.rejected) == {
        "session_input_mismatch": 1, "session_bad_parent": 2, "session_too_deep": 1,
        "session_too_many_branches": 2, "not_object": 1}
    assert [n["turn"] for n in res.nodes] == [1, 2, 3, 2, 1] and res.ok

    for line, reason in ((NOT_JSON, "not_json"), (42, "not_object"),
                         ({"turns": good["turns"]}, "missing_field"),
                         ({"input": ROOT, "turns": []}, "session_no_turns"),
                         ({"input": ROOT, "edit": "add a rug", "output": "x"},
                          "session_no_turns")):
        assert check(line).reason == reason


# ------------------------------------------------------------------------------ openai

COLOURS = ["red", "blue", "green", "grey", "white", "black", "yellow", "pink", "teal", "tan"]
STYLES = ["rustic", "coastal", "industrial", "boho"]  # no copy of the recipe's examples


def session_line(agent: str, u: int) -> dict:
    """The u-th valid session of an agent: two turns, and a branch from the root when u is
    odd."""
    c1, c2, style = COLOURS[u % 10], COLOURS[(u + 3) % 10], STYLES[(u // 10) % 4]
    if agent == "chairs":
        root = f"a {style} {c1} oak armchair without a cushion"
        turns = [("add a cushion", f"a {style} {c1} oak armchair with a cushion", None),
                 (f"make the armchair {c2}", f"a {style} {c2} oak armchair with a cushion", 0),
                 ("replace the armchair with a dining chair",
                  f"a {style} {c1} oak dining chair without a cushion", None)]
    else:
        root = f"a {style} living room with a {c1} sofa and no rug"
        turns = [("add a rug", f"a {style} living room with a {c1} sofa and a rug", None),
                 (f"make the sofa {c2}", f"a {style} living room with a {c2} sofa and a rug", 0),
                 ("remove the sofa", f"a {style} living room with no rug", None)]
    return {"input": root, "turns": [{"edit": e, "output": o, "parent": p}
                                     for e, o, p in turns[:3 if u % 2 else 2]]}


def single_line(agent: str, u: int) -> dict:
    c1, c2, style = COLOURS[u % 10], COLOURS[(u + 3) % 10], STYLES[(u // 10) % 4]
    if agent == "chairs":
        return {"input": f"a {style} {c1} pine stool", "edit": f"make the stool {c2}",
                "output": f"a {style} {c2} pine stool"}
    return {"input": f"a {style} living room with a {c1} linen sofa and no coffee table",
            "edit": "add a coffee table",
            "output": f"a {style} living room with a {c1} linen sofa and a coffee table"}


def served(body: dict, n: int):
    """Session requests: per reply, two good sessions among a malformed one (its first turn
    has no output: rejected, and the turn under it cut), a line that is not JSON, a single
    triple (no turns), and a session whose second turn breaks the addition rule (its input
    has the thing already); single edits for single-edit requests."""
    user = body["messages"][-1]["content"]
    agent = "chairs" if "chairs of every kind" in user else "living-room"
    if "Session batch" in user:
        assert '"parent"' in user
        batch = int(user.split("Session batch ")[1].split(".")[0])
        s0, s1 = session_line(agent, 2 * batch), session_line(agent, 2 * batch + 1)
        broken = session_line(agent, 40 + batch)
        broken["turns"][0] = {"edit": broken["turns"][0]["edit"], "parent": None}
        rule = session_line(agent, 60 + 2 * batch)
        first = rule["turns"][0]
        thing = "cushion" if agent == "chairs" else "rug"
        rule["turns"][1] = {"edit": f"add a {thing}", "parent": 0,
                            "output": first["output"].replace(f"a {thing}", f"two {thing}s")}
        lines = [json.dumps(s0), json.dumps(broken), "here are the sessions:",
                 json.dumps(single_line(agent, batch)), json.dumps(s1), json.dumps(rule)]
        return chat("\n".join(lines))
    batch = int(user.split("Batch ")[1].split(".")[0])
    return chat("\n".join(json.dumps(single_line(agent, 10 + 10 * batch + u)) for u in range(5)))


def openai_build(root: Path, recipe: Path, base_url: str, *sets: str) -> Build:
    opts = {"backend": "openai", "base_url": base_url, "model": "test-model",
            "per_request": 10, "concurrency": 2, "timeout": 5, "retry_backoff": 0.01,
            "max_retries": 1, "api_key_env": "DSBUILD_TEST_KEY"}
    return new_build(root, recipe, [*(f"captions.{k}={v}" for k, v in opts.items()), *sets])


@pytest.mark.server
def test_openai_sessions_with_malformed_turns_and_lines(tmp_path, mini_recipe):
    sets = ["captions.sessions.share=0.5", "captions.sessions.turns=3",
            "captions.sessions.branches=2", "captions.sessions.branch_share=0.5"]
    with OpenAIServer(handler=served) as srv:
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url, *sets)
        run_captions(b, show_progress=False)
        recs = list(b.records("captions"))
        rep = json.loads((b.reports_dir / "captions.json").read_text())
        asked = [r["body"]["messages"][-1]["content"] for r in srv.chat_requests]
    sessions = by_session(recs)
    for nodes in sessions.values():
        check_tree(nodes, "mini", turns=3, min_turns=2, branches=2)
        assert nodes[0]["source"] == {"backend": "openai", "model": "test-model"}
    assert rep["kept"] == 24 and rep["short"] == {}
    ss = rep["sessions"]
    assert sum(1 for a in asked if "Session batch" in a) == ss["requests"] == 4
    for agent in ("chairs", "living-room"):
        mine = [r for r in recs if r["agent"] == agent]
        got = rep["agents"][agent]["sessions"]
        nodes = [r for r in mine if S.is_session(r)]
        assert len(mine) == 12 and got["turns"] == len(nodes) == 7  # 2 + 3, then 2 (full)
        assert got["sessions"] == len({r["session_id"] for r in nodes}) == 3
        assert got["by_length"] == {"2": 3} and got["branches"] == 1
        asks = got["requests"]
        assert asks == 2  # 5 session turns per reply: two replies for a target of 6
        # per reply: one not-JSON line, one single triple (no turns), a turn with no output
        # (the turn under it cut, the session dropped), an addition-rule break (dropped short)
        assert got["rejected"] == {"not_json": asks, "session_no_turns": asks,
                                   "missing_field": asks, "add_not_absent_in_input": asks}
        assert got["cut"] == asks and got["dropped"] == 2 * asks and got["surplus"] == 1
        assert rep["agents"][agent]["rejected"] == got["rejected"]
    assert ss["rejected"] == {k: 4 for k in ("add_not_absent_in_input", "missing_field",
                                             "not_json", "session_no_turns")}
    assert rep["reasons"]["session_no_turns"].startswith("session:")


def test_template_resume_after_a_kill_mid_session_gives_the_same_shard(tmp_path, mini_recipe):
    """Kill a real `dsbuild captions` process after it wrote part of a session: the re-run
    writes the same records in the same order as a clean run, with the same counts."""
    ref = new_build(tmp_path / "ref", mini_recipe, SESSION_SETS)
    run_captions(ref, show_progress=False)
    want = list(ref.records("captions"))
    ref_report = json.loads((ref.reports_dir / "captions.json").read_text())
    # stop after the first record that has a later node of its session right after it
    stop = next(k + 1 for k in range(len(want) - 1) if S.is_session(want[k])
                and want[k + 1].get("session_id") == want[k]["session_id"] and k > 3)

    b = new_build(tmp_path / "b", mini_recipe, SESSION_SETS)
    cmd = [sys.executable, "-m", "dsbuild", "captions", str(b.root)]
    env = dict(os.environ, DSBUILD_NO_PROGRESS="1")
    paused = tmp_path / "paused.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, env=dict(env, DSBUILD_PAUSE_AT=f"triples/r00000.jsonl:{stop}:"
                                          f"{paused}"), cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not paused.exists():
        time.sleep(0.02)
    assert paused.exists(), proc.stdout.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = b.root / "triples" / "r00000.jsonl.partial"
    assert partial.read_text().count("\n") == stop and not b.is_complete("captions")

    out = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sessions:" in out.stdout
    got = [json.loads(line) for line in (b.root / "triples" / "r00000.jsonl").read_text()
           .splitlines()]
    assert got == want  # same ids, same order
    report = json.loads((b.reports_dir / "captions.json").read_text())
    assert report["agents"] == ref_report["agents"]
    assert report["sessions"] == ref_report["sessions"]
    assert report["rejected"] == ref_report["rejected"]


@pytest.mark.server
def test_openai_resume_from_a_partial_shard_replays_sessions(tmp_path, mini_recipe):
    """A partial shard that ends inside a session (as a kill leaves it) resumes from the
    cached replies to the same shard and counts."""
    sets = ["captions.sessions.share=0.5", "captions.sessions.branches=2",
            "captions.sessions.branch_share=0.5"]
    with OpenAIServer(handler=served) as srv:
        ref = openai_build(tmp_path / "ref", mini_recipe, srv.base_url, *sets)
        run_captions(ref, show_progress=False)
        want = list(ref.records("captions"))
        ref_report = json.loads((ref.reports_dir / "captions.json").read_text())
        stop = next(k + 1 for k in range(len(want) - 1) if S.is_session(want[k])
                    and want[k + 1].get("session_id") == want[k]["session_id"])
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url, *sets)
        shutil.copytree(ref.cache_dir / "captions", b.cache_dir / "captions")
        partial = b.root / "triples" / "r00000.jsonl.partial"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text("".join(json.dumps(r) + "\n" for r in want[:stop]))
        sent = len(srv.chat_requests)
        run_captions(b, show_progress=False)
        assert len(srv.chat_requests) == sent  # everything from the cache
    assert list(b.records("captions")) == want
    report = json.loads((b.reports_dir / "captions.json").read_text())
    assert report["agents"] == ref_report["agents"]
    assert report["sessions"] == ref_report["sessions"]


def test_template_sessions_from_photos_start_at_the_photo_caption(tmp_path, mini_recipe):
    """In a build with photos a session's root is the photo's caption: its nodes carry the
    photo, its turn-1 edits pass the grounding check on the photo (counted), later turns the
    validator against their parent's output; each photo still gives per_photo triples."""
    from test_grounded import TINY, photo_records

    b = new_build(tmp_path / "b", mini_recipe)
    photos = photo_records(b)
    sets = [*TINY, "captions.photos.present_min=0", "captions.photos.absent_max=1",
            "captions.photos.per_photo=4", "captions.sessions.share=0.5",
            "captions.sessions.turns=3", "captions.sessions.branches=2",
            "captions.sessions.branch_share=0.5"]
    run_captions(b, overrides=sets, photos=photos, show_progress=False)
    recs = list(b.records("captions"))
    assert Counter(r["photo_id"] for r in recs) == {pid: 4 for pid in photos}
    sessions = by_session(recs)
    assert len(sessions) >= len(photos)
    for nodes in sessions.values():
        check_tree(nodes, "mini", turns=3, min_turns=2, branches=2)
        photo = photos[nodes[0]["photo_id"]]
        assert all(n["photo_id"] == photo["id"] for n in nodes)
        assert all(n["input"] == photo["caption"] for n in nodes if n["turn"] == 1)
        assert all(n["attribution"] == photo["attribution"] for n in nodes)
    rep = json.loads((b.reports_dir / "captions.json").read_text())
    turn1 = sum(1 for r in recs if r.get("turn", 1) == 1)
    assert rep["grounded"]["grounded"] >= turn1  # every single edit and turn 1 was checked
    assert rep["sessions"]["turns"] == sum(map(len, sessions.values()))


def photo_served(body: dict, n: int):
    """Edits of the photo caption the request gives: a session (add a thing it does not name,
    then remove it again), a session that starts from another caption, single edits."""
    user = body["messages"][-1]["content"]
    caption = json.loads(user.split("Input caption (of a real photo): ")[1].splitlines()[0])
    terms = ["armrests"] if "armchair" in caption else ["sofa", "rug", "coffee table",
                                                         "floor lamp"]
    absent = [t for t in terms if t not in caption]
    if "Session batch" in user:
        t = absent[0]
        np = t if t.endswith("s") else f"a {t}"
        out1 = f"{caption} and {np}"
        session = {"input": caption, "turns": [
            {"edit": f"add {np}", "output": out1, "parent": None},
            {"edit": f"remove the {t}", "output": f"{caption} and no {t}", "parent": 0}]}
        elsewhere = dict(session, input="a rustic living room with a sofa")
        return chat("\n".join(map(json.dumps, (session, elsewhere))))
    lines = [{"input": caption, "edit": f"add {t if t.endswith('s') else 'a ' + t}",
              "output": f"{caption} and {t if t.endswith('s') else 'a ' + t}"}
             for t in absent[1:]]
    lines += [{"input": caption, "edit": f"remove the {t}",
               "output": caption.replace(f"a {t}", f"no {t}")}
              for t in terms if f"a {t}" in caption]
    return chat("\n".join(map(json.dumps, lines)))


@pytest.mark.server
def test_openai_sessions_from_photos_keep_the_photo_caption(tmp_path, mini_recipe):
    from test_grounded import TINY, photo_records

    sets = [*TINY, "captions.photos.present_min=0", "captions.photos.absent_max=1",
            "captions.photos.per_photo=4", "captions.sessions.share=0.5"]
    with OpenAIServer(handler=photo_served) as srv:
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url, *sets)
        photos = photo_records(b)
        run_captions(b, overrides=["captions.backend=openai"], photos=photos,
                     show_progress=False)
        asked = [r["body"]["messages"][-1]["content"] for r in srv.chat_requests]
    recs = list(b.records("captions"))
    sessions = by_session(recs)
    assert len(sessions) == len(photos)  # one two-turn session per photo
    for nodes in sessions.values():
        check_tree(nodes, "mini", turns=3, min_turns=2, branches=1)
        photo = photos[nodes[0]["photo_id"]]
        assert [n["turn"] for n in nodes] == [1, 2] and nodes[0]["input"] == photo["caption"]
        assert {n["photo_id"] for n in nodes} == {photo["id"]}
    rep = json.loads((b.reports_dir / "captions.json").read_text())
    assert rep["sessions"]["rejected"] == {"photo_input_changed": len(photos)}
    assert rep["sessions"]["requests"] == len(photos)
    assert sum("Session batch" in a and "Every session's" in a for a in asked) == len(photos)
