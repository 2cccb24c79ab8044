"""Sessions in one P2P pass (issue 28): the chained controller against turns run one after
another, the sweep and records of session runs, kill + resume, and `dsbuild bench session`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from builders import TRIPLES, session_triples, triple_record
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.attention.controller import P2PController  # noqa: E402
from dsbuild.attention.processors import install  # noqa: E402
from dsbuild.core import sessions  # noqa: E402
from dsbuild.core.build import Build  # noqa: E402
from dsbuild.core.config import load_recipe  # noqa: E402
from dsbuild.generate.generators.p2p.sampler import (  # noqa: E402
    P2PGenerator,
    SourceGroup,
    TargetSpec,
)
from dsbuild.generate.generators.p2p.sweep import plan_triple  # noqa: E402
from dsbuild.generate.settings import GenerateSettings  # noqa: E402
from dsbuild.generate.stage import run_generate  # noqa: E402
from dsbuild.models import load_sd_pipeline  # noqa: E402
from dsbuild.models.sd import char_tokenizer  # noqa: E402

SIZE, STEPS = 32, 4
ROOT = "a red velvet armchair"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SequentialReference(P2PController):
    """Prompt-to-Prompt of one pair (row 0 the source, row 1 the target) with every attention
    map materialised, written here independently of the fused controller. ``replay`` makes the
    source branch a recorded branch of an earlier run: its attention probabilities (both
    guidance halves) at every (step, layer) and its latents after every step are the recorded
    ones. The target branch's maps and latents are recorded (``rec_maps``, ``rec_latents``)."""

    replay: dict | None = None

    def configure(self, n_rows, edits, steps, device, dtype, cfg=True, zero_uncond=False):
        assert n_rows == 2 and list(edits) == [1] and edits[1].source == 0
        self.R, self.edits, self.steps, self.e = n_rows, edits, steps, edits[1]
        self.B, self.C = (4, 2) if cfg else (2, 0)
        self.device, self.dtype = device, dtype
        e = self.e
        self.blending = e.blend_src is not None or e.blend_tgt is not None
        self.blend_rows = [1] if self.blending else []
        self.maps_src = self.maps_tgt = None
        self.rec_maps, self.rec_latents = {}, {}
        self.last_mask = None
        self.active = True

    def reset(self):
        self.active = False

    def begin_step(self, i):
        self.step = i

    def attend(self, name, is_cross, q, k, v, mask):
        assert mask is None and q.shape[0] == self.B
        e, i, C = self.e, self.step, self.C
        halves = [0, C] if C else [0]
        P = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        if self.replay is not None:
            for h, m in zip(halves, self.replay["maps"][(i, name)], strict=True):
                P[h] = m
        own_tgt = P[C + 1].clone()
        if not is_cross and i < int(e.self_replace * self.steps):
            for h in halves:
                P[h + 1] = P[h]
        if is_cross and e.alignment is not None:
            w = (i < (e.cross_replace * self.steps).floor()).float()
            we = w * e.equalizer if e.equalizer is not None else w
            M = e.alignment.mapper * we[None, :]
            c = we * (1 - e.alignment.alpha) + (1 - w)
            P[C + 1] = P[C] @ M + P[C + 1] * c
        self.rec_maps[(i, name)] = [P[h + 1].clone() for h in halves]
        if is_cross and self.blending and name in self.blend_layers:
            if e.blend_tgt is not None and e.blend_tgt.any():
                m = own_tgt.mean(0) @ e.blend_tgt
                self.maps_tgt = m if self.maps_tgt is None else self.maps_tgt + m
            if e.blend_src is not None and e.blend_src.any():
                m = P[C].mean(0) @ e.blend_src
                self.maps_src = m if self.maps_src is None else self.maps_src + m
        return (P @ v.float()).to(v.dtype)

    def after_step(self, latents, i, x0=None):
        latents = latents.clone()
        if self.replay is not None:
            latents[0] = self.replay["latents"][i]
        if self.blending and i >= int(self.blend_start * self.steps) and (
                self.maps_src is not None or self.maps_tgt is not None):
            hw = tuple(latents.shape[-2:])
            mask = torch.zeros(1, *hw, dtype=torch.bool)
            for m in (self.maps_src, self.maps_tgt):
                if m is not None:
                    mask |= self._mask(m[None], hw)[0]
            mask = mask.to(latents.dtype)
            latents[1] = latents[0] + mask * (latents[1] - latents[0])
            self.last_mask = mask[None]
        self.rec_latents[i] = latents[1].clone()
        return latents


