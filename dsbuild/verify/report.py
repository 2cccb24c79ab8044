"""The verify report: pass rates per operation and per agent, rejects per reason, checks that
could not be made, and a contact sheet of rejects per reason.

Writes ``reports/verify.json`` (everything), ``verify.md`` (tables for people) and
``verify_rejects.png``: one row per reject reason, up to ``SHEET_PER_REASON`` pairs each, input
beside output with the region verify checked outlined in red, the instruction, reason and
measurements under each pair (a ``dsbuild.core.grid`` picture, its text layer recorded). When
the judge ran: a "Judge" section (who was asked, who answered, the rubric, missing scores,
drift warnings) and ``verify_judge.png`` (weighted scores, passed and failed, the threshold;
mean per criterion). When re-captioning ran: a "Re-captioning" section (pairs asked, re-captions
like and unlike the generated instruction, unchanged, missing, examples) and
``verify_recaption.png`` (those counts per operation).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from dsbuild.core import join
from dsbuild.core.build import Build
from dsbuild.core.records import write_image, write_json, write_text

SHEET_PER_REASON = 6
BINS = 20  # of the judge's weighted score in verify_judge.png
THUMB = 128
PAIR_GAP = 2  # between a pair's input and output in its cell


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


# each check of a record (``checks[].name``) under a name that cannot be read as an operation:
# record name -> (report name, the operation it belongs to or None for every pair, what it asks)
CHECKS: dict[str, tuple[str, str | None, str]] = {
    "image": ("images-readable", None, "both images of the pair can be read"),
    "near_copy": ("not-a-near-copy", None, "the output differs from the input: pixel "
                  "similarity ≤ near_copy_max ({near_copy_max:g}); no-change triples exempt"),
    "preserve": ("photo-preserved", None, "photo pairs with an edit mask: outside the mask the "
                 "edited image stays close to the photo: pixel similarity ≥ preserve_min "
                 "({preserve_min:g})"),
    "add": ("object-added", "add", "the new phrase is present in the output ({present}) and "
            "absent in the input ({absent}){more}"),
    "remove": ("object-removed", "remove", "the old phrase is present in the input ({present}) "
               "and absent in the output ({absent}){fewer}"),
    "replace": ("object-replaced", "replace", "the old phrase is present in the input and the "
                "new one in the output ({present})"),
    "change": ("region-changed", "change", "the thing is detected ({present}), its region "
               "moved the caption's way ({direction}) and the rest stayed ({rest})"),
    "judge": ("judge-rubric", None, "the judge's {rubric} rubric scores ({criteria}) reach "
              "their minimums{judge_threshold}"),
}


def check_label(name: str) -> str:
    """A record check's name in reports: ``object-added (for operation add)``, ..."""
    label, op, _ = CHECKS.get(name, (f"{name}-check", name, ""))
    return f"{label} (for operation {op})" if op else label


def _check_table(recs: list[dict], s) -> dict[str, dict]:
    """Per check: which pairs it ran on, passed, failed, could not be made, and rejected (the
    pairs whose reject reason it gave: the first check that failed)."""
    out: dict[str, dict] = {}
    for r in recs:
        first = next((c["name"] for c in r.get("checks", []) if c.get("pass") is False), None)
        for c in r.get("checks", []):
            name = c["name"]
            label, op, asks = CHECKS.get(name, (f"{name}-check", name, "unknown operation"))
            t = out.setdefault(name, {
                "label": label, "operation": op,
                "asks": asks.format(**_shown_settings(s)),
                "ran": 0, "pass": 0, "fail": 0, "unchecked": 0, "rejected": 0})
            t["ran"] += 1
            t[{True: "pass", False: "fail", None: "unchecked"}[c.get("pass")]] += 1
            t["rejected"] += name == first
    order = list(CHECKS)
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                    else len(order), kv[0])))


