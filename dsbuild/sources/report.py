"""The sources stage's report (reports/sources.json and .md): photos kept, refused per reason
with the files named, captions by origin, licenses; and the lines ``dsbuild sources``
prints."""

from __future__ import annotations

from dsbuild.core.records import write_json, write_text

WHY = {"duplicate": "exact duplicate (same file bytes)", "unreadable": "not a readable image",
       "small": "smaller than the generation size", "unknown_license":
       "unknown license (sources.require_license)", "near_duplicate":
       "near-duplicate (perceptual hash)", "caption": "no usable VLM caption"}


def report(build) -> dict:
    marks = build.markers("sources")
    stats = marks[0].get("stats", {}) if 0 in marks else {}
    return {"photos": stats.get("photos", 0), "refused": stats.get("refused", {}),
            "refused_files": stats.get("refused_files", {}),
            "captions": stats.get("captions", {}), "licenses": stats.get("licenses", {}),
            "size": stats.get("size"), "fit": stats.get("fit"),
            **({"requests": stats["requests"]} if "requests" in stats else {})}


def _detail(item: dict) -> str:
    rest = {k: v for k, v in item.items() if k != "file"}
    return f"`{item['file']}`" + (f" ({', '.join(f'{k}: {v}' for k, v in rest.items())})"
                                  if rest else "")


def write_report(build) -> dict:
    rep = report(build)
    write_json(build.reports_dir / "sources.json", rep)
    lines = ["# Sources", "", f"- photos kept: {rep['photos']}"
             + (f" at {rep['size'][0]}x{rep['size'][1]} ({rep['fit']})" if rep["size"] else ""),
             f"- captions: {', '.join(f'{k}: {v}' for k, v in rep['captions'].items()) or '-'}",
             f"- licenses: {', '.join(f'{k}: {v}' for k, v in rep['licenses'].items()) or '-'}"]
    for reason, items in rep["refused_files"].items():
        lines += ["", f"## Refused: {WHY.get(reason, reason)} ({len(items)})", ""]
        lines += [f"- {_detail(i)}" for i in items]
    write_text(build.reports_dir / "sources.md", "\n".join(lines) + "\n")
    return rep


def summary(build, result) -> list[str]:
    """What ``dsbuild sources`` prints after its run."""
    rep = result.report or report(build)
    lines = [result.stats.get("summary", f"{rep['photos']} photos")]
    for reason, items in rep.get("refused_files", {}).items():
        names = ", ".join(i["file"] for i in items[:3]) + (" ..." if len(items) > 3 else "")
        lines.append(f"  refused ({WHY.get(reason, reason)}): {names}")
    return [*lines, f"report: {build.reports_dir / 'sources.md'}"]
