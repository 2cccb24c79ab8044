"""The saved views of a build's dataset: what a curator opens first."""

from __future__ import annotations

import re

from dsbuild.review.fiftyone.dataset import INFO_KEY


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "none"


def queue_views(ds, queue: str = "export") -> dict:
    """The review queue's views: ``not-reviewed-yet`` (pairs without a verdict in force) and
    ``review-queue`` (unreviewed first), both by ``review_priority`` (highest first, then pair
    id). With ``queue`` ``export`` (``review.queue``) they hold only the pairs still headed for
    the export (no verify or review reject, kept by the filter, alive under the session cut);
    with ``all`` every sample, in sample order as before."""
    from fiftyone import ViewField as F

    if queue == "all":
        return {"not-reviewed-yet": ds.match(F("review") == None),  # noqa: E711
                "review-queue": ds.sort_by([(F("review") != None, 1)])}  # noqa: E711
    order = [("review_priority", -1), ("pair_id", 1)]
    headed = ds.match(F("headed") == True)  # noqa: E712
    return {"not-reviewed-yet": headed.match(F("review") == None).sort_by(order),  # noqa: E711
            "review-queue": headed.sort_by([(F("review") != None, 1), *order])}  # noqa: E711


def save_views(ds, queue: str = "export") -> list[str]:
    """(Re)write the saved views: kept, filtered out (all and per reason), lowest clip_sim_dir,
    no-change samples, the review queue (:func:`queue_views`: not reviewed yet, review queue),
    reviewers disagree, corrected, verify rejects (all and per reason, e.g.
    "verify-add-not-detected"; an inspection view, not the queue), per agent, per generator
    where the build mixes them, session pairs by run then turn ("sessions") where the build
    has sessions; drops our views that no longer apply."""
    from fiftyone import ViewField as F

    views = {
        "kept": ds.match(F("filter_keep") == True),  # noqa: E712 - a MongoDB expression
        "filtered-out": ds.match(F("filter_keep") == False).sort_by(  # noqa: E712
            "filter_reason"),
        "lowest-clip-sim-dir": ds.exists("clip_sim_dir").sort_by("clip_sim_dir"),
        "no-change": ds.match(F("no_change") == True),  # noqa: E712
        **queue_views(ds, queue),
        "reviewers-disagree": ds.match((F("review_agreement") != None)  # noqa: E711
                                       & (F("review_agreement") < 1)).sort_by(
                                           "review_agreement"),
        "corrected": ds.exists("corrected_edit"),
    }

    def unique(name: str) -> str:  # two reasons or agents may slug alike: keep both views
        n, out = 2, name
        while out in views:
            out, n = f"{name}-{n}", n + 1
        return out

    for reason in sorted(r for r in ds.distinct("filter_reason") if r):
        views[unique(f"filtered-{slug(reason)}")] = ds.match(F("filter_reason") == reason)
    if any(ds.distinct("verify")):  # verify ran: its rejects, all and per reason
        views["verify-rejected"] = ds.match(F("verify") == "reject").sort_by("verify_reason")
        for reason in sorted(r for r in ds.distinct("verify_reason") if r):
            views[unique(f"verify-{slug(reason)}")] = ds.match(F("verify_reason") == reason)
    for agent in sorted(a for a in ds.distinct("agent") if a):
        views[unique(f"agent-{slug(agent)}")] = ds.match(F("agent") == agent)
    if any(ds.distinct("session_run")):  # multi-turn sessions: by run, then turn
        views["sessions"] = ds.exists("session_run").sort_by(
            [("session_run", 1), ("turn", 1), ("node_id", 1)])
    made_by = sorted(g for g in ds.distinct("generator") if g)
    for gen in made_by if len(made_by) > 1 else []:  # a build that mixes generators
        views[unique(f"generator-{slug(gen)}")] = ds.match(F("generator") == gen)
    info = dict(ds.info or {})
    ours = info.get(INFO_KEY, {})
    for old in ours.get("views", []):
        if old not in views and ds.has_saved_view(old):
            ds.delete_saved_view(old)
    for vname, view in views.items():
        ds.save_view(vname, view, overwrite=True)
    info[INFO_KEY] = {**ours, "views": list(views)}
    ds.info = info
    ds.save()
    return list(views)
