"""Sessions downstream (issue 28): filter ranks a session's runs, what survives (prefix / whole),
the MagicBrush-style export with its session columns and source image, splits that keep a
session on one side, the filter/verify reports and the card's session counts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from builders import make_session_build, write_scores
from PIL import Image

from dsbuild.augment.stage import run_augment
from dsbuild.core import sessions
from dsbuild.core.decisions import add_decisions, make_decision
from dsbuild.core.split import group_rows, row_nodes
from dsbuild.export.dataset import collect_rows
from dsbuild.export.writer import export_build
from dsbuild.filter.report import write_report as filter_report
from dsbuild.verify.report import write_report as verify_report

datasets = pytest.importorskip("datasets")

SESSION_COLS = ("session_id", "session_run", "turn", "node_id", "parent_id")


def pair_of(made: dict, session: int, run: int, node: int) -> dict:
    """The pair ``make_session_build`` wrote for (session index, run, node index)."""
    sids = list(dict.fromkeys(t["session_id"] for t in made["triples"] if t.get("session_id")))
    nodes = [t["id"] for t in made["triples"] if t.get("session_id") == sids[session]]
    runs = list(dict.fromkeys(p["session_run"] for p in made["pairs"]
                              if p.get("session_id") == sids[session]))
    return next(p for p in made["pairs"] if p.get("session_run") == runs[run]
                and p["node_id"] == nodes[node])


def exported(build) -> dict[str, dict]:
    """pair id -> row of every edit row collect_rows exports."""
    return {r["pair_id"]: r for rows in collect_rows(build).splits.values() for r in rows
            if not r["no_change"]}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_export_loads_with_session_columns_and_source_image(mini_build, tmp_path):
    mini_build.update(["augment.ratio=1.0", "export.grid_pairs=0"])
    made = make_session_build(mini_build, runs=2)
    run_augment(mini_build)
    res = export_build(mini_build)
    ds = datasets.load_dataset(str(res.path), cache_dir=str(tmp_path / "hf-cache"))
    f = ds["train"].features
    assert isinstance(f["source_image"], datasets.Image)
    assert f["turn"] == datasets.Value("int64")
    for col in ("session_id", "session_run", "node_id", "parent_id"):
        assert f[col] == datasets.Value("string"), col
    rows = [r for k in ds for r in ds[k]]
    turns = [r for r in rows if r["session_id"] and not r["no_change"]]
    assert len(turns) == 2 * 3 * 2  # 2 sessions of 3 nodes, 2 runs each: every turn passes
    by_node_run = {(r["session_run"], r["node_id"]): r for r in turns}
    pairs = {p["id"]: p for p in made["pairs"]}
    for r in turns:
        p = pairs[r["pair_id"]]
        assert [r[c] for c in SESSION_COLS] == [p[c] for c in SESSION_COLS]
        root = Image.open(mini_build.root / p["images"]["session_source"])
        assert (pixels(r["source_image"]) == pixels(root)).all()
        # MagicBrush-style: the input is the parent turn's edited image (the root at turn 1)
        parent = by_node_run.get((r["session_run"], r["parent_id"]))
        want = root if r["turn"] == 1 else parent["edited_image"]
        assert (pixels(r["input_image"]) == pixels(want)).all()
        assert (r["parent_id"] is None) == (r["turn"] == 1)
    singles = [r for r in rows if not r["session_id"] and not r["no_change"]]
    assert len(singles) == 2 * 2 and all(r["source_image"] is None for r in singles)
    # a no-change sample made from a session turn is a single edit, not a turn
    no_change = [r for r in rows if r["no_change"]]
    from_turns = [r for r in no_change if pairs[r["source_pair_id"]].get("session_id")]
    assert from_turns
    for r in no_change:
        assert all(r[c] is None for c in SESSION_COLS) and r["source_image"] is None


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_splits_never_cut_a_session(mini_build, seed):
    mini_build.update(["split.test_ratio=0.5", f"split.seed={seed}"])
    make_session_build(mini_build, runs=3)
    splits = collect_rows(mini_build).splits
    side: dict[str, set[str]] = {}
    captions: dict[str, set[str]] = {k: set() for k in splits}
    for k, rows in splits.items():
        for r in rows:
            captions[k] |= {r["original_prompt"].lower(), r["edited_prompt"].lower()}
            if r["session_id"]:
                side.setdefault(r["session_id"], set()).add(k)
    assert len(side) == 2 and all(len(v) == 1 for v in side.values())
    assert not captions["train"] & captions["test"]  # the root caption too


def test_split_groups_a_session_by_its_id():
    # two turns that share no triple and no caption (e.g. corrected) still share a side
    rows = {"a": row_nodes("t1", ["one room"], session="s"),
            "b": row_nodes("t2", ["another room"], session="s"),
            "c": row_nodes("t3", ["a third room"])}
    groups = sorted(sorted(g) for g in group_rows(rows).values())
    assert groups == [["a", "b"], ["c"]]
    assert row_nodes("t1", ["x"]) == ["t:t1", "c:x"]  # single edits: as before


def test_failing_middle_turn_prefix_drops_its_subtree_whole_drops_the_run(mini_build):
    # session 0 is a 3-turn chain: run 0's turn 2 fails the filter; session 1 is a tree: run
    # 1's node 0 (turn 1, parent of node 2) fails
    made = make_session_build(mini_build, runs=2, fail={(0, 0, 1), (1, 1, 0)})
    chain = [pair_of(made, 0, 0, n)["id"] for n in range(3)]
    tree = [pair_of(made, 1, 1, n)["id"] for n in range(3)]
    whole_runs = [pair_of(made, s, 1 - s, n)["id"] for s in (0, 1) for n in range(3)]
    got = exported(mini_build)
    assert chain[0] in got and chain[1] not in got and chain[2] not in got
    assert tree[1] in got and tree[0] not in got and tree[2] not in got
    assert all(p in got for p in whole_runs)
    st = collect_rows(mini_build).stats
    assert st["session_cut"] == "prefix" and st["dropped_with_session"] == 2
    assert st["session_runs"] == {"1": 2, "2": 1, "3": 1}
    mini_build.update(["export.session_cut=whole"])
    got = exported(mini_build)
    assert not set(chain + tree) & set(got)
    assert all(p in got for p in whole_runs)
    assert len([r for r in got.values() if r["session_id"]]) == 6


def test_bad_cut_mode_is_a_clear_error(mini_build):
    from dsbuild.core.errors import DsbuildError

    with pytest.raises(DsbuildError, match="session_cut"):
        mini_build.update(["export.session_cut=middle"])


def test_curator_reject_on_a_middle_turn_drops_its_subtree(mini_build):
    made = make_session_build(mini_build, runs=2)
    chain = [pair_of(made, 0, 1, n)["id"] for n in range(3)]
    add_decisions(mini_build, [make_decision(chain[1], "reject", tool="fiftyone",
                                             reason="the sofa is still grey")])
    got = exported(mini_build)
    assert chain[0] in got and chain[1] not in got and chain[2] not in got
    st = collect_rows(mini_build).stats
    assert st["rejected_by_review"] == 1 and st["dropped_with_session"] == 1
    other = [pair_of(made, 0, 0, n)["id"] for n in range(3)]
    assert all(p in got for p in other)


def test_verify_reject_on_a_middle_turn_drops_its_subtree_and_reports(mini_build):
    made = make_session_build(mini_build, runs=2)
    chain = [pair_of(made, 0, 0, n)["id"] for n in range(3)]
    recs = [{"pair_id": p["id"], "triple_id": p["triple_id"], "verdict":
             "reject" if p["id"] == chain[1] else "pass",
             "reason": "near_copy" if p["id"] == chain[1] else None, "checks": []}
            for p in made["pairs"]]
    mini_build.run_stage("verify", 0, 1, lambda w: [w.write(r) for r in recs] and None,
                         report=False)
    got = exported(mini_build)
    assert chain[0] in got and chain[1] not in got and chain[2] not in got
    rep = verify_report(mini_build)
    ses = rep["sessions"]
    assert ses["captions"] == {"sessions": 2, "turns": 6, "branches": 1, "max_turn": 3}
    assert ses["runs"] == {"2": 2, "3": 2}
    assert ses["prefix"] == {"1": 1, "2": 2, "3": 1} and ses["whole"] == {"2": 2, "3": 1}
    assert ses["per_turn"]["2"] == {"pairs": 4, "passed": 3, "prefix": 3, "whole": 3}
    md = (mini_build.reports_dir / "verify.md").read_text()
    assert "## Sessions" in md and "| surviving (prefix *) | 1 | 2 | 1 | 4 |" in md


def test_filter_ranks_runs_and_a_run_below_top_k_goes_whole(mini_build):
    mini_build.update(["filter.top_k=1"])
    made = make_session_build(mini_build, runs=3)
    run = {(s, r): [pair_of(made, s, r, n)["id"] for n in range(3)] for s in (0, 1)
           for r in range(3)}
    # session 0: run 0 passes everywhere (mean 0.3), run 1 passes everywhere (mean 0.5), run 2
    # has the best mean (0.63) but fails turn 1, so nothing of it survives: it takes no place
    dirs = {**{p: 0.3 for p in run[0, 0]}, **{p: 0.5 for p in run[0, 1]},
            run[0, 2][0]: 0.1, run[0, 2][1]: 0.9, run[0, 2][2]: 0.9}
    sc = write_scores(mini_build, made["pairs"], [dirs.get(p["id"], 0.3)
                                                  for p in made["pairs"]], force=True)
    by = {r["pair_id"]: r for r in sc}
    assert all(by[p]["keep"] and by[p]["rank"] == 1 for p in run[0, 1])
    assert all(not by[p]["keep"] and by[p]["reason"] == "top_k" and by[p]["rank"] == 2
               for p in run[0, 0])
    assert by[run[0, 2][0]]["reason"] == "clip_sim_dir"
    assert all(by[p]["reason"] == "top_k" and by[p]["rank"] is None for p in run[0, 2][1:])
    # session 1 (a tree; all runs tie at 0.3): exactly one run kept, whole
    kept = [r for r in range(3) if all(by[p]["keep"] for p in run[1, r])]
    assert len(kept) == 1 and not any(by[p]["keep"] for r in range(3) if r not in kept
                                      for p in run[1, r])
    # single triples: top_k per triple, as always
    singles = [p for p in made["pairs"] if not p.get("session_id")]
    assert sum(by[p["id"]]["keep"] for p in singles) == 2
    got = exported(mini_build)
    assert {r["session_run"] for r in got.values() if r["session_id"]} == {
        pair_of(made, 0, 1, 0)["session_run"], pair_of(made, 1, kept[0], 0)["session_run"]}
    rep = filter_report(mini_build)
    assert rep["sessions"]["prefix"] == {"2": 1, "3": 1}
    assert rep["sessions"]["runs"] == {"2": 3, "3": 3}
    assert "## Sessions" in (mini_build.reports_dir / "filter.md").read_text()


def test_single_edit_build_reports_and_signs_as_before(mini_build):
    from builders import make_build

    make_build(mini_build, samples=2)
    assert "sessions" not in filter_report(mini_build)
    assert "session_cut" not in mini_build.config.export.signature_dict()
    st = collect_rows(mini_build).stats
    assert "session_cut" not in st and "dropped_with_session" not in st


def test_card_counts_sessions_and_links_tree_pages(mini_build):
    mini_build.update(["export.grid_pairs=20"])
    made = make_session_build(mini_build, runs=2, fail={(0, 0, 2)})
    sids = sorted({t["session_id"] for t in made["triples"] if t.get("session_id")})
    page = mini_build.root / sessions.tree_page(sids[0])
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("<html><body>tree</body></html>")
    res = export_build(mini_build)
    card = (res.path / "README.md").read_text()
    assert "The captions hold 2 multi-turn sessions: 6 turns, 1 branch points, turns up to 3" \
        in card
    total = next(line for line in card.splitlines() if line.startswith("| total | 2 |"))
    # runs: the chain's run 0 lost turn 3 (2 turns), its run 1 is whole; the tree's are 2 deep
    assert total.endswith("| 4 | 11 | 2 turns: 3, 3 turns: 1 |"), total
    assert f"[session {sids[0][:8]}]({sessions.tree_page(sids[0])})" in card
    assert f"[session {sids[1][:8]}]" not in card  # no page written for it
    assert (res.path / sessions.tree_page(sids[0])).read_text() == page.read_text()
    info = json.loads((res.path / "export_info.json").read_text())
    assert info["stats"]["session_runs"] == {"2": 3, "3": 1}
    grid = Image.open(io.BytesIO((res.path / "grid.png").read_bytes()))
    assert grid.size[0] > 0


def test_real_filter_shards_by_session_and_keeps_top_k_runs(mini_build):
    from builders import score_records

    from dsbuild.filter.stage import Scorer, run_filter
    from dsbuild.models.clip import ClipEncoder

    made = make_session_build(mini_build, runs=3)
    mini_build.update(["filter.clip_model=tiny", "filter.top_k=1", "filter.clip_sim_0=-1",
                       "filter.clip_sim_1=-1", "filter.clip_sim_dir=-1",
                       "filter.clip_sim_image=-1"])
    scorer = Scorer(ClipEncoder.load("tiny", quiet=True), None, workers=0)
    for rank in range(2):  # a session's runs all land on one rank, or top-k would count twice
        run_filter(mini_build, rank, 2, force=True, scorer=scorer, quiet=True, report=False)
    got = {r["pair_id"]: r for r in mini_build.records("filter")}
    assert set(got) == {p["id"] for p in made["pairs"]}
    for sid in sorted({p["session_id"] for p in made["pairs"] if p.get("session_id")}):
        mine = sessions.by_run(p for p in made["pairs"] if p.get("session_id") == sid)
        kept = [run for run, ps in mine.items() if all(got[p["id"]]["keep"] for p in ps)]
        assert len(kept) == 1, sid
        assert all(got[p["id"]]["reason"] == "top_k" for run, ps in mine.items()
                   if run not in kept for p in ps)
        means = {run: np.mean([got[p["id"]]["clip_sim_dir"] for p in ps])
                 for run, ps in mine.items()}
        assert means[kept[0]] == max(means.values())
    # tests/builders.py decides sessions exactly as the stage does
    like = score_records(mini_build, made["pairs"],
                         [got[p["id"]]["clip_sim_dir"] for p in made["pairs"]])
    for r in like:
        assert (r["keep"], r["reason"], r["rank"]) == tuple(
            got[r["pair_id"]][k] for k in ("keep", "reason", "rank")), r["pair_id"]
