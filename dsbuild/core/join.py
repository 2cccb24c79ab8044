"""The records join every reader shares: triples ⋈ pairs ⋈ scores, and no-change samples.

Stages write their records apart (captions → triples/, generate → pairs/, filter → scores/,
augment → augment/). The filter report, augment, FiftyOne, Label Studio, the contact sheet and
export read them back joined; doing it here once keeps one rule for what "kept" means and one
clear error where two stages' outputs disagree (rerun the stage that is behind).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from dsbuild.core.errors import DsbuildError


class Joined(NamedTuple):
    """A generated pair with its caption triple and its filter score (None: not scored)."""

    pair: dict
    triple: dict
    score: dict | None


class NoChange(NamedTuple):
    """An augment (no-change) sample with the pair it was made from and that pair's triple
    (None where the build no longer holds them)."""

    sample: dict
    source: dict | None
    triple: dict | None


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


def no_change_samples(build, pairs: dict[str, dict] | None = None,
                      triples: dict[str, dict] | None = None, *,
                      require: bool = True) -> Iterator[NoChange]:
    """Augment's samples with their source pair and its triple. ``require=False`` reads the
    ranks that are done even when augment is unfinished (or never ran: nothing)."""
    if require:
        build.require_complete("augment")
    pairs = pairs_by_id(build) if pairs is None else pairs
    triples = triples_by_id(build) if triples is None else triples
    for sample in build.records("augment", require=require):
        source = pairs.get(sample.get("source_pair_id") or sample.get("pair_id"))
        tid = sample.get("triple_id") or (source or {}).get("triple_id")
        yield NoChange(sample, source, triples.get(tid))
