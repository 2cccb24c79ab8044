"""Prompt-to-Prompt on SDXL and few-step runs, on 'tiny-sdxl' (built from config: a UNet with
SDXL's added time/text conditioning, CLIPTextModel + CLIPTextModelWithProjection, two in-memory
tokenizers), against plain ``StableDiffusionXLPipeline`` and an explicit-softmax P2P."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.attention.align import align_prompts, prompt_words  # noqa: E402
from dsbuild.attention.controller import P2PController  # noqa: E402
from dsbuild.attention.processors import install  # noqa: E402
from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.generate.generators.p2p.sampler import (  # noqa: E402
    P2PGenerator,
    SourceGroup,
    TargetSpec,
    make_scheduler,
)
from dsbuild.models import load_sd_pipeline  # noqa: E402

SIZE, STEPS = 32, 3
SRC = "a red velvet armchair"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ExplicitController(P2PController):
    """P2P as the paper's reference code runs it: every attention map materialised as
    softmax(QKᵀ/√d), edited as a map (the target's self-attention map replaced by its source's;
    its cross-attention map ``w·e·(A_src M ⊙ α + A_tgt (1-α)) + (1-w) A_tgt``), then times V.
    Local blend reads the same materialised maps; the mask and latent blend are shared."""

    def attend(self, name, is_cross, q, k, v, mask):
        assert q.shape[0] == self.B and mask is None
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
        out = probs.clone()
        halves = (0, self.C) if self.C else (0,)
        for r, e in self.edits.items():
            if not is_cross and self.step < int(e.self_replace * self.steps):
                for h in halves:
                    out[h + r] = probs[h + e.source]
            if is_cross and e.alignment is not None:
                al = e.alignment
                w = (self.step < (e.cross_replace * self.steps).floor()).float()
                eq = e.equalizer if e.equalizer is not None else torch.ones_like(w)
                a_src, a_tgt = probs[self.C + e.source], probs[self.C + r]
                edited = (a_src @ al.mapper) * al.alpha + a_tgt * (1 - al.alpha)
                out[self.C + r] = (w * eq) * edited + (1 - w) * a_tgt
        if is_cross and self.blend_rows and name in self.blend_layers:
            m_tgt = probs[self.b_rows].mean(1) @ self.b_tgt[:, :, None]
            m_src = probs[self.blend_src_idx + self.C].mean(1) @ self.b_src[:, :, None]
            for attr, m in (("maps_tgt", m_tgt[..., 0]), ("maps_src", m_src[..., 0])):
                old = getattr(self, attr)
                setattr(self, attr, m if old is None else old + m)
            self.maps_seen = True
        return out @ v


@pytest.fixture(scope="module")
def plain():
    return load_sd_pipeline("tiny-sdxl", quiet=True)


@pytest.fixture(scope="module")
def gen():
    return P2PGenerator(load_sd_pipeline("tiny-sdxl", quiet=True), "euler_ancestral",
                        blend_start=0.0)


@pytest.fixture(scope="module")
def explicit():
    g = P2PGenerator(load_sd_pipeline("tiny-sdxl", quiet=True), "euler_ancestral",
                     blend_start=0.0)
    g.controller = ExplicitController(g.controller.blend_threshold, 0.0)
    install(g.pipe.unet, g.controller)
    return g


def plain_image(pipe, prompt, seed, guidance=7.5, steps=STEPS, scheduler="euler_ancestral"):
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=SIZE,
                width=SIZE, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


EDITS = {
    "self": TargetSpec("a blue leather armchair", "self", self_replace=0.7),
    "replace": TargetSpec("a blue velvet armchair", "replace", 0.4, 0.8),
    "refine": TargetSpec("a red velvet armchair with a cushion", "refine", 0.4,
                         {"default": 0.7, "red": 1.0}),
    "reweight": TargetSpec("a blue velvet armchair", "reweight", 0.4, 1.0,
                           equalizer={"blue": 3.0, "velvet": 0.5}),
    "auto": TargetSpec("a red velvet armchair with a cushion", "auto", 0.3, 0.8),
    "blend": TargetSpec("a blue velvet armchair", "replace", 0.3, 0.8,
                        blend_words=(["red"], ["blue"])),
    "blend-one-side": TargetSpec("a red velvet armchair with a cushion", "refine", 0.3, 0.8,
                                 blend_words=([], ["cushion"])),
}


@pytest.mark.parametrize("guidance", [7.5, 0.0])
@pytest.mark.parametrize("mode", sorted(EDITS))
def test_fused_sdxl_p2p_equals_explicit_softmax_p2p(gen, explicit, plain, mode, guidance):
    """Every mode, with and without the CFG branch: fused SDPA (no maps but local blend's)
    gives the images of the explicit-softmax edit; the source is plain SDXL's image and the
    edit changes the target."""
    t = EDITS[mode]
    # random tiny weights give flat maps: a high threshold makes a mask with an outside
    for g in (gen, explicit):
        g.controller.blend_threshold = 0.9
    groups = [SourceGroup(SRC, 13, guidance, [t])]
    probs = gen.controller.calls["probs"]
    fused = gen.generate(groups, STEPS, SIZE, SIZE)[0]
    ref = explicit.generate(groups, STEPS, SIZE, SIZE)[0]
    blends = t.blend_words is not None
    assert (gen.controller.calls["probs"] > probs) == blends  # maps only where blend reads them
    np.testing.assert_allclose(fused.source, ref.source, atol=1e-5)
    np.testing.assert_allclose(fused.targets[0], ref.targets[0], atol=1e-4)
    np.testing.assert_allclose(fused.source, plain_image(plain, SRC, 13, guidance), atol=1e-4)
    own = plain_image(plain, t.prompt, 13, guidance)  # the target caption with no edit
    noise = float(np.abs(fused.targets[0] - ref.targets[0]).max())
    assert float(np.abs(fused.targets[0] - own).max()) > 20 * max(noise, 1e-6)
    if blends:
        assert fused.masks[0] is not None and fused.masks[0].shape == (SIZE, SIZE)


def test_zeroed_negative_cross_attention_is_skipped_exactly(gen):
    """SDXL's zeroed negative prompt gives zero keys and values in every bias-free
    cross-attention layer, so that half's output is zero without computing it: the images
    equal the run that computes it, and a batch whose negative is not zero computes it."""
    ctrl = gen.controller
    assert ctrl.zero_kv_layers  # tiny-sdxl's cross-attention has no bias
    groups = [SourceGroup(SRC, 5, 7.5, [EDITS["refine"], EDITS["blend"]])]
    before = ctrl.calls["uncond_skipped"]
    skipped = gen.generate(groups, STEPS, SIZE, SIZE)[0]
    assert ctrl.calls["uncond_skipped"] > before
    layers, ctrl.zero_kv_layers = ctrl.zero_kv_layers, set()
    try:
        full = gen.generate(groups, STEPS, SIZE, SIZE)[0]
    finally:
        ctrl.zero_kv_layers = layers
    np.testing.assert_allclose(skipped.source, full.source, atol=1e-6)
    for a, b in zip(skipped.targets, full.targets, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    zeros = gen.pipe.config["force_zeros_for_empty_prompt"]
    gen.pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        before = ctrl.calls["uncond_skipped"]
        gen.generate(groups, STEPS, SIZE, SIZE)
        assert ctrl.calls["uncond_skipped"] == before  # the empty caption's states: computed
    finally:
        gen.pipe.register_to_config(force_zeros_for_empty_prompt=zeros)


@pytest.mark.parametrize("mode", ["self", "replace", "refine", "reweight", "auto"])
def test_identical_captions_give_the_plain_sdxl_image(plain, gen, mode):
    spec = {"self": TargetSpec(SRC, "self", 1.0)}.get(mode, TargetSpec(SRC, mode, 0.5, 1.0))
    ref = plain_image(plain, SRC, seed=7, guidance=9.0)
    out = gen.generate([SourceGroup(SRC, 7, 9.0, [spec])], STEPS, SIZE, SIZE)[0]
    np.testing.assert_allclose(out.source, ref, atol=1e-4)
    np.testing.assert_allclose(out.targets[0], ref, atol=1e-4)


def test_added_conditioning_time_ids_shared_pooled_per_caption(gen):
    """Every row gets the same time ids (size, crop, target size); each row's pooled text is
    its own caption's second-encoder embedding; the negative half is zeros (SDXL's
    force_zeros_for_empty_prompt), as the plain pipeline makes them."""
    seen = []
    h = gen.pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True)
    tgt = "a blue velvet armchair"
    try:
        gen.generate([SourceGroup(SRC, 3, 7.5, [TargetSpec(tgt, "replace", 0.3, 0.8)])], 1,
                     SIZE, SIZE)
    finally:
        h.remove()
    ids, pooled = seen[0]["time_ids"], seen[0]["text_embeds"]
    assert ids.shape[0] == 4 and ids.eq(torch.tensor([SIZE, SIZE, 0, 0, SIZE, SIZE])).all()
    want = gen.pipe.encode_prompt([SRC, tgt], device="cpu", do_classifier_free_guidance=False)[2]
    torch.testing.assert_close(pooled[2:], want)
    assert pooled[:2].eq(0).all()
    assert (pooled[2] - pooled[3]).abs().max() > 0


def test_both_tokenizers_split_alike_and_a_mismatch_is_refused(gen):
    """SDXL's two tokenizers (the second pads with "!") put the text at the same token
    positions, "!" in a caption included, so one alignment serves both encoders; a second
    tokenizer that splits otherwise is refused with one line."""
    from dsbuild.models.sd import char_tokenizer

    tok, tok2 = gen.pipe.tokenizer, gen.pipe.tokenizer_2
    assert tok2.pad_token == "!" and tok.pad_token != "!"
    for p in (SRC, "a red chair! with a cushion!!", "wow! a sofa"):
        one, n1 = prompt_words(tok, p)
        two, n2 = prompt_words(tok2, p)
        assert [t for w in one for t in w.tokens] == [t for w in two for t in w.tokens]
        assert n1 == n2 == len(tok(p).input_ids) - 2
        words = [w.text for w in one if w.text.isalpha()]
        assert words == [w.text for w in two if w.text.isalpha()] and "cushion" in words \
            or "cushion" not in p
    for t in EDITS.values():  # each encoder's tokens get the same alignment
        for mode in ("replace", "refine", "auto"):
            a1, a2 = align_prompts(tok, SRC, t.prompt, mode), align_prompts(tok2, SRC, t.prompt,
                                                                             mode)
            assert torch.equal(a1.mapper, a2.mapper) and torch.equal(a1.alpha, a2.alpha)
            assert a1.edit_words() == a2.edit_words()
    gen.check_split("a red chair! with a cushion!!")
    other = P2PGenerator(load_sd_pipeline("tiny-sdxl", quiet=True))
    other.pipe.tokenizer_2 = char_tokenizer(max_length=10)  # cuts long captions elsewhere
    with pytest.raises(DsbuildError, match=r"^generate\.model: its two tokenizers split"):
        other.generate([SourceGroup(SRC, 1, 7.5, [TargetSpec(
            "a blue velvet armchair", "replace", 0.3, 0.8)])], 1, SIZE, SIZE)


def test_shared_source_batching_equals_pairs_alone(gen):
    targets = [EDITS["replace"], EDITS["refine"], EDITS["self"], EDITS["reweight"],
               EDITS["blend"]]
    gen.controller.blend_threshold = 0.9
    together = gen.generate([SourceGroup(SRC, 9, 8.0, targets)], STEPS, SIZE, SIZE,
                            batch_size=8)[0]
    for i, t in enumerate(targets):
        alone = gen.generate([SourceGroup(SRC, 9, 8.0, [t])], STEPS, SIZE, SIZE)[0]
        np.testing.assert_allclose(alone.source, together.source, atol=1e-5)
        np.testing.assert_allclose(alone.targets[0], together.targets[i], atol=1e-5)
    split = gen.generate([SourceGroup(SRC, 9, 8.0, targets)], STEPS, SIZE, SIZE,
                         batch_size=3)[0]
    for a, b in zip(split.targets, together.targets, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- few-step runs

def _batch_rows(gen):
    rows = []
    h = gen.pipe.unet.register_forward_pre_hook(lambda m, a, kw: rows.append(a[0].shape[0]),
                                                with_kwargs=True)
    return rows, h


def test_few_step_windows_are_the_same_fraction_of_the_run(gen):
    """2 steps with 0.5 windows: self- and cross-attention are injected in step 0 only."""
    seen = []
    t = TargetSpec("a blue velvet armchair", "replace", self_replace=0.5, cross_replace=0.5)
    gen.generate([SourceGroup(SRC, 4, 0.0, [t])], 2, SIZE, SIZE,
                 callback=lambda i, lat, ctrl, layout: seen.append(
                     (i, ctrl.self_idx is not None, ctrl.x_rows is not None)))
    assert seen == [(0, True, True), (1, False, False)]
    seen.clear()
    gen.generate([SourceGroup(SRC, 4, 0.0, [TargetSpec(t.prompt, "replace", 1.0, 1.0)])], 1,
                 SIZE, SIZE, callback=lambda i, lat, ctrl, layout: seen.append(
                     (i, ctrl.self_idx is not None, ctrl.x_rows is not None)))
    assert seen == [(0, True, True)]  # 1 step: a full window is that step


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_guidance_at_most_one_runs_one_branch(plain, gen, guidance):
    """Turbo-style guidance 0 or 1: the UNet batch holds only the conditional rows, and the
    source is the plain pipeline's (which runs no CFG either)."""
    rows, h = _batch_rows(gen)
    t = TargetSpec("a blue velvet armchair", "replace", 0.5, 0.5)
    try:
        out = gen.generate([SourceGroup(SRC, 2, guidance, [t, EDITS["self"]])], 2, SIZE,
                           SIZE)[0]
    finally:
        h.remove()
    assert rows == [3, 3]
    np.testing.assert_allclose(out.source, plain_image(plain, SRC, 2, guidance, steps=2),
                               atol=1e-4)


