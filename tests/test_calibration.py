"""Judge calibration (issue 29, item 2): Cohen's κ against hand-made decisions, the threshold
that best matches the curators, ``dsbuild report judge`` (JSON and plain output, the files,
the picture), the dataset card's part and the errors that say what to do."""

from __future__ import annotations

import json

import pytest
from builders import make_build, make_judged_build
from click.testing import CliRunner

from dsbuild.cli import cli
from dsbuild.core import agreement
from dsbuild.core.agreement import Confusion, best_threshold, calibrate, cohen_kappa
from dsbuild.core.decisions import add_decisions, make_decision


def jrow(score, review, passed=None, *, threshold=0.7, scores=None, missing=None, pid=None):
    """A joined row's judge and review fields (as core/schema.judged fills them)."""
    return {"pair_id": pid or f"p{id(object())}", "judge_score": score,
            "judge_pass": (score >= threshold if passed is None else passed)
            if score is not None else None,
            "judge_threshold": threshold, "judge_missing": missing,
            "judge_scores": json.dumps(scores) if scores else None,
            "judge_model": "m", "review": review}


# 10 pairs: judge pass/accept 4, pass/reject 1, reject/accept 2, reject/reject 3.
# p_o = (4 + 3) / 10 = 0.7; the judge passes 5/10, the curators accept 6/10, so
# p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5 and κ = (0.7 - 0.5) / (1 - 0.5) = 0.4.
TABLE = [(True, True)] * 4 + [(True, False)] + [(False, True)] * 2 + [(False, False)] * 3


def test_kappa_of_a_hand_made_table():
    c = Confusion.of(TABLE)
    assert (c.pass_accept, c.pass_reject, c.reject_accept, c.reject_reject) == (4, 1, 2, 3)
    assert c.agreement == pytest.approx(0.7) and c.expected == pytest.approx(0.5)
    assert cohen_kappa(c) == pytest.approx(0.4)
    rows = [jrow(0.9 if j else 0.3, "accept" if a else "reject") for j, a in TABLE]
    rows += [jrow(None, "accept", missing="refused"), jrow(None, "reject", missing="not_json"),
             jrow(0.9, None)]  # missing scores and an undecided pair: counted apart
    rep = calibrate(rows)
    assert rep["kappa"] == 0.4 and rep["agreement"] == 0.7
    assert rep["confusion"] == {"pass_accept": 4, "pass_reject": 1, "reject_accept": 2,
                                "reject_reject": 3}
    n = rep["counts"]
    assert (n["pairs"], n["judged"], n["missing"], n["decided"], n["decided_missing"]) == \
        (10, 11, 2, 12, 2)
    assert rep["missing_reasons"] == {"refused": 1, "not_json": 1}


def test_kappa_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    judge, curators = zip(*TABLE, strict=True)
    assert cohen_kappa(Confusion.of(TABLE)) == pytest.approx(
        metrics.cohen_kappa_score(judge, curators))
    skew = TABLE[:5] + [(False, True)] * 6
    assert cohen_kappa(Confusion.of(skew)) == pytest.approx(
        metrics.cohen_kappa_score(*zip(*skew, strict=True)))


def test_kappa_degenerate_cases():
    # both raters gave every pair the same verdict: p_e = p_o = 1, κ = 0/0 is undefined
    same = calibrate([jrow(0.9, "accept") for _ in range(4)])
    assert same["kappa"] is None and same["agreement"] == 1.0
    assert same["kappa_note"] == agreement.DEGENERATE
    assert cohen_kappa(Confusion()) is None  # no pair at all
    # each rater used one verdict, but not the same one: p_e = 0, κ = 0
    assert cohen_kappa(Confusion.of([(True, False)] * 3)) == 0.0


