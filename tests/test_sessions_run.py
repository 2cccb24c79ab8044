"""Issue 28, done when: an offline build with ``--set captions.sessions.share=0.5`` exports turn
rows that `datasets` loads, `dsbuild tree` writes a page Chromium renders with every node, and
`dsbuild eval --turns` prints per-turn metrics for two models. (The session benchmark's
ratios: tests/test_sessions_p2p.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("open_clip")
pytest.importorskip("datasets")

from test_sessions_tree import assert_not_blank, chromium  # noqa: E402

from dsbuild.cli import cli  # noqa: E402
from dsbuild.core import sessions as S  # noqa: E402


@pytest.fixture(scope="module")
def session_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions-demo")
    r = CliRunner().invoke(cli, ["run", str(root / "demo"), "--offline",
                                 "--set", "captions.sessions.share=0.5"])
    assert r.exit_code == 0, r.output
    return root / "demo"


def _load(export):
    import datasets

    files = {s: sorted(str(p) for p in (export / "data").glob(f"{s}-*.parquet"))
             for s in ("train", "test")}
    return datasets.load_dataset("parquet", data_files={k: v for k, v in files.items() if v})


def test_offline_session_build_exports_turn_rows(session_demo):
    from dsbuild.core.build import Build

    build = Build.open(session_demo)
    triples = list(build.records("captions"))
    counts = S.tree_counts(triples)
    assert counts["sessions"] >= 2 and counts["turns"] >= 2 * counts["sessions"]
    ds = _load(session_demo / "export")
    rows = [r for split in ds.values() for r in split]
    turns = [r for r in rows if r["session_id"]]
    assert turns, "the export holds no turn rows"
    assert {r["turn"] for r in turns} >= {1, 2}
    for col in ("session_id", "session_run", "turn", "node_id", "parent_id", "source_image"):
        assert col in ds["train"].column_names, col
    # MagicBrush-style: a turn's input image is its parent turn's edited image in the same
    # run (the run's source image at turn 1), pixel for pixel
    by_node = {(r["session_run"], r["node_id"]): r for r in turns}
    checked = 0
    for r in turns:
        if r["no_change"]:
            continue
        if r["turn"] == 1:
            want = r["source_image"]
        elif (r["session_run"], r["parent_id"]) in by_node:
            want = by_node[(r["session_run"], r["parent_id"])]["edited_image"]
        else:
            pytest.fail(f"turn {r['turn']} of run {r['session_run']} is exported without its "
                        "parent turn")
        assert np.array_equal(np.asarray(r["input_image"]), np.asarray(want))
        checked += 1
    assert checked >= len([r for r in turns if not r["no_change"]]) > 0
    # splits never cut a session
    sides: dict[str, set[str]] = {}
    for split, d in ds.items():
        for r in d:
            if r["session_id"]:
                sides.setdefault(r["session_id"], set()).add(split)
    assert all(len(v) == 1 for v in sides.values()), sides


def test_tree_page_renders_in_chromium(session_demo, tmp_path):
    r = CliRunner().invoke(cli, ["tree", str(session_demo)])
    assert r.exit_code == 0, r.output
    from dsbuild.core.build import Build
    from dsbuild.core.join import rows as joined_rows

    build = Build.open(session_demo)
    rows = [x for x in joined_rows(build)[0] if x.get("session_id")]
    sid = rows[0]["session_id"]
    page = session_demo / S.tree_page(sid)
    assert page.is_file() and page.with_suffix(".png").is_file()
    dom, shot = chromium(page, tmp_path)
    runs = {x["session_run"] for x in rows if x["session_id"] == sid}
    nodes = [x for x in rows if x["session_id"] == sid]
    # one element per node of every run, plus each run's root
    assert len(dom.nodes) == len(nodes) + len(runs), (len(dom.nodes), len(nodes), len(runs))
    assert_not_blank(shot)


def test_eval_turns_on_the_session_export(session_demo, tmp_path, one_torch_thread):
    from dsbuild.models.editor import editor_pipeline, tiny_editor_components

    comps = tiny_editor_components(seed=1)
    sched = comps.pop("scheduler")
    editor_pipeline(scheduler_config=dict(sched.config), **comps).save_pretrained(
        str(tmp_path / "other"))
    other = str(tmp_path / "other")
    ds = _load(session_demo / "export")
    split = max(ds, key=lambda s: sum(1 for r in ds[s] if r["session_id"]))
    r = CliRunner().invoke(cli, [
        "eval", "tiny", other, "--data", str(session_demo / "export"), "--split", split,
        "--out", str(tmp_path / "ev"), "--turns", "--offline", "--steps", "2",
        "--resolution", "32", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["turns"]["runs"] >= 1 and "2" in res["turns"]["rows"]
    for name in ("tiny", other):
        per_turn = res["models"][name]["turns"]["per_turn"]
        assert {"1", "2"} <= set(per_turn), (name, per_turn)
        for scores in per_turn.values():
            assert all(np.isfinite(scores[k]) for k in ("clip_i", "dino_gt", "l1"))
    md = (tmp_path / "ev" / "eval.md").read_text()
    assert "Multi-turn (MagicBrush protocol)" in md