def _pair(model: str = "tiny", threshold: float = 0.9):
    """The one-pass sampler and the reference, on two copies of one tiny model."""
    one = P2PGenerator(load_sd_pipeline(model, quiet=True), "euler_ancestral",
                       blend_threshold=threshold, blend_start=0.0)
    ref = P2PGenerator(load_sd_pipeline(model, quiet=True), "euler_ancestral")
    ref.controller = SequentialReference(threshold, 0.0)
    install(ref.pipe.unet, ref.controller)
    return one, ref


@pytest.fixture(scope="module")
def samplers():
    return _pair()


def sequential(ref: P2PGenerator, root: str, targets: list[TargetSpec], seed: int,
               guidance: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """The turns one after another: each a separate pair whose source branch replays the
    parent's branch (its maps and latents) recorded in the parent's own run."""
    ctrl = ref.controller
    branch: dict[int, dict] = {}
    images: list[np.ndarray] = []
    root_image = None
    for n, t in enumerate(targets):
        src = root if t.parent is None else targets[t.parent].prompt
        ctrl.replay = None if t.parent is None else branch[t.parent]
        out = ref.generate([SourceGroup(src, seed, guidance, [replace(t, parent=None)])],
                           STEPS, SIZE, SIZE)[0]
        branch[n] = {"maps": ctrl.rec_maps, "latents": ctrl.rec_latents}
        if t.parent is None:
            root_image = out.source if root_image is None else root_image
        else:  # the replayed source branch is the parent's image
            np.testing.assert_allclose(out.source, images[t.parent], atol=1e-5)
        images.append(out.targets[0])
    ctrl.replay = None
    return root_image, images


CHAIN = [
    TargetSpec("a blue velvet armchair", "replace", self_replace=0.5, cross_replace=0.8,
               blend_words=(["red"], ["blue"])),
    TargetSpec("a blue leather armchair", "replace", self_replace=0.75, cross_replace=0.5,
               blend_words=(["velvet"], ["leather"]), parent=0),
    TargetSpec("a blue leather armchair with a cushion", "refine", self_replace=0.25,
               cross_replace={"default": 0.8, "cushion": 0.5}, blend_words=([], ["cushion"]),
               parent=1),
]
TREE = [
    TargetSpec("a blue velvet armchair", "replace", self_replace=0.5, cross_replace=0.75),
    TargetSpec("a red velvet armchair with a cushion", "refine", self_replace=0.25,
               cross_replace=0.8, blend_words=([], ["cushion"])),
    TargetSpec("a blue velvet armchair with a cushion", "refine", self_replace=0.5,
               cross_replace=0.5, parent=0),
    TargetSpec("a green velvet armchair", "self", self_replace=0.75, parent=0),
    TargetSpec("a green velvet armchair", "reweight", self_replace=0.5, cross_replace=1.0,
               equalizer={"green": 2.0}, blend_words=(["blue"], ["green"]), parent=0),
    TargetSpec("a green leather armchair", "replace", self_replace=0.25, cross_replace=0.75,
               blend_words=(["velvet"], ["leather"]), parent=3),
]


@pytest.mark.parametrize("nodes", [CHAIN, TREE], ids=["chain", "tree"])
def test_one_pass_session_equals_turns_one_after_another(samplers, nodes):
    one, ref = samplers
    res = one.generate([SourceGroup(ROOT, 5, 8.0, nodes)], STEPS, SIZE, SIZE, batch_size=2)[0]
    root, turns = sequential(ref, ROOT, nodes, 5, 8.0)
    np.testing.assert_allclose(res.source, root, atol=1e-4)
    for n, (a, b) in enumerate(zip(res.targets, turns, strict=True)):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"node {n}")
    # the chain is not a chain of independent pairs: a child edited from the root differs
    alone = one.generate([SourceGroup(ROOT, 5, 8.0, [replace(nodes[2], parent=None)])],
                         STEPS, SIZE, SIZE)[0]
    assert np.abs(alone.targets[0] - res.targets[2]).max() > 1e-3
    assert one.controller.calls["probs"] > 0
    # a local blend leaves a mask (outside it a child keeps its parent's latents)
    assert any(m is not None for m in res.masks)


