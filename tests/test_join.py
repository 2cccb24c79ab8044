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
                         force=True)
    with pytest.raises(DsbuildError, match="triple 'gone'.*rerun `dsbuild generate`"):
        list(join.all_pairs(mini_build))
