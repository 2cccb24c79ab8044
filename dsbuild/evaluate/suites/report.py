"""The one report of ``dsbuild eval --suite ...``: the models side by side on every suite.

``OUT/report.json`` (the whole result), ``OUT/report.md`` and ``OUT/report.png``. The first model
is the base: every other model gets a delta column. The summary puts the specialisation delta
(the export's own test split, CLIP_dir) beside the general-skill deltas (each public suite's
headline metric), so a team sees at once what fine-tuning gained on its own data and whether it
cost skill on the field's suites. Each suite then has a section: where its rows came from, its
protocol, backbones and judge, the table of every metric, and per-category tables where the
suite has categories.
"""

from __future__ import annotations

from pathlib import Path

from dsbuild.core.records import write_figure, write_json, write_text

# export's headline: CLIP_dir of the edit rows (LangDesign's table)
EXPORT_HEADLINE = ("clip_dir", "CLIP_dir ↑", "cos")
SCALES = {"cos100": "cosine ×100", "cos": "raw cosine", "lower": "lower is better",
          "plain": "judge scale"}


def fmt(v, kind: str) -> str:
    if v is None or v != v:  # None or NaN
        return "–"
    if kind == "cos100":
        return f"{100 * v:.2f}"
    if kind == "plain":
        return f"{v:.3f}"
    return f"{v:.4f}"


def delta(v, base, kind: str) -> str:
    if v is None or base is None or v != v or base != base:
        return "–"
    d = v - base
    scaled = 100 * d if kind == "cos100" else d
    digits = 2 if kind == "cos100" else (3 if kind == "plain" else 4)
    return f"{scaled:+.{digits}f}"


def _name(model: str) -> str:
    from dsbuild.core.schema import public_name

    return public_name(model)


def headlines(result: dict) -> list[dict]:
    """One summary row per suite: its headline metric per model."""
    rows = []
    for name, entry in result["suites"].items():
        if name == "export":
            key, title, kind = EXPORT_HEADLINE
            vals = {m: v["edit"].get(key) for m, v in entry["eval"]["models"].items()}
            rows.append({"suite": name, "kind": "specialisation (own test split)",
                         "metric": title, "fmt": kind, "values": vals})
            continue
        cols = {c[0]: c for c in entry["columns"]}
        key = entry["headline"]
        _, title, kind = cols.get(key, (key, key, "plain"))
        vals = {m: v["metrics"].get(key) for m, v in entry["models"].items()}
        rows.append({"suite": name, "kind": "general skill (public suite)", "metric": title,
                     "fmt": kind, "values": vals})
    return rows


def markdown(result: dict) -> str:
    models, base = result["models"], result["base"]
    others = [m for m in models if m != base]
    head = ["| suite | what it measures | metric | " + " | ".join(_name(m) for m in models)
            + "".join(f" | Δ {_name(m)}" for m in others) + " |",
            "|---|---|---|" + "---:|" * (len(models) + len(others))]
    for r in headlines(result):
        v = r["values"]
        head.append(f"| {r['suite']} | {r['kind']} | {r['metric']} | "
                    + " | ".join(fmt(v.get(m), r["fmt"]) for m in models)
                    + "".join(f" | {delta(v.get(m), v.get(base), r['fmt'])}" for m in others)
                    + " |")
    lines = [f"# Evaluation: {len(models)} model{'s' if len(models) != 1 else ''} on "
             f"{len(result['suites'])} suite{'s' if len(result['suites']) != 1 else ''}", "",
             f"Base: {_name(base)}; Δ = model − base. Cosines print ×100 (CLIP_dir as a raw "
             "cosine, as LangDesign's and Emu Edit's tables print it); L1/L2 are mean pixel "
             "differences in [0, 1] (lower is better); judge scores keep their suite's scale.",
             "", "## Summary: specialisation and general skill", "", *head]
    for name, entry in result["suites"].items():
        lines += ["", *(_export_section(entry) if name == "export"
                        else _suite_section(name, entry, models, base))]
    return "\n".join(lines) + "\n"


def _export_section(entry: dict) -> list[str]:
    from dsbuild.evaluate.report import markdown_table

    return ["## export: own test split", "", markdown_table(entry["eval"]).rstrip()]