def _shown_settings(s) -> dict:
    """The thresholds as the checks' descriptions print them: "off" where one tests nothing
    (``dsbuild run --offline`` turns the detector and change thresholds off)."""
    try:
        rubric = s.judge.resolved()
    except ValueError:  # an unknown preset: the stage says so before it runs
        rubric = None
    return {"near_copy_max": s.near_copy_max, "preserve_min": s.preserve_min,
            "rubric": rubric.name if rubric else s.judge.rubric,
            "criteria": ", ".join(rubric.names) if rubric else "?",
            "judge_threshold": f" and their weighted score ≥ {rubric.threshold:g}"
            if rubric and rubric.threshold else "",
            "present": f"detector ≥ {s.present_min:g}" if s.present_min > 0
            else "present_min off: any box",
            "absent": f"≤ {s.absent_max:g}" if s.absent_max < 1 else "absent_max off: any score",
            "direction": f"CLIP ≥ {s.change_dir_min:g}" if s.change_dir_min > -1
            else "change_dir_min off",
            "rest": f"DINO ≥ {s.rest_min:g}" if s.rest_min > -1 else "rest_min off",
            "more": ", or more boxes than before" if s.count_gain else "",
            "fewer": ", or fewer boxes than before" if s.count_gain else ""}


def _table(recs: list[dict]) -> dict:
    n = len(recs)
    passed = sum(r.get("verdict") == "pass" for r in recs)
    return {"pairs": n, "passed": passed, "pass_rate": _rate(passed, n),
            "reasons": dict(Counter(r["reason"] for r in recs if r.get("verdict") == "reject")
                            .most_common())}


def verify_report(build: Build, records: list[dict] | None = None) -> dict:
    """The report as a dict (settings, overall, per operation, per agent, per check)."""
    s = build.config.verify
    recs = list(build.records("verify")) if records is None else records
    by_op, by_agent = defaultdict(list), defaultdict(list)
    unchecked: Counter = Counter()
    for r in recs:
        by_op[r.get("operation") or "?"].append(r)
        by_agent[r.get("agent") or "?"].append(r)
        for c in r.get("checks", []):
            if c.get("pass") is None:
                unchecked[c.get("reason") or "?"] += 1
    sources = Counter((r.get("targets") or {}).get("source", "?") for r in recs)
    return {
        "settings": {"detector": s.detector, "present_min": s.present_min,
                     "absent_max": s.absent_max, "change_dir_min": s.change_dir_min,
                     "rest_min": s.rest_min, "near_copy_max": s.near_copy_max,
                     "judge": s.judge.model if s.judge.enabled else None},
        "overall": _table(recs),
        "per_operation": {k: _table(v) for k, v in sorted(by_op.items())},
        "per_agent": {k: _table(v) for k, v in sorted(by_agent.items())},
        # keyed by the record's check name; "label" is the name reports print
        "checks": _check_table(recs, s),
        "unchecked": dict(unchecked.most_common()),
        "target_sources": dict(sources.most_common()),
        **judge_part(recs),
        **recaption_part(build, recs),
        **session_part(build, recs),
    }


