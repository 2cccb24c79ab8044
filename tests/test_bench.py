"""The bench harness: warm-up, repeats, order, both clocks, peaks, ratios and the printing."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner

from dsbuild.bench.harness import emit, per_second, ratio, table, time_cases


def test_time_cases_warms_up_repeats_and_alternates():
    calls: list[str] = []
    cases = {"plain": lambda: calls.append("plain"), "ours": lambda: calls.append("ours")}
    t = time_cases(cases, "cpu", repeats=3, alternate=True, memory=True)
    # one warm-up call each, then three repeats with the order reversed every time
    assert calls == ["plain", "ours"] + ["plain", "ours", "ours", "plain", "plain", "ours"]
    assert {len(v) for v in (*t.wall.values(), *t.cpu.values())} == {3}
    best, median = t.seconds("wall", pick="best"), t.seconds("cpu")
    assert set(best) == set(median) == {"plain", "ours"}
    assert all(best[k] <= max(t.wall[k]) for k in best)
    assert all(v is None or v > 0 for v in t.peak_mb.values())


def test_time_cases_custom_warmup_and_hook_run_untimed():
    seen: list[str] = []
    t = time_cases({"a": lambda: seen.append("a")}, "cpu", repeats=2,
                   warmup=lambda: seen.append("warm"), before=lambda: seen.append("before"))
    assert seen == ["warm", "before", "a", "before", "a"]
    assert t.peak_mb == {"a": None}  # memory not asked for
    seen.clear()
    time_cases({"a": lambda: seen.append("a")}, "cpu", warmup=False)
    assert seen == ["a"]


def test_ratios_rates_and_table():
    assert ratio(2.0, 3.0) == 0.667 and ratio(1, 8, 2) == 0.12
    assert per_second(10, {"raw": 2.0, "ours": 0.5}) == {"raw": 5.0, "ours": 20.0}
    lines = table([("case", 6), ("s", 5)], [("a", "1.00"), ("bb", "12.50")])
    assert lines == ["case      s", "a      1.00", "bb    12.50"]


def test_emit_prints_json_or_lines():
    res = {"ratio": 1.5}

    @click.command()
    @click.option("--json", "as_json", is_flag=True)
    def cmd(as_json):
        emit(res, as_json, lambda r: [f"ratio {r['ratio']}x"])

    assert CliRunner().invoke(cmd, []).output == "ratio 1.5x\n"
    assert json.loads(CliRunner().invoke(cmd, ["--json"]).output) == res