def _suite_section(name: str, entry: dict, models: list[str], base: str) -> list[str]:
    others = [m for m in models if m != base]
    lines = [f"## {name}: {entry['title']}", "",
             f"Rows: {entry['rows']} from `{_name(str(entry['source']))}` [{entry['split']}]; "
             f"edited at {entry['resolution']} px. {entry.get('protocol') or ''}".rstrip()]
    if entry.get("reference"):
        lines.append(f"Protocol from: {entry['reference']}.")
    b = entry.get("backbones")
    if b:
        lines.append(f"Backbones: CLIP {b['clip_model']}/{b['clip_pretrained']} "
                     f"({b['clip_preprocess']} preprocessing), DINO {b['dino_model']} "
                     f"({b['dino_preprocess']} preprocessing).")
    for m in models:
        j = entry["models"][m].get("judge")
        if j:
            reported = ", ".join(f"{k} ×{v}" for k, v in (j.get("models_reported") or {}).items())
            missing = j.get("missing") or {}
            lines.append(f"Judge for {_name(m)}: asked `{j.get('model_requested')}`, answered by "
                         f"{reported or 'nobody'}; rubrics {', '.join(j.get('rubric_hashes') or [])}"
                         f"; missing scores: {sum(missing.values())}"
                         + (f" ({', '.join(f'{k} {v}' for k, v in missing.items())})"
                            if missing else "") + ".")
            drift = set(j.get("models_reported") or {}) - {j.get("model_requested")}
            if drift:
                lines.append(f"**Warning:** the server reported {', '.join(sorted(drift))} for "
                             f"`{j.get('model_requested')}`: pin the reported snapshot, or "
                             "scores will move when the alias does.")
    cols = entry["columns"]
    lines += ["", "| model | " + " | ".join(c[1] for c in cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for m in models:
        got = entry["models"][m]["metrics"]
        lines.append(f"| {_name(m)} | " + " | ".join(fmt(got.get(c[0]), c[2]) for c in cols)
                     + " |")
    for m in others:
        got, ref = entry["models"][m]["metrics"], entry["models"][base]["metrics"]
        lines.append(f"| Δ {_name(m)} | " + " | ".join(delta(got.get(c[0]), ref.get(c[0]), c[2])
                                                      for c in cols) + " |")
    cats = sorted({c for m in models for c in (entry["models"][m].get("categories") or {})})
    if cats:
        key = entry["headline"]
        col = next((c for c in cols if c[0] == key), (key, key, "plain"))
        lines += ["", f"Per {entry.get('category_label') or 'category'} ({col[1]}):", "",
                  f"| {entry.get('category_label') or 'category'} | rows | "
                  + " | ".join(_name(m) for m in models)
                  + "".join(f" | Δ {_name(m)}" for m in others) + " |",
                  "|---|---:|" + "---:|" * (len(models) + len(others))]
        for c in cats:
            vals = {m: (entry["models"][m].get("categories") or {}).get(c, {}) for m in models}
            n = vals[base].get("rows", next((v.get("rows") for v in vals.values() if v), 0))
            lines.append(f"| {c} | {n} | " + " | ".join(fmt(vals[m].get(key), col[2])
                                                       for m in models)
                         + "".join(f" | {delta(vals[m].get(key), vals[base].get(key), col[2])}"
                                   for m in others) + " |")
    return lines


def figure(result: dict):
    """One panel per suite: each model's headline metric as a bar (the table's scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = headlines(result)
    models = result["models"]
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows) + 1, 3.4), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        scale = 100 if r["fmt"] == "cos100" else 1
        vals = [r["values"].get(m) for m in models]
        ys = [0 if v is None or v != v else v * scale for v in vals]
        bars = ax.bar(range(len(models)), ys, color=[f"C{i}" for i in range(len(models))])
        for bar, v in zip(bars, vals, strict=True):
            ax.annotate(fmt(v, r["fmt"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(models)), [_name(m)[-14:] for m in models], fontsize=7,
                      rotation=20)
        ax.set_title(f"{r['suite']}\n{r['metric']}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"base {_name(result['base'])[-30:]} vs the others: each suite's headline "
                 "metric (first panel: own test split)", fontsize=8)
    fig.tight_layout()
    return fig


def write_report(out: Path, result: dict) -> str:
    """Writes report.json, report.md and report.png under ``out``; returns the markdown."""
    md = markdown(result)
    write_json(Path(out) / "report.json", result)
    write_text(Path(out) / "report.md", md)
    write_figure(Path(out) / "report.png", figure(result))
    return md
