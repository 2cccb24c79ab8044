"""dsbuild report diversity --baseline: no drop against an earlier report (e.g. main's),
structured misses, the GitHub Actions step summary and ::error lines, bad baseline files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import triple_record
from click.testing import CliRunner
from conftest import MINI_RECIPE

from dsbuild.cli import cli, main
from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.core.text import TOKENISATION
from dsbuild.diversity.gate import compared_keys, load_baseline
from dsbuild.diversity.measures import DIRECTION
from dsbuild.diversity.settings import DiversitySettings

REPO = Path(__file__).resolve().parent.parent
GITHUB = ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY")


@pytest.fixture(autouse=True)
def not_in_github_actions(monkeypatch):
    """The suite itself may run under GitHub Actions: start every test outside it."""
    for k in GITHUB:
        monkeypatch.delenv(k, raising=False)


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, ["report", "diversity", *args], env=env)


def run_main(capsys, *args: str) -> tuple[int, str]:
    """dsbuild.cli.main in-process, as the shell runs it: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(["report", "diversity", *args])
        raise SystemExit(0)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A template-backend build of the two-agent recipe and its report, kept as baseline.json
    (what an earlier run, e.g. main's, leaves behind)."""
    root = tmp_path_factory.mktemp("gate")
    recipe = root / "mini.yaml"
    recipe.write_text(MINI_RECIPE)
    build = root / "main"
    assert CliRunner().invoke(cli, ["init", str(build), "--recipe", str(recipe)]).exit_code == 0
    res = CliRunner().invoke(cli, ["captions", str(build), "--backend", "template"])
    assert res.exit_code == 0, res.output
    assert invoke(str(build)).exit_code == 0
    baseline = root / "baseline.json"
    baseline.write_text((build / "reports" / "diversity.json").read_text())
    return build, baseline, recipe


def repetitive_build(root: Path, template_build: Path, recipe: Path) -> Path:
    """The template build's triples plus 12 near-copies of one chairs triple (only case and
    punctuation differ): the chairs agent and the object level get more repetitive, the
    living-room agent and the room level stay exactly as they were."""
    src = Build.open(template_build)
    recs = list(src.records("captions"))
    one = next(r for r in recs if r["agent"] == "chairs")
    for k in range(12):
        mark = "!" * (k + 1)
        recs.append(triple_record("mini", one["agent"], one["level"], one["operation"],
                                  one["input"].upper() + mark, one["edit"] + mark,
                                  one["output"] + mark))
    build = Build.init(root, load_recipe(recipe), recipe_path=str(recipe))
    build.run_stage("captions", 0, 1, lambda w: [w.write(r) for r in recs] and None,
                    report=False)
    return root


def scaled(baseline: Path, out: Path, factor_higher: float, factor_lower: float) -> Path:
    """The baseline with every higher-is-better value times one factor and every
    lower-is-better value times another (agents, levels and overall alike)."""
    data = json.loads(baseline.read_text())
    for b in data["builds"]:
        for f in b["fields"].values():
            for m in [f["overall"], *f["agents"].values(), *f["levels"].values()]:
                for metric, direction in DIRECTION.items():
                    if m.get(metric) is not None:
                        m[metric] *= factor_higher if direction > 0 else factor_lower
    out.write_text(json.dumps(data))
    return out


def gate_of(build: Path) -> dict:
    return json.loads((build / "reports" / "diversity.json").read_text())["gate"]


# ----------------------------------------------------------------------------- drops


def test_a_drop_fails_with_structured_misses_on_the_keys_that_got_worse(template, tmp_path):
    main_build, baseline, recipe = template
    pr = repetitive_build(tmp_path / "pr", main_build, recipe)
    res = invoke(str(pr), "--baseline", str(baseline))
    assert res.exit_code == 1, res.output
    gate = gate_of(pr)
    misses = gate["misses"]
    assert misses and not gate["passed"] and gate["baseline"]["max_drop"] == "2%"
    keys = {m["key"] for m in misses}
    # the copies made edits repeat (lower is better: it rose) and MTLD fall (higher: it fell)
    assert {"edit.near_dup_rate", "edit.mtld", "agent:chairs.edit.near_dup_rate",
            "level:object.edit.yule_k"} <= keys
    # what did not change cannot miss
    assert not [k for k in keys if k.startswith(("agent:living-room.", "level:room."))]
    for m in misses:
        assert m["kind"] == "drop" and m["rule"] == "--max-drop 2%" and m["margin"] == "2%"
        assert set(m) >= {"key", "build", "value", "bound", "kind", "baseline", "drop"}
        assert m["build"] == "pr" and m["drop"] > 0
        if m["better"] == "higher":
            assert m["value"] < m["bound"] == pytest.approx(m["baseline"] * 0.98)
        else:
            assert m["value"] > m["bound"] == pytest.approx(m["baseline"] * 1.02)
        assert m["drop"] == pytest.approx(abs(m["value"] - m["baseline"]))
    nd = next(m for m in misses if m["key"] == "edit.near_dup_rate")
    assert nd["better"] == "lower" and nd["value"] > nd["baseline"]
    # one readable line per miss on stderr, then the verdict
    fails = [ln for ln in res.stderr.splitlines() if ln.startswith("FAIL ")]
    assert len(fails) == len(misses)
    line = next(ln for ln in fails if ln.startswith("FAIL pr edit.mtld = "))
    mt = next(m for m in misses if m["key"] == "edit.mtld")
    assert line == (f"FAIL pr edit.mtld = {mt['value']:.4g} < {mt['bound']:.4g} (baseline "
                    f"{mt['baseline']:.4g}, worse by {100 * mt['drop_rel']:.1f}%; --max-drop 2%)")
    assert (f"diversity gate FAILED: {len(misses)} of {gate['checks']} checks missed "
            f"(against {baseline}, --max-drop 2%)") in res.stderr
    # the Markdown report lists the same lines
    md = (pr / "reports" / "diversity.md").read_text()
    assert f"- {line}" in md and f"Against the baseline `{baseline}`" in md


def test_same_report_and_drops_within_the_margin_pass(template, tmp_path):
    build, baseline, _ = template
    ok = invoke(str(build), "--baseline", str(baseline))
    assert ok.exit_code == 0, ok.output
    gate = gate_of(build)
    n = len(compared_keys(json.loads(baseline.read_text())["builds"][0], False))
    assert gate["checks"] == n == 3 * 5 * (1 + 2 + 2)  # fields × metrics × (overall, agents, levels)
    assert gate["misses"] == [] and gate["new"] == [] and gate["vanished"] == []
    # every key 1 % worse than the baseline: inside 2 %, outside 0.5 %
    worse = scaled(baseline, tmp_path / "better-main.json", 1.01, 0.99)
    assert invoke(str(build), "--baseline", str(worse)).exit_code == 0
    assert invoke(str(build), "--baseline", str(worse), "--max-drop", "1.5%").exit_code == 0
    tight = invoke(str(build), "--baseline", str(worse), "--max-drop", "0.5%")
    assert tight.exit_code == 1
    nonzero = [k for k, (m, metric) in compared_keys(
        json.loads(baseline.read_text())["builds"][0], False).items() if m[metric]]
    assert sorted(m["key"] for m in gate_of(build)["misses"]) == sorted(nonzero)
    # an absolute margin is in the metric's units; METRIC= sets one metric's margin only
    assert invoke(str(build), "--baseline", str(worse), "--max-drop", "1000").exit_code == 0
    one = invoke(str(build), "--baseline", str(worse), "--max-drop", "u2=0")
    assert one.exit_code == 1
    misses = gate_of(build)["misses"]
    assert {m["key"].rsplit(".", 1)[1] for m in misses} == {"dugast"}
    assert {m["rule"] for m in misses} == {"--max-drop dugast=0"}
    assert len(misses) == 3 * 5


def test_direction_lower_is_better_for_yule_k_and_near_dup(template, tmp_path):
    build, baseline, _ = template
    # a baseline with every value halved: higher-is-better metrics improved, the others (Yule's
    # K, near-dup rate) doubled against the baseline: only those miss
    half = invoke(str(build), "--baseline", str(scaled(baseline, tmp_path / "h.json", .5, .5)))
    assert half.exit_code == 1
    misses = gate_of(build)["misses"]
    assert {m["key"].rsplit(".", 1)[1] for m in misses} <= {"yule_k", "near_dup_rate"}
    assert "edit.yule_k" in {m["key"] for m in misses}
    assert all(m["better"] == "lower" and m["value"] > m["bound"] for m in misses)
    assert "FAIL main edit.yule_k = " in half.stderr and " > " in half.stderr
    # every value 1.5 times higher: now only the higher-is-better metrics miss
    more = invoke(str(build), "--baseline", str(scaled(baseline, tmp_path / "m.json", 1.5, 1.5)))
    assert more.exit_code == 1
    misses = gate_of(build)["misses"]
    assert {m["key"].rsplit(".", 1)[1] for m in misses} == {"mtld", "dugast", "guiraud"}
    assert all(m["better"] == "higher" and m["value"] < m["bound"] for m in misses)


def test_new_and_vanished_keys_are_listed_not_failed(template, tmp_path):
    build, baseline, _ = template
    data = json.loads(baseline.read_text())
    for f in data["builds"][0]["fields"].values():
        f["agents"]["stools"] = f["agents"].pop("chairs")
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    res = invoke(str(build), "--baseline", str(renamed), env={"GITHUB_ACTIONS": "true"})
    assert res.exit_code == 0, res.output
    gate = gate_of(build)
    assert {e["key"] for e in gate["vanished"]} == {
        f"agent:stools.{f}.{m}" for f in ("input", "edit", "output")
        for m in ("mtld", "yule_k", "dugast", "guiraud", "near_dup_rate")}
    assert {e["key"].split(".")[0] for e in gate["new"]} == {"agent:chairs"}
    assert ("warning: baseline keys gone from build 'main': agent:stools (15 keys) "
            "(not compared)") in res.stderr
    assert "not in the baseline, not compared: build 'main': agent:chairs (15 keys)" in res.stderr
    assert ("::warning title=diversity gate::baseline keys gone from build 'main': agent:stools "
            "(15 keys)") in res.stderr.splitlines()


def test_combined_with_absolute_gates_every_miss_is_an_object(template, tmp_path):
    build, baseline, _ = template
    worse = scaled(baseline, tmp_path / "w.json", 1.5, 1.5)
    res = invoke(str(build), "--baseline", str(worse), "--fail-under", "edit.mtld=100000",
                 "--fail-over", "agent:*.edit.yule_k=0", "--json")
    assert res.exit_code == 1
    gate = json.loads(res.stdout)["gate"]
    assert gate == gate_of(build)
    kinds = {m["kind"] for m in gate["misses"]}
    assert kinds == {"fail-under", "fail-over", "drop"}
    under = next(m for m in gate["misses"] if m["kind"] == "fail-under")
    assert under == {"key": "edit.mtld", "build": "main", "value": under["value"],
                     "bound": 100000.0, "kind": "fail-under",
                     "rule": "--fail-under edit.mtld=100000"}
    over = [m["key"] for m in gate["misses"] if m["kind"] == "fail-over"]
    assert over == ["agent:chairs.edit.yule_k", "agent:living-room.edit.yule_k"]
    assert gate["checks"] == 1 + 2 + 75
    assert "FAIL main edit.mtld = " in res.stderr and "< 100000 (--fail-under edit.mtld=100000)" \
        in res.stderr


# ----------------------------------------------------------------------------- GitHub Actions


def test_step_summary_is_appended_and_errors_printed_under_github_actions(template, tmp_path):
    main_build, baseline, recipe = template
    pr = repetitive_build(tmp_path / "pr", main_build, recipe)
    summary = tmp_path / "step_summary.md"
    summary.write_text("## an earlier step\n")
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    res = invoke(str(pr), "--baseline", str(baseline), env=env)
    assert res.exit_code == 1
    misses = gate_of(pr)["misses"]
    text = summary.read_text()
    assert text.startswith("## an earlier step\n### Diversity gate FAILED: ")
    assert "| key | value | baseline | bound | check | result |" in text
    nd = next(m for m in misses if m["key"] == "edit.near_dup_rate")
    row = next(ln for ln in text.splitlines() if ln.startswith("| `edit.near_dup_rate` |"))
    assert row.startswith(f"| `edit.near_dup_rate` | {nd['value']:.4g} | {nd['baseline']:.4g} | "
                          f"≤ {nd['bound']:.4g} | `--max-drop 2%` | **miss**")
    assert "| `agent:living-room.edit.mtld` |" in text and "| pass |" in text  # every check
    assert "#### Overall" in text
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("::error ")]
    assert len(errors) == len(misses)
    assert all(ln.startswith("::error title=diversity gate::FAIL pr ") for ln in errors)
    assert any("--max-drop 2%25)" in ln for ln in errors)  # '%' escaped for the runner
    # a passing run appends its own summary after the failing one
    assert invoke(str(main_build), "--baseline", str(baseline), env=env).exit_code == 0
    assert summary.read_text().startswith(text)
    assert "### Diversity gate passed: 0 of 75 checks missed" in summary.read_text()[len(text):]


