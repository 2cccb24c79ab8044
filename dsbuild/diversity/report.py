"""reports/diversity.{json,md,png}: the diversity report as Markdown tables and a bar chart."""

from __future__ import annotations

import math
from pathlib import Path

from dsbuild.diversity.measures import FIELD_METRICS, LABELS


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
        from dsbuild.diversity.gate import group_keys, miss_line

        g = report["gate"]
        lines += ["", "## Gate", "", f"{g['checks']} checks, {len(g['misses'])} missed."]
        if g.get("baseline"):
            lines += ["", f"Against the baseline `{g['baseline']['path']}` "
                      f"(--max-drop {g['baseline']['max_drop']})."]
        lines += [""] if g["misses"] else []
        lines += [f"- {miss_line(m)}" for m in g["misses"]]
        if g.get("vanished"):
            lines += ["", "In the baseline, gone here (not compared):", ""]
            lines += [f"- {ln}" for ln in group_keys(g["vanished"])]
        if g.get("new"):
            lines += ["", "New here, not in the baseline (not compared):", ""]
            lines += [f"- {ln}" for ln in group_keys(g["new"])]
    return "\n".join(lines) + "\n"


def overall_table(report: dict) -> str:
    """Only the overall table (what the command prints)."""
    md = markdown(report)
    start = md.index("## Overall")
    return md[start:md.index("## Per agent")].rstrip() + "\n"


# what each panel's y axis measures (the value labels print it as the table does)
Y_UNITS = {"mtld": "tokens per factor", "yule_k": "K", "dugast": "U²",
           "guiraud": "types / √tokens", "near_dup_rate": "% of texts (as the table)",
           "semantic": "1 − mean cosine"}


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
            scale = 100 if metric == "near_dup_rate" else 1  # a percentage, as the table
            ys = [np.nan if v is None else scale * v for v in vals]
            bars = ax.bar(x + (i - (len(builds) - 1) / 2) * width, ys, width, label=b["name"])
            # value labels, so a zero (or missing) value is visible rather than an empty panel
            ax.bar_label(bars, labels=["n/a" if v is None else (f"{v:.1%}" if metric ==
                                       "near_dup_rate" else f"{v:.3g}") for v in vals],
                         fontsize=7, padding=1)
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.12 if top > 0 else 1)  # room for the value labels
        ax.set_xticks(x, fields)
        ax.set_xlabel("field")
        ax.set_ylabel(Y_UNITS[metric], fontsize=8)
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