def test_best_threshold_on_a_made_case():
    """Accepted pairs score 0.9, 0.8, 0.65 and 0.95 (but that one failed a criterion minimum:
    it fails at every threshold); rejected ones 0.6 and 0.5. At 0.65: pass/accept 3,
    reject/accept 1 (the minimum), reject/reject 2: p_o = 5/6, p_e = 1/2 * 4/6 + 1/2 * 2/6 =
    1/2, κ = 2/3, the best. At 0.8: p_o = 4/6, p_e = 4/9, κ = 0.4; at 0.6: p_o = 4/6,
    p_e = 5/9, κ = 0.25; at the current 0.7 the judge's own verdicts: κ 0.4."""
    rows = [jrow(0.9, "accept"), jrow(0.8, "accept"), jrow(0.65, "accept"),
            jrow(0.95, "accept", passed=False), jrow(0.6, "reject"), jrow(0.5, "reject")]
    rep = calibrate(rows)
    t = rep["threshold"]
    assert t["current"] == 0.7 and rep["kappa"] == pytest.approx(0.4)
    assert t["best"] == 0.65 and t["best_kappa"] == pytest.approx(2 / 3, abs=1e-4)
    assert t["best_agreement"] == pytest.approx(5 / 6, abs=1e-4)
    curve = {p["threshold"]: p["kappa"] for p in t["curve"]}
    assert curve[0.8] == pytest.approx(0.4) and curve[0.6] == pytest.approx(0.25)
    assert set(curve) == {0.5, 0.6, 0.65, 0.7, 0.8, 0.9, 0.95}  # the scores and the current
    assert curve[0.7] == rep["kappa"]
    assert next(p for p in t["curve"] if p["threshold"] == 0.95)["passed"] == 0
    # the current threshold where it is as good as any: nothing to change
    ok = calibrate([jrow(0.9, "accept"), jrow(0.3, "reject")])["threshold"]
    assert ok["best"] == ok["current"] == 0.7 and ok["best_kappa"] == 1.0
    # ties go to the threshold nearest the current one, then to the lower one
    pts = [{"threshold": 0.25, "kappa": 0.4, "agreement": 0.7},
           {"threshold": 0.75, "kappa": 0.4, "agreement": 0.6},
           {"threshold": 0.6, "kappa": 0.2, "agreement": 0.9}]
    assert best_threshold(pts, 0.7)["threshold"] == 0.75
    assert best_threshold(pts, 0.3)["threshold"] == 0.25
    assert best_threshold(pts, 0.5)["threshold"] == 0.25
    assert best_threshold([], 0.5) is None


def pico(n):
    return {"instruction": n, "realism": n, "preservation": n, "technical": n}


# pico-banana (threshold 0.7): index -> judge scores; decisions per index
JUDGE = {0: pico(9), 1: pico(8), 2: pico(8), 3: pico(5), 4: pico(6), 5: None, 6: pico(4)}
DECISIONS = {0: ("accept", "fiftyone"), 1: ("accept", "labelstudio"),
             2: ("reject", "fiftyone"), 3: ("reject", "labelstudio"),
             4: ("accept", "fiftyone"), 5: ("accept", "fiftyone"), 6: ("reject", "fiftyone")}


@pytest.fixture
def judged(mini_build):
    """Pass/accept 0, 1; pass/reject 2; reject/accept 4; reject/reject 3, 6; 5 missing.
    p_o = 4/6, p_e = 1/2 (3 of 6 pass, 3 of 6 accepted), κ = 1/3. Best threshold 0.6: only 4
    changes side (reject/accept -> pass/accept): p_o = 5/6, p_e = 4/6 * 1/2 + 2/6 * 1/2 = 1/2,
    κ = 2/3. Per tool: FiftyOne 0, 2, 4, 6 is one of each cell (κ 0); Label Studio 1, 3
    (κ 1)."""
    mini_build.update(["verify.judge.rubric=pico-banana"])
    out = make_judged_build(mini_build, judge=JUDGE, decisions=DECISIONS)
    return mini_build, out


