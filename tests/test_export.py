"""Export: parquet shards with embedded images that load_dataset reads; leak-free splits;
review policy; the dataset card."""

from __future__ import annotations

import shutil

import pytest
import yaml
from builders import TRIPLES, make_build

from dsbuild.augment.stage import run_augment
from dsbuild.core.decisions import add_decisions, make_decision
from dsbuild.core.errors import DsbuildError
from dsbuild.export.writer import export_build, split_captions

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")

# Captions that chain: B's input is A's output, C shares A's input: one group, one split.
CHAINED = TRIPLES + [
    ("chairs", "object", "change", "a blue velvet armchair", "make the armchair green",
     "a green velvet armchair"),
    ("chairs", "object", "add", "a red velvet armchair", "add a cushion",
     "a red velvet armchair with a cushion"),
] + [
    ("living-room", "room", "change", f"a {s} living room with a {c} sofa",
     f"make the sofa {c2}", f"a {s} living room with a {c2} sofa")
    for s in ("modern", "scandinavian") for c, c2 in (("grey", "white"), ("green", "grey"))
] + [
    ("chairs", "object", "change", f"a {m} dining chair", "make the chair rustic",
     f"a rustic {m} dining chair") for m in ("oak", "pine", "walnut", "birch")
]


def load(path, tmp_path):
    """datasets.load_dataset(DIR) with a fresh cache: with HF_DATASETS_OFFLINE=1 (conftest),
    datasets would otherwise return whatever it cached earlier under the name 'export'."""
    cache = tmp_path / f"hf-cache-{len(list(tmp_path.glob('hf-cache-*')))}"
    return datasets.load_dataset(str(path), cache_dir=str(cache))


@pytest.fixture
def built(mini_build):
    mini_build.update(["export.grid_pairs=3", "augment.ratio=0.2", "export.test_ratio=0.25"])
    make_build(mini_build, samples=3, triples=CHAINED, keep_every=1)
    run_augment(mini_build)
    return mini_build