def test_one_pass_session_on_sdxl():
    one, ref = _pair("tiny-sdxl")
    nodes = CHAIN[:2] + [replace(CHAIN[2], mode="self", blend_words=None)]
    res = one.generate([SourceGroup(ROOT, 3, 6.0, nodes)], STEPS, SIZE, SIZE)[0]
    root, turns = sequential(ref, ROOT, nodes, 3, 6.0)
    np.testing.assert_allclose(res.source, root, atol=1e-4)
    for a, b in zip(res.targets, turns, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_identical_turns_keep_the_plain_image(samplers):
    """A session whose every caption is the root's: every image is the root image."""
    one, _ = samplers
    nodes = [TargetSpec(ROOT, "replace", 0.5, 0.8), TargetSpec(ROOT, "refine", 0.5, 0.8, parent=0),
             TargetSpec(ROOT, "self", 1.0, parent=1),
             TargetSpec(ROOT, "replace", 0.5, 0.8, blend_words=(["red"], ["red"]), parent=0)]
    res = one.generate([SourceGroup(ROOT, 2, 7.5, nodes)], STEPS, SIZE, SIZE)[0]
    for im in res.targets:
        np.testing.assert_allclose(im, res.source, atol=1e-4)


def test_a_parent_must_come_first(samplers):
    from dsbuild.core.errors import DsbuildError

    one, _ = samplers
    with pytest.raises(DsbuildError, match="parent"):
        one.generate([SourceGroup(ROOT, 2, 7.5, [TargetSpec(ROOT, "self", 1.0, parent=1),
                                                 TargetSpec(ROOT, "self", 1.0)])],
                     STEPS, SIZE, SIZE)


# ---------------------------------------------------------------- sweep, generator, stage

SETTINGS = ["generate.model=tiny", "generate.steps=2", "generate.height=32",
            "generate.width=32", "generate.per_triple=3", "generate.batch_size=9",
            "generate.mode=auto", "generate.blend=true", "generate.self_replace=[0.5,0.9]"]


def make(root: Path, recipe: Path, extra=()) -> Build:
    b = Build.init(root, load_recipe(recipe), recipe_path=str(recipe),
                   overrides=SETTINGS + list(extra))
    tr = session_triples(b.recipe.name) + [triple_record(b.recipe.name, *TRIPLES[0])]
    b.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None, report=False)
    return b


def test_sweep_plans_a_session_with_one_seed_and_guidance_per_draw():
    tok = char_tokenizer()
    st = session_triples("mini")
    for sweep in ("random", "grid"):
        s = GenerateSettings(sweep=sweep, mode="auto", per_triple=4,
                             grid_cross_replace=[0.6, 0.8])
        plans = [p for t in st for p in plan_triple(t, s, tok)]
        runs: dict = {}
        for p in plans:
            runs.setdefault(sessions.plan_run(p), set()).add(
                (p.seed, p.params["guidance"]))
            assert sessions.plan_run(p) == (p.triple["session_id"], p.index)
        assert len(runs) == 2 * 4 and all(len(v) == 1 for v in runs.values())
        assert len({p.id for p in plans}) == len(plans)
        # a single triple keeps its own plans: the input caption's draws
        single = triple_record("mini", *TRIPLES[0])
        assert [p.id for p in plan_triple(single, s, tok)] == \
            [p.id for p in plan_triple(dict(single), s, tok)]
    # per-node parameters are the node's own
    s = GenerateSettings(mode="auto", per_triple=2)
    chain = [plan_triple(t, s, tok)[0] for t in st[:3]]
    assert len({p.params["self_replace"] for p in chain}) > 1


