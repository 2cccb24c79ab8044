"""The generate stage end to end on the tiny model: records, PNGs, resume, shards, sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from builders import TRIPLES, triple_record
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.core.build import Build  # noqa: E402
from dsbuild.core.config import load_recipe  # noqa: E402
from dsbuild.core.errors import ConfigError, DsbuildError  # noqa: E402
from dsbuild.generate.generators.p2p.sweep import plan_triple  # noqa: E402
from dsbuild.generate.settings import GenerateSettings  # noqa: E402
from dsbuild.generate.stage import run_generate  # noqa: E402
from dsbuild.models.sd import char_tokenizer  # noqa: E402

# two edits of one input caption share their sources
EXTRA = [("chairs", "object", "change", "a red velvet armchair", "make it green",
          "a green velvet armchair")]
SETTINGS = ["generate.model=tiny", "generate.steps=2", "generate.height=32", "generate.width=32", "generate.per_triple=2",
            "generate.batch_size=4", "generate.mode=auto", "generate.blend=true"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(root: Path, recipe: Path, triples=TRIPLES[:4] + EXTRA, extra=()) -> Build:
    b = Build.init(root, load_recipe(recipe), recipe_path=str(recipe),
                   overrides=SETTINGS + list(extra))
    tr = [triple_record(b.recipe.name, *t) for t in triples]
    b.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None, report=False)
    return b


def pixels(build: Build) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {p["id"]: tuple(np.asarray(Image.open(build.root / p["images"][k]), dtype=np.int16)
                           for k in ("input", "output"))
            for p in build.records("generate")}


def assert_same_pairs(a: Build, b: Build, tol: int = 1) -> None:
    ra = {p["id"]: p for p in a.records("generate")}
    rb = {p["id"]: p for p in b.records("generate")}
    assert ra == rb
    pa, pb = pixels(a), pixels(b)
    for pid in ra:
        for x, y in zip(pa[pid], pb[pid], strict=True):
            assert np.abs(x - y).max() <= tol, pid


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One unsharded, uninterrupted run that the other tests compare with."""
    tmp = tmp_path_factory.mktemp("ref")
    recipe = tmp / "mini.yaml"
    from conftest import MINI_RECIPE

    recipe.write_text(MINI_RECIPE)
    b = make(tmp / "build", recipe)
    res = run_generate(b)
    return b, res, recipe


def test_stage_writes_every_pair_with_metadata(reference):
    b, res, _ = reference
    assert not res.skipped and res.records == 5 * 2
    triples = {t["id"]: t for t in b.records("captions")}
    pairs = list(b.records("generate"))
    assert len({p["id"] for p in pairs}) == len(pairs) == 10
    for p in pairs:
        assert set(p) >= {"id", "triple_id", "seed", "params", "model", "images"}
        assert set(p["params"]) >= {"mode", "steps", "guidance", "cross_replace", "self_replace",
                                    "blend_words", "equalizer", "scheduler"}
        prm = p["params"]
        assert prm["mode"] in ("replace", "refine") and prm["steps"] == 2
        assert 7.5 <= prm["guidance"] <= 15 and 0.1 <= prm["self_replace"] <= 0.9
        assert 0.4 <= prm["cross_replace"] <= 0.9 and prm["scheduler"] == "euler_ancestral"
        assert p["model"] == "tiny" and p["triple_id"] in triples
        for k in ("input", "output"):
            path = b.root / p["images"][k]
            assert path.parent.name == p["triple_id"]
            assert Image.open(path).size == (32, 32)
        # local blend (generate.blend=true) leaves its final mask beside the pair
        assert ("mask" in p["images"]) == bool(prm["blend_words"])
        if prm["blend_words"]:
            m = Image.open(b.root / p["images"]["mask"])
            assert m.mode == "L" and m.size == (32, 32)
            vals = set(np.unique(np.asarray(m)).tolist())
            assert vals <= {0, 255} and 255 in vals
    assert any("mask" in p["images"] for p in pairs)
    by_caption = {}
    for p in pairs:
        by_caption.setdefault(triples[p["triple_id"]]["input"], []).append(p)
    shared = by_caption["a red velvet armchair"]
    assert len(shared) == 4 and len({p["source_id"] for p in shared}) == 2
    assert res.stats["sources"] == 8  # 10 pairs, two sources shared by two edits each
    # a shared source is the same image for both edits
    for sid in {p["source_id"] for p in shared}:
        imgs = [(b.root / p["images"]["input"]).read_bytes() for p in shared
                if p["source_id"] == sid]
        assert imgs[0] == imgs[1]
    swap = next(p for p in shared if triples[p["triple_id"]]["output"].startswith("a green"))
    assert swap["params"]["mode"] == "replace"
    assert swap["params"]["blend_words"] == [["red"], ["green"]]
    pages = sorted((b.reports_dir / "generate_contact_sheet").glob("*.png"))
    assert pages and all(Image.open(p).size[1] > 160 for p in pages)
    assert all(p.name in (b.reports_dir / "generate.md").read_text() for p in pages)