def _counts(c: Counter) -> dict:
    """Most first, ties by name (the same report for the same records)."""
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def judge_part(recs: list[dict]) -> dict:
    """``judge``: who judged (the model asked for, the models the server reported with counts),
    under which rubric (name, hash, threshold), how many scores are missing by reason, the mean
    weighted score and the warnings a person should see (model drift); nothing when no record
    holds a judge record."""
    js = [r["judge"] for r in recs if r.get("judge")]
    if not js:
        return {}
    requested = Counter(j.get("model_requested") for j in js)
    reported = Counter(j.get("model_reported") or "?" for j in js)
    rubrics = Counter((j.get("rubric"), j.get("rubric_hash")) for j in js)
    scores = [j["score"] for j in js if j.get("score") is not None]
    scored = [j["scores"] for j in js if j.get("scores")]
    warnings = []
    if len(reported) > 1:
        warnings.append(f"the server reported {len(reported)} models for one run: "
                        + ", ".join(f"{m} ({n})" for m, n in _counts(reported).items()))
    for m in reported:
        if m not in requested:
            warnings.append(f"the server reported model {m} for {', '.join(requested)} "
                            "(model drift: the records hold both names; an alias moves "
                            f"between snapshots: pin verify.judge.model={m} to reproduce "
                            "these scores)")
    if len(rubrics) > 1:
        warnings.append(f"the records were judged under {len(rubrics)} rubrics")
    (name, rhash), _ = rubrics.most_common(1)[0]
    return {"judge": {
        "model_requested": _counts(requested), "models_reported": _counts(reported),
        "rubric": name, "rubric_hash": rhash,
        "threshold": js[0].get("threshold"),
        "prompt_hashes": sorted({j.get("prompt_hash") for j in js}),
        "temperature": sorted({j.get("temperature") for j in js}),
        "judged": len(js), "scored": len(scores),
        "passed": sum(j.get("passed") is True for j in js),
        "failed": _counts(Counter(j["failed"] for j in js if j.get("passed") is False)),
        "missing": _counts(Counter(j["missing"] for j in js if j.get("missing"))),
        "mean_score": round(sum(scores) / len(scores), 4) if scores else None,
        "criteria_means": {k: round(sum(x[k] for x in scored) / len(scored), 2)
                           for k in (scored[0] if scored else {})},
        "warnings": warnings,
        # weighted scores in 20 bins of 0.05 (the last takes 1.0), passed and failed apart
        "histogram": {k: [sum(min(int(j["score"] * BINS), BINS - 1) == b for j in js
                              if j.get("score") is not None and j.get("passed") is want)
                          for b in range(BINS)] for k, want in (("passed", True),
                                                                 ("failed", False))}}}


def plot_judge(j: dict, path: Path) -> None:
    """The judge at a glance: weighted scores of the scored pairs (passed / failed stacked, the
    threshold dashed), the mean per criterion, who answered and what is missing; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsbuild.core.records import write_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    h, left = j["histogram"], [b / BINS for b in range(BINS)]
    ax.bar(left, h["passed"], width=1 / BINS, align="edge", color="#55a868",
           label=f"passed {sum(h['passed'])}")
    ax.bar(left, h["failed"], width=1 / BINS, align="edge", bottom=h["passed"],
           color="#c44e52", label=f"failed {sum(h['failed'])}")
    if j["threshold"]:
        ax.axvline(j["threshold"], color="black", linestyle="--",
                   label=f"threshold {j['threshold']:g}")
    missing = sum(j["missing"].values())
    ax.set_title(f"weighted score ({j['scored']} scored, {missing} missing)", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score in [0, 1]")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    names = list(j["criteria_means"])
    bx.bar(names, [j["criteria_means"][n] for n in names], color="#4c72b0")
    bx.set_ylim(0, 10)
    bx.set_title("mean score per criterion (0-10)", fontsize=10)
    bx.tick_params(axis="x", labelsize=8)
    models = ", ".join(f"{m} ({n})" for m, n in j["models_reported"].items())
    fig.suptitle(f"judge: rubric {j['rubric']} ({j['rubric_hash']}), answered by {models}",
                 fontsize=10)
    if j["warnings"]:
        fig.text(0.5, 0.005, "warning: " + "; ".join(j["warnings"]), ha="center",
                 fontsize=7, color="#c44e52", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if j["warnings"] else 0, 1, 1))
    write_figure(path, fig)


def judge_lines(j: dict) -> list[str]:
    """The markdown ``## Judge`` section: identity, rubric, scores, missing, warnings."""
    fmt = ", ".join
    mean = "-" if j["mean_score"] is None else f"{j['mean_score']:.3f}"
    lines = ["## Judge", "",
             "Who scored the pairs and under which rubric. A missing score (the reply could "
             "not be used) is counted here and never rejects a pair. Picture: "
             "`verify_judge.png`.", "",
             *(f"**Warning:** {w}" for w in j["warnings"]), *([""] if j["warnings"] else []),
             "| field | value |", "|---|---|",
             f"| model requested | {fmt(f'{m} ({n})' for m, n in j['model_requested'].items())} |",
             f"| models reported | {fmt(f'{m} ({n})' for m, n in j['models_reported'].items())} |",
             f"| rubric | {j['rubric']} ({j['rubric_hash']}) |",
             f"| threshold (weighted score) | {j['threshold']:g} |",
             f"| pairs judged / scored / passed | {j['judged']} / {j['scored']} / "
             f"{j['passed']} |",
             f"| mean weighted score | {mean} |",
             "| mean per criterion | " + (fmt(f"{k} {v:g}" for k, v in
                                               j["criteria_means"].items()) or "-") + " |",
             "| failed, by criterion | " + (fmt(f"{k} {v}" for k, v in j["failed"].items())
                                            or "none") + " |",
             "| missing, by reason | " + (fmt(f"{k} {v}" for k, v in j["missing"].items())
                                          or "none") + " |", ""]
    return lines


