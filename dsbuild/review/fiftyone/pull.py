"""Curators' tags back as decisions: ``pull`` reads tags from *all* slices.

``select_group_slices``: tagging in the App tags only the active slice unless the curator
switched slices. One decision per tagged pair (tool ``fiftyone``): ``accept``/``reject`` is the
verdict, every other tag is kept as reason.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from dsbuild.core.decisions import PER_REVIEWER, VERDICTS, WITHDRAWN, add_decisions, make_decision
from dsbuild.review.fiftyone.dataset import (
    TOOL,
    all_slices,
    dataset_name,
    open_dataset,
    refresh_decisions,
)
from dsbuild.review.fiftyone.db import import_fiftyone


def tag_decisions(tags_by_pair: dict[str, set[str]], *, reviewer: str, dataset: str,
                  at: str | None = None) -> tuple[list[dict], dict]:
    """Turn each pair's tags into a decision: accept/reject is the verdict, others reasons."""
    out, stats = [], {"tagged": 0, "conflicting": [], "no_verdict": []}
    for pid in sorted(tags_by_pair):
        tags = tags_by_pair[pid]
        if not tags:
            continue
        stats["tagged"] += 1
        verdicts = sorted(tags & set(VERDICTS))
        reasons = sorted(tags - set(VERDICTS))
        if len(verdicts) > 1:
            stats["conflicting"].append(pid)
            continue
        if not verdicts:
            stats["no_verdict"].append(pid)
            continue
        out.append(make_decision(pid, verdicts[0], tool=TOOL, reviewer=reviewer,
                                 reason=", ".join(reasons) or None, at=at, dataset=dataset,
                                 tags=sorted(tags), source="tags", **{PER_REVIEWER: True}))
    return out, stats


def pull(build, name: str | None = None, reviewer: str | None = None) -> dict:
    """Write curators' tags (from every slice) as decisions; pulling twice adds nothing."""
    fo = import_fiftyone()
    name = dataset_name(build, name)
    ds = open_dataset(fo, build, name, create=False)
    pids, tags = all_slices(ds).values(["pair_id", "tags"])
    by_pair: dict[str, set[str]] = defaultdict(set)
    for pid, t in zip(pids, tags, strict=True):
        if pid:
            by_pair[pid].update(t or [])
    reviewer = reviewer or TOOL
    decisions, stats = tag_decisions(by_pair, reviewer=reviewer, dataset=name)
    # a snapshot of this reviewer's tags: a pair whose verdict tag is gone withdraws their
    # decision (an ambiguous pair, tagged both accept and reject, keeps it); verdicts given
    # through the plugin's operators are not tags and stay
    added = add_decisions(build, decisions, reviewer=reviewer,
                          withdraw=(TOOL, set(by_pair) - set(stats["conflicting"])))
    refreshed = refresh_decisions(ds, build)
    return {"name": name, "tagged_pairs": stats["tagged"], "decisions": len(decisions),
            "added": len(added), "conflicting": stats["conflicting"],
            "no_verdict": stats["no_verdict"], "refreshed_fields": refreshed,
            "withdrawn": sum(d["verdict"] == WITHDRAWN for d in added),
            "verdicts": dict(Counter(d["verdict"] for d in decisions))}
