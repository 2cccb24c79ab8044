"""The records join (dsbuild/core/join.py): what every reader of triples, pairs and scores gets."""

from __future__ import annotations

import pytest
from builders import make_build, write_scores

from dsbuild.core import join
from dsbuild.core.errors import DsbuildError


def test_scored_and_all_pairs(mini_build):
    recs = make_build(mini_build, samples=2)
    triples = {t["id"]: t for t in recs["triples"]}
    scored = list(join.scored_pairs(mini_build))
    assert [j.score["pair_id"] for j in scored] == [s["pair_id"] for s in recs["scores"]]
    for pair, triple, score in scored:
        assert score["pair_id"] == pair["id"] and triple == triples[pair["triple_id"]]
    kept = {j.pair["id"] for j in join.scored_pairs(mini_build, kept_only=True)}
    assert kept == {s["pair_id"] for s in recs["scores"] if s["keep"]} and 0 < len(kept) < 12
    every = list(join.all_pairs(mini_build))
    assert [j.pair["id"] for j in every] == [p["id"] for p in recs["pairs"]]
    assert all(j.score["pair_id"] == j.pair["id"] for j in every)
    assert all(j.score is None for j in join.all_pairs(mini_build, scores=False))


def test_pairs_before_the_filter_and_disagreeing_outputs(mini_build):
    recs = make_build(mini_build, samples=1, scores=False)
    assert [j.score for j in join.all_pairs(mini_build)] == [None] * len(recs["pairs"])
    with pytest.raises(DsbuildError, match="run `dsbuild filter"):
        list(join.scored_pairs(mini_build))
    ghost = {**recs["pairs"][0], "id": "ghost"}
    write_scores(mini_build, [*recs["pairs"], ghost], [0.5] * (len(recs["pairs"]) + 1))
    with pytest.raises(DsbuildError, match="unknown pair 'ghost'.*rerun `dsbuild filter`"):
        list(join.scored_pairs(mini_build))
    orphan = {**recs["pairs"][0], "id": "orphan", "triple_id": "gone"}
    mini_build.run_stage("generate", 0, 1, lambda w: [w.write(p) for p in
                                                      [*recs["pairs"], orphan]] and None,
                         force=True, report=False)
    with pytest.raises(DsbuildError, match="triple 'gone'.*rerun `dsbuild generate`"):
        list(join.all_pairs(mini_build))


def test_one_joined_row_one_name_per_field(mini_build):
    """The joined row joins verify and the decision in force; export columns, FiftyOne fields
    and Label Studio task data are its names (images aside: slices and URLs)."""
    from dsbuild.core.decisions import add_decisions, make_decision
    from dsbuild.core.schema import fields
    from dsbuild.review.fiftyone.dataset import OWN_FIELDS, sample_fields
    from dsbuild.review.labelstudio.push import task_data

    recs = make_build(mini_build, samples=2)
    first, second = recs["pairs"][0], recs["pairs"][1]
    mini_build.run_stage("verify", 0, 1, lambda w: w.write(
        {"pair_id": first["id"], "verdict": "reject", "reason": "near_copy",
         "checks": [{"name": "near_copy", "pass": False, "reason": "near_copy"}]}) and None,
             report=False)
    add_decisions(mini_build, [make_decision(second["id"], "accept", tool="t", reviewer="r",
                                             corrected_edit="make it red")])
    rows, cols = join.rows(mini_build)
    assert list(cols) == ["p2p_mode", "p2p_steps", "guidance", "cross_replace", "self_replace",
                          "scheduler", "blend_words", "equalizer"]
    names = set(fields(cols))
    by_id = {r["pair_id"]: r for r in rows}
    assert all(set(r) - {"_images"} == names - {"input_image", "edited_image", "edit_mask"}
               for r in rows)
    a, b = by_id[first["id"]], by_id[second["id"]]
    assert (a["verify"], a["verify_reason"], a["verify_checks"]) == \
        ("reject", "near_copy", "near_copy:fail(near_copy)")
    assert (a["generator"], a["p2p_mode"], a["guidance"], a["blend_words"]) == \
        ("p2p", "self", 7.5, None)
    assert (b["review"], b["edit_prompt"], b["corrected"], b["review_count"]) == \
        ("accept", "make it red", True, 1)
    assert b["original_edit"] == recs["triples"][0]["edit"] != b["edit_prompt"]
    assert set(sample_fields(cols)) - set(OWN_FIELDS) <= names
    task = task_data(a, {"input": "i", "output": "o"})
    assert set(task) <= names and (task["generator"], task["guidance"]) == ("p2p", 7.5)