def test_mixed_guidance_batch_equals_each_group_alone(gen):
    """A guided group and an unguided one in one batch: CFG runs for the batch, and the
    unguided rows take the conditional prediction exactly."""
    a = SourceGroup(SRC, 1, 7.5, [TargetSpec("a blue velvet armchair", "replace", 0.4, 0.8)])
    b = SourceGroup("a modern living room", 2, 0.0,
                    [TargetSpec("a modern living room with a rug", "auto", 0.5, 0.5)])
    rows, h = _batch_rows(gen)
    try:
        both = gen.generate([a, b], 2, SIZE, SIZE, batch_size=8)
    finally:
        h.remove()
    assert rows == [8, 8]
    for g, res in zip((a, b), both, strict=True):
        alone = gen.generate([g], 2, SIZE, SIZE)[0]
        np.testing.assert_allclose(res.source, alone.source, atol=1e-5)
        np.testing.assert_allclose(res.targets[0], alone.targets[0], atol=1e-5)


@pytest.mark.parametrize("scheduler", ["lcm", "euler"])
def test_few_step_schedulers_match_plain(plain, scheduler):
    """LCM and Lightning-style (Euler) schedulers, 2 steps, no CFG: the source is plain's."""
    g = P2PGenerator(load_sd_pipeline("tiny-sdxl", quiet=True), scheduler)
    out = g.generate([SourceGroup(SRC, 6, 0.0, [TargetSpec("a blue velvet armchair", "replace",
                                                           0.5, 0.5)])], 2, SIZE, SIZE)[0]
    ref = plain_image(plain, SRC, 6, 0.0, steps=2, scheduler=scheduler)
    np.testing.assert_allclose(out.source, ref, atol=1e-4)
    assert np.abs(out.targets[0] - ref).max() > 1e-3


