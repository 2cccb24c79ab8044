"""What survives to the export, one definition for every reader: export's policy, the review
queue (FiftyOne's views, ``review push``), the survival funnel (``dsbuild status``, the card)
and the design tree.

:func:`left_out` says why the export's policy drops one joined row; :func:`headed` applies it
with the session cut (a turn survives only with its parent turn); :func:`mark` fills a row's
``headed`` and ``review_priority`` fields, which :func:`dsbuild.core.join.rows` calls for every
reader. :func:`priority` orders the review queue by how much a curator's verdict is worth.
"""

from __future__ import annotations

from collections.abc import Iterable

from dsbuild.core import sessions

# a review's worth: an unreviewed pair first, then the judge near its threshold and signals
# that disagree (CLIP's rank, verify, the judge)
UNREVIEWED = 2.0
NEAR = 0.25  # a judge score this far from its threshold counts as not near at all


def left_out(row: dict, policy: str = "kept", prompt: str = "generated") -> str | None:
    """Why the export's policy leaves an edit row out (``filter``: not kept, ``verify`` or
    ``review``: rejected, ``recaption``: ``prompt`` recaptioned and the re-captioner saw no
    change, ``not_accepted``: policy ``accepted`` without an accept), else None. The predicate
    :func:`dsbuild.core.sessions.cut` applies per turn."""
    if not row["filter_keep"]:
        return "filter"
    if row["verify"] == "reject":
        return "verify"
    if row["review"] == "reject":
        return "review"
    if prompt == "recaptioned" and row.get("recaption_unchanged") and not row.get(
            "corrected_edit"):
        return "recaption"
    if policy == "accepted" and row["review"] != "accept":
        return "not_accepted"
    return None


def headed(rows: Iterable[dict], cut: str = "prefix", prompt: str = "generated") -> set[str]:
    """Pair ids of the edit rows still headed for the export: not left out under policy
    ``kept`` (a pending review may still accept a pair, so ``accepted`` does not narrow this)
    and alive under the session cut ``cut``."""
    rows = [r for r in rows if not r.get("no_change")]
    return sessions.cut(rows, lambda r: left_out(r, "kept", prompt) is None, cut,
                        key="pair_id")


def priority(row: dict) -> float:
    """What a curator's verdict on this row is worth (higher: review sooner).

    - ``UNREVIEWED`` (2) when no curator has a verdict in force;
    - up to 1 for a judge score near its threshold (1 at the threshold, 0 at ``NEAR`` away or
      further), 0.5 where the judge ran but its score is missing;
    - up to 1 for disagreement between the signals that exist: CLIP (the filter kept the pair;
      a low ``filter_rank`` counts as confident), verify's verdict and the judge's.
    """
    out = UNREVIEWED if row.get("review") is None else 0.0
    score, thr = row.get("judge_score"), row.get("judge_threshold")
    if score is not None and thr is not None:
        out += max(0.0, 1.0 - abs(score - thr) / NEAR)
    elif row.get("judge_missing"):
        out += 0.5
    votes = [v for v in (
        None if row.get("filter_keep") is None else bool(row["filter_keep"]),
        None if row.get("verify") is None else row["verify"] == "pass",
        row.get("judge_pass")) if v is not None]
    if votes:
        out += min(votes.count(True), votes.count(False)) * 2 / len(votes)
    return round(out, 4)


def mark(rows: list[dict], cut: str = "prefix", prompt: str = "generated") -> list[dict]:
    """Fill ``headed`` and ``review_priority`` of every row (in place; returns ``rows``).
    No-change samples are headed when their source pair is."""
    alive = headed(rows, cut, prompt)
    for r in rows:
        src = r.get("source_pair_id") if r.get("no_change") else r["pair_id"]
        r["headed"] = src in alive
        r["review_priority"] = priority(r)
    return rows