RECAPTION_KINDS = ("same", "differ", "unchanged", "missing")  # what one re-caption record is


def recaption_part(build: Build, recs: list[dict]) -> dict:
    """``recaption``: pairs asked, ``recaptioned`` (an instruction came back), ``unchanged``,
    ``missing`` by reason, ``differ`` (unlike the generated instruction but for case, spacing
    and punctuation), the same per operation, the model(s) and up to five differing examples;
    nothing where no record holds a re-caption."""
    from dsbuild.llm.recaption import counts, same

    rcs = [r for r in recs if r.get("recaption")]
    if not rcs:
        return {}
    edits = {t["id"]: t["edit"] for t in build.records("captions", require=False)}
    generated = {r["pair_id"]: edits.get(r.get("triple_id"), "") for r in rcs}

    def kind(r: dict) -> str:
        rc = r["recaption"]
        if rc.get("missing"):
            return "missing"
        if rc.get("unchanged"):
            return "unchanged"
        return "same" if same(rc.get("instruction"), generated[r["pair_id"]]) else "differ"

    per_op: dict[str, Counter] = defaultdict(Counter)
    for r in rcs:
        per_op[r.get("operation") or "?"][kind(r)] += 1
    examples = [{"pair_id": r["pair_id"], "generated": generated[r["pair_id"]],
                 "recaptioned": r["recaption"]["instruction"]}
                for r in rcs if kind(r) == "differ"][:5]
    return {"recaption": {
        **counts(rcs, generated),
        "missing_reasons": _counts(Counter(r["recaption"]["missing"] for r in rcs
                                           if r["recaption"].get("missing"))),
        "model_requested": _counts(Counter(r["recaption"].get("model_requested")
                                           for r in rcs)),
        "models_reported": _counts(Counter(str(r["recaption"].get("model_reported"))
                                           for r in rcs)),
        "per_operation": {op: {k: c[k] for k in RECAPTION_KINDS}
                          for op, c in sorted(per_op.items())},
        "examples": examples}}


def recaption_lines(rc: dict) -> list[str]:
    """The markdown ``## Re-captioning`` section."""
    fmt = ", ".join
    lines = ["## Re-captioning", "",
             "Each pair that passed was shown to a vision-language model with its instruction; "
             "it wrote the instruction that describes what actually changed, or said nothing "
             "changed. Export keeps both instructions (`export.edit_prompt` picks which one "
             "`edit_prompt` shows). Picture: `verify_recaption.png`.", "",
             "| field | value |", "|---|---|",
             f"| model requested | {fmt(f'{m} ({n})' for m, n in rc['model_requested'].items())} |",
             f"| models reported | {fmt(f'{m} ({n})' for m, n in rc['models_reported'].items())} |",
             f"| pairs asked | {rc['asked']} |",
             f"| re-captioned | {rc['recaptioned']} ({rc['differ']} differ from the generated "
             "instruction) |",
             f"| unchanged (nothing changed) | {rc['unchanged']} |",
             "| missing, by reason | " + (fmt(f"{k} {v}" for k, v in
                                              rc["missing_reasons"].items()) or "none") + " |",
             ""]
    if rc["examples"]:
        lines += ["| generated | re-captioned |", "|---|---|",
                  *(f"| {e['generated']} | {e['recaptioned']} |" for e in rc["examples"]), ""]
    return lines


