"""Prompt-to-Prompt core on a tiny real SD (UNet/VAE/CLIP text encoder built from config)."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.attention.align import align_prompts, prompt_words  # noqa: E402
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


@pytest.fixture(scope="module")
def plain():
    return load_sd_pipeline("tiny", quiet=True)


@pytest.fixture(scope="module")
def gen():
    return P2PGenerator(load_sd_pipeline("tiny", quiet=True), "euler_ancestral",
                        blend_start=0.0)


def plain_image(pipe, prompt, seed, guidance=7.5, scheduler="euler_ancestral"):
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE,
                width=SIZE, generator=torch.Generator().manual_seed(seed),
                output_type="np").images[0]


TARGETS = {
    "self": TargetSpec(SRC, "self", self_replace=1.0),
    "replace": TargetSpec(SRC, "replace", self_replace=0.5, cross_replace=1.0),
    "refine": TargetSpec(SRC, "refine", self_replace=0.5, cross_replace={"default": 0.7,
                                                                          "red": 1.0}),
    "reweight": TargetSpec(SRC, "reweight", self_replace=0.5, cross_replace=1.0),
    "auto": TargetSpec(SRC, "auto", self_replace=0.5, cross_replace=0.8),
    "blend": TargetSpec(SRC, "replace", cross_replace=0.8,
                        blend_words=(["armchair"], ["armchair"])),
}


@pytest.mark.parametrize("mode", sorted(TARGETS))
def test_identical_captions_give_the_plain_image(plain, gen, mode):
    ref = plain_image(plain, SRC, seed=7, guidance=9.0)
    out = gen.generate([SourceGroup(SRC, 7, 9.0, [TARGETS[mode]])], STEPS, SIZE, SIZE)[0]
    np.testing.assert_allclose(out.source, ref, atol=1e-4)
    np.testing.assert_allclose(out.targets[0], ref, atol=1e-4)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_other_schedulers_match_plain(plain, scheduler):
    g = P2PGenerator(load_sd_pipeline("tiny", quiet=True), scheduler)
    ref = plain_image(plain, SRC, seed=3, scheduler=scheduler)
    out = g.generate([SourceGroup(SRC, 3, 7.5, [TargetSpec(SRC, "auto", 0.5, 0.8)])],
                     STEPS, SIZE, SIZE)[0]
    np.testing.assert_allclose(out.targets[0], ref, atol=1e-4)


def test_different_target_differs_and_source_stays_plain(plain, gen):
    ref = plain_image(plain, SRC, seed=11)
    out = gen.generate([SourceGroup(SRC, 11, 7.5, [
        TargetSpec("a blue velvet armchair", "replace", 0.3, 0.6)])], STEPS, SIZE, SIZE)[0]
    np.testing.assert_allclose(out.source, ref, atol=1e-4)
    assert np.abs(out.targets[0] - ref).max() > 1e-3


def split_heads(x, heads):
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _attn_out(layer, probs, v):
    heads, d = layer.heads, v.shape[-1]
    return layer.to_out[0]((probs @ v).transpose(0, 1).reshape(-1, heads * d))


def _probs(q, k):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)


def test_full_self_injection_equals_sdpa_of_source_qk_and_target_v(gen):
    """Every target self-attention output, at every resolution, is softmax(Q_src K_srcᵀ/√d)
    V_tgt computed here; a partial window (p = 0.5 of 3 steps = 1 step) then lets go."""
    unet = gen.pipe.unet
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn1")]
    seen: dict[str, list] = {n: [] for n, _ in layers}

    def hook_for(name):
        def hook(module, args, kwargs, output):
            seen[name].append((args[0] if args else kwargs["hidden_states"], output))
        return hook

    hooks = [m.register_forward_hook(hook_for(n), with_kwargs=True) for n, m in layers]
    try:
        gen.generate([SourceGroup(SRC, 5, 7.5, [TargetSpec("a green oak chair", "self", 1.0),
                                                TargetSpec("a tall blue stool", "self", 1.0),
                                                TargetSpec("a red oak stool", "self", 0.5)])],
                     STEPS, SIZE, SIZE)
    finally:
        for h in hooks:
            h.remove()
    assert any(n.startswith("mid_block") for n in seen)
    assert len({seen[n][0][0].shape[1] for n in seen}) >= 2  # several resolutions
    R, window = 4, int(0.5 * STEPS)
    differs = after_window = 0.0
    with torch.no_grad():
        for name, layer in layers:
            assert len(seen[name]) == STEPS, name
            for step, (hidden, output) in enumerate(seen[name]):
                q, k, v = (split_heads(f(hidden), layer.heads)
                           for f in (layer.to_q, layer.to_k, layer.to_v))
                for half in (0, R):  # unconditional and conditional halves
                    src = half
                    for tgt in (half + 1, half + 2, half + 3):
                        injected = _attn_out(layer, _probs(q[src], k[src]), v[tgt])
                        own = _attn_out(layer, _probs(q[tgt], k[tgt]), v[tgt])
                        inject = tgt != half + 3 or step < window
                        torch.testing.assert_close(output[tgt], injected if inject else own,
                                                   atol=1e-5, rtol=1e-4)
                        gap = float((own - injected).abs().max())
                        if inject:  # ... which is not the target's own attention
                            differs = max(differs, gap)
                        else:  # ... and after the window it is not the source's
                            after_window = max(after_window, gap)
    assert differs > 1e-4 and after_window > 1e-4


def test_fused_cross_attention_edit_equals_the_materialised_p2p_map(gen):
    """refine + per-word window + reweight through SDPA equals the explicit P2P attention map,
    with no attention probabilities materialised."""
    from dsbuild.attention.align import token_weights

    unet = gen.pipe.unet
    layer = next(m for n, m in unet.named_modules() if n.endswith("attn2"))
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((args[0] if args else kwargs["hidden_states"],
                     kwargs["encoder_hidden_states"], output))

    tgt = "a red velvet armchair with a cushion"
    # default window 0.7 of 3 steps = steps 0 and 1; "red" never reads the source
    t = TargetSpec(tgt, "refine", 0.0, {"default": 0.7, "red": 0.0},
                   equalizer={"velvet": 1.5, "cushion": 2.0})  # mapped / own-attention words
    probs_before = gen.controller.calls["probs"]
    h = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        gen.generate([SourceGroup(SRC, 6, 7.5, [t])], STEPS, SIZE, SIZE)
    finally:
        h.remove()
    assert gen.controller.calls["probs"] == probs_before
    al = align_prompts(gen.pipe.tokenizer, SRC, tgt, "refine")
    L = al.alpha.numel()
    e = 1 + 0.5 * token_weights(al.tgt_words, ["velvet"], L) \
        + token_weights(al.tgt_words, ["cushion"], L)
    cushion = token_weights(al.tgt_words, ["cushion"], L).bool()
    assert al.alpha[cushion].eq(0).all()
    heads = layer.heads
    assert len(seen) == STEPS
    with torch.no_grad():
        for step, (hidden, ctx, output) in enumerate(seen):
            w = (1 - token_weights(al.tgt_words, ["red"], L)) * float(step < 2)
            q = split_heads(layer.to_q(hidden), heads)
            k = split_heads(layer.to_k(ctx), heads)
            v = split_heads(layer.to_v(ctx), heads)
            a_src = _probs(q[2], k[2])  # cond source row
            a_tgt = _probs(q[3], k[3])  # cond target row
            edited = (a_src @ al.mapper) * al.alpha + a_tgt * (1 - al.alpha)
            attn = (w * e) * edited + (1 - w) * a_tgt
            torch.testing.assert_close(output[3], _attn_out(layer, attn, v[3]),
                                       atol=1e-5, rtol=1e-4)
            if step < 2:  # the edit is not the target's own attention
                assert (_attn_out(layer, a_tgt, v[3]) - output[3]).abs().max() > 1e-4
            # the unconditional half is not edited
            torch.testing.assert_close(output[1], _attn_out(layer, _probs(q[1], k[1]), v[1]),
                                       atol=1e-5, rtol=1e-4)


def test_local_blend_keeps_the_source_outside_the_mask(gen):
    checked = []

    def cb(i, latents, ctrl, layout):
        mask = ctrl.last_mask
        assert mask is not None
        src, tgt = latents[0], latents[1]
        outside = (mask[0] == 0).expand_as(src)
        assert bool(outside.any()) and bool((~outside).any())
        torch.testing.assert_close(tgt[outside], src[outside], atol=0, rtol=0)
        assert (tgt[~outside] - src[~outside]).abs().max() > 0
        checked.append(i)

    t = TargetSpec("a blue velvet armchair", "replace", 0.2, 0.8,
                   blend_words=(["red"], ["blue"]))
    # random tiny weights give flat maps: a high threshold makes a mask with an outside
    threshold = gen.controller.blend_threshold
    gen.controller.blend_threshold = 0.9
    try:
        gen.generate([SourceGroup(SRC, 2, 7.5, [t])], STEPS, SIZE, SIZE, callback=cb)
    finally:
        gen.controller.blend_threshold = threshold
    assert checked == list(range(STEPS))
    assert gen.controller.calls["probs"] > 0


def test_shared_source_batching_equals_pairs_alone(gen):
    targets = [TargetSpec("a blue velvet armchair", "replace", 0.3, 0.7),
               TargetSpec("a red velvet armchair with a cushion", "refine", 0.6, 0.5),
               TargetSpec("a red leather armchair", "self", 0.8),
               TargetSpec("a blue velvet armchair", "reweight", 0.2, 0.9,
                          equalizer={"blue": 2.0}, blend_words=([], ["blue"]))]
    together = gen.generate([SourceGroup(SRC, 9, 8.0, targets)], STEPS, SIZE, SIZE,
                            batch_size=8)[0]
    for i, t in enumerate(targets):
        alone = gen.generate([SourceGroup(SRC, 9, 8.0, [t])], STEPS, SIZE, SIZE)[0]
        np.testing.assert_allclose(alone.source, together.source, atol=1e-5)
        np.testing.assert_allclose(alone.targets[0], together.targets[i], atol=1e-5)
    # batch size 3 splits the group into two batches, each with its own copy of the source
    split = gen.generate([SourceGroup(SRC, 9, 8.0, targets)], STEPS, SIZE, SIZE,
                         batch_size=3)[0]
    for a, b in zip(split.targets, together.targets, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert together.modes == ["replace", "refine", "self", "reweight"]


def test_groups_with_different_seeds_in_one_batch(gen):
    a = SourceGroup(SRC, 1, 7.5, [TargetSpec("a blue velvet armchair", "auto", 0.4, 0.8)])
    b = SourceGroup("a modern living room", 2, 12.0,
                    [TargetSpec("a modern living room with a rug", "auto", 0.6, 0.8)])
    both = gen.generate([a, b], STEPS, SIZE, SIZE, batch_size=8)
    for g, res in zip((a, b), both, strict=True):
        alone = gen.generate([g], STEPS, SIZE, SIZE)[0]
        np.testing.assert_allclose(res.targets[0], alone.targets[0], atol=1e-5)
    assert both[1].modes == ["refine"]


# ---------------------------------------------------------------- token alignment

def _bpe_tokenizer(pieces: list[str]):
    """A real CLIPTokenizer: byte vocab plus merges that build each piece left to right."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for piece in pieces:
        end = piece.endswith("</w>")
        body = piece[:-4] if end else piece
        syms = list(body)
        if end:
            syms[-1] += "</w>"
        cur = syms[0]
        for s in syms[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur = cur + s
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


@pytest.fixture(scope="module")
def tok():
    return _bpe_tokenizer(["red</w>", "blue</w>", "chair</w>", "arm", "velvet</w>",
                           "with</w>", "cushion</w>", "the</w>", "big</w>"])


def _pairs(al):
    """Non-zero (source token, target token, weight) entries of the content part."""
    nz = al.mapper.nonzero().tolist()
    return {(s, t): round(float(al.mapper[s, t]), 3) for s, t in nz}


def test_tokenizer_builds_words(tok):
    ids = tok("a red armchair").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "red</w>", "arm",
                                              "chair</w>", "<|endoftext|>"]


