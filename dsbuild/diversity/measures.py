"""Lexical diversity measures of caption fields: MTLD, Yule's K, Dugast's U², Guiraud, the
near-duplicate rate, repeated n-grams and shares, per field overall, per agent and per level.

Numbers come from lexicalrichness's ``LexicalRichness`` on one corpus per (build, field,
group): the field's values, ordered by triple id and joined with newlines, tokenised by
:func:`tokenize` (passed to lexicalrichness as its ``tokenizer``, with no preprocessor), so
the figures equal ``LexicalRichness(text, preprocessor=None, tokenizer=tokenize)`` exactly.
The library's sharp edges are handled here: empty corpora and all-unique corpora give
``None`` plus a note instead of a ZeroDivisionError, short corpora get an "MTLD unstable"
warning, and HD-D (which needs 42 words) is not reported. See docs/diversity.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dsbuild.core.deps import require
from dsbuild.core.text import words
from dsbuild.diversity.settings import DiversitySettings
from dsbuild.diversity.sources import Source, field_values

if TYPE_CHECKING:
    from dsbuild.diversity.semantic import SemanticScorer

# ----------------------------------------------------------------------------- metric names

LEXICAL_METRICS: tuple[str, ...] = ("mtld", "yule_k", "dugast", "guiraud", "tokens", "types")
FIELD_METRICS: tuple[str, ...] = LEXICAL_METRICS + ("near_dup_rate", "semantic")
LABELS: dict[str, str] = {
    "mtld": "MTLD", "yule_k": "Yule's K ↓", "dugast": "Dugast's U²", "guiraud": "Guiraud",
    "tokens": "tokens", "types": "types", "near_dup_rate": "near-dup ↓", "semantic": "semantic",
}
# which way is better, for the baseline gate: +1 higher is more diverse, -1 lower is (the ↓ of
# LABELS); tokens and types are sizes, not diversity, and have no direction (never compared)
DIRECTION: dict[str, int] = {
    "mtld": 1, "yule_k": -1, "dugast": 1, "guiraud": 1, "near_dup_rate": -1, "semantic": 1,
}
ALIASES: dict[str, str] = {
    "yules_k": "yule_k", "yulek": "yule_k", "k": "yule_k", "dugast_u2": "dugast", "u2": "dugast",
    "rttr": "guiraud", "root_ttr": "guiraud", "near_dup": "near_dup_rate",
    "near_duplicates": "near_dup_rate", "semantic_diversity": "semantic",
}

# ----------------------------------------------------------------------------- tokenisation

# the report's tokeniser is the shared one (dsbuild/core/text.py); docs/diversity.md spells it out
tokenize = words


def corpus_text(values: Iterable[str]) -> str:
    """One corpus from a field's values: joined with newlines (tokens never span two values)."""
    return "\n".join(values)


def lexical_richness(text: str):
    """The lexicalrichness object for ``text`` with this module's tokeniser, no preprocessor."""
    lr = require("lexicalrichness")
    return lr.LexicalRichness(text, preprocessor=None, tokenizer=tokenize)


# ----------------------------------------------------------------------------- measures


def lexical_metrics(values: list[str], settings: DiversitySettings) -> tuple[dict, list[str]]:
    """MTLD, Yule's K, Dugast's U², Guiraud, tokens, types of the joined values, with notes."""
    text = corpus_text(values)
    out: dict[str, Any] = {m: None for m in LEXICAL_METRICS}
    notes: list[str] = []
    tokens = tokenize(text)
    out["tokens"], out["types"] = len(tokens), len(set(tokens))
    if not tokens:
        notes.append(f"no words in {len(values)} values (all empty): every metric is null"
                     if values else "no values: every metric is null")
        return out, notes
    lex = lexical_richness(text)
    out["mtld"] = float(lex.mtld(threshold=settings.mtld_threshold))
    out["yule_k"] = float(lex.yulek)
    out["guiraud"] = float(lex.rttr)
    if lex.words == lex.terms:
        notes.append("every word is unique: Dugast's U² is undefined (division by zero), "
                     "reported as null")
    else:
        out["dugast"] = float(lex.Dugast)
    if lex.words < settings.min_tokens_mtld:
        notes.append(f"only {lex.words} tokens (< {settings.min_tokens_mtld}): MTLD is not "
                     "stable on so short a corpus")
    elif out["mtld"] == float(lex.words):
        notes.append("TTR never fell to the MTLD threshold: MTLD equals the word count")
    return out, notes


def near_duplicate_rate(values: list[str]) -> float | None:
    """Share of non-empty values whose normalised tokens repeat an earlier value."""
    norm = [" ".join(tokenize(v)) for v in values]
    norm = [v for v in norm if v]
    if not norm:
        return None
    return 1.0 - len(set(norm)) / len(norm)


def top_ngrams(values: list[str], n: int, k: int) -> list[dict]:
    """The k most repeated token n-grams (counted within values, never across two)."""
    counts: Counter[tuple[str, ...]] = Counter()
    for v in values:
        toks = tokenize(v)
        counts.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    ranked = sorted(((c, g) for g, c in counts.items() if c > 1), key=lambda x: (-x[0], x[1]))
    return [{"ngram": " ".join(g), "count": c} for c, g in ranked[:k]]


def _group(record: dict, key: str) -> str:
    value = record.get(key)
    return "(none)" if value is None else str(value)


def shares(records: list[dict], key: str) -> dict[str, dict]:
    """Count and share of each value of ``key`` among the records."""
    counts = Counter(_group(r, key) for r in records)
    n = len(records) or 1
    return {k: {"count": c, "share": c / n} for k, c in sorted(counts.items())}


def measure_group(values: list[str], settings: DiversitySettings) -> dict:
    """Every lexical figure of one group's values, with its notes."""
    metrics, notes = lexical_metrics(values, settings)
    metrics["near_dup_rate"] = near_duplicate_rate(values)
    metrics["values"] = len(values)
    metrics["empty_values"] = sum(1 for v in values if not tokenize(v))
    metrics["notes"] = notes
    return metrics


def measure_source(src: Source, settings: DiversitySettings,
                   scorer: SemanticScorer | None = None) -> dict:
    """Every figure for one build: per field overall/per agent/per level, shares, n-grams."""
    recs = sorted(src.records, key=lambda r: str(r.get("id") or ""))
    if not recs:
        src.notes.append("no triples: every metric is null")
    agents = sorted({_group(r, "agent") for r in recs})
    levels = sorted({_group(r, "level") for r in recs})
    fields: dict[str, Any] = {}
    for name in settings.fields:
        values = field_values(src, recs, name)
        overall = measure_group(values, settings)
        overall["semantic"] = (scorer.score(values, settings.semantic_sample, settings.seed)
                               if scorer else None)
        by_agent = {a: measure_group(field_values(
            src, [r for r in recs if _group(r, "agent") == a], name), settings) for a in agents}
        by_level = {lv: measure_group(field_values(
            src, [r for r in recs if _group(r, "level") == lv], name), settings)
            for lv in levels}
        fields[name] = {"overall": overall, "agents": by_agent, "levels": by_level,
                        "top_ngrams": top_ngrams(values, settings.ngram, settings.top_ngrams)}
    return {
        "name": src.name, "path": str(src.path), "kind": src.kind, "records": len(recs),
        "no_change": sum(1 for r in recs if r.get("no_change")),
        "agent_levels": {a: sorted({_group(r, "level") for r in recs
                                    if _group(r, "agent") == a}) for a in agents},
        "fields": fields,
        "shares": {k: shares(recs, k) for k in ("operation", "agent", "level")},
        "notes": src.notes,
    }
