"""The diversity gate: ``--fail-under`` / ``--fail-over`` thresholds and the ``--baseline``
comparison (``--max-drop``), parsed and checked; every miss is a dict (``gate.misses``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dsbuild.core.errors import DsbuildError
from dsbuild.diversity.measures import ALIASES, DIRECTION, FIELD_METRICS
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


def _miss_entry(build: str, key: str, value: float | None, bound: float, kind: str, rule: str,
                why: str | None = None, **extra) -> dict:
    """One check's outcome as the JSON holds it (``gate.misses`` keeps the missed ones)."""
    out = {"key": key, "build": build, "value": value, "bound": bound, "kind": kind,
           "rule": rule, **extra}
    if why is not None:
        out["reason"] = why
    return out


UNBOUNDED = "unbounded (every word unique)"


def _json_value(value: float | None) -> tuple[float | None, str | None]:
    """A value JSON can hold: +inf (U² of all-unique text) becomes null with a reason."""
    if value is not None and math.isinf(value):
        return None, UNBOUNDED
    return value, None


def apply_gate(report: dict, checks: list[Check]) -> tuple[list[dict], list[dict]]:
    """Every threshold comparison, in the order of the checks, as a dict with ``passed``; the
    ones that did not pass are ``gate.misses`` (:func:`miss_line` prints one)."""
    results: list[dict] = []
    for b in report["builds"]:
        for c in checks:
            fields = [c.field] if c.field else list(b["fields"])
            kind = "fail-under" if c.under else "fail-over"
            rule = f"--{kind} {c.key}={c.bound:g}"
            for fname in fields:
                f = b["fields"][fname]
                if c.scope is None:
                    groups = [("", f["overall"])]
                else:
                    table = f[c.scope + "s"]
                    if c.group == "*":
                        names = sorted(table)
                        if not names:  # a build without triples must not pass a per-agent gate
                            results.append(_miss_entry(
                                b["name"], f"{c.scope}:*.{fname}.{c.metric}", None, c.bound,
                                kind, rule, f"no {c.scope}s (no triples)", passed=False))
                            continue
                    elif c.group in table:
                        names = [c.group]
                    else:
                        raise DsbuildError(
                            f"{c.key}: build '{b['name']}' has no {c.scope} {c.group!r}; it has "
                            f"{', '.join(sorted(table)) or 'none'}")
                    groups = [(f"{c.scope}:{g}.", table[g]) for g in names]
                for prefix, m in groups:
                    key = f"{prefix}{fname}.{c.metric}"
                    value = _gate_value(m, c.metric)
                    if value is None:
                        why = ("no words" if not m.get("tokens") else
                               "not measured (pass --semantic)" if c.metric == "semantic"
                               else "no value")
                        results.append(_miss_entry(b["name"], key, None, c.bound, kind, rule,
                                                   why, passed=False))
                        continue
                    passed = not ((value < c.bound) if c.under else (value > c.bound))
                    shown, why = _json_value(value)
                    results.append(_miss_entry(b["name"], key, shown, c.bound, kind, rule, why,
                                               passed=passed))
    return results


# ----------------------------------------------------------------------------- the baseline


@dataclass(frozen=True)
class Margin:
    """How much worse than the baseline a value may get: a share of the baseline's value
    (``2%``) or an amount in the metric's own units (``0.5``)."""

    amount: float
    relative: bool
    text: str

    def bound(self, base: float, direction: int) -> float:
        """The worst value that still passes, for a metric of this direction."""
        slack = abs(base) * self.amount if self.relative else self.amount
        return base - direction * slack


DEFAULT_MAX_DROP = "2%"


def parse_margin(text: str, opt: str = "--max-drop") -> Margin:
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        amount = float(raw[:-1] if relative else raw)
    except ValueError:
        raise DsbuildError(f"{opt} {text!r}: expected a share like 2% or an amount like 0.5")\
            from None
    if not math.isfinite(amount) or amount < 0:
        raise DsbuildError(f"{opt} {text!r}: the margin must be 0 or more")
    return Margin(amount / 100 if relative else amount, relative, raw)