def test_outside_github_actions_nothing_extra(template, tmp_path):
    main_build, baseline, recipe = template
    pr = repetitive_build(tmp_path / "pr", main_build, recipe)
    res = invoke(str(pr), "--baseline", str(baseline))
    assert res.exit_code == 1
    assert not [ln for ln in res.stderr.splitlines() if ln.startswith("::")]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON (Expecting property name enclosed in double quotes at line 1)"),
    ('{"version": 1, "builds": []}', "not a diversity report"),
    ('{"kept": 24, "backend": "template"}', "not a diversity report"),
    ("dir", "is a folder; give a report file"),
])
def test_bad_baseline_is_one_line_exit_2(template, tmp_path, capsys, content, message):
    build, _, _ = template
    path = tmp_path / "main.json"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    before = (build / "reports" / "diversity.json").read_text()
    code, err = run_main(capsys, str(build), "--baseline", str(path))
    assert code == 2
    assert err.startswith(f"error: --baseline {path}") and message in err
    assert len(err.strip().splitlines()) == 1
    assert (build / "reports" / "diversity.json").read_text() == before  # no work was done


@pytest.mark.parametrize("args, message", [
    (["--max-drop", "5x"], "expected a share like 2% or an amount like 0.5"),
    (["--max-drop", "-1%"], "the margin must be 0 or more"),
    (["--max-drop", "tokens=1%"], "'tokens' is not a metric with a better direction"),
])
def test_bad_max_drop_is_a_usage_error(template, args, message):
    build, baseline, _ = template
    res = invoke(str(build), "--baseline", str(baseline), *args)
    assert res.exit_code == 2 and message in res.output