def _tokens(tok, prompt):
    """Token positions of each word, as the tokenizer itself splits the prompt."""
    words, n = prompt_words(tok, prompt)
    return [w.tokens for w in words], 1 + n  # and the end-token position


def test_aligner_word_swap(tok):
    al = align_prompts(tok, "a red velvet chair", "a blue velvet chair", "auto")
    assert al.mode == "replace" and not al.has_indel
    assert al.changed_words() == (["red"], ["blue"])
    (sa, sr, sv, sc), s_end = _tokens(tok, "a red velvet chair")
    (ta, tb, tv, tc), t_end = _tokens(tok, "a blue velvet chair")
    m = _pairs(al)
    assert m[(0, 0)] == 1.0
    for s_w, t_w in ((sa, ta), (sr, tb), (sv, tv), (sc, tc)):
        assert len(s_w) == len(t_w) == 1 or s_w == t_w
        for s, t in zip(s_w, t_w, strict=True):
            assert m[(s, t)] == 1.0 and al.alpha[t] == 1
    assert m[(s_end, t_end)] == 1.0
    assert al.mapper.sum(0).eq(1).all()  # every target column reads exactly one source token


def test_aligner_swap_with_different_token_counts(tok):
    al = align_prompts(tok, "a red chair", "a big armchair", "auto")
    assert al.mode == "replace"
    assert al.changed_words() == (["red", "chair"], ["big", "armchair"])
    (_, sr, sc), s_end = _tokens(tok, "a red chair")
    (_, tb, tarm), t_end = _tokens(tok, "a big armchair")
    assert len(sc) == 1 and len(tarm) == 2  # chair -> arm + chair
    m = _pairs(al)
    assert m[(sr[0], tb[0])] == 1.0
    assert m[(sc[0], tarm[0])] == 0.5 and m[(sc[0], tarm[1])] == 0.5  # spread, as P2P
    assert m[(s_end, t_end)] == 1.0