def parse_max_drop(specs: Iterable[str]) -> dict[str, Margin]:
    """``--max-drop`` values: ``2%`` / ``0.5`` for every metric, ``METRIC=2%`` for one; the
    result maps a metric (or ``*``) to its margin, ``*`` defaulting to 2%."""
    out = {"*": parse_margin(DEFAULT_MAX_DROP)}
    for spec in specs:
        if "=" in spec:
            name, raw = (s.strip() for s in spec.split("=", 1))
            metric = ALIASES.get(name.lower(), name.lower())
            if metric not in DIRECTION:
                raise DsbuildError(
                    f"--max-drop {spec!r}: {name!r} is not a metric with a better direction; "
                    f"known: {', '.join(DIRECTION)}")
            out[metric] = parse_margin(raw, f"--max-drop {metric}=")
        else:
            out["*"] = parse_margin(spec)
    return out


def margins_text(margins: dict[str, Margin]) -> str:
    """``2%`` or ``2%, mtld=5%``: the margins as the user would write them."""
    return ", ".join([margins["*"].text] + [f"{k}={m.text}" for k, m in margins.items()
                                            if k != "*"])


@dataclass(frozen=True)
class Baseline:
    """An earlier run's diversity.json (e.g. main's), read and checked."""

    path: str
    report: dict


def load_baseline(path: str | Path) -> Baseline:
    """Read a diversity report to compare against; anything else is a one-line DsbuildError
    naming the file."""
    p = Path(path)
    where = f"--baseline {p}"
    if p.is_dir():
        hint = p / "reports" / "diversity.json"
        raise DsbuildError(f"{where} is a folder; give a report file"
                           + (f", e.g. {hint}" if hint.exists() else " (a diversity.json)"))
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DsbuildError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DsbuildError(f"{where}: cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DsbuildError(f"{where}: not JSON ({exc.msg} at line {exc.lineno}); expected the "
                           "diversity.json that `dsbuild report diversity` writes") from None
    if not _is_report(data):
        raise DsbuildError(f"{where}: not a diversity report (expected the diversity.json that "
                           "`dsbuild report diversity` writes)")
    return Baseline(str(p), data)


def _is_report(data) -> bool:
    if not isinstance(data, dict) or data.get("version") != 1:
        return False
    builds = data.get("builds")
    if not isinstance(builds, list) or not builds:
        return False
    for b in builds:
        if not isinstance(b, dict) or not isinstance(b.get("name"), str):
            return False
        fields = b.get("fields")
        if not isinstance(fields, dict):
            return False
        for f in fields.values():
            if not (isinstance(f, dict) and isinstance(f.get("overall"), dict)
                    and isinstance(f.get("agents"), dict) and isinstance(f.get("levels"), dict)):
                return False
    return True


def compared_keys(build: dict, semantic: bool) -> dict[str, tuple[dict, str]]:
    """Every key the baseline gate compares in one build: ``FIELD.METRIC`` (overall),
    ``agent:NAME.FIELD.METRIC`` and ``level:NAME.FIELD.METRIC``, for every metric with a
    DIRECTION (semantic: overall only, when measured). Maps a key to (its figures, metric)."""
    out: dict[str, tuple[dict, str]] = {}
    for fname, f in build["fields"].items():
        for metric in DIRECTION:
            if metric == "semantic":
                if semantic:
                    out[f"{fname}.{metric}"] = (f["overall"], metric)
                continue
            out[f"{fname}.{metric}"] = (f["overall"], metric)
            for scope in ("agent", "level"):
                for g, m in sorted(f[scope + "s"].items()):
                    out[f"{scope}:{g}.{fname}.{metric}"] = (m, metric)
    return out


def baseline_build(baseline: Baseline, name: str) -> dict:
    """The baseline's build to compare build ``name`` with: the one of the same name, else
    the baseline's only build."""
    builds = baseline.report["builds"]
    for b in builds:
        if b["name"] == name:
            return b
    if len(builds) == 1:
        return builds[0]
    raise DsbuildError(f"--baseline {baseline.path} holds builds "
                       f"{', '.join(b['name'] for b in builds)}; none is named '{name}' (compare "
                       "one build against a one-build report, or name the builds alike)")


