"""The survival funnel (issue 29): its numbers equal counts taken from the records, per step
and per agent / operation, in ``dsbuild status`` (text and --json), a picture and the card."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from builders import make_build, make_judged_build
from click.testing import CliRunner

from dsbuild.cli import cli
from dsbuild.core import funnel as F
from dsbuild.core.decisions import read_decisions


def _from_records(build) -> dict:
    """The funnel counted straight from the record files, independently of core.funnel."""
    triples = list(build.records("captions"))
    pairs = list(build.records("generate"))
    kept = {s["pair_id"] for s in build.records("filter") if s["keep"]}
    ver = {v["pair_id"]: v for v in build.records("verify")}
    own = {p for p in kept if p in ver and all(c["pass"] is not False for c in
                                                ver[p]["checks"] if c["name"] != "judge")}
    judged = {p for p in own if ver[p]["verdict"] == "pass"}
    last = {}
    for d in read_decisions(build):
        last[d["pair_id"]] = d["verdict"]
    accepted = {p for p in judged if last.get(p) == "accept"}
    headed = {p for p in kept if ver[p]["verdict"] == "pass" and last.get(p) != "reject"}
    target = sum(m["stats"].get("target", 0) for m in build.markers("captions").values())
    return {"triples": len(triples), "generated": len(pairs), "kept": len(kept),
            "verified": len(own), "judged": len(judged), "accepted": len(accepted),
            "headed": len(headed), "requested": target,
            "sets": {"kept": kept, "verified": own, "judged": judged, "accepted": accepted,
                     "headed": headed},
            "pairs": pairs, "triples_list": triples}


def test_funnel_equals_the_records(mini_build):
    b = mini_build
    out = make_judged_build(b, judge={0: {"instruction": 2, "preserve": 9, "quality": 9},
                                      1: None}, reject={2, 3},
                            decisions={4: ("accept", "fiftyone"), 5: ("reject", "labelstudio"),
                                       6: ("accept", "labelstudio"), 0: ("accept", "fiftyone")})
    f = F.funnel(b)
    want = _from_records(b)
    got = f["counts"]
    for step in ("triples", "generated", "kept", "verified", "judged", "accepted", "headed"):
        assert got[step] == want[step], (step, got[step], want[step])
    assert got["exported"] is None  # nothing exported yet
    assert f["aside"]["judge_missing"] == 1 and f["aside"]["reviewed"] == 4
    # every step is a subset of the one before it
    assert got["generated"] >= got["kept"] >= got["verified"] >= got["judged"] >= \
        got["accepted"]
    # per agent and per operation, the steps add up to the total
    for key in ("agent", "operation"):
        for step in ("triples", "generated", "kept", "verified", "judged", "accepted",
                     "headed"):
            assert sum(c[step] for c in f["by"][key].values()) == got[step], (key, step)
    op_of = {t["id"]: t["operation"] for t in want["triples_list"]}
    pair_op = Counter(op_of[p["triple_id"]] for p in want["pairs"])
    assert {k: c["generated"] for k, c in f["by"]["operation"].items()} == dict(pair_op)
    # shares: of the step before that ran
    steps = {s["step"]: s for s in f["steps"]}
    assert steps["judged"]["share"] == pytest.approx(round(want["judged"] / want["verified"],
                                                           4))
    assert steps["generated"]["per_triple"] == pytest.approx(
        round(want["generated"] / want["triples"], 4))
    assert f["next"].startswith("dsbuild run")  # augment, diversity, export not done yet
    del out


def test_steps_that_did_not_run_are_none_and_the_next_command(mini_build, tmp_path):
    b = mini_build
    f = F.funnel(b)  # an empty build
    assert all(s["count"] is None for s in f["steps"]) and f["next"] == f"dsbuild run {b.root}"
    make_build(b)
    f = F.funnel(b)
    c = f["counts"]
    assert c["kept"] == sum(s["keep"] for s in b.records("filter"))
    assert c["verified"] is None and c["judged"] is None and c["accepted"] is None
    assert c["headed"] == c["kept"]
    steps = {s["step"]: s for s in f["steps"]}
    assert steps["headed"]["share"] == 1.0  # of kept: verify, judge and review did not run
    png = F.plot(f, tmp_path / "funnel.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 400 and len(im.convert("L").getcolors(1 << 16) or []) > 10


def test_status_shows_the_funnel_and_the_next_step(mini_build, tmp_path):
    b = mini_build
    make_judged_build(b, reject={1}, decisions={0: ("accept", "fiftyone")})
    r = CliRunner().invoke(cli, ["status", str(b.root), "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["funnel"]["counts"] == F.funnel(b)["counts"]
    assert st["funnel"]["next"]
    r = CliRunner().invoke(cli, ["status", str(b.root), "--plot", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output
    assert "funnel" in r.output and "passed verify" in r.output and "next: dsbuild" in r.output
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_the_card_has_the_funnel(mini_build):
    from dsbuild.export.writer import export_build

    b = mini_build
    make_judged_build(b, reject={1})
    res = export_build(b)
    card = (res.path / "README.md").read_text()
    assert "### Survival funnel" in card and "(funnel.png)" in card
    assert (res.path / "funnel.png").is_file()
    rows = sum(c["rows"] - c["no_change"] for c in res.counts.values())
    assert f"| exported | {rows} |" in card
    # the funnel of the written export reads it back
    assert F.funnel(b)["counts"]["exported"] == rows
    assert F.funnel(b)["next"] == f"dsbuild run {b.root}"  # augment and diversity not run


def test_next_is_push_once_the_export_is_current_and_export_after_new_decisions(mini_build):
    from dsbuild.core.decisions import add_decisions, make_decision
    from dsbuild.core.stages import all_stages
    from dsbuild.export.writer import export_build

    b = mini_build
    out = make_judged_build(b, decisions={0: ("accept", "fiftyone")})
    for st in all_stages():  # the stages the builder does not make: run for real
        if st.name not in ("captions", "generate", "filter", "verify", "export") and \
                b.is_active(st.name):
            st.load_run()(b)
    assert not [st.name for st in all_stages() if b.is_active(st.name)
                and st.name != "export" and not b.is_complete(st.name)]
    export_build(b)
    assert F.funnel(b)["next"] == f"dsbuild push {b.root} <user>/<dataset>"
    add_decisions(b, [make_decision(out["kept"][1], "reject", tool="fiftyone")])
    f = F.funnel(b)
    assert f["aside"]["export_stale"] and f["next"] == f"dsbuild export {b.root}"
