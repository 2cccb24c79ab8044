"""Sessions (dsbuild.core.sessions) with the generators that edit an image turn after turn:
the editor (tiny InstructPix2Pix), the images-edit API (a real OpenAI-compatible server on
127.0.0.1) and inpainting (tiny SD inpainting), on a 3-turn chain and a small tree
(tests/builders.SESSIONS) beside a single-edit triple.

Each node edits its parent's output (the root image at turn 1), so turn t's input is turn
t-1's output pixel-equal; a node's image equals calling the pipeline (or the endpoint) yourself
on its parent's output with the run's seed and knobs; a run (one draw index) has one seed and
one setting of the knobs; a kill mid session and a resume give the same pairs and PNGs (the
API from its cache, asking nothing twice); single edits are made as before.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from builders import TRIPLES, session_triples, triple_record
from openai_server import OpenAIServer, b64_image, error
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.core import sessions  # noqa: E402
from dsbuild.core.build import Build  # noqa: E402
from dsbuild.core.config import load_recipe  # noqa: E402
from dsbuild.core.errors import StageFailed  # noqa: E402
from dsbuild.generate.generators.api.generator import ImagesEditAPI  # noqa: E402
from dsbuild.generate.generators.editor.drivers import to_pil  # noqa: E402
from dsbuild.generate.generators.editor.generator import InstructionEditor  # noqa: E402
from dsbuild.generate.generators.inpaint.generator import (  # noqa: E402
    RegionInpainter,
    mask_pil,
)
from dsbuild.generate.settings import GenerateSettings  # noqa: E402
from dsbuild.generate.stage import run_generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE, STEPS = 32, 2
RECIPE = "mini"
NODES = session_triples(RECIPE)  # a 3-turn chain (living-room) and a 3-node tree (chairs)
SINGLE = triple_record(RECIPE, *TRIPLES[1])  # an add: inpainting makes it too
KNOBS = ("guidance", "image_guidance", "strength", "variant")
KEY_ENV, SECRET = "DSBUILD_TEST_SESSION_IMAGES_KEY", "sk-session-test"
SHIFT = 40  # what the test endpoint adds to every channel of the image it edits


def grid(image) -> np.ndarray:
    return np.round(np.asarray(image, dtype=np.float64) * 255) / 255


def check_runs(made: list, plans: list) -> dict[str, dict[str, object]]:
    """The contract on the session nodes a generator made: one run per draw index with one
    seed and one setting of the knobs, the session fields and run id in the record, each node
    on its parent's output (the run's root at turn 1). Returns run -> node id -> Made."""
    runs: dict[str, dict[str, object]] = {}
    for m in made:
        if sessions.is_session(m.plan.triple):
            runs.setdefault(m.record["session_run"], {})[m.plan.triple["id"]] = m
    asked = {sessions.plan_run(p) for p in plans if sessions.is_session(p.triple)}
    assert len(runs) == len(asked)
    for run, nodes in runs.items():
        ms = list(nodes.values())
        (sid, k), = {sessions.plan_run(m.plan) for m in ms}
        assert {m.plan.triple["session_id"] for m in ms} == {sid}
        assert len({m.plan.seed for m in ms}) == 1
        assert len({json.dumps([m.plan.params.get(x) for x in KNOBS]) for m in ms}) == 1
        assert run == sessions.run_id(sid, ms[0].plan.seed, ms[0].plan.params.get("guidance"),
                                      k)
        root = ms[0].images["session_source"]
        for m in ms:
            t = m.plan.triple
            assert {f: m.record[f] for f in sessions.SESSION_FIELDS} == \
                {"session_id": sid, "node_id": t["id"], "parent_id": t["parent_id"],
                 "turn": t["turn"]}
            assert np.array_equal(m.images["session_source"], root)
            parent = root if t["parent_id"] is None else nodes[t["parent_id"]].target
            assert np.array_equal(m.source, parent)  # the parent's output, pixel-equal
            assert np.array_equal(m.target, grid(m.target))  # what its PNG holds
        depth = max(m.plan.triple["turn"] for m in ms)
        assert {m.plan.triple["turn"] for m in ms} == set(range(1, depth + 1))
    return runs


def editor(batched: bool = True, **own) -> InstructionEditor:
    s = GenerateSettings(generator="editor", model="tiny-ip2p", steps=STEPS, height=SIZE,
                         width=SIZE, per_triple=2, batch_size=4, editor={"variants": 1, **own})
    return InstructionEditor(s, s.section("editor"), "cpu", "fp32", batched=batched)


def test_editor_turns_edit_the_parents_output_as_the_pipeline_does():
    gen = editor()
    plans = [p for t in [*NODES, SINGLE] for p in gen.plan(t)]
    made = list(gen.generate(plans))
    assert sorted(m.plan.id for m in made) == sorted(p.id for p in plans)
    runs = check_runs(made, plans)
    assert len(runs) == 4 and gen.stats()["session_runs"] == 4
    for m in made:
        if not sessions.is_session(m.plan.triple):
            continue
        p = m.plan.params
        with torch.no_grad():  # the pipeline called on the parent's output, seed and knobs
            ref = gen.pipe(prompt=m.plan.triple["edit"], image=to_pil(m.source),
                           num_inference_steps=STEPS, guidance_scale=p["guidance"],
                           image_guidance_scale=p["image_guidance"], output_type="np",
                           generator=torch.Generator().manual_seed(m.plan.seed)).images[0]
        np.testing.assert_allclose(m.target, ref, atol=0.5 / 255 + 1e-4)
        if m.plan.triple["parent_id"] is None:  # the root: the root caption made with the seed
            with torch.no_grad():
                root = gen.source_pipe(m.plan.triple["input"], num_inference_steps=STEPS,
                                       guidance_scale=7.5, height=SIZE, width=SIZE,
                                       output_type="np", generator=torch.Generator()
                                       .manual_seed(m.plan.seed)).images[0]
            np.testing.assert_allclose(m.source, root, atol=0.5 / 255 + 1e-4)
    # a tree: both children of the root edit the same root, the grandchild its own parent
    tree = next(n for n in runs.values() if any(m.plan.triple["agent"] == "chairs"
                                                for m in n.values()))
    kids = [m for m in tree.values() if m.plan.triple["parent_id"] is None]
    assert len(kids) == 2 and np.array_equal(kids[0].source, kids[1].source)

    # single edits are made as before: the same plans and pixels with or without sessions
    alone = editor()
    single = alone.plan(SINGLE)
    assert single == [p for p in plans if p.triple is SINGLE]
    for a, m in zip(alone.generate(single), [m for m in made if m.plan.triple is SINGLE],
                    strict=True):
        assert a.plan == m.plan and np.array_equal(a.target, m.target)
        assert m.record is None and m.images is None
    # one call per edit (no batch): the same images
    unbatched = {m.plan.id: m.target for m in editor(batched=False).generate(plans)}
    for m in made:
        np.testing.assert_allclose(m.target, unbatched[m.plan.id], atol=1.5 / 255)

    # a resumed run asks for some runs only: each is made as in the whole batch, pixel-equal
    some = [p for p in plans if sessions.is_session(p.triple) and p.index == 1]
    again = {m.plan.id: m for m in editor().generate(some)}
    assert sorted(again) == sorted(p.id for p in some)
    for m in made:
        if m.plan.id in again:
            assert np.array_equal(again[m.plan.id].target, m.target)
            assert np.array_equal(again[m.plan.id].source, m.source)


def test_a_photo_session_edits_the_photo(tmp_path):
    from dsbuild.core.photos import load_photo

    Image.new("RGB", (SIZE, SIZE), (200, 120, 40)).save(tmp_path / "p.png")
    rec = {"id": "ph1", "path": "p.png", "image": "p.png", "width": SIZE, "height": SIZE,
           "caption": NODES[0]["input"], "license": "CC-BY-4.0", "source": "test"}

    class Root:
        root = tmp_path

    gen = editor()
    gen.sources.use_photos({"ph1": rec}, lambda p: load_photo(Root, p))
    nodes = [{**t, "photo_id": "ph1"} for t in NODES[:3]]
    plans = [p for t in nodes for p in gen.plan(t)]
    made = list(gen.generate(plans))
    check_runs(made, plans)
    photo = np.asarray(Image.open(tmp_path / "p.png"))
    for m in made:
        assert np.array_equal(np.round(m.images["session_source"] * 255).astype("uint8"), photo)
        assert m.record["photo_id"] == "ph1"
    assert gen.stats()["sources_made"] == 0


def inpainter(**own) -> RegionInpainter:
    own = {"threshold": 0.6, "dilate": 1, "variants": 1, **own}
    s = GenerateSettings(generator="inpaint", model="tiny-inpaint", steps=STEPS, height=SIZE,
                         width=SIZE, per_triple=2, inpaint=own)
    return RegionInpainter(s, s.section("inpaint"), "cpu", "fp32")


def test_inpaint_turns_repaint_their_own_region_of_the_parents_output():
    gen = inpainter()
    plans = [p for t in [*NODES, SINGLE] for p in gen.plan(t)]
    # a session makes every turn, a change included (its children edit its output)
    assert {p.triple["id"] for p in plans} == {t["id"] for t in [*NODES, SINGLE]}
    made = list(gen.generate(plans))
    assert sorted(m.plan.id for m in made) == sorted(p.id for p in plans)
    check_runs(made, plans)
    for m in made:
        if not sessions.is_session(m.plan.triple):
            continue
        mask, origin = gen.region(m.source, m.plan.triple["edit"])  # on the parent's output
        assert np.array_equal(m.mask, mask) and m.plan.params["mask_from"] == origin
        p = m.plan.params
        with torch.no_grad():
            ref = gen.pipe(prompt=m.plan.triple["output"], image=to_pil(m.source),
                           mask_image=mask_pil(m.mask), height=SIZE, width=SIZE,
                           strength=p["strength"], guidance_scale=p["guidance"],
                           num_inference_steps=STEPS, output_type="np",
                           generator=torch.Generator("cpu").manual_seed(m.plan.seed)
                           ).images[0]
        np.testing.assert_allclose(m.target[m.mask], ref[m.mask], atol=0.5 / 255 + 1e-5)
        assert np.array_equal(m.target[~m.mask], m.source[~m.mask])  # composite: the parent's
    single = inpainter()
    for a, m in zip(single.generate(single.plan(SINGLE)),
                    [m for m in made if m.plan.triple is SINGLE], strict=True):
        assert a.plan == m.plan and np.array_equal(a.target, m.target)


# ------------------------------------------------------------------ the stage: kill, resume

SETTINGS = {
    "editor": ["generate.generator=editor", "generate.model=tiny-ip2p",
               "generate.editor.variants=1"],
    "inpaint": ["generate.generator=inpaint", "generate.model=tiny-inpaint",
                "generate.inpaint.threshold=0.6", "generate.inpaint.dilate=1",
                "generate.inpaint.variants=1"],
}
SHARED = ["generate.steps=2", f"generate.height={SIZE}", f"generate.width={SIZE}",
          "generate.per_triple=2", "generate.batch_size=4"]


def api_settings(base_url: str) -> list[str]:
    return ["generate.generator=api", "generate.model=tiny", f"generate.api.base_url={base_url}",
            "generate.api.model=test-image-model", f"generate.api.api_key_env={KEY_ENV}",
            "generate.api.concurrency=2", "generate.api.retry_backoff=0.01",
            "generate.api.max_retries=1", "generate.api.timeout=5"]


def make(root: Path, recipe: Path, overrides: list[str]) -> Build:
    b = Build.init(root, load_recipe(recipe), recipe_path=str(recipe),
                   overrides=SHARED + overrides)
    tr = session_triples(b.recipe.name) + [triple_record(b.recipe.name, *TRIPLES[1])]
    b.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None, report=False)
    return b


def pixels(build: Build, rel: str) -> np.ndarray:
    return np.asarray(Image.open(build.root / rel).convert("RGB"))


def check_build(b: Build) -> list[dict]:
    """The written pairs keep the chain: a node's input PNG is its parent's output PNG
    pixel-equal (the run's source image at turn 1), one source image per run."""
    pairs = list(b.records("generate"))
    runs = sessions.by_run(pairs)
    assert runs
    for run in runs.values():
        nodes = {p["node_id"]: p for p in run}
        src = {pixels(b, p["images"]["session_source"]).tobytes() for p in run}
        assert len(src) == 1
        for p in run:
            up = nodes.get(p["parent_id"])
            parent = (pixels(b, p["images"]["session_source"]) if up is None
                      else pixels(b, up["images"]["output"]))
            assert np.array_equal(pixels(b, p["images"]["input"]), parent)
            assert p["session_run"] and p["turn"] == (up["turn"] + 1 if up else 1)
    return pairs


def written(b: Build) -> dict[str, tuple]:
    """Every pair record and the bytes of its PNGs."""
    return {p["id"]: (p, {k: (b.root / v).read_bytes() for k, v in p["images"].items()})
            for p in b.records("generate")}


def kill_at(b: Build, records: int, tmp_path: Path, **env) -> None:
    """``dsbuild generate`` in a subprocess, killed once its shard holds ``records`` pairs."""
    paused = tmp_path / "paused.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", DSBUILD_NO_PROGRESS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]), **env,
               DSBUILD_PAUSE_AT=f"pairs/r00000.jsonl:{records}:{paused}")
    proc = subprocess.Popen([sys.executable, "-m", "dsbuild", "generate", str(b.root)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not paused.exists():
        time.sleep(0.05)  # waits for the event (the pause file), races nothing
    assert paused.exists(), proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = b.root / "pairs" / "r00000.jsonl.partial"
    assert partial.read_text().count("\n") == records and not b.is_complete("generate")


@pytest.mark.parametrize("generator", ["editor", "inpaint"])
def test_kill_mid_session_and_resume_give_the_same_pairs_and_pixels(generator, tmp_path,
                                                                     mini_recipe):
    ref = make(tmp_path / "ref", mini_recipe, SETTINGS[generator])
    res = run_generate(ref)
    assert res.records == 14 and res.stats["session_runs"] == 4  # 2 runs x 6 nodes + 2
    pairs = check_build(ref)
    assert {p.get("session_id") is None for p in pairs} == {True, False}
    b = make(tmp_path / "b", mini_recipe, SETTINGS[generator])
    kill_at(b, 5, tmp_path)  # the single's 2 pairs, then 3 turns of a session
    again = run_generate(Build.open(b.root))
    assert again.records == 14
    check_build(Build.open(b.root))
    assert written(Build.open(b.root)) == written(ref)  # records and PNG bytes


def shifted(req: dict, n: int):
    """The test endpoint's edit: every channel of the uploaded image plus SHIFT (mod 256)."""
    with Image.open(io.BytesIO(req["image"])) as im:
        out = im.convert("RGB").point(lambda v: (v + SHIFT) % 256)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return b64_image([base64.b64encode(buf.getvalue()).decode()])


@pytest.mark.server
def test_api_turns_are_requests_on_the_parents_output_and_resume_from_the_cache(
        tmp_path, mini_recipe, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with OpenAIServer(image_handler=shifted) as srv:
        ref = make(tmp_path / "ref", mini_recipe, api_settings(srv.base_url))
        res = run_generate(ref)
        assert res.records == 14 and len(srv.edit_requests) == 14
        assert res.stats["session_runs"] == 4
        pairs = check_build(ref)
        asked = {(r["body"]["image_sha256"], r["body"]["prompt"]) for r in srv.edit_requests}
        triples = {t["id"]: t for t in ref.records("captions")}
        for p in pairs:  # each turn: one request on its input image, what the endpoint sent
            inp = (ref.root / p["images"]["input"]).read_bytes()
            assert (hashlib.sha256(inp).hexdigest(), triples[p["triple_id"]]["edit"]) in asked
            assert np.array_equal(pixels(ref, p["images"]["output"]),
                                  (pixels(ref, p["images"]["input"]).astype(int) + SHIFT) % 256)

        # a kill mid session: the resumed run asks nothing twice and writes the same pixels
        b = make(tmp_path / "b", mini_recipe, api_settings(srv.base_url))
        before = len(srv.edit_requests)
        kill_at(b, 5, tmp_path, **{KEY_ENV: SECRET})
        again = run_generate(Build.open(b.root))
        assert again.records == 14 and len(srv.edit_requests) - before == 14
        assert again.stats["images"]["cached"] >= 1  # asked before the kill, not written
        assert written(Build.open(b.root)) == written(ref)


@pytest.mark.server
def test_api_a_failed_turn_drops_the_turns_under_it_and_a_rerun_asks_only_for_them(
        tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    broken = {"make the sofa green"}  # the chain's turn 2

    def handler(req, n):
        return error(500) if req["prompt"] in broken else shifted(req, n)

    with OpenAIServer(image_handler=handler) as srv:
        s = GenerateSettings.model_validate({
            "generator": "api", "model": "tiny", "steps": STEPS, "height": SIZE,
            "width": SIZE, "per_triple": 2, "batch_size": 4,
            "api": {"base_url": srv.base_url, "model": "test-image-model",
                    "api_key_env": KEY_ENV, "max_retries": 1, "retry_backoff": 0.01,
                    "timeout": 5}})

        def api() -> ImagesEditAPI:
            gen = ImagesEditAPI(s, s.section("api"), "cpu", "fp32")
            gen.use_cache(tmp_path / "cache")
            return gen

        gen = api()
        plans = [p for t in NODES for p in gen.plan(t)]
        made = []
        with pytest.raises(StageFailed, match="2 image edit request"):
            for m in gen.generate(plans):
                made.append(m)
        turns = sorted(m.plan.triple["turn"] for m in made
                       if m.plan.triple["agent"] == "living-room")
        assert turns == [1, 1]  # turn 2 failed, turn 3 dropped, in both runs
        assert len(made) == 8 and gen.stats()["session_turns_dropped"] == 2
        assert len(srv.edit_requests) == 8 + 2 * 2  # the failing ones asked twice each

        broken.clear()
        before = len(srv.edit_requests)
        again = api()
        full = list(again.generate(plans))
        check_runs(full, plans)
        assert len(full) == 12 and len(srv.edit_requests) - before == 4  # turns 2 and 3
        first = {m.plan.id: m.target for m in made}
        for m in full:
            if m.plan.id in first:
                assert np.array_equal(first[m.plan.id], m.target)