def compare_baseline(report: dict, baseline: Baseline, margins: dict[str, Margin]
                     ) -> tuple[list[dict], list[dict], list[dict]]:
    """Compare every key of every build with the baseline: (results, new, vanished).

    A value that got worse (in its metric's DIRECTION) by more than its margin fails. Keys on
    one side only are listed, not failed: ``new`` (no baseline value: a new agent, or a value
    the baseline could not measure) and ``vanished`` (the baseline had it, this build does not).
    """
    results: list[dict] = []
    new: list[dict] = []
    vanished: list[dict] = []
    for b in report["builds"]:
        base = baseline_build(baseline, b["name"])
        ours = compared_keys(b, bool(report.get("semantic")))
        theirs = compared_keys(base, bool(baseline.report.get("semantic")))
        for key, (m, metric) in ours.items():
            old = _gate_value(theirs[key][0], metric) if key in theirs else None
            if old is None or not math.isfinite(old):
                if m.get(metric) is not None:
                    new.append({"build": b["name"], "key": key, "value": m.get(metric)})
                continue
            margin = margins.get(metric, margins["*"])
            direction = DIRECTION[metric]
            bound = margin.bound(old, direction)
            rule = f"--max-drop {margin.text}" if metric not in margins else \
                f"--max-drop {metric}={margin.text}"
            extra = {"baseline": old, "margin": margin.text,
                     "better": "higher" if direction > 0 else "lower"}
            value = _gate_value(m, metric)
            if value is None:
                why = "no words" if not m.get("tokens") else "no value"
                results.append(_miss_entry(b["name"], key, None, bound, "drop", rule, why,
                                           passed=False, **extra))
                continue
            drop = (old - value) * direction  # > 0: worse than the baseline
            shown, why = _json_value(value)
            results.append(_miss_entry(
                b["name"], key, shown, bound, "drop", rule, why,
                passed=not (direction * (value - bound) < 0), drop=None if why else drop,
                drop_rel=None if why or old == 0 else drop / abs(old), **extra))
        for key, (m, metric) in theirs.items():
            if key not in ours and m.get(metric) is not None:
                vanished.append({"build": b["name"], "key": key, "baseline": m.get(metric)})
    return results, new, vanished


def group_keys(entries: list[dict]) -> list[str]:
    """Keys shown compactly per build: ``agent:sofas (15 keys)``, ``edit.semantic``."""
    lines = []
    for build in dict.fromkeys(e["build"] for e in entries):
        groups: dict[str, int] = {}
        for e in entries:
            if e["build"] == build:
                k = e["key"]
                head = k.split(".", 1)[0] if k.startswith(("agent:", "level:")) else k
                groups[head] = groups.get(head, 0) + 1
        shown = ", ".join(g if n == 1 else f"{g} ({n} keys)" for g, n in groups.items())
        lines.append(f"build '{build}': {shown}")
    return lines


def miss_line(m: dict) -> str:
    """The printed form of one miss (stderr, diversity.md, ``::error`` lines)."""
    where = f"{m['build']} {m['key']}"
    if m["kind"] == "drop":
        worse = m.get("drop")
        how = ""
        if worse is not None:
            rel = m.get("drop_rel")
            how = (f", worse by {100 * rel:.1f}%" if m["margin"].endswith("%") and rel is not None
                   else f", worse by {worse:.4g}")
        op = "<" if m["better"] == "higher" else ">"
        tail = f"(baseline {m['baseline']:.4g}{how}; {m['rule']})"
        if m["value"] is None and m.get("reason") != UNBOUNDED:
            return f"FAIL {where}: {m['reason']} {tail}"
        value = "inf" if m["value"] is None else f"{m['value']:.4g}"
        return f"FAIL {where} = {value} {op} {m['bound']:.4g} {tail}"
    op = "<" if m["kind"] == "fail-under" else ">"
    if m["value"] is None and m.get("reason") != UNBOUNDED:
        return f"FAIL {where}: {m['reason']} ({m['rule']})"
    value = "inf" if m["value"] is None else f"{m['value']:.4g}"
    return f"FAIL {where} = {value} {op} {m['bound']:g} ({m['rule']})"