def test_aligner_insertion(tok):
    src, tgt = "a velvet chair", "a velvet chair with a cushion"
    al = align_prompts(tok, src, tgt, "auto")
    assert al.mode == "refine" and al.has_indel
    assert al.changed_words() == ([], ["with", "a", "cushion"])
    s_words, s_end = _tokens(tok, src)
    t_words, t_end = _tokens(tok, tgt)
    m = _pairs(al)
    for s_w, t_w in zip(s_words, t_words[:3], strict=True):
        for s, t in zip(s_w, t_w, strict=True):
            assert m[(s, t)] == 1.0
    inserted = [p for w in t_words[3:] for p in w]
    assert al.alpha[inserted].eq(0).all()  # inserted words keep their own attention
    assert al.mapper[:, inserted].sum() == 0
    assert m[(s_end, t_end)] == 1.0  # source end token -> target end token


def test_aligner_deletion(tok):
    src, tgt = "the big red chair", "the red chair"
    al = align_prompts(tok, src, tgt, "refine")
    assert al.mode == "refine"
    assert al.changed_words() == (["big"], [])
    (s_the, s_big, s_red, s_chair), s_end = _tokens(tok, src)
    (t_the, t_red, t_chair), t_end = _tokens(tok, tgt)
    m = _pairs(al)
    for s_w, t_w in ((s_the, t_the), (s_red, t_red), (s_chair, t_chair)):
        for s, t in zip(s_w, t_w, strict=True):
            assert m[(s, t)] == 1.0
    assert al.mapper[s_big].sum() == 0  # "big" is read by nobody
    assert m[(s_end, t_end)] == 1.0
    assert al.alpha[: t_end + 1].eq(1).all()