def test_report_judge_json_files_and_picture(judged, tmp_path):
    from PIL import Image

    b, _ = judged
    r = CliRunner().invoke(cli, ["report", "judge", str(b.root), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["kappa"] == pytest.approx(1 / 3, abs=1e-4)
    assert rep["agreement"] == pytest.approx(4 / 6, abs=1e-4)
    assert rep["confusion"] == {"pass_accept": 2, "pass_reject": 1, "reject_accept": 1,
                                "reject_reject": 2}
    assert rep["threshold"]["current"] == 0.7 and rep["threshold"]["best"] == 0.6
    assert rep["threshold"]["best_kappa"] == pytest.approx(2 / 3, abs=1e-4)
    assert rep["counts"]["pairs"] == 6 and rep["counts"]["decided_missing"] == 1
    assert rep["missing_reasons"] == {"not_json": 1}
    assert rep["by_tool"]["fiftyone"]["kappa"] == 0.0
    assert rep["by_tool"]["fiftyone"]["pairs"] == 4
    assert rep["by_tool"]["labelstudio"]["kappa"] == 1.0
    crit = rep["criteria"]["instruction"]
    assert crit["accept"]["hist"][9] == 1 and crit["accept"]["hist"][8] == 1
    assert crit["accept"]["hist"][6] == 1 and crit["accept"]["n"] == 3
    assert crit["reject"]["mean"] == pytest.approx((8 + 5 + 4) / 3, abs=1e-3)
    assert set(rep["criteria"]) == {"instruction", "realism", "preservation", "technical",
                                    "weighted"}
    rd = b.reports_dir
    assert json.loads((rd / "judge.json").read_text()) == rep
    md = (rd / "judge.md").read_text()
    assert "| pass | 2 | 1 |" in md and "| reject | 1 | 2 |" in md
    with Image.open(rd / "judge.png") as im:
        im.load()
        assert im.width > 1000 and im.height > 200
    out = tmp_path / "elsewhere"
    r = CliRunner().invoke(cli, ["report", "judge", str(b.root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["judge.json", "judge.md", "judge.png"]


def test_report_judge_plain_output(judged):
    b, _ = judged
    r = CliRunner().invoke(cli, ["report", "judge", str(b.root)])
    assert r.exit_code == 0, r.output
    text = r.output
    assert "Cohen's kappa  0.3333" in text and "agreement      0.6667" in text
    assert "judge pass         2       1" in text and "judge reject       1       2" in text
    assert ("current 0.7; best 0.6 (kappa 0.6667, agreement 0.8333; "
            "--set verify.judge.threshold=0.6)") in text
    assert "missing judge scores: 1 (1 of them decided)" in text
    assert "labelstudio:   kappa 1.0000" in text
    assert f"wrote {b.reports_dir / 'judge.json'}" in text


def test_the_decision_in_force_counts(judged):
    """A later Label Studio verdict on a FiftyOne-reviewed pair replaces it in the overall
    numbers, while FiftyOne's own stays in its per-tool numbers."""
    from dsbuild.verify.calibration import calibration

    b, out = judged
    add_decisions(b, [make_decision(out["kept"][2], "accept", tool="labelstudio",
                                    reviewer="other", at="2999-01-01T00:00:00Z")])
    rep = calibration(b)
    assert rep["confusion"]["pass_accept"] == 3 and rep["confusion"]["pass_reject"] == 0
    assert rep["by_tool"]["fiftyone"]["confusion"]["pass_reject"] == 1
    assert rep["by_tool"]["labelstudio"]["pairs"] == 3


def test_card_part(judged):
    pytest.importorskip("datasets")
    pytest.importorskip("huggingface_hub")
    from dsbuild.export.card_notes import CALIBRATION_PNG
    from dsbuild.export.writer import export_build

    b, out = judged
    res = export_build(b)
    text = (res.path / "README.md").read_text(encoding="utf-8")
    assert "### Judge calibration" in text
    assert "on the 6 pairs both judged and reviewed: Cohen's κ 0.3333, agreement 0.6667" in text
    assert "best matches the curators is 0.6 (κ 0.6667; this build's: 0.7)" in text
    assert "Reviewed pairs without a judge score (a missing reply), counted apart: 1." in text
    assert CALIBRATION_PNG not in text  # no report judge yet: no picture
    assert CliRunner().invoke(cli, ["report", "judge", str(b.root)]).exit_code == 0
    res = export_build(b, force=True)
    text = (res.path / "README.md").read_text(encoding="utf-8")
    assert f"]({CALIBRATION_PNG})" in text
    assert (res.path / CALIBRATION_PNG).read_bytes() == (b.reports_dir / "judge.png").read_bytes()
    # newer decisions than the picture: the numbers follow them, the old picture is left out
    add_decisions(b, [make_decision(out["kept"][7], "reject", tool="fiftyone", reviewer="x")])
    res = export_build(b)
    text = (res.path / "README.md").read_text(encoding="utf-8")
    assert "on the 7 pairs" in text and CALIBRATION_PNG not in text
    assert not (res.path / CALIBRATION_PNG).exists()


def test_no_card_part_without_decisions(mini_build):
    pytest.importorskip("datasets")
    pytest.importorskip("huggingface_hub")
    from dsbuild.export.writer import export_build

    make_judged_build(mini_build)
    res = export_build(mini_build)
    assert "Judge calibration" not in (res.path / "README.md").read_text(encoding="utf-8")


def run_main(capsys, *args: str) -> tuple[int, str]:
    """dsbuild.cli.main in-process, as the shell runs it: (exit status, stderr)."""
    from dsbuild.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["report", "judge", *args])
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


def test_errors_say_what_to_do(mini_build, mini_recipe, tmp_path, capsys):
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    b = mini_build
    make_build(b)
    rc, err = run_main(capsys, str(b.root))
    assert rc == 2 and "verify has not run" in err and err.count("\n") == 1
    assert f"dsbuild verify {b.root}" in err and "Traceback" not in err
    # verify ran without the judge
    recs = [{"pair_id": s["pair_id"], "triple_id": "t", "operation": "add", "agent": "a",
             "targets": {}, "checks": [], "verdict": "pass", "reason": None}
            for s in b.records("filter") if s["keep"]]
    b.run_stage("verify", 0, 1, lambda w: [w.write(x) for x in recs] and None, report=False)
    rc, err = run_main(capsys, str(b.root))
    assert rc == 2 and "the judge did not run" in err and "verify.judge.enabled=true" in err
    # judged, but nobody reviewed a judged pair (the one decision is on a missing score)
    c = Build.init(tmp_path / "c", load_recipe(mini_recipe), recipe_path=str(mini_recipe))
    make_judged_build(c, judge={0: None}, decisions={0: ("accept", "fiftyone")})
    rc, err = run_main(capsys, str(c.root))
    assert rc == 2 and "no pair is both judged and decided" in err
    assert "1 of those with a missing judge score" in err
    assert "FiftyOne" in err and "Label Studio" in err
    assert f"dsbuild review pull {c.root}" in err
    assert not (c.reports_dir / "judge.json").exists()
