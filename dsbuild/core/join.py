"""The records join every reader shares: triples ⋈ pairs ⋈ scores ⋈ verify ⋈ decisions.

Stages write their records apart (captions → triples/, generate → pairs/, filter → scores/,
verify → verify/, augment → augment/, review → decisions.jsonl). The filter report, augment,
FiftyOne, Label Studio, the contact sheet and export read them back joined; doing it here once
keeps one rule for what "kept" means and one clear error where two stages' outputs disagree
(rerun the stage that is behind). :func:`rows` and :func:`no_change_rows` give the joined rows
of :mod:`dsbuild.core.schema`, which every reader shows under the same field names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Literal, NamedTuple

from dsbuild.core import schema, survival
from dsbuild.core.decisions import in_force, read_decisions
from dsbuild.core.errors import DsbuildError
from dsbuild.core.generators import Param, generator_of, param_columns


class Joined(NamedTuple):
    """A generated pair with its caption triple and its filter score (None: not scored)."""

    pair: dict
    triple: dict
    score: dict | None


def triples_by_id(build) -> dict[str, dict]:
    """Caption triples by id (captions must be complete)."""
    return {t["id"]: t for t in build.records("captions")}


def pairs_by_id(build) -> dict[str, dict]:
    """Generated pairs by id (generate must be complete)."""
    return {p["id"]: p for p in build.records("generate")}


def scores_by_pair(build) -> dict[str, dict]:
    """Filter scores by pair id; empty while the filter has not finished."""
    if not build.is_complete("filter"):
        return {}
    return {s["pair_id"]: s for s in build.records("filter")}


def _triple_of(build, pair: dict, triples: dict[str, dict]) -> dict:
    triple = triples.get(pair.get("triple_id"))
    if triple is None:
        raise DsbuildError(f"{build.root}: pair {pair.get('id')} names triple "
                           f"{pair.get('triple_id')!r}, which is not among the caption triples "
                           "(generate output does not match captions output); rerun "
                           "`dsbuild generate`")
    return triple


def scored_pairs(build, *, kept_only: bool = False) -> Iterator[Joined]:
    """Every pair the filter scored (or only the kept ones), in score order.

    The filter must be complete: a score names a pair, and a pair a triple, that must exist.
    """
    build.require_complete("filter")
    triples = triples_by_id(build)
    pairs = pairs_by_id(build)
    for score in build.records("filter"):
        if kept_only and not score.get("keep"):
            continue
        pair = pairs.get(score.get("pair_id"))
        if pair is None:
            raise DsbuildError(f"{build.root}: score for unknown pair {score.get('pair_id')!r} "
                               "(filter output does not match generate output); rerun "
                               "`dsbuild filter`")
        yield Joined(pair, _triple_of(build, pair, triples), score)


def all_pairs(build, *, scores: bool = True) -> Iterator[Joined]:
    """Every generated pair with its triple, in pair order, and its score where the filter has
    finished (``scores=False``: never read scores). Review's ``policy=all`` reads this."""
    triples = triples_by_id(build)
    by_pair = scores_by_pair(build) if scores else {}
    for pair in build.records("generate"):
        yield Joined(pair, _triple_of(build, pair, triples), by_pair.get(pair["id"]))


def verify_by_pair(build) -> dict[str, dict] | None:
    """verify's records by pair id; None while verify has not finished (or never ran)."""
    if not build.is_complete("verify"):
        return None
    return {r["pair_id"]: r for r in build.records("verify")}


def columns(pairs: Iterable[dict]) -> dict[str, Param]:
    """The parameter columns of the generators that made these pairs (one name each)."""
    return param_columns(generator_of(p) for p in pairs)


class Reviews(NamedTuple):
    """The decision in force per pair and how many decisions each pair has (one read)."""

    in_force: dict[str, dict]
    counts: Counter

    @classmethod
    def read(cls, build) -> Reviews:
        decisions = read_decisions(build)
        return cls(in_force(decisions), Counter(d.get("pair_id") for d in decisions))


def rows(build, *, policy: Literal["scored", "kept", "all"] = "all", scores: bool = True,
         reviews: Reviews | None = None) -> tuple[list[dict], dict[str, Param]]:
    """The joined rows (:func:`dsbuild.core.schema.row`) of the pairs a reader shows, and the
    parameter columns they fill: ``scored`` (every scored pair, in score order; the filter
    must be complete), ``kept`` (those the filter kept), ``all`` (every pair, in pair order,
    with its score where the filter has finished; ``scores=False``: never read scores).
    verify's verdict and the decision in force are joined where they exist."""
    if policy == "all":
        joined = list(all_pairs(build, scores=scores))
    elif policy in ("scored", "kept"):
        joined = list(scored_pairs(build, kept_only=policy == "kept"))
    else:
        raise DsbuildError(f"policy must be 'scored', 'kept' or 'all' (got {policy!r})")
    cols = columns(j.pair for j in joined)
    schema.fields(cols)  # a parameter column that shadows a row field fails here, by name
    verified = verify_by_pair(build) or {}
    reviews = Reviews.read(build) if reviews is None else reviews
    ex = build.config.export
    out = [schema.row(j.pair, j.triple, j.score, verified.get(j.pair["id"]),
                      reviews.in_force.get(j.pair["id"]), columns=cols,
                      decisions=reviews.counts.get(j.pair["id"], 0), prompt=ex.edit_prompt)
           for j in joined]
    survival.mark(out, ex.session_cut, ex.edit_prompt)
    return out, cols


def no_change_rows(build, sources: dict[str, dict], *, require: bool = True,
                   reviews: Reviews | None = None) -> Iterator[dict]:
    """The joined rows of augment's samples (:func:`dsbuild.core.schema.no_change_row`), each
    with the row of its source pair from ``sources`` (pair id -> row; None where absent).
    ``require=False`` reads the ranks that are done even when augment is unfinished (or never
    ran: nothing)."""
    if require:
        build.require_complete("augment")
    reviews = Reviews.read(build) if reviews is None else reviews
    for sample in build.records("augment", require=require):
        src = sources.get(sample.get("source_pair_id") or sample.get("pair_id"))
        sid = sample.get("id") or sample.get("pair_id")
        yield schema.no_change_row(sample, src, reviews.in_force.get(sid),
                                   decisions=reviews.counts.get(sid, 0))
