"""The diversity gate: ``--fail-under`` / ``--fail-over`` thresholds, parsed and checked."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from dsbuild.core.errors import DsbuildError
from dsbuild.diversity.measures import ALIASES, FIELD_METRICS
from dsbuild.diversity.settings import TEXT_FIELDS


@dataclass(frozen=True)
class Check:
    """One threshold: ``[agent:NAME.|level:NAME.][field.]metric`` over or under a value."""

    key: str
    metric: str
    field: str | None
    scope: str | None  # "agent" | "level" | None
    group: str | None  # agent/level name or "*"
    bound: float
    under: bool  # True: fail when value < bound; False: fail when value > bound


def parse_check(spec: str, under: bool, fields: Iterable[str] = TEXT_FIELDS) -> Check:
    """Parse ``metric=value`` specs; an unknown metric or field is a DsbuildError."""
    opt = "--fail-under" if under else "--fail-over"
    if "=" not in spec:
        raise DsbuildError(f"{opt} {spec!r}: expected metric=value, e.g. {opt} mtld=30")
    key, raw = (s.strip() for s in spec.split("=", 1))
    try:
        bound = float(raw)
    except ValueError:
        raise DsbuildError(f"{opt} {spec!r}: {raw!r} is not a number") from None
    scope = group = None
    rest = key
    for prefix in ("agent:", "level:"):
        if key.startswith(prefix):
            scope = prefix[:-1]
            group, _, rest = key[len(prefix):].partition(".")
            if not group or not rest:
                raise DsbuildError(f"{opt} {spec!r}: expected {prefix}NAME.[field.]metric")
    parts = rest.split(".")
    if len(parts) > 2:
        raise DsbuildError(f"{opt} {spec!r}: expected [agent:NAME.|level:NAME.][field.]metric")
    metric = ALIASES.get(parts[-1].lower(), parts[-1].lower())
    if metric not in FIELD_METRICS:
        raise DsbuildError(f"{opt} {spec!r}: unknown metric {parts[-1]!r}; known: "
                           f"{', '.join(FIELD_METRICS)}")
    fname = parts[0] if len(parts) == 2 else None
    fields = list(fields)
    if fname is not None and fname not in fields:
        raise DsbuildError(f"{opt} {spec!r}: unknown field {fname!r}; known: {', '.join(fields)}")
    if metric == "semantic" and scope:
        raise DsbuildError(f"{opt} {spec!r}: semantic diversity is measured per field overall "
                           "only")
    return Check(key, metric, fname, scope, group, bound, under)


def _gate_value(m: dict, metric: str) -> float | None:
    value = m.get(metric)
    if value is None and metric == "dugast" and m.get("tokens") and m["tokens"] == m["types"]:
        return math.inf  # every word unique: U² grows without bound as t -> w
    return value


def apply_gate(report: dict, checks: list[Check]) -> tuple[list[str], int]:
    """Lines for every threshold a build misses, and how many comparisons were made."""
    misses: list[str] = []
    n = 0
    for b in report["builds"]:
        for c in checks:
            fields = [c.field] if c.field else list(b["fields"])
            op, opt = ("<", "--fail-under") if c.under else (">", "--fail-over")
            rule = f"({opt} {c.key}={c.bound:g})"
            for fname in fields:
                f = b["fields"][fname]
                if c.scope is None:
                    groups = [("", f["overall"])]
                else:
                    table = f[c.scope + "s"]
                    if c.group == "*":
                        names = sorted(table)
                        if not names:  # a build without triples must not pass a per-agent gate
                            n += 1
                            misses.append(f"FAIL {b['name']} {c.scope}:*.{fname}.{c.metric}: "
                                          f"no {c.scope}s (no triples) {rule}")
                            continue
                    elif c.group in table:
                        names = [c.group]
                    else:
                        raise DsbuildError(
                            f"{c.key}: build '{b['name']}' has no {c.scope} {c.group!r}; it has "
                            f"{', '.join(sorted(table)) or 'none'}")
                    groups = [(f"{c.scope}:{g}.", table[g]) for g in names]
                for prefix, m in groups:
                    n += 1
                    where = f"{b['name']} {prefix}{fname}.{c.metric}"
                    value = _gate_value(m, c.metric)
                    if value is None:
                        why = ("no words" if not m.get("tokens") else
                               "not measured (pass --semantic)" if c.metric == "semantic"
                               else "no value")
                        misses.append(f"FAIL {where}: {why} {rule}")
                    elif (value < c.bound) if c.under else (value > c.bound):
                        misses.append(f"FAIL {where} = {value:.4g} {op} {c.bound:g} {rule}")
    return misses, n