def test_rerun_skips_and_force_gives_the_same_pixels(reference):
    b, _, _ = reference
    before = pixels(b)
    assert run_generate(b).skipped
    assert not run_generate(b, force=True).skipped
    after = pixels(b)
    assert before.keys() == after.keys()
    for pid in before:
        assert all((x == y).all() for x, y in zip(before[pid], after[pid], strict=True))


def test_shards_together_equal_one_run(reference, tmp_path):
    ref, _, recipe = reference
    b = make(tmp_path / "b", recipe)
    r0 = run_generate(b, rank=0, world_size=2)
    assert not b.is_complete("generate")
    r1 = run_generate(b, rank=1, world_size=2)
    assert r0.records + r1.records == 10 and r0.records and r1.records
    assert b.is_complete("generate")
    assert_same_pairs(ref, b)


def test_resume_after_sigkill(reference, tmp_path):
    ref, _, recipe = reference
    b = make(tmp_path / "b", recipe, extra=["generate.batch_size=2"])
    partial = b.root / "pairs" / "r00000.jsonl.partial"
    paused = tmp_path / "paused.json"  # the writer stops after its 2nd of 10 pairs, until killed
    env = dict(os.environ, OMP_NUM_THREADS="1", DSBUILD_NO_PROGRESS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               DSBUILD_PAUSE_AT=f"pairs/r00000.jsonl:2:{paused}")
    proc = subprocess.Popen([sys.executable, "-m", "dsbuild", "generate", str(b.root)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not paused.exists():
        time.sleep(0.05)
    assert paused.exists(), proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = partial.read_text().count("\n")
    assert done_before == 2 and not b.is_complete("generate")
    res = run_generate(Build.open(b.root))
    assert res.records == 10
    ids = [json.loads(line)["id"] for line in
           (b.root / "pairs" / "r00000.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 10
    assert not list(b.images_dir.rglob("*.tmp"))
    assert_same_pairs(ref, Build.open(b.root))


def test_cli_generate_and_clear_errors(tmp_path, mini_recipe):
    from click.testing import CliRunner

    from dsbuild.cli import cli

    b = make(tmp_path / "b", mini_recipe, triples=TRIPLES[:1])
    r = CliRunner().invoke(cli, ["generate", str(b.root), "--set", "generate.mode=self",
                                 "--set", "generate.per_triple=1"])
    assert r.exit_code == 0, r.output
    assert "generate rank 0/1: done, 1 records" in r.output
    assert Build.open(b.root).config.generate.mode == "self"
    b2 = Build.open(b.root)
    b2.update(["generate.model=/nonexistent/sd"])
    with pytest.raises(DsbuildError, match="neither"):
        run_generate(b2)
    with pytest.raises(ConfigError, match="mode"):
        Build.open(b.root).update(["generate.mode=swap"])


def test_sweeps_are_deterministic_and_recorded():
    tok = char_tokenizer()
    t = triple_record("mini", *TRIPLES[0])
    s = GenerateSettings(sweep="grid", mode="refine", samples_object=7,
                         grid_self_replace=[0.2, 0.4], grid_guidance=[7.5, 12.0],
                         grid_cross_replace=[0.8])
    plans = plan_triple(t, s, tok)
    assert len(plans) == 7 and len({p.id for p in plans}) == 7
    assert len({p.seed for p in plans}) == 2  # 4 combinations per seed
    assert [(p.params["guidance"], p.params["self_replace"]) for p in plans[:4]] == \
        [(7.5, 0.2), (7.5, 0.4), (12.0, 0.2), (12.0, 0.4)]
    assert all(p.params["mode"] == "refine" and p.params["cross_replace"] == 0.8 for p in plans)
    rnd = GenerateSettings(mode="self", samples_object=5, samples_room=9)
    a, b = plan_triple(t, rnd, tok), plan_triple(t, rnd, tok)
    assert [p.id for p in a] == [p.id for p in b] and len(a) == 5
    assert all(p.params["cross_replace"] is None and p.params["equalizer"] is None for p in a)
    room = triple_record("mini", *TRIPLES[3])
    assert len(plan_triple(room, rnd, tok)) == 9
    other = plan_triple(t, GenerateSettings(mode="self", samples_object=5, seed=1), tok)
    assert {p.seed for p in other}.isdisjoint({p.seed for p in a})
    # another edit of the same caption draws the same seeds and guidance (shared sources)
    t2 = triple_record("mini", *EXTRA[0])
    assert [p.group_key for p in plan_triple(t2, rnd, tok)] == [p.group_key for p in a]
    rw = plan_triple(t, GenerateSettings(mode="reweight", samples_object=2), tok)
    assert all(set(p.params["equalizer"]) == {"blue"} and 1 <= p.params["equalizer"]["blue"] <= 3
               for p in rw)