def test_max_drop_needs_a_baseline(template):
    build, _, _ = template
    res = invoke(str(build), "--max-drop", "2%")
    assert res.exit_code == 2 and "--max-drop needs --baseline" in res.output


def test_several_builds_are_matched_by_name(template, tmp_path, capsys):
    build, baseline, recipe = template
    pr = repetitive_build(tmp_path / "pr", build, recipe)
    both = tmp_path / "both"
    assert invoke(str(build), str(pr), "--out", str(both)).exit_code == 0
    # the two-build report as baseline: each build meets its namesake
    res = invoke(str(build), str(pr), "--out", str(tmp_path / "again"), "--baseline",
                 str(both / "diversity.json"))
    assert res.exit_code == 0, res.output
    other = repetitive_build(tmp_path / "other", build, recipe)
    code, err = run_main(capsys, str(other), "--baseline", str(both / "diversity.json"))
    assert code == 2
    assert "holds builds main, pr; none is named 'other'" in err


def test_committed_ci_baseline_is_comparable_with_todays_report():
    """.ci/run compares the template build of the built-in recipe with this file: it must be
    a report measured the way today's code measures (else the comparison means nothing)."""
    base = load_baseline(REPO / "tests" / "fixtures" / "diversity-baseline.json")
    assert base.report["tokenisation"] == TOKENISATION
    defaults = DiversitySettings()
    assert base.report["settings"]["fields"] == defaults.fields
    assert base.report["settings"]["mtld_threshold"] == defaults.mtld_threshold
    (b,) = base.report["builds"]
    assert b["records"] == 2080 and len(b["agent_levels"]) == 16
    assert "--baseline tests/fixtures/diversity-baseline.json" in (REPO / ".ci" / "run").read_text()
