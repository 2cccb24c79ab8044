"""One build, two generators (``generate.mix``): P2P on the tiny SD and the editor on
tiny-ip2p make pairs side by side that go through filter, verify, augment and export together;
every row names its generator and carries its parameters; a kill inside the second generator
resumes that generator only, and a run after completion recomputes nothing; the generate
report, the card and FiftyOne show each generator apart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.core.hashing import content_id, signature  # noqa: E402
from dsbuild.generate.settings import GenerateSettings  # noqa: E402

MIX = "generate.mix=[{generator: editor, model: tiny-ip2p, editor: {variants: 2}}]"
ENV = {**os.environ, "DSBUILD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
ENV.pop("DSBUILD_PLUGINS", None)


def dsbuild(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsbuild", *map(str, args)], env=env or ENV,
                          capture_output=True, text=True, timeout=600)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("r*.jsonl")) for line in
            f.read_text().splitlines() if line.strip()]


def marker(b: Path, stage: str) -> dict:
    (m,) = (b / ".done" / stage).glob("*/r00000")
    return json.loads(m.read_text())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A mixed build killed after P2P's 4 pairs and the editor's first, then resumed to the
    export: (build folder, the resumed generate marker)."""
    from conftest import MINI_RECIPE

    tmp = tmp_path_factory.mktemp("mixed")
    recipe = tmp / "mini.yaml"
    recipe.write_text(MINI_RECIPE)
    b, flag = tmp / "b", tmp / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsbuild", "run", str(b), "--recipe", str(recipe), "--offline",
         "--per-agent", "1", "--set", MIX],
        env={**ENV, "DSBUILD_PAUSE_AT": f"pairs/r00000.jsonl:5:{flag}"}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while not flag.exists():  # the writer creates it once it holds 5 records, then waits
        assert proc.poll() is None, proc.communicate()
        try:
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (b / ".done" / "generate").exists()
    r = dsbuild("run", b)
    assert r.returncode == 0, r.stdout + r.stderr
    return b, marker(b, "generate")


def test_both_generators_reach_the_export(mixed):
    import pyarrow.parquet as pq

    b, _ = mixed
    pairs = records(b / "pairs")
    by_gen = {g: [p for p in pairs if p["generator"] == g] for g in ("p2p", "editor")}
    assert len(by_gen["p2p"]) == 4 and len(by_gen["editor"]) == 4 and len(pairs) == 8
    assert {p["model"] for p in by_gen["p2p"]} == {"tiny"}
    assert {p["model"] for p in by_gen["editor"]} == {"tiny-ip2p"}
    # ids are content hashes of (triple, seed, params): one per pair, never shared
    assert len({p["id"] for p in pairs}) == 8
    for p in pairs:
        assert p["id"] == content_id(p["triple_id"], p["seed"], p["params"])
    # the editor's own section reached it (2 variants per source), inherited steps and size
    assert {p["params"]["steps"] for p in pairs} == {4}
    assert len({p["source_id"] for p in by_gen["editor"]}) == 2
    # every later stage saw every pair, whoever made it
    assert {s["pair_id"] for s in records(b / "scores")} == {p["id"] for p in pairs}
    assert {v["pair_id"] for v in records(b / "verify")} == {p["id"] for p in pairs}

    rows = [row for f in sorted((b / "export" / "data").glob("*.parquet"))
            for row in pq.read_table(f).to_pylist()]
    edits = [row for row in rows if not row["no_change"]]
    assert {row["generator"] for row in edits} == {"p2p", "editor"}
    by_id = {p["id"]: p for p in pairs}
    for row in edits:
        pair = by_id[row["pair_id"]]
        assert row["generator"] == pair["generator"] and row["model"] == pair["model"]
        assert json.loads(row["params"]) == pair["params"]
        assert row["guidance"] == pytest.approx(pair["params"]["guidance"])
        if row["generator"] == "p2p":
            assert row["p2p_mode"] == pair["params"]["mode"] and row["editor_pipeline"] is None
        else:
            assert row["editor_pipeline"] == "StableDiffusionInstructPix2PixPipeline"
            assert row["image_guidance"] == pytest.approx(pair["params"]["image_guidance"])
            assert row["p2p_mode"] is None and row["self_replace"] is None

    card = (b / "export" / "README.md").read_text()
    n = {g: sum(r["generator"] == g for r in edits) for g in ("p2p", "editor")}
    assert f"p2p made {n['p2p']} rows, editor made {n['editor']} rows" in card
    assert "### Generation (p2p:" in card and "### Generation (editor:" in card
    assert f"{n['editor']} exported rows were made by editor." in card
    editor_part = card.split("### Generation (editor:")[1].split("rows carry")[0]
    assert "| model | tiny-ip2p |" in editor_part and "| variants | 2 |" in editor_part
    assert "editor_pipeline" in editor_part and "p2p_mode" not in editor_part