def test_lcm_unet_embeds_guidance_and_runs_one_branch():
    """An LCM-distilled UNet (time_cond_proj_dim) takes the guidance as an embedding: no CFG
    branch at any guidance, and the source is the plain pipeline's."""
    from diffusers import StableDiffusionXLPipeline

    from dsbuild.models.sd import tiny_sdxl_components

    def pipe():
        p = StableDiffusionXLPipeline(**tiny_sdxl_components(time_cond_proj_dim=8),
                                      add_watermarker=False)
        p.set_progress_bar_config(disable=True)
        return p

    g = P2PGenerator(pipe(), "lcm")
    rows, h = _batch_rows(g)
    try:
        out = g.generate([SourceGroup(SRC, 8, 4.0, [TargetSpec("a blue velvet armchair",
                                                               "replace", 0.5, 0.5)])],
                         2, SIZE, SIZE)[0]
    finally:
        h.remove()
    assert rows == [2, 2]
    np.testing.assert_allclose(out.source, plain_image(pipe(), SRC, 8, 4.0, steps=2,
                                                       scheduler="lcm"), atol=1e-4)


@pytest.mark.parametrize("sets, name", [
    ({"steps": 1, "mode": "replace"}, "cross_replace"),
    ({"steps": 4, "mode": "replace", "cross_replace": (0.1, 0.2)}, "cross_replace"),
    ({"steps": 3, "mode": "auto", "sweep": "grid", "grid_cross_replace": [0.3, 1.0]},
     "grid_cross_replace"),
    ({"steps": 1}, "self_replace"),
])
def test_a_window_that_rounds_to_zero_steps_is_refused(sets, name):
    from pydantic import ValidationError

    from dsbuild.generate.settings import GenerateSettings

    with pytest.raises(ValidationError, match=rf"generate\.{name}: .* rounds to 0 steps"):
        GenerateSettings(**sets)
    # the same fraction of a longer run is steps; another generator has no windows
    GenerateSettings(**{**sets, "steps": 10})
    GenerateSettings(**{**sets, "generator": "editor"})


