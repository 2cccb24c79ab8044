"""The contract of issue 29: rubrics, judge records, the joined row's judge and re-caption
columns, and what survives to the export (dsbuild.core.survival)."""

from __future__ import annotations

import pytest
from builders import make_judged_build

from dsbuild.core import join, survival
from dsbuild.llm.rubric import PRESETS, judge_record, resolve


def test_rubric_presets_weights_and_thresholds():
    pico = resolve("pico-banana")
    assert [c.weight for c in pico.criteria] == [0.40, 0.25, 0.20, 0.15]
    assert pico.threshold == 0.7
    top = {n: 10 for n in pico.names}
    assert pico.weighted(top) == pytest.approx(1.0)
    sc = {"instruction": 9, "realism": 5, "preservation": 6, "technical": 4}
    assert pico.weighted(sc) == pytest.approx((0.4 * 9 + 0.25 * 5 + 0.2 * 6 + 0.15 * 4) / 10)
    assert pico.failed(sc) == "weighted"  # 0.665 < 0.7
    assert pico.failed({**sc, "realism": 7}) is None  # 0.715
    ds = resolve("dsbuild", minimums={"instruction": 6, "preserve": 6, "quality": 5})
    assert ds.failed({"instruction": 5, "preserve": 9, "quality": 9}) == "instruction"
    assert ds.threshold == 0 and set(PRESETS) >= {"dsbuild", "pico-banana"}
    own = resolve([{"name": "a", "description": "x", "weight": 3, "min": 2},
                   {"name": "b", "description": "y"}], 0.5)
    assert own.name == "custom" and own.failed({"a": 1, "b": 10}) == "a"
    assert own.hash != resolve([{"name": "a", "description": "x", "weight": 2},
                                {"name": "b", "description": "y"}], 0.5).hash
    with pytest.raises(ValueError, match="distinct"):
        resolve([{"name": "a", "description": "x"}, {"name": "a", "description": "y"}])
    with pytest.raises(ValueError, match="unknown rubric"):
        resolve("nope")


def test_missing_reply_is_no_score_and_no_verdict():
    r = judge_record(resolve("pico-banana"), model_requested="m", model_reported=None,
                     prompt_hash="h", temperature=0.0, raw="garbage", scores=None,
                     missing="not_json")
    assert r["score"] is None and r["passed"] is None and r["missing"] == "not_json"
    assert r["raw"] == "garbage" and r["model_requested"] == "m"


def test_rows_carry_judge_recaption_and_survival(mini_build):
    b = mini_build
    out = make_judged_build(b, judge={0: {"instruction": 2, "preserve": 9, "quality": 9},
                                      1: None}, reject={2}, recaption={3: "add a blue rug",
                                                                       4: None},
                            decisions={5: ("reject", "fiftyone")})
    rows = {r["pair_id"]: r for r in join.rows(b, policy="scored")[0]}
    k = out["kept"]
    assert rows[k[0]]["judge_pass"] is False and rows[k[0]]["verify"] == "reject"
    assert rows[k[1]]["judge_score"] is None and rows[k[1]]["judge_missing"] == "not_json"
    assert rows[k[1]]["verify"] == "pass"  # a missing score never rejects
    assert rows[k[3]]["edit_prompt_recaptioned"] == "add a blue rug"
    assert rows[k[3]]["edit_prompt"] == rows[k[3]]["edit_prompt_generated"]  # generated: default
    assert rows[k[4]]["recaption_unchanged"] is True
    headed = {pid for pid, r in rows.items() if r["headed"]}
    assert headed == {k[i] for i in range(len(k)) if i not in (0, 2, 5)}
    assert all(survival.left_out(rows[p]) is None for p in headed)
    # the review queue's order: unreviewed first, a missing judge score above a confident one
    assert rows[k[1]]["review_priority"] > rows[k[6]]["review_priority"] > \
        rows[k[5]]["review_priority"]
    b.update(["export.edit_prompt=recaptioned"])
    rows = {r["pair_id"]: r for r in join.rows(b, policy="scored")[0]}
    assert rows[k[3]]["edit_prompt"] == "add a blue rug" and not rows[k[3]]["corrected"]
    assert survival.left_out(rows[k[4]], prompt="recaptioned") == "recaption"
    assert not rows[k[4]]["headed"]