def plot_recaption(rc: dict, path: Path) -> None:
    """Re-captions per operation: like the generated instruction, unlike it, unchanged,
    missing (stacked bars); a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsbuild.core.records import write_figure

    ops = list(rc["per_operation"])
    fig, ax = plt.subplots(figsize=(7.0, 0.5 * len(ops) + 1.8))
    left = [0] * len(ops)
    colors = {"same": "#55a868", "differ": "#dd8452", "unchanged": "#c44e52",
              "missing": "#8c8c8c"}
    for k in RECAPTION_KINDS:
        vals = [rc["per_operation"][op][k] for op in ops]
        ax.barh(ops, vals, left=left, color=colors[k], label=k)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.set_xlabel("pairs re-captioned")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"re-captions: {rc['recaptioned']} of {rc['asked']}, {rc['differ']} differ "
                 f"from the generated instruction, {rc['unchanged']} unchanged", fontsize=9)
    fig.tight_layout()
    write_figure(path, fig)


def session_part(build: Build, recs: list[dict]) -> dict:
    """``sessions``: what the captions hold and the session runs of each length that the
    filter and verify leave (a turn passes when the filter kept it and verify did not reject
    it; per cut mode), per turn too; nothing for a build without sessions."""
    from dsbuild.core import sessions

    counts = sessions.tree_counts(build.records("captions", require=False))
    if not counts["sessions"]:
        return {}
    verdict = {r["pair_id"]: r.get("verdict") for r in recs}
    keep = {k: bool(v.get("keep")) for k, v in join.scores_by_pair(build).items()}
    pairs = [p for p in join.pairs_by_id(build).values() if p["id"] in keep]
    surv = sessions.survival(pairs, lambda p: keep[p["id"]] and p["id"] in verdict
                             and verdict[p["id"]] != "reject")
    return {"sessions": {"captions": counts,
                         "cut": getattr(build.config.export, "session_cut", "prefix"), **surv}}


def markdown(rep: dict) -> str:
    lines = [f"# Verify report ({rep['settings']['detector']})", "",
             "Pairs the filter kept, by group: `passed` pairs failed no check; each rejected "
             "pair counts once, under the reason of its first failed check.", "",
             "| group | pairs | passed | pass rate | top reject reasons |", "|---|---|---|---|---|"]
    rows = [("all", rep["overall"])]
    rows += [(f"operation {k}", v) for k, v in rep["per_operation"].items()]
    rows += [(f"agent {k}", v) for k, v in rep["per_agent"].items()]
    for name, t in rows:
        rate = "-" if t["pass_rate"] is None else f"{t['pass_rate']:.0%}"
        top = ", ".join(f"{k} {v}" for k, v in list(t["reasons"].items())[:3]) or "-"
        lines.append(f"| {name} | {t['pairs']} | {t['passed']} | {rate} | {top} |")
    lines += ["", "## Checks", "",
              "Every check runs on each pair it applies to; a pair passes when none fails, and "
              "is rejected with the reason of the first check that failed (in this order). A "
              "check that could not be made is \"not checked\" and never rejects.", "",
              "| check | asks | ran on | passed | failed | not checked | rejected by it |",
              "|---|---|---|---|---|---|---|"]
    ops = {k: v["pairs"] for k, v in rep["per_operation"].items()}
    for name, c in rep["checks"].items():
        scope = (f"pairs of operation {c['operation']}" if c["operation"] else "pairs")
        if not c["operation"] and c["ran"] == rep["overall"]["pairs"]:
            scope = "pairs (all)"
        elif c["operation"] and c["ran"] != ops.get(c["operation"]):
            scope += f" (of {ops.get(c['operation'], 0)}; the rest: unreadable images)"
        lines.append(f"| {check_label(name)} | {c.get('asks', '')} | {c['ran']} {scope} | "
                     f"{c['pass']} | {c['fail']} | {c['unchecked']} | {c['rejected']} |")
    lines += ["", "Not checked, by reason: "
              + (", ".join(f"{k} {v}" for k, v in rep["unchecked"].items()) or "none"), ""]
    if rep.get("judge"):
        lines += judge_lines(rep["judge"])
    if rep.get("recaption"):
        lines += recaption_lines(rep["recaption"])
    if rep.get("sessions"):
        from dsbuild.core import sessions

        ses = rep["sessions"]
        lines += ["## Sessions", "",
                  "Verify checks each turn on its own (input: the parent turn's image). A turn "
                  "passes when the filter kept it and verify did not reject it; it survives "
                  "when it passes and, under `prefix`, its parent turn survives; under `whole`, "
                  "only runs whose every turn passes survive.", "",
                  *sessions.survival_lines(ses["captions"], ses, ses["cut"])]
    return "\n".join(lines)


RED = (255, 40, 40)


def _thumb(path: Path, boxes: list[list[float]]):
    """The image fitted into THUMB×THUMB with ``boxes`` (its pixels) outlined in red."""
    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception:  # noqa: BLE001 - a broken image shows as grey
        return Image.new("RGB", (THUMB, THUMB), (90, 90, 90)), []
    scale = THUMB / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    drawn = []
    for box in boxes:
        rect = [round(v * scale) for v in box]
        rect[2], rect[3] = max(rect[2], rect[0] + 2), max(rect[3], rect[1] + 2)
        ImageDraw.Draw(im).rectangle(rect, outline=RED, width=2)
        drawn.append(rect)
    return im, drawn


def regions(rec: dict, present_min: float) -> tuple[list, list]:
    """The boxes verify checked, (on the input, on the output): a change's measured region
    on both, and where the detector saw each phrase (score at least ``present_min``)."""
    on_in: list[list[float]] = []
    on_out: list[list[float]] = []
    for c in rec.get("checks", []):
        if c.get("box"):
            on_in.append(list(c["box"]))
            on_out.append(list(c["box"]))
        for seen in c.get("seen") or []:
            for side, lst in (("input", on_in), ("output", on_out)):
                box, sc = seen.get(f"box_{side}"), seen.get(side)
                if box and sc is not None and sc >= present_min and list(box) not in lst:
                    lst.append(list(box))
    return on_in, on_out


def _pair_image(root: Path, pair: dict, boxes: tuple[list, list]):
    """Input | output of one pair in one cell, the regions drawn on each."""
    from PIL import Image

    a, ra = _thumb(root / pair["images"]["input"], boxes[0])
    b, rb = _thumb(root / pair["images"]["output"], boxes[1])
    cell = Image.new("RGB", (2 * THUMB + PAIR_GAP, THUMB), (255, 255, 255))
    cell.paste(a, ((THUMB - a.width) // 2, (THUMB - a.height) // 2))
    ox = THUMB + PAIR_GAP
    cell.paste(b, (ox + (THUMB - b.width) // 2, (THUMB - b.height) // 2))
    return cell, ra, rb


def reject_note(rec: dict, triple: dict | None) -> str:
    """What a reject says under its pair: the instruction, the reason and what was measured
    (only values that were measured)."""
    from dsbuild.core.grid import set_params

    failed = next((c for c in rec.get("checks", []) if c.get("pass") is False
                   and c.get("reason") == rec.get("reason")), {})
    seen = "; ".join(
        f"{x['phrase']}: " + ", ".join(f"{short} {x[side]:.2f}" for side, short in
                                       (("input", "in"), ("output", "out"))
                                       if x.get(side) is not None)
        for x in failed.get("seen") or [] if x.get("phrase"))
    measured = set_params({k: failed.get(k) for k in ("region_dir", "rest", "similarity")})
    judged = set_params(failed.get("scores") or {})
    edit = (triple or {}).get("edit")
    return "\n".join(x for x in (f"“{edit}”" if edit else "", f"reject: {rec.get('reason')}",
                                  seen, measured, judged) if x)


def contact_sheet(build: Build, recs: list[dict], path: Path) -> int:
    """Rejects per reason: each pair input | output with the region verify checked in red,
    its instruction, reason and measurements under it; returns how many pairs it shows."""
    from dsbuild.core.grid import Row, grid

    pairs = join.pairs_by_id(build)
    triples = join.triples_by_id(build)
    present_min = build.config.verify.present_min
    by_reason: dict[str, list[dict]] = defaultdict(list)
    total: Counter = Counter()
    for r in sorted(recs, key=lambda r: r["pair_id"]):
        if r.get("verdict") == "reject":
            total[r["reason"]] += 1
            if len(by_reason[r["reason"]]) < SHEET_PER_REASON:
                by_reason[r["reason"]].append(r)
    rows, drawn, shown = [], [], 0
    for reason, recs_of in sorted(by_reason.items()):
        images, notes = [], []
        for r in recs_of:
            p = pairs.get(r["pair_id"])
            if p is None:
                continue
            boxes = regions(r, present_min)
            cell, ra, rb = _pair_image(build.root, p, boxes)
            drawn.append({"pair_id": r["pair_id"], "row": len(rows), "cell": len(images),
                          "input": ra, "output": rb})
            images.append(cell)
            note = reject_note(r, triples.get(r.get("triple_id") or p.get("triple_id")))
            notes.append(note if any(boxes) else note + "\n(no region detected)")
            shown += 1
        n = total[reason]
        rows.append(Row(f"{reason}: {n} reject{'s' if n != 1 else ''}, {len(images)} shown",
                        images, notes))
    cols = max((len(r.images) for r in rows), default=1)
    title = (f"verify rejects ({build.config.verify.detector}): input | output, the region "
             "verify checked in red" if rows else "verify rejects: no rejects")
    sheet = grid(rows, cell=(2 * THUMB + PAIR_GAP, THUMB), title=title,
                 headers=["input | output"] * cols if rows else [], note_lines=6,
                 extra={"regions": drawn, "pair_gap": PAIR_GAP, "thumb": THUMB})
    write_image(path, sheet)
    return shown


def write_report(build: Build, records: list[dict] | None = None) -> dict:
    """Write reports/verify.{json,md} and verify_rejects.png; returns the report dict.

    ``records``: what to report on (default: every rank's, once the stage is done; a failed
    rank reports its own)."""
    recs = list(build.records("verify")) if records is None else records
    rep = verify_report(build, recs)
    out = build.reports_dir
    rep["contact_sheet_pairs"] = contact_sheet(build, recs, out / "verify_rejects.png")
    write_json(out / "verify.json", rep)
    write_text(out / "verify.md", markdown(rep))
    rep["files"] = [str(out / n) for n in ("verify.json", "verify.md", "verify_rejects.png")]
    if rep.get("judge"):
        plot_judge(rep["judge"], out / "verify_judge.png")
        rep["files"].append(str(out / "verify_judge.png"))
    if rep.get("recaption"):
        plot_recaption(rep["recaption"], out / "verify_recaption.png")
        rep["files"].append(str(out / "verify_recaption.png"))
    return rep


def summary(build: Build, result) -> list[str]:
    """What ``dsbuild verify`` prints after a rank: passed of checked, and the report once
    every rank is done."""
    st, lines = result.stats, []
    if st:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(st.get("reasons", {}).items()))
        lines.append(f"  passed {st.get('passed', 0)} of {st.get('pairs', 0)} pairs"
                     + (f" (rejected: {reasons})" if reasons else ""))
        rc = st.get("recaption")
        if rc:
            lines.append(f"  re-captioned {rc['recaptioned']} of {rc['asked']} passed pairs "
                         f"({rc['differ']} differ from the generated instruction, "
                         f"{rc['unchanged']} unchanged, {rc['missing']} missing)")
    if build.is_complete("verify"):
        lines.append(f"  report: {build.reports_dir / 'verify.md'}, "
                     f"{build.reports_dir / 'verify_rejects.png'}")
    else:
        lines.append("  report: written when every rank is done")
    return lines