def test_round_trip_load_dataset(built, tmp_path):
    res = export_build(built)
    ds = load(res.path, tmp_path)
    assert set(ds) == {"train", "test"}
    total = sum(len(ds[k]) for k in ds)
    assert total == sum(v["rows"] for v in res.counts.values())
    f = ds["train"].features
    assert isinstance(f["input_image"], datasets.Image)
    assert isinstance(f["edited_image"], datasets.Image)
    for col in ("edit_prompt", "original_prompt", "edited_prompt", "pair_id", "triple_id",
                "agent", "level", "operation", "p2p_mode", "scheduler"):
        assert f[col] == datasets.Value("string"), col
    assert f["no_change"] == datasets.Value("bool") and f["seed"] == datasets.Value("int64")
    for col in ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image", "guidance",
                "self_replace", "cross_replace"):
        assert f[col] == datasets.Value("float64"), col
    row = ds["train"][0]
    assert row["input_image"].size == (32, 32) and row["edited_image"].size == (32, 32)
    # bytes are embedded, names are bare: the files work anywhere, without the build
    for shard in sorted((res.path / "data").glob("*.parquet")):
        t = pq.read_table(shard, columns=["input_image", "edited_image"])
        for col in ("input_image", "edited_image"):
            for v in t.column(col).to_pylist():
                assert v["bytes"] and v["bytes"][:4] == b"\x89PNG"
                assert "/" not in v["path"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(res.path, moved)
    shutil.rmtree(built.images_dir)
    again = load(moved, tmp_path)
    assert again["test"][0]["input_image"].size == (32, 32)


def test_no_caption_in_both_splits_and_no_change_in_both(built, tmp_path):
    res = export_build(built)
    caps = split_captions(res.path)
    assert caps["train"] and caps["test"]
    assert caps["train"].isdisjoint(caps["test"])
    assert res.counts["train"]["no_change"] >= 1 and res.counts["test"]["no_change"] >= 1
    ds = load(res.path, tmp_path)
    for k in ds:
        for r in ds[k].remove_columns(["input_image", "edited_image"]):
            if r["no_change"]:
                assert r["original_prompt"] == r["edited_prompt"]
                assert r["clip_sim_dir"] is None


def test_split_is_deterministic_and_export_resumes(built):
    first = export_build(built)
    ids = {k: pq.read_table(f).column("pair_id").to_pylist()
           for k in ("train", "test") for f in (first.path / "data").glob(f"{k}-*")}
    assert export_build(built).skipped
    again = export_build(built, force=True)
    assert not again.skipped
    ids2 = {k: pq.read_table(f).column("pair_id").to_pylist()
            for k in ("train", "test") for f in (again.path / "data").glob(f"{k}-*")}
    assert ids == ids2
    built.update(["export.seed=5"])
    third = export_build(built)
    assert not third.skipped


def test_review_policy_and_corrections(built, tmp_path):
    pairs = [s["pair_id"] for s in built.records("filter") if s["keep"]]
    add_decisions(built, [
        make_decision(pairs[0], "reject", tool="fiftyone", reason="bad edit"),
        make_decision(pairs[1], "accept", tool="labelstudio",
                      corrected_edit="paint the armchair blue"),
        make_decision(pairs[2], "accept", tool="labelstudio"),
    ])
    res = export_build(built)
    ds = load(res.path, tmp_path)
    rows = [r for k in ds for r in ds[k].remove_columns(["input_image", "edited_image"])]
    got = {r["pair_id"]: r for r in rows}
    assert pairs[0] not in got
    assert got[pairs[1]]["edit_prompt"] == "paint the armchair blue"
    assert got[pairs[1]]["original_edit"] != "paint the armchair blue"
    # the correction is flagged; the captions stay those the images were generated from
    triples = {t["id"]: t for t in built.records("captions")}
    fixed = got[pairs[1]]
    assert fixed["corrected"] is True and got[pairs[2]]["corrected"] is False
    assert fixed["original_edit"] == triples[fixed["triple_id"]]["edit"]
    assert fixed["edited_prompt"] == triples[fixed["triple_id"]]["output"]
    assert not any(r["corrected"] for r in rows if r["no_change"])
    assert got[pairs[1]]["review"] == "accept"
    assert res.stats["rejected_by_review"] == 1 and res.stats["corrected"] == 1
    built.update(["export.policy=accepted"])
    res = export_build(built)
    ds = load(res.path, tmp_path)
    edits = {r["pair_id"] for k in ds for r in ds[k].remove_columns(
        ["input_image", "edited_image"]) if not r["no_change"]}
    assert edits == {pairs[1], pairs[2]}


def test_card(built):
    res = export_build(built)
    text = (res.path / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "cc-by-4.0" and meta["task_categories"] == ["image-to-image"]
    assert meta["size_categories"] == ["n<1K"]
    files = meta["configs"][0]["data_files"]
    assert {f["split"] for f in files} == {"train", "test"}
    for f in files:
        assert list(res.path.glob(f["path"]))
    assert "![Sample pairs" in text and (res.path / "grid.png").stat().st_size > 1000
    for needle in ("| train |", "### Per agent", "| living-room | room |", "### Per operation",
                   "clip_sim_dir (image change", "≥ 0.2", "euler_ancestral", "no-change",
                   "Not computed"):
        assert needle in text, needle
    assert str(built.root.resolve()) not in text and "/tmp" not in text
    # once the diversity stage has run on the build, the card shows its overall table
    from dsbuild.diversity.stage import run_diversity

    div = run_diversity(built)
    md = (built.reports_dir / "diversity.md").read_text()
    overall = md.split("## Overall", 1)[1].split("\n## ", 1)[0].strip()
    mtld = div.report["builds"][0]["fields"]["input"]["overall"]["mtld"]
    assert f"{mtld:.2f}" in overall.splitlines()[2]  # the first data row: input
    res = export_build(built)
    assert not res.skipped  # a new diversity report makes the card out of date
    text = (res.path / "README.md").read_text()
    assert overall in text and "Not computed" not in text


def test_export_refuses_foreign_folder_and_empty_builds(built, mini_recipe, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("my file")
    with pytest.raises(DsbuildError, match="not a dsbuild export"):
        export_build(built, other)
    assert (other / "keep.txt").exists()
    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe

    empty = Build.init(tmp_path / "empty", load_recipe(mini_recipe))
    make_build(empty, samples=1, keep_every=10 ** 6)
    empty_scores = [s for s in empty.records("filter")]
    assert sum(s["keep"] for s in empty_scores) == 1
    add_decisions(empty, [make_decision(s["pair_id"], "reject", tool="fiftyone")
                          for s in empty_scores])
    with pytest.raises(DsbuildError, match="nothing to export"):
        export_build(empty)


def test_export_cli(built, tmp_path):
    from click.testing import CliRunner

    from dsbuild.cli import cli

    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export", str(built.root), "--export-dir", str(out)])
    assert r.exit_code == 0, r.output
    assert "written" in r.output and (out / "README.md").exists()
    r = CliRunner().invoke(cli, ["export", str(built.root), "--export-dir", str(out)])
    assert "up to date" in r.output


def test_train_only_when_test_ratio_is_zero(built, tmp_path):
    built.update(["export.test_ratio=0"])
    res = export_build(built)
    assert res.counts["test"]["rows"] == 0
    meta = yaml.safe_load((res.path / "README.md").read_text().split("---")[1])
    assert [f["split"] for f in meta["configs"][0]["data_files"]] == ["train"]
    assert set(load(res.path, tmp_path)) == {"train"}


def test_split_stays_near_its_ratio_with_a_big_caption_group():
    """A large caption-chained group never lands in test just for coming first in seeded
    order; test is still never empty."""
    from dsbuild.core.split import row_nodes, split_rows

    chain = {f"c{i}": row_nodes(f"t{i}", [f"caption {i}", f"caption {i + 1}"]) for i in range(60)}
    singles = {f"s{i}": row_nodes(f"u{i}", [f"single {i}"]) for i in range(40)}
    for seed in range(200):
        row_split, _ = split_rows({**chain, **singles}, 0.1, seed)
        n_test = sum(v == "test" for v in row_split.values())
        assert 5 <= n_test <= 15, (seed, n_test)
    # only big groups: the smallest goes to test rather than none
    big = {f"{g}{i}": row_nodes(f"{g}{i}", [f"{g} caption", f"{g} {i}"])
           for g, n in (("a", 30), ("b", 20)) for i in range(n)}
    row_split, _ = split_rows(big, 0.1, 0)
    assert sorted(k[0] for k, v in row_split.items() if v == "test") == ["b"] * 20


def test_edit_mask_column_carries_the_blend_masks(mini_build, tmp_path):
    """Pairs made with local blend export their mask (the ground-truth edit region) as
    ``edit_mask``; others and no-change rows have none; a broken mask drops its row."""
    mini_build.update(["augment.ratio=0.3", "export.test_ratio=0.25"])
    made = make_build(mini_build, samples=3, triples=CHAINED, keep_every=1, masks=True)
    run_augment(mini_build)
    masked = {p["id"]: p["images"]["mask"] for p in made["pairs"] if "mask" in p["images"]}
    assert masked and len(masked) < len(made["pairs"])
    res = export_build(mini_build)
    ds = load(res.path, tmp_path)
    assert isinstance(ds["train"].features["edit_mask"], datasets.Image)
    rows = [r for k in ds for r in ds[k].cast_column("edit_mask", datasets.Image(decode=False))]
    pairs = [r for r in rows if not r["no_change"]]
    assert {r["pair_id"] for r in pairs if r["edit_mask"]} == set(masked) & {
        r["pair_id"] for r in pairs}
    for r in pairs:
        if r["edit_mask"]:
            want = (mini_build.root / masked[r["pair_id"]]).read_bytes()
            assert r["edit_mask"]["bytes"] == want
            assert r["edit_mask"]["path"] == f"{r['pair_id']}_mask.png"
    assert all(r["edit_mask"] is None for r in rows if r["no_change"])
    assert res.stats["with_edit_mask"] == sum(bool(r["edit_mask"]) for r in pairs)
    card = (res.path / "README.md").read_text()
    assert f"{res.stats['with_edit_mask']} rows carry their blend mask (`edit_mask`)" in card
    # a mask that no longer decodes keeps its row out of the parquet files, counted
    broken = sorted(masked)[0]
    (mini_build.root / masked[broken]).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    again = export_build(mini_build, force=True)
    ids = {i for k in ("train", "test") for f in (again.path / "data").glob(f"{k}-*")
           for i in pq.read_table(f).column("pair_id").to_pylist()}
    assert broken not in ids and again.stats["unreadable_images"] == 1


# ---------------------------------------------------------------- kills and a full disk
KILL_AT = """
import os, signal, sys
from pathlib import Path
import dsbuild.export.writer as w
from dsbuild.core.build import Build

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

point, exchange, replace = sys.argv[2], w._exchange, os.replace
if point == "before-swap":
    w._exchange = die
elif point == "after-swap":
    w._exchange = lambda a, b: exchange(a, b) and die()
elif point == "between-renames":  # a file system without an atomic exchange
    w._exchange = lambda a, b: False
    os.replace = lambda a, b: replace(a, b) or (Path(a).name == "export" and die())
elif point == "writing":
    w.write_shards = die
w.export_build(Build.open(sys.argv[1]), force=True)
"""


def killed_export(build, point: str) -> None:
    """Run `dsbuild export --force` in a process SIGKILLed at ``point`` of the swap."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", KILL_AT, str(build.root), point],
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr


def files_of(path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*"))
            if f.is_file()}


def side_folders(build) -> list[str]:
    return sorted(p.name for p in build.root.glob(".export.*"))


@pytest.mark.parametrize("point", ["before-swap", "after-swap", "between-renames"])
def test_a_kill_inside_the_export_swap_leaves_the_old_or_the_new_export_whole(built, point):
    from dsbuild.export.writer import read_info

    out = export_build(built).path
    old = files_of(out)
    built.update(["export.seed=5"])  # the next export differs
    sig = built.signature("export")
    killed_export(built, point)
    if point == "before-swap":
        assert files_of(out) == old
    elif point == "after-swap":  # the new one is whole; the next run only writes the marker
        new = files_of(out)
        assert read_info(out)["signature"] == sig and new != old
        res = export_build(built)
        assert files_of(out) == new and built.is_complete("export") and not res.skipped
    else:  # the old copy is whole beside it; the next run, killed too, puts it back
        aside = [p for p in built.root.glob(".export.old-*")]
        assert not out.exists() and len(aside) == 1 and files_of(aside[0]) == old
        killed_export(built, "writing")
        assert files_of(out) == old
    res = export_build(built)
    assert read_info(out)["signature"] == sig and built.is_complete("export")
    assert load(out, built.root / "hf") and side_folders(built) == []
    assert res.counts == read_info(out)["counts"]


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    OSError("[errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"),
])
def test_a_full_disk_during_export_force_is_one_line_and_keeps_the_old_export(
        built, monkeypatch, capsys, error):
    import dsbuild.export.writer as writer
    from dsbuild.cli import main

    out = export_build(built).path
    old = files_of(out)

    def full(build, rows, tmp, shard_mb):
        (tmp / "data").mkdir()
        (tmp / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 half")
        raise error  # as pyarrow raises it when the disk fills

    monkeypatch.setattr(writer, "write_shards", full)
    with pytest.raises(SystemExit) as exc:
        main(["export", str(built.root), "--force"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on the device while "
                                               f"writing the export of {built.root}")
    assert f"the old export {out} is kept as it was" in err[0]
    assert files_of(out) == old and side_folders(built) == []
    assert built.is_complete("export")  # status still says the export is there