def _pixels(build: Build, rel: str) -> np.ndarray:
    return np.asarray(Image.open(build.root / rel), dtype=np.int16)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted generate of a build with two sessions (a chain, a tree) and one
    single triple."""
    from conftest import MINI_RECIPE

    tmp = tmp_path_factory.mktemp("ref")
    recipe = tmp / "mini.yaml"
    recipe.write_text(MINI_RECIPE)
    b = make(tmp / "build", recipe)
    run_generate(b)
    return b, recipe


def test_session_pairs_carry_the_contract(reference):
    b, _ = reference
    pairs = list(b.records("generate"))
    triples = {t["id"]: t for t in b.records("captions")}
    sess = [p for p in pairs if sessions.is_session(p)]
    assert len(sess) == 6 * 3 and len(pairs) == 6 * 3 + 3
    by_node = {(p["session_run"], p["node_id"]): p for p in sess}
    for p in sess:
        t = triples[p["triple_id"]]
        assert {k: p[k] for k in sessions.SESSION_FIELDS} == sessions.session_fields(t)
        assert p["session_run"] == sessions.run_id(t["session_id"], p["seed"],
                                                   p["params"]["guidance"],
                                                   next(i for i, q in enumerate(plan_triple(
                                                       t, b.config.generate, char_tokenizer()))
                                                       if q.id == p["id"]))
        root = _pixels(b, p["images"]["session_source"])
        if p["parent_id"] is None:
            assert (_pixels(b, p["images"]["input"]) == root).all()
        else:  # the parent's output, pixel for pixel
            parent = by_node[(p["session_run"], p["parent_id"])]
            assert (_pixels(b, p["images"]["input"]) ==
                    _pixels(b, parent["images"]["output"])).all()
            assert (_pixels(b, parent["images"]["session_source"]) == root).all()
    # a run has one seed and guidance; its pairs share the root image
    for run in sessions.by_run(sess).values():
        assert len({(p["seed"], p["params"]["guidance"]) for p in run}) == 1
        assert len({p["images"]["session_source"] for p in run}) == len(run)
    assert sessions.run_lengths(sess) == {3: 3, 2: 3}
    assert not any(sessions.is_session(p) or "session_run" in p for p in pairs
                   if not p.get("session_id"))


def test_kill_mid_session_and_resume_gives_the_same_pairs(reference, tmp_path):
    ref, recipe = reference
    b = make(tmp_path / "b", recipe)
    partial = b.root / "pairs" / "r00000.jsonl.partial"
    paused = tmp_path / "paused.json"  # the writer stops after 4 pairs: inside a session run
    env = dict(os.environ, OMP_NUM_THREADS="1", DSBUILD_NO_PROGRESS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               DSBUILD_PAUSE_AT=f"pairs/r00000.jsonl:4:{paused}")
    proc = subprocess.Popen([sys.executable, "-m", "dsbuild", "generate", str(b.root)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not paused.exists():
        time.sleep(0.05)
    assert paused.exists(), proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(before) == 4 and not b.is_complete("generate")
    runs = {p["session_run"] for p in before if p.get("session_run")}
    n_run = {r: sum(1 for p in ref.records("generate") if p.get("session_run") == r)
             for r in runs}
    assert any(sum(1 for p in before if p.get("session_run") == r) < n_run[r] for r in runs)
    run_generate(Build.open(b.root))
    got = {p["id"]: p for p in Build.open(b.root).records("generate")}
    want = {p["id"]: p for p in ref.records("generate")}
    assert got == want
    for p in want.values():
        for k, rel in p["images"].items():
            assert (_pixels(b, rel) == _pixels(ref, rel)).all(), (p["id"], k)


def test_bench_session_reports_its_ratios():
    from click.testing import CliRunner

    from dsbuild.cli import cli

    r = CliRunner().invoke(cli, ["bench", "session", "--steps", "2", "--resolution", "32",
                                 "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    want = {"chain3/3_pairs", "tree4/4_pairs", "plain_chain3/3_pairs", "plain_tree4/4_pairs",
            "chain3_one_pass/plain_images", "tree4_one_pass/plain_images"}
    assert set(res["ratios"]) == want and set(res["ratios_cpu_time"]) == want
    assert set(res["goals"]) == {"chain3/3_pairs <= 0.69", "tree4/4_pairs <= 0.64"}
    assert res["floors"] == {"chain3/3_pairs": 0.667, "tree4/4_pairs": 0.625}
    assert res["threads"] == 1 and all(v > 0 for v in res["cpu_seconds"].values())


def test_a_photo_session_has_the_photo_as_its_root(tmp_path):
    """With real photos the root row starts from the photo's inversion and turn 1 edits the
    photo itself; later turns edit their parent's image."""
    from dsbuild.generate.generators.p2p.generator import PromptToPrompt

    s = GenerateSettings(model="tiny", steps=2, height=SIZE, width=SIZE, per_triple=2,
                         batch_size=4, mode="replace", device="cpu")
    rng = np.random.default_rng(0)
    image = np.kron(rng.random((4, 4, 3)), np.ones((8, 8, 1))).astype(np.float32)
    gen = PromptToPrompt(s, None, "cpu", "fp32")
    gen.use_photos({"ph": {"id": "ph", "image": "photos/img/ph.png"}}, lambda rec: image,
                   tmp_path / "inv")
    st = [dict(t, photo_id="ph") for t in session_triples("mini")[:3]]
    plans = [p for t in st for p in gen.plan(t)]
    assert all(p.params["scheduler"] == "ddim" for p in plans)
    made = list(gen.generate(plans))
    assert len(made) == len(plans) == 6
    by = {(m.record["session_run"], m.plan.triple["id"]): m for m in made}
    for m in made:
        assert m.images["session_source"] is image and m.record["photo_id"] == "ph"
        parent = m.plan.triple["parent_id"]
        if parent is None:
            assert m.source is image and "reconstruction" in m.images
        else:
            assert m.source is by[(m.record["session_run"], parent)].target
    # negative-prompt inversion: one per photo and caption, reused by every run and node
    assert gen.stats()["inversions"] == 1 and gen.stats()["inversions_reused"] == 1
