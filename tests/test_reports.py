"""Reports and status lines that say what happened: thresholds that are off print "off", verify's
checks cannot be read as operations, init counts the triples the limits leave, and a stale
export shows as stale with its row count."""

from __future__ import annotations

import json

import pytest
from builders import make_build
from click.testing import CliRunner

from dsbuild.cli import cli
from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe


def _build(tmp_path, recipe, overrides=()):
    return Build.init(tmp_path / "b", load_recipe(recipe), recipe_path=str(recipe),
                      overrides=list(overrides))


def _report(build) -> tuple[dict, str]:
    return (json.loads((build.reports_dir / "filter.json").read_text()),
            (build.reports_dir / "filter.md").read_text())


def test_filter_report_prints_off_for_disabled_thresholds(tmp_path, mini_recipe):
    from dsbuild.filter.report import write_report

    build = _build(tmp_path, mini_recipe, ["filter.clip_sim_image=-1", "filter.clip_sim_0=-1.5"])
    made = make_build(build, samples=3)
    write_report(build)
    rep, md = _report(build)
    s = rep["settings"]
    assert s["active_thresholds"] == ["clip_sim_dir", "clip_sim_1"]
    assert s["off_thresholds"] == ["clip_sim_image", "clip_sim_0"]
    assert s["thresholds"]["clip_sim_image"] == -1  # the raw minimum stays for readers
    assert rep["overall"]["thresholds"]["clip_sim_0"]["active"] is False
    assert rep["overall"]["thresholds"]["clip_sim_dir"]["active"] is True
    assert "≥ -1" not in md and "≥ -1.5" not in md
    assert ("Thresholds in force: clip_sim_dir ≥ 0.2, clip_sim_1 ≥ 0.2; off (a minimum of -1 "
            "or less, which every pair passes): clip_sim_image, clip_sim_0.") in md
    header = next(line for line in md.splitlines() if line.startswith("| agent |"))
    assert "| clip_sim_image off | clip_sim_dir ≥ 0.2 | clip_sim_0 off | clip_sim_1 ≥ 0.2 |" \
        in header
    # the numbers of a row add up: kept = passed - dropped by top_k; off cells say "off"
    kept = sum(r["keep"] for r in made["scores"])
    passed = sum(r["rank"] is not None for r in made["scores"])
    row = next(line for line in md.splitlines() if line.startswith("| all |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["all", str(len(made["scores"])), str(kept), str(passed),
                         str(passed - kept)]
    assert cells[5] == "off" and cells[7] == "off" and cells[6].endswith("%")
    assert f"Kept {kept} of {len(made['scores'])} pairs. Dropped, by first reason: " in md


def test_filter_report_all_thresholds_off_and_all_on(tmp_path, mini_recipe):
    from dsbuild.filter.report import markdown, write_report

    off = [f"filter.{n}=-1" for n in ("clip_sim_0", "clip_sim_1", "clip_sim_dir",
                                      "clip_sim_image")]
    build = _build(tmp_path, mini_recipe, off)
    make_build(build, samples=2)
    write_report(build)
    rep, md = _report(build)
    assert rep["settings"]["active_thresholds"] == []
    assert "Thresholds: all off (a minimum of -1 or less, which every pair passes). Then the 4 " \
        "pairs with the highest clip_sim_dir of each triple are kept." in md
    assert "| all | 12 | 12 | 12 | 0 | off | off | off | off |" in md
    # the defaults are all in force: no "off" anywhere in the table
    rep["settings"]["off_thresholds"] = []
    rep["settings"]["thresholds"] = {"clip_sim_image": 0.7, "clip_sim_dir": 0.2,
                                     "clip_sim_0": 0.2, "clip_sim_1": 0.2}
    md = markdown(rep)
    assert "Thresholds in force: clip_sim_image ≥ 0.7, clip_sim_dir ≥ 0.2, clip_sim_0 ≥ 0.2, " \
        "clip_sim_1 ≥ 0.2." in md and " off" not in md


@pytest.mark.usefixtures("one_torch_thread")
def test_verify_report_names_checks_apart_from_operations(tmp_path, mini_recipe):
    from dsbuild.verify.stage import run_verify

    build = _build(tmp_path, mini_recipe)
    make_build(build, samples=2, keep_every=1)
    # tiny models with the detector and change thresholds off (as --offline), and a near-copy
    # bound every pair exceeds: every operation check passes, the near-copy check rejects all
    run_verify(build, quiet=True, overrides=[
        "verify.detector=tiny", "verify.clip_model=tiny", "verify.clip_pretrained=none",
        "verify.dino_model=tiny", "verify.present_min=0", "verify.absent_max=1",
        "verify.change_dir_min=-1", "verify.rest_min=-1", "verify.near_copy_max=0"])
    rep = json.loads((build.reports_dir / "verify.json").read_text())
    md = (build.reports_dir / "verify.md").read_text()
    n = rep["overall"]["pairs"]
    assert n == 12 and rep["overall"]["passed"] == 0 and rep["overall"]["reasons"] == {
        "near_copy": n}
    checks = rep["checks"]
    assert set(checks) == {"near_copy", "add", "remove", "replace", "change"}
    assert checks["near_copy"] | {"asks": None} == {
        "label": "not-a-near-copy", "operation": None, "asks": None, "ran": n, "pass": 0,
        "fail": n, "unchecked": 0, "rejected": n}
    for op in ("add", "remove", "replace", "change"):
        c = checks[op]
        assert c["operation"] == op and c["label"] != op and c["rejected"] == 0
        assert c["ran"] == rep["per_operation"][op]["pairs"] == c["pass"] + c["fail"] \
            + c["unchecked"]
    assert checks["add"]["label"] == "object-added"
    assert sum(c["rejected"] for c in checks.values()) == n - rep["overall"]["passed"]
    # the markdown: no check is printed under an operation's bare name
    assert "Checks: add" not in md and "| add |" not in md
    add = rep["per_operation"]["add"]["pairs"]
    assert f"| operation add | {add} | 0 | 0% | near_copy {add} |" in md
    row = next(line for line in md.splitlines()
               if line.startswith("| object-added (for operation add) |"))
    assert f"| {add} pairs of operation add | " in row and row.endswith(" | 0 |")
    assert "present_min off" in row and "absent_max off" in row  # thresholds off say so
    assert "| not-a-near-copy | " in md and f"| {n} pairs (all) | 0 | {n} | 0 | {n} |" in md


def test_init_counts_the_triples_the_limits_leave_and_captions_makes_them(tmp_path,
                                                                         mini_recipe):
    from dsbuild.captions.settings import CaptionsSettings

    per_agent = "per_agent" if "per_agent" in CaptionsSettings.model_fields else "limit"
    b = tmp_path / "b"
    r = CliRunner().invoke(cli, ["init", str(b), "--recipe", str(mini_recipe),
                                 "--set", f"captions.{per_agent}=1"])
    assert r.exit_code == 0, r.output
    assert (f"2 agents, 2 target triples (captions.{per_agent}=1; the recipe's counts add up "
            "to 24)") in r.output
    r = CliRunner().invoke(cli, ["init", str(tmp_path / "c"), "--recipe", str(mini_recipe),
                                 "--set", "captions.count_scale=0.25"])
    assert "6 target triples (captions.count_scale=0.25; the recipe's counts add up to 24)" \
        in r.output
    r = CliRunner().invoke(cli, ["init", str(tmp_path / "d"), "--recipe", str(mini_recipe)])
    assert r.output.rstrip().endswith("2 agents, 24 target triples")
    # the captions stage makes what init announced, and status counts the same
    r = CliRunner().invoke(cli, ["captions", str(b)])
    assert r.exit_code == 0, r.output
    assert "kept 2 of 2 target triples" in r.output
    st = json.loads(CliRunner().invoke(cli, ["status", str(b), "--json"]).output)
    assert st["stages"]["captions"]["records"] == 2
    assert st["stages"]["captions"]["state"] == "complete"


def test_status_shows_a_stale_export_with_its_rows(tmp_path, mini_recipe):
    from dsbuild.export.writer import run_export

    build = _build(tmp_path, mini_recipe)
    make_build(build, samples=2)
    rows = run_export(build).records
    assert rows > 0
    runner = CliRunner()
    text = runner.invoke(cli, ["status", str(build.root)]).output
    assert "not run" in next(line for line in text.splitlines() if "augment" in line)
    # a setting export signs changes: the export on disk is from an earlier run
    build.update(["export.grid_pairs=2"])
    text = runner.invoke(cli, ["status", str(build.root)]).output
    line = next(line for line in text.splitlines() if line.strip().startswith("export"))
    assert (f"stale ({rows} records from an earlier run; `dsbuild export {build.root}` to "
            "refresh)") in line and "not run" not in line
    st = json.loads(runner.invoke(cli, ["status", str(build.root), "--json"]).output)
    ex = st["stages"]["export"]
    assert ex["state"] in line and ex["records"] == 0 and ex["complete"] is False
    assert ex["stale"]["records"] == rows and ex["stale"]["refresh"] == \
        f"dsbuild export {build.root}"
    assert ex["stale"]["signature"] in ex["stale_signatures"]
    assert st["stages"]["augment"]["state"] == "not run" and st["stages"]["augment"]["stale"] \
        is None
    # refreshed, it is complete again and nothing is stale
    run_export(build)
    ex = json.loads(runner.invoke(cli, ["status", str(build.root), "--json"]).output)[
        "stages"]["export"]
    assert ex["state"] == "complete" and ex["stale"] is None and ex["records"] == rows


def test_status_shows_stale_record_shards(tmp_path, mini_recipe):
    """A record stage whose upstream changed: its old shards are stale, counted."""
    from builders import write_scores

    build = _build(tmp_path, mini_recipe)
    made = make_build(build, samples=2)
    # other filter settings: the scores on disk are the earlier settings', until it reruns
    build.update(["filter.top_k=1"])
    st = json.loads(CliRunner().invoke(cli, ["status", str(build.root), "--json"]).output)
    f = st["stages"]["filter"]
    assert f["stale"]["records"] == len(made["scores"])
    assert f["state"] == (f"stale ({len(made['scores'])} records from an earlier run; "
                          f"`dsbuild filter {build.root}` to refresh)")
    write_scores(build, made["pairs"], [0.3] * len(made["pairs"]))
    st = json.loads(CliRunner().invoke(cli, ["status", str(build.root), "--json"]).output)
    assert st["stages"]["filter"]["state"] == "complete"
    assert st["stages"]["filter"]["stale"] is None
