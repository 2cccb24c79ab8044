"""Issue 29, done when: on the offline demo with a local judge server the judge records carry
identity and raw replies; ``dsbuild report judge`` prints kappa against decisions; ``dsbuild
status`` shows the funnel and the next step; the preference export loads with ``datasets``;
the review queue skips what verify rejected."""

from __future__ import annotations

import hashlib
import json

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("datasets")

from openai_server import OpenAIServer, chat  # noqa: E402

from dsbuild.cli import cli  # noqa: E402

NAMES = ("instruction", "realism", "preservation", "technical")


def _scores(body: dict) -> dict:
    """Deterministic 0-10 scores from the request's images: some pass pico-banana's 0.7."""
    h = hashlib.sha256(json.dumps(body["messages"][1]["content"], sort_keys=True).encode())
    d = h.digest()
    return {n: 4 + d[i] % 7 for i, n in enumerate(NAMES)}


def handler(body, n):
    if n % 11 == 5:
        return chat("not json at all", model="judge-vlm-2026-06")  # a missing score
    return chat(json.dumps({**_scores(body), "reason": "ok"}), model="judge-vlm-2026-06")


@pytest.fixture(scope="module")
def judged_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge-demo")
    with OpenAIServer(handler=handler) as srv:
        env = {"OPENAI_API_KEY": "test"}
        r = CliRunner(env=env).invoke(cli, [
            "run", str(root / "demo"), "--offline",
            "--set", "verify.judge.enabled=true", "--set", f"verify.judge.base_url={srv.base_url}",
            "--set", "verify.judge.model=judge-vlm", "--set", "verify.judge.rubric=pico-banana",
            "--set", "verify.judge.image_side=64",
            # a grid sweep: two strengths per seed share one source image, so the preference
            # export has groups (one input image, one instruction, several edits)
            "--set", "generate.sweep=grid", "--set", "generate.grid_guidance=[7.5]"])
        assert r.exit_code == 0, r.output
        asked = len(srv.chat_requests)
    assert asked > 0
    return root / "demo"


def test_judge_records_carry_identity_and_raw_replies(judged_demo):
    from dsbuild.core.build import Build

    recs = list(Build.open(judged_demo).records("verify"))
    judged = [r["judge"] for r in recs if r.get("judge")]
    assert judged
    for j in judged:
        assert j["model_requested"] == "judge-vlm" and j["model_reported"] == "judge-vlm-2026-06"
        assert j["rubric"] == "pico-banana" and j["raw"]
        if j["missing"] is None:
            assert set(j["scores"]) == set(NAMES) and 0 <= j["score"] <= 1
        else:
            assert j["scores"] is None and j["score"] is None and j["passed"] is None
    assert any(j["missing"] for j in judged) and any(j["passed"] for j in judged)


def _decide(build) -> list[dict]:
    """Curators' verdicts on every pair verify passed or the judge alone rejected: accept where
    the instruction score is 7 or more, except every fifth pair, where they disagree with it."""
    from dsbuild.core.decisions import add_decisions, make_decision

    recs = [r for r in build.records("verify") if r.get("judge") and r["judge"]["scores"]]
    out = []
    for i, r in enumerate(sorted(recs, key=lambda r: r["pair_id"])):
        good = r["judge"]["scores"]["instruction"] >= 7
        if i % 5 == 4:
            good = not good
        out.append(make_decision(r["pair_id"], "accept" if good else "reject",
                                 tool="labelstudio", reviewer="cur"))
    add_decisions(build, out)
    return out


def _kappa(pairs: list[tuple[bool, bool]]) -> float:
    n = len(pairs)
    po = sum(a == b for a, b in pairs) / n
    pa, pb = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return (po - pe) / (1 - pe)


@pytest.fixture(scope="module")
def decided_demo(judged_demo):
    """The demo with curators' verdicts (as a Label Studio pull writes them)."""
    from dsbuild.core.build import Build

    return judged_demo, _decide(Build.open(judged_demo))


