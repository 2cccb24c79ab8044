"""The verify report: pass rates per operation and per agent, rejects per reason, checks that
could not be made, and a contact sheet of rejects per reason.

Writes ``reports/verify.json`` (everything), ``verify.md`` (tables for people) and
``verify_rejects.png``: one row per reject reason, up to ``SHEET_PER_REASON`` pairs each, input
beside output with the detected region drawn.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from dsbuild.core import join
from dsbuild.core.build import Build
from dsbuild.core.records import write_image, write_json, write_text

SHEET_PER_REASON = 6
THUMB = 128


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 4) if d else None


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
    per_check: dict[str, Counter] = defaultdict(Counter)
    unchecked: Counter = Counter()
    for r in recs:
        by_op[r.get("operation") or "?"].append(r)
        by_agent[r.get("agent") or "?"].append(r)
        for c in r.get("checks", []):
            state = {True: "pass", False: "fail", None: "unchecked"}[c.get("pass")]
            per_check[c["name"]][state] += 1
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
        "checks": {k: dict(v) for k, v in sorted(per_check.items())},
        "unchecked": dict(unchecked.most_common()),
        "target_sources": dict(sources.most_common()),
    }


def markdown(rep: dict) -> str:
    lines = [f"# Verify report ({rep['settings']['detector']})", "",
             "| group | pairs | passed | pass rate | top reject reasons |", "|---|---|---|---|---|"]
    rows = [("all", rep["overall"])]
    rows += [(f"operation {k}", v) for k, v in rep["per_operation"].items()]
    rows += [(f"agent {k}", v) for k, v in rep["per_agent"].items()]
    for name, t in rows:
        rate = "-" if t["pass_rate"] is None else f"{t['pass_rate']:.0%}"
        top = ", ".join(f"{k} {v}" for k, v in list(t["reasons"].items())[:3]) or "-"
        lines.append(f"| {name} | {t['pairs']} | {t['passed']} | {rate} | {top} |")
    lines += ["", "Checks: " + "; ".join(f"{k}: " + ", ".join(f"{s} {n}" for s, n in v.items())
                                         for k, v in rep["checks"].items()),
              "", "Not checked: " + (", ".join(f"{k} {v}" for k, v in rep["unchecked"].items())
                                     or "none"), ""]
    return "\n".join(lines)


def _thumb(path: Path, box: list[float] | None):
    from PIL import Image, ImageDraw

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except Exception:  # noqa: BLE001 - a broken image shows as grey
        return Image.new("RGB", (THUMB, THUMB), (90, 90, 90))
    scale = THUMB / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    if box:
        ImageDraw.Draw(im).rectangle([v * scale for v in box], outline=(255, 40, 40), width=2)
    return im


def _box(rec: dict) -> list[float] | None:
    for c in rec.get("checks", []):
        if c.get("box"):
            return c["box"]
    return None


def contact_sheet(build: Build, recs: list[dict], path: Path) -> int:
    """Rejects per reason, input | output; returns how many pairs it shows."""
    from PIL import Image, ImageDraw

    pairs = join.pairs_by_id(build)
    by_reason: dict[str, list[dict]] = defaultdict(list)
    total: Counter = Counter()
    for r in sorted(recs, key=lambda r: r["pair_id"]):
        if r.get("verdict") == "reject":
            total[r["reason"]] += 1
            if len(by_reason[r["reason"]]) < SHEET_PER_REASON:
                by_reason[r["reason"]].append(r)
    label_h, pad = 14, 4
    cell_w = 2 * THUMB + pad
    width = max(1, len(max(by_reason.values(), key=len, default=[None]))) * (cell_w + pad) + pad
    height = max(1, len(by_reason)) * (THUMB + label_h + pad) + pad
    sheet = Image.new("RGB", (max(width, 320), height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if not by_reason:
        draw.text((pad, pad), "no rejects", fill=(0, 0, 0))
    y, shown = pad, 0
    for reason, rows in sorted(by_reason.items()):
        draw.text((pad, y), f"{reason}: {total[reason]} rejects ({len(rows)} shown, input | "
                  "output, region in red)", fill=(0, 0, 0))
        x = pad
        for r in rows:
            p = pairs.get(r["pair_id"])
            if p is None:
                continue
            box = _box(r)
            sheet.paste(_thumb(build.root / p["images"]["input"], box), (x, y + label_h))
            sheet.paste(_thumb(build.root / p["images"]["output"], box),
                        (x + THUMB + pad // 2, y + label_h))
            x += cell_w + pad
            shown += 1
        y += THUMB + label_h + pad
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
    return rep


def summary(build: Build, result) -> list[str]:
    """What ``dsbuild verify`` prints after a rank: passed of checked, and the report once
    every rank is done."""
    st, lines = result.stats, []
    if st:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(st.get("reasons", {}).items()))
        lines.append(f"  passed {st.get('passed', 0)} of {st.get('pairs', 0)} pairs"
                     + (f" (rejected: {reasons})" if reasons else ""))
    if build.is_complete("verify"):
        lines.append(f"  report: {build.reports_dir / 'verify.md'}, "
                     f"{build.reports_dir / 'verify_rejects.png'}")
    else:
        lines.append("  report: written when every rank is done")
    return lines