def test_aligner_refine_swap_keeps_own_attention(tok):
    al = align_prompts(tok, "a red chair", "a blue chair", "refine")
    (_, tb, _), _ = _tokens(tok, "a blue chair")
    assert al.alpha[tb].eq(0).all() and al.mapper[:, tb].sum() == 0


class _PythonTokenizer:
    """The tokenizer as a Python ("slow") tokenizer shows itself: no offsets, no word ids
    (transformers 4.x loads SD checkpoints' CLIPTokenizer this way)."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        if kw.pop("return_offsets_mapping", False):
            raise NotImplementedError("return_offset_mapping needs a fast tokenizer")
        return {"input_ids": self._tok(text, **kw)["input_ids"]}


@pytest.mark.parametrize("src,tgt", [("a red velvet chair", "a blue velvet chair"),
                                     ("a red chair", "a big armchair"),
                                     ("a velvet chair", "a velvet chair with a cushion"),
                                     ("the big red chair, velvet", "the red armchair, velvet")])
def test_aligner_with_a_python_tokenizer_matches_the_fast_one(tok, src, tgt):
    slow = _PythonTokenizer(tok)
    for p in (src, tgt):
        fw, fn = prompt_words(tok, p)
        sw, sn = prompt_words(slow, p)
        assert [(w.text, w.tokens) for w in sw] == [(w.text, w.tokens) for w in fw] and sn == fn
    a, b = align_prompts(tok, src, tgt), align_prompts(slow, src, tgt)
    assert a.mode == b.mode and a.changed_words() == b.changed_words()
    assert torch.equal(a.mapper, b.mapper) and torch.equal(a.alpha, b.alpha)


def test_saved_pipeline_loads_from_a_directory(tmp_path, plain):
    from dsbuild.core.errors import DsbuildError

    plain.save_pretrained(tmp_path / "sd")
    loaded = load_sd_pipeline(str(tmp_path / "sd"))
    ref = plain_image(plain, SRC, seed=4)
    np.testing.assert_allclose(plain_image(loaded, SRC, seed=4), ref, atol=1e-5)
    with pytest.raises(DsbuildError, match="neither"):
        load_sd_pipeline(str(tmp_path / "missing"))


def test_bench_p2p_reports_ratios():
    """The bench command runs end to end (figures only, no timing assertions)."""
    from click.testing import CliRunner

    from dsbuild.bench.p2p import bench_p2p

    r = CliRunner().invoke(bench_p2p, ["--steps", "1", "--resolution", "32", "--k", "2",
                                       "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert set(res["ratios"]) == {"self/plain", "replace/plain", "refine/plain",
                                  "reweight/plain", "replace+blend/plain",
                                  "shared_k2/2_separate"}
    assert all(v > 0 for v in res["ratios"].values())
    assert set(res["goals"]) and res["seconds"]["plain_pair"] > 0


@pytest.mark.parametrize("src, tgt, want", [
    ("a red velvet chair", "a blue velvet chair", (["red"], ["blue"])),
    ("a velvet chair", "a velvet chair with a cushion", ([], ["cushion"])),
    ("a modern living room with no rug", "a modern living room with a rug", (["rug"], ["rug"])),
    ("a desk without drawers", "a desk with drawers", (["drawers"], ["drawers"])),
    ("a bathroom with a bathtub and no toilet", "a bathroom with a bathtub and a white toilet",
     (["toilet"], ["white", "toilet"])),
    # the whole noun phrase, and a side with no change of its own borrows it
    ("a daybed with a blanket and no storage drawers", "a daybed with a blanket and storage drawers",
     (["storage", "drawers"], ["storage", "drawers"])),
    ("a foyer with a bench and no coat rack", "a foyer with a bench and a terracotta coat rack",
     (["coat", "rack"], ["terracotta", "coat", "rack"])),
    ("a lounge chair without a headrest", "a lounge chair with a headrest",
     (["headrest"], ["headrest"])),
    # removals name only what goes: not the next object, not a moved "and"
    ("a foyer with jute baskets, a runner and an iron lamp", "a foyer with jute baskets and an iron lamp",
     (["runner"], [])),
    ("a nook with wainscoting, a grey vase and a navy dining table",
     "a nook with wainscoting and a grey vase", (["navy", "dining", "table"], [])),
])
def test_edit_words_name_the_thing_not_filler(tok, src, tgt, want):
    """Local blend and reweight read the words an edit is about: never 'a', 'no' or 'with'."""
    al = align_prompts(tok, src, tgt, "auto")
    assert al.edit_words() == want


def test_caption_cache_bound_keeps_lookups_working(gen):
    """Clearing the bounded caption cache never drops a caption the same call needs."""
    saved = dict(gen._embeds)
    try:
        gen.encode(["a red velvet armchair"])
        filler = gen._embeds["a red velvet armchair"]
        gen._embeds.update({f"filler {i}": filler for i in range(4097)})
        out = gen.encode(["a red velvet armchair", "a never seen caption"])
        assert out.shape[0] == 2 and len(gen._embeds) == 2
    finally:
        gen._embeds.clear()
        gen._embeds.update(saved)


def test_blend_computes_each_needed_map_once(gen):
    """Local blend materialises one probability map per side it needs, per blend layer and
    step: a side no target names is skipped, and a source shared by targets is computed once;
    the pixels equal each pair made alone."""
    ctrl = gen.controller
    layers = len(ctrl.blend_layers)
    one_sided = TargetSpec("a blue velvet armchair", "replace", 0.2, 0.8,
                           blend_words=([], ["blue"]))
    before = ctrl.calls["probs"]
    gen.generate([SourceGroup(SRC, 4, 7.5, [one_sided])], STEPS, SIZE, SIZE)
    assert ctrl.calls["probs"] - before == layers * STEPS  # target side only

    both = [TargetSpec("a blue velvet armchair", "replace", 0.2, 0.8,
                       blend_words=(["red"], ["blue"])),
            TargetSpec("a green velvet armchair", "replace", 0.4, 0.6,
                       blend_words=(["red"], ["green"]))]
    before = ctrl.calls["probs"]
    together = gen.generate([SourceGroup(SRC, 4, 7.5, both)], STEPS, SIZE, SIZE)[0]
    assert ctrl.calls["probs"] - before == 2 * layers * STEPS  # targets + the one source
    for i, t in enumerate(both):
        alone = gen.generate([SourceGroup(SRC, 4, 7.5, [t])], STEPS, SIZE, SIZE)[0]
        np.testing.assert_allclose(alone.targets[0], together.targets[i], atol=1e-5)