def test_report_judge_prints_kappa_against_decisions(decided_demo):
    from dsbuild.core.build import Build

    judged_demo, decisions = decided_demo
    build = Build.open(judged_demo)
    verdict = {d["pair_id"]: d["verdict"] == "accept" for d in decisions}
    judged = {r["pair_id"]: r["judge"]["passed"] for r in build.records("verify")
              if r.get("judge") and r["judge"]["passed"] is not None}
    both = [(judged[p], verdict[p]) for p in verdict if p in judged]
    want = _kappa(both)
    r = CliRunner().invoke(cli, ["report", "judge", str(judged_demo), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["kappa"] == pytest.approx(want, abs=1e-4)  # the report rounds to 4 places
    r = CliRunner().invoke(cli, ["report", "judge", str(judged_demo)])
    assert r.exit_code == 0, r.output
    assert "κ" in r.output or "kappa" in r.output.lower()
    # printed at the places the report rounds to, rounded once (never 0.23249 -> "0.233")
    assert f"Cohen's kappa  {want:.4f}" in r.output


def test_status_shows_the_funnel_and_the_next_step(decided_demo):
    from dsbuild.core.build import Build

    judged_demo, decisions = decided_demo
    build = Build.open(judged_demo)
    r = CliRunner().invoke(cli, ["status", str(judged_demo), "--json"])
    assert r.exit_code == 0, r.output
    f = json.loads(r.output)["funnel"]
    c = f["counts"]
    verify = {v["pair_id"]: v for v in build.records("verify")}
    assert c["generated"] == len(list(build.records("generate")))
    assert c["judged"] == sum(v["verdict"] == "pass" for v in verify.values())
    accepted = {d["pair_id"] for d in decisions if d["verdict"] == "accept"}
    assert c["accepted"] == sum(verify[p]["verdict"] == "pass" for p in accepted)
    assert c["exported"] is not None  # `dsbuild run` exported before the decisions
    # decided since the last export: export it again
    assert f["aside"]["export_stale"] and f["next"] == f"dsbuild export {judged_demo}"
    r = CliRunner().invoke(cli, ["status", str(judged_demo)])
    assert r.exit_code == 0, r.output
    assert "passed the judge" in r.output and "accepted in review" in r.output
    assert "next: dsbuild" in r.output


def test_the_review_queue_skips_what_verify_rejected(decided_demo):
    from dsbuild.core.build import Build
    from dsbuild.review.labelstudio.push import select_pairs

    judged_demo, _ = decided_demo
    build = Build.open(judged_demo)
    rejected = {v["pair_id"] for v in build.records("verify") if v["verdict"] == "reject"}
    assert rejected
    queue = select_pairs(build)
    assert queue and not {r["pair_id"] for r in queue} & rejected
    prio = [r["review_priority"] for r in queue]
    assert prio == sorted(prio, reverse=True)
    everything = select_pairs(build, queue="all")
    assert {r["pair_id"] for r in everything} >= rejected


def test_the_preference_export_loads_with_datasets(decided_demo, tmp_path):
    import datasets
    import numpy as np

    judged_demo, _ = decided_demo
    out = tmp_path / "prefs"
    r = CliRunner().invoke(cli, ["export", str(judged_demo), "--preferences", "--to", str(out)])
    assert r.exit_code == 0, r.output
    dd = datasets.load_from_disk(str(out))
    rows = [x for split in dd.values() for x in split]
    assert rows, r.output
    for col in ("input_image", "edit_prompt", "chosen_image", "rejected_image", "reason",
                "margin"):
        assert col in dd["train"].column_names, col
    sides: dict[str, set[str]] = {}
    for split, d in dd.items():
        for x in d:
            assert x["chosen_pair_id"] != x["rejected_pair_id"]
            assert x["margin"] > 0 or x["reason"] in ("review", "verify")
            assert np.asarray(x["input_image"]).shape == np.asarray(x["chosen_image"]).shape
            sides.setdefault(x["triple_id"], set()).add(split)
    assert all(len(v) == 1 for v in sides.values())  # a triple never on both sides
    assert {x["reason"] for x in rows} <= {"review", "verify", "judge", "filter"}