def test_resume_and_stats_are_per_generator(mixed):
    b, resumed = mixed
    runs = resumed["stats"]["generators"]
    # the kill came after P2P's 4 pairs and the editor's first: the resumed run made 3 more
    assert (runs["p2p"]["pairs"], runs["editor"]["pairs"]) == (0, 3)
    assert resumed["stats"]["pairs"] == 3 and resumed["records"] == 8
    report = json.loads((b / "reports" / "generate.json").read_text())
    assert report["pairs"] == 8 and report["generators"] == {"p2p": 4, "editor": 4}
    sheets = sorted(p.name for p in (b / "reports" / "generate_contact_sheet").glob("*.png"))
    assert sheets == ["editor_chairs.png", "editor_living-room.png", "p2p_chairs.png",
                      "p2p_living-room.png"]
    md = (b / "reports" / "generate.md").read_text()
    assert "| generator | agent | pages |" in md and "generator=editor model=tiny-ip2p" in md

    # a run after completion recomputes nothing: same markers, same files, no new record
    pngs = {p: p.stat().st_mtime_ns for p in (b / "pairs" / "img").rglob("*.png")}
    before = {st: marker(b, st) for st in ("generate", "filter", "verify", "export")}
    r = dsbuild("run", b)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {st: marker(b, st) for st in before} == before
    assert {p: p.stat().st_mtime_ns for p in (b / "pairs" / "img").rglob("*.png")} == pngs


