"""How far the judge agrees with the curators, from joined rows (the math only: verify's
``report judge`` writes it out, the dataset card and eval read it).

A pair counts when the judge scored it (``judge_score`` not None) and a curator's verdict is in
force (``review`` accept or reject). The judge's verdict (``judge_pass``) is one rater, the
curator's the other: :class:`Confusion` holds the 2x2 table, :func:`cohen_kappa` Cohen's κ. A
missing judge score (a bad, refused or failed reply) is counted apart, never as a 0 and never as
a reject.

The threshold that best matches the curators is searched over the distinct weighted scores of
the counted pairs and the current threshold: at a threshold ``t`` a pair passes when its score reaches ``t`` and no
criterion minimum failed. Rows do not carry the minimums, but the judge's verdict tells:
:meth:`dsbuild.llm.rubric.Rubric.failed` checks minimums first, so a pair that failed at a score
at or above its threshold failed a minimum, and fails at every threshold.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

VERDICTS = ("accept", "reject")
BINS = 11  # per-criterion histograms: one bin per integer score 0..10
DEGENERATE = ("undefined: judge and curators each gave every pair the same one verdict, so "
              "chance explains all agreement (p_e = 1, κ = 0/0)")


@dataclass(frozen=True)
class Confusion:
    """The 2x2 table: judge pass/reject × curator accept/reject."""

    pass_accept: int = 0
    pass_reject: int = 0
    reject_accept: int = 0
    reject_reject: int = 0

    @classmethod
    def of(cls, pairs: Iterable[tuple[bool, bool]]) -> Confusion:
        """From (judge passed, curator accepted) per pair."""
        c = Counter((bool(j), bool(a)) for j, a in pairs)
        return cls(c[True, True], c[True, False], c[False, True], c[False, False])

    @property
    def n(self) -> int:
        return self.pass_accept + self.pass_reject + self.reject_accept + self.reject_reject

    @property
    def agreement(self) -> float | None:
        """p_o: the share of pairs where judge pass == curator accept (None: no pair)."""
        return (self.pass_accept + self.reject_reject) / self.n if self.n else None

    @property
    def expected(self) -> float | None:
        """p_e: the agreement two raters with these marginals reach by chance."""
        n = self.n
        if not n:
            return None
        judge_pass, accept = (self.pass_accept + self.pass_reject) / n, \
            (self.pass_accept + self.reject_accept) / n
        return judge_pass * accept + (1 - judge_pass) * (1 - accept)

    @property
    def kappa(self) -> float | None:
        return cohen_kappa(self)

    def as_dict(self) -> dict:
        return {"pass_accept": self.pass_accept, "pass_reject": self.pass_reject,
                "reject_accept": self.reject_accept, "reject_reject": self.reject_reject}


def cohen_kappa(table: Confusion) -> float | None:
    """Cohen's κ = (p_o - p_e) / (1 - p_e).

    None where it is undefined: no pair, or p_e == 1 — both raters gave every pair one and
    the same verdict (all pass/accept or all reject/reject), so 0/0 (:data:`DEGENERATE`;
    sklearn's ``cohen_kappa_score`` gives nan there). Raters that each used one verdict but
    different ones have p_e = 0 and κ = 0."""
    p_o, p_e = table.agreement, table.expected
    if p_o is None or p_e is None or math.isclose(p_e, 1.0):
        return None
    return (p_o - p_e) / (1 - p_e)


# κ and agreement are rounded to this many places once, here; every printer shows them with as
# many places, so no value is rounded twice (0.23249 -> 0.2325 -> "0.233")
PLACES = 4


def _r(v: float | None, nd: int = PLACES) -> float | None:
    return None if v is None else round(v, nd)


def shown(v: float | None, nd: int = PLACES, none: str = "undefined") -> str:
    """A report value as printed: at the places it was rounded to; ``none`` for None (κ is
    undefined where p_e = 1)."""
    return none if v is None else f"{v:.{nd}f}"


def _scores(row: dict) -> dict[str, float]:
    raw = row.get("judge_scores")
    if not raw:
        return {}
    try:
        out = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError):
        return {}
    return {k: float(v) for k, v in out.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def min_failed(row: dict) -> bool:
    """The judge failed this pair on a criterion minimum (at any threshold it fails)."""
    thr = row.get("judge_threshold") or 0.0
    return row.get("judge_pass") is False and row["judge_score"] >= thr


def passes_at(row: dict, threshold: float) -> bool:
    """The judge's verdict on a scored row had its threshold been ``threshold``."""
    return not min_failed(row) and row["judge_score"] >= threshold


def counted(rows: Iterable[dict]) -> list[dict]:
    """The rows both judged (a weighted score) and decided (accept or reject in force)."""
    return [r for r in rows if r.get("judge_score") is not None
            and r.get("review") in VERDICTS and r.get("judge_pass") is not None]


def _curve(both: list[dict], current: float) -> list[dict]:
    """κ and agreement at each candidate threshold: the distinct scores, and the current
    threshold (so that where it is as good as any, it is the best: nothing to change)."""
    out = []
    for t in sorted({r["judge_score"] for r in both} | ({current} if both else set())):
        c = Confusion.of((passes_at(r, t), r["review"] == "accept") for r in both)
        out.append({"threshold": t, "kappa": _r(c.kappa), "agreement": _r(c.agreement),
                    "passed": c.pass_accept + c.pass_reject})
    return out


def best_threshold(curve: list[dict], current: float) -> dict | None:
    """The curve's point with the highest κ (an undefined κ ranks below every number); ties:
    the threshold nearest ``current``, then the lower one. None for an empty curve."""
    if not curve:
        return None
    top = max((p["kappa"] for p in curve if p["kappa"] is not None), default=None)
    ties = [p for p in curve if p["kappa"] == top]
    return min(ties, key=lambda p: (abs(p["threshold"] - current), p["threshold"]))


def _distribution(vals: list[float]) -> dict:
    hist = [0] * BINS
    for v in vals:
        hist[min(BINS - 1, max(0, int(round(v))))] += 1
    return {"n": len(vals), "mean": _r(sum(vals) / len(vals), 3) if vals else None,
            "hist": hist}


def calibrate(rows: Iterable[dict]) -> dict:
    """The judge against the curators on joined rows: counts, agreement, κ, the confusion
    table, per-criterion score distributions for accepted and rejected pairs, the κ of every
    candidate threshold and the best one."""
    rows = [r for r in rows if not r.get("no_change")]
    judged = [r for r in rows if r.get("judge_score") is not None]
    ran = [r for r in rows if r.get("judge_score") is not None or r.get("judge_missing")]
    ran_ids = {id(r) for r in ran}
    decided = [r for r in rows if r.get("review") in VERDICTS]
    both = counted(rows)
    missing = Counter(r["judge_missing"] for r in decided
                      if r.get("judge_score") is None and r.get("judge_missing"))
    table = Confusion.of((r["judge_pass"], r["review"] == "accept") for r in both)
    thresholds = Counter(r["judge_threshold"] for r in ran if r.get("judge_threshold")
                         is not None)
    current = thresholds.most_common(1)[0][0] if thresholds else 0.0
    curve = _curve(both, current)
    best = best_threshold(curve, current)
    names = sorted({k for r in both for k in _scores(r)})
    criteria = {}
    for name in names:
        criteria[name] = {v: _distribution([_scores(r)[name] for r in both
                                            if r["review"] == v and name in _scores(r)])
                          for v in VERDICTS}
    criteria["weighted"] = {v: {"n": sum(r["review"] == v for r in both),
                                "mean": _r(_mean([r["judge_score"] for r in both
                                                  if r["review"] == v]))}
                            for v in VERDICTS}
    kappa = table.kappa
    return {
        "counts": {"rows": len(rows), "judge_ran": len(ran), "judged": len(judged),
                   "missing": len(ran) - len(judged), "decided": len(decided),
                   "pairs": len(both), "decided_missing": sum(missing.values()),
                   "decided_not_judged": sum(1 for r in decided if id(r) not in ran_ids),
                   "judged_undecided": len(judged) - len(both)},
        "missing_reasons": dict(missing.most_common()),
        "agreement": _r(table.agreement), "kappa": _r(kappa),
        "kappa_note": DEGENERATE if kappa is None and table.n else None,
        "expected_agreement": _r(table.expected),
        "confusion": table.as_dict(),
        "threshold": {"current": current,
                      "best": best["threshold"] if best else None,
                      "best_kappa": best["kappa"] if best else None,
                      "best_agreement": best["agreement"] if best else None,
                      "curve": curve},
        "criteria": criteria,
        "models": dict(Counter(r.get("judge_model") or "?" for r in ran).most_common()),
    }


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None