def test_few_step_settings_that_mean_something_pass():
    from dsbuild.generate.settings import GenerateSettings

    s = GenerateSettings(steps=2, mode="replace", guidance=(0.0, 0.0), self_replace=(0.0, 0.5),
                         cross_replace=(0.5, 1.0), scheduler="euler_ancestral")
    assert int(s.cross_replace[0] * s.steps) == 1
    GenerateSettings(steps=1, self_replace=(1.0, 1.0))


ENV = dict(os.environ, DSBUILD_NO_PROGRESS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _dsbuild(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dsbuild", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=1200)


def test_zero_step_window_is_one_line_from_the_shell(tmp_path):
    r = _dsbuild("run", str(tmp_path / "B"), "--offline", "--set", "generate.model=tiny-sdxl",
                 "--set", "generate.steps=1")
    assert r.returncode == 2, r.stderr
    # the settings error as --set reports every invalid setting: a heading, one line for it
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "deprecated" not in ln]
    assert lines[0].startswith("error: --set") and len(lines) == 2, r.stderr
    assert "generate.self_replace" in lines[1] and "rounds to 0 steps" in lines[1], r.stderr
    assert not (tmp_path / "B" / "captions").exists()  # refused before any stage ran


def test_offline_run_on_tiny_sdxl_exports(tmp_path):
    """`dsbuild run B --offline --set generate.model=tiny-sdxl` (trimmed) runs to an export
    whose rows name their generator and model."""
    import pyarrow.parquet as pq

    b = tmp_path / "B"
    r = _dsbuild("run", str(b), "--offline", "--per-agent", "1", "--set",
                 "generate.model=tiny-sdxl", "--set", "generate.per_triple=1",
                 "--set", "generate.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    files = sorted((b / "export" / "data").glob("*.parquet"))
    assert files, r.stderr[-2000:]
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    assert rows
    assert {(r["generator"], r["model"]) for r in rows} == {("p2p", "tiny-sdxl")}
    assert all(r["p2p_steps"] == 2 and json.loads(r["params"])["steps"] == 2 for r in rows)


def test_bench_p2p_on_tiny_sdxl_reports_ratios():
    """`dsbuild bench p2p --model tiny-sdxl --json` runs end to end (figures only)."""
    from click.testing import CliRunner

    from dsbuild.bench.p2p import bench_p2p

    r = CliRunner().invoke(bench_p2p, ["--model", "tiny-sdxl", "--steps", "1", "--resolution",
                                       "32", "--k", "2", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["pipeline"] == "StableDiffusionXLPipeline"
    assert set(res["ratios"]) >= {"self/plain", "replace/plain", "refine/plain",
                                  "reweight/plain", "replace+blend/plain",
                                  "shared_k2/2_separate"}
    assert all(v > 0 for v in res["ratios"].values())
    if res["device"] == "cpu":  # median and best-repeat CPU-time ratios, same cases
        assert set(res["ratios_cpu_time"]) == set(res["ratios_cpu_time_best"]) \
            == set(res["ratios"])