def test_mix_settings_inherit_sign_and_refuse():
    plain = GenerateSettings(model="tiny")
    assert "mix" not in plain.model_dump() and "mix" not in plain.signature_dict()
    s = GenerateSettings.model_validate({"model": "tiny", "steps": 3, "editor": {"variants": 4},
                                         "mix": ["editor"]})
    p2p, ed = s.runs()
    assert (p2p.generator, p2p.mix, ed.generator, ed.steps) == ("p2p", [], "editor", 3)
    assert ed.section("editor").variants == 4  # the top-level editor section is its own
    assert s.labels() == ["p2p", "editor"]
    # the first run signs as it would alone; the mix signs apart
    assert {k: v for k, v in s.signature_dict().items() if k not in ("mix", "editor")} == \
        GenerateSettings(model="tiny", steps=3).signature_dict()
    assert signature(s.signature_dict()) != signature(
        GenerateSettings.model_validate({"model": "tiny", "steps": 3,
                                         "mix": ["editor"]}).signature_dict())
    # one generator on two models: both run, labelled by model
    two = GenerateSettings.model_validate({"model": "tiny", "mix": [{"model": "arch:small"}]})
    assert two.labels() == ["p2p:tiny", "p2p:arch:small"]
    for bad, words in (({"mix": [{"generator": "nope"}]}, "mix[0]: unknown generator 'nope'"),
                       ({"mix": [{"steps": 0}]}, "mix[0].steps: Input should be greater"),
                       ({"mix": ["p2p"]}, "mix[0]: generator p2p on model"),
                       ({"mix": [{"generator": "editor", "mix": []}]}, "mix of its own")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            GenerateSettings.model_validate(bad)


def test_a_bad_mix_entry_is_one_line(tmp_path, mini_recipe):
    r = dsbuild("run", tmp_path / "c", "--recipe", mini_recipe, "--offline", "--set",
                "generate.mix=[{generator: editor, model: tiny-ip2p, editor: {colour: 1}}]")
    assert r.returncode == 2 and not (tmp_path / "c").exists()
    # the config error's usual two lines: where, then the entry and key to fix
    assert r.stderr.strip().splitlines()[-1].endswith(
        "mix[0]: editor.colour: Extra inputs are not permitted")
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 1


def test_one_generator_on_two_models_plans_its_own_ids():
    from dsbuild.core.errors import DsbuildError
    from dsbuild.generate.generators.p2p.generator import PromptToPrompt
    from dsbuild.generate.stage import plan_runs

    s = GenerateSettings(model="tiny", steps=2, height=32, width=32, per_triple=2)
    a, b = PromptToPrompt(s, s, "cpu", "fp32"), PromptToPrompt(s, s, "cpu", "fp32")
    t = {"id": "t1", "input": "a red chair", "output": "a blue chair", "edit": "make it blue",
         "level": "object"}
    # two generators whose plans meet (b stands for another generator here): refused
    with pytest.raises(DsbuildError, match="generators p2p and other plan the same pair id"):
        plan_runs([a, b], [t], ["p2p", "other"])
    b.model = "tiny-2"  # what a second model looks like to the planner
    first, second = plan_runs([a, b], [t], ["p2p:tiny", "p2p:tiny-2"])
    assert [p.id for p in first] == [p.id for p in a.plan(t)]  # the first keeps its ids
    assert [p.id for p in second] == [content_id(p.id, "tiny-2") for p in first]


@pytest.mark.server
@pytest.mark.skipif(find_spec("fiftyone") is None, reason="fiftyone is not installed")
def test_fiftyone_shows_each_generator_and_its_params(mixed, tmp_path, monkeypatch):
    from dsbuild.core.build import Build
    from dsbuild.review import fiftyone as fr

    monkeypatch.setenv("FIFTYONE_DO_NOT_TRACK", "true")
    monkeypatch.setenv("FIFTYONE_DATABASE_DIR", str(tmp_path / "fo-db"))
    monkeypatch.setenv("FIFTYONE_DATABASE_VALIDATION", "false")
    monkeypatch.setenv("FIFTYONE_PLUGINS_DIR", str(tmp_path / "plugins"))
    if "fiftyone" in sys.modules:
        monkeypatch.setattr(sys.modules["fiftyone"].config, "plugins_dir",
                            str(tmp_path / "plugins"))
    server = fr.Mongod(tmp_path / "mongod")
    server.start()
    try:
        fo = fr.import_fiftyone()
        build = Build.open(mixed[0])
        build.update(["review.dataset_name=t-mixed-generators"])
        ds = fo.load_dataset(fr.build_dataset(build)["name"])
        schema = ds.get_field_schema()
        for field in ("generator", "model", "p2p_mode", "self_replace", "editor_pipeline",
                      "image_guidance", "source_model", "guidance"):
            assert field in schema
        pairs = {p["id"]: p for p in build.records("generate")}
        seen = set()
        for s in ds.select_group_slices(_allow_mixed=True).iter_samples():
            pair = pairs.get(s["pair_id"])
            if pair is None:  # a no-change sample of augment
                continue
            seen.add(pair["id"])
            assert s["generator"] == pair["generator"] and s["model"] == pair["model"]
            assert s["guidance"] == pytest.approx(pair["params"]["guidance"])
            if pair["generator"] == "editor":
                assert s["image_guidance"] == pytest.approx(pair["params"]["image_guidance"])
                assert s["p2p_mode"] is None
            else:
                assert s["p2p_mode"] == pair["params"]["mode"] and s["editor_pipeline"] is None
        assert seen == set(pairs)
        for name in ("p2p", "editor"):  # its pairs and the no-change samples made from them
            view = ds.load_saved_view(f"generator-{name}")
            assert view.distinct("generator") == [name]
            assert {p for p, pair in pairs.items() if pair["generator"] == name} <= \
                set(view.distinct("pair_id"))
        (gen,) = [g for g in ds.app_config.sidebar_groups if g.name == "generation"]
        assert {"generator", "p2p_mode", "editor_pipeline", "image_guidance"} <= set(gen.paths)
    finally:
        server.stop()
