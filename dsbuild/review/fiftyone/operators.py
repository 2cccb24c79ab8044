"""What the dsbuild FiftyOne plugin does: give verdicts from inside the App, and how FiftyOne
finds the plugin.

The plugin (``plugin/``: ``fiftyone.yml`` and its operators, registered by ``build_dataset``)
calls :func:`give_verdict`, which writes one decision per pair for the reviewer
(``$DSBUILD_REVIEWER``, ``review.reviewer`` or ``$USER``); each reviewer holds their own
verdict and the decision in force follows the Label Studio agreement rule
(dsbuild.core.decisions).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from dsbuild.core.decisions import (
    PER_REVIEWER,
    VERDICTS,
    add_decisions,
    current_by_slot,
    make_decision,
    read_decisions,
)
from dsbuild.core.errors import DsbuildError
from dsbuild.review.fiftyone.dataset import INFO_KEY, TOOL, all_slices, refresh_decisions


def plugin_dir() -> Path:
    """The dsbuild FiftyOne plugin shipped in the package (fiftyone.yml + operators)."""
    return Path(__file__).resolve().parent / "plugin"


def register_plugin(fo) -> Path:
    """Make FiftyOne find the dsbuild plugin: a link ``<plugins_dir>/dsbuild`` to the package's
    copy (a copy where links are not allowed), ``plugins_dir`` being $FIFTYONE_PLUGINS_DIR or
    FiftyOne's default; returns the link. Re-running points it at this installation."""
    root = Path(fo.config.plugins_dir).expanduser()
    link, src = root / "dsbuild", plugin_dir()
    root.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() == src:
        return link
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(src, target_is_directory=True)
    except OSError:
        shutil.copytree(src, link, ignore=shutil.ignore_patterns("__pycache__"))
    return link


def reject_reasons() -> list[tuple[str, str]]:
    """(value, label) of the reject reasons the Label Studio pair config offers."""
    import xml.etree.ElementTree as ET

    from dsbuild.core.resources import bundled_file

    root = ET.parse(bundled_file("label_config", "pair_review.xml")).getroot()
    for choices in root.iter("Choices"):
        if choices.get("name") == "reason":
            return [(c.get("value"), c.get("html") or c.get("value"))
                    for c in choices.iter("Choice")]
    raise DsbuildError("label_config/pair_review.xml has no <Choices name=\"reason\">")


def reviewer_name(build, given: str | None = None) -> str:
    """Who is reviewing: ``given``, else $DSBUILD_REVIEWER, review.reviewer, $USER."""
    for name in (given, os.environ.get("DSBUILD_REVIEWER"), build.config.review.reviewer,
                 os.environ.get("USER"), os.environ.get("USERNAME")):
        if name and str(name).strip():
            return str(name).strip()
    raise DsbuildError(f"no reviewer name: set DSBUILD_REVIEWER, or review.reviewer in "
                       f"{build.root / 'dsbuild.yaml'}")


def build_of(ds):
    """The build a dsbuild dataset was made from (its info names the folder)."""
    from dsbuild.core.build import Build

    root = (ds.info or {}).get(INFO_KEY, {}).get("build")
    if not root:
        raise DsbuildError(f"FiftyOne dataset '{ds.name}' was not made by `dsbuild inspect`")
    return Build.open(root)


def pairs_of(ds, sample_ids: list[str]) -> list[str]:
    """The pairs of the given samples (of any slice), in order, each once."""
    if not sample_ids:
        return []
    pids = all_slices(ds).select(sample_ids).values("pair_id")
    return list(dict.fromkeys(p for p in pids if p))


def give_verdict(ds, sample_ids: list[str], verdict: str, *, reviewer: str | None = None,
                 reason: str | None = None, corrected_edit: str | None = None) -> dict:
    """The plugin's operators: one decision per pair of ``sample_ids`` for the reviewer.

    ``accept`` keeps a correction the reviewer gave the pair before; ``correct`` is an accept
    with ``corrected_edit`` (the instruction the pair really shows). The dataset's decision
    fields are refreshed at once.
    """
    if verdict not in (*VERDICTS, "correct"):
        raise DsbuildError(f"verdict must be accept, reject or correct, got {verdict!r}")
    if verdict == "reject":
        known = [v for v, _ in reject_reasons()]
        if reason is not None and reason not in known:
            raise DsbuildError(f"unknown reject reason {reason!r}; one of {', '.join(known)}")
    if verdict == "correct" and not (corrected_edit or "").strip():
        raise DsbuildError("a correction needs the corrected instruction")
    build = build_of(ds)
    pids = pairs_of(ds, sample_ids)
    if not pids:
        raise DsbuildError("no pair chosen: select pairs in the grid or open one")
    who = reviewer_name(build, reviewer)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    current = current_by_slot(read_decisions(build))
    decisions = []
    for pid in pids:
        fix = corrected_edit.strip() if verdict == "correct" else None
        if verdict == "accept":
            fix = (current.get((pid, TOOL, who)) or {}).get("corrected_edit")
        decisions.append(make_decision(
            pid, "reject" if verdict == "reject" else "accept", tool=TOOL, reviewer=who,
            reason=reason if verdict == "reject" else None, corrected_edit=fix, at=at,
            dataset=ds.name, source="operator", **{PER_REVIEWER: True}))
    added = add_decisions(build, decisions)
    refreshed = refresh_decisions(ds, build)
    return {"pairs": len(pids), "added": len(added), "reviewer": who,
            "refreshed_fields": refreshed}
