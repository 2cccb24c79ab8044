"""Localized edits: the LIME penalty against an explicit softmax, an empty mask = plain editing,
`dsbuild edit --localize` end to end (user mask and tiny CLIPSeg), the referring LLM against a
local OpenAI-compatible server, and the offline rules."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from openai_server import OpenAIServer, chat  # noqa: E402
from PIL import Image  # noqa: E402

from dsbuild.attention.lime import (  # noqa: E402
    LocalizeController,
    RegularisationSettings,
    edit_token_mask,
)
from dsbuild.cli import cli  # noqa: E402
from dsbuild.core.errors import DsbuildError  # noqa: E402
from dsbuild.llm.settings import LLMSettings  # noqa: E402
from dsbuild.localize.edit import localized_edit  # noqa: E402
from dsbuild.localize.referring import ReferringAgent, referred_by_rules  # noqa: E402

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"


def explicit(q, k, v, m, edit, alpha, B):
    """softmax(R(QKᵀ, M)/√d) V with R = QKᵀ − α where M = 1 and t is not an edit token, on the
    first B (instruction) rows, written out with materialised probabilities."""
    logits = q.double() @ k.double().transpose(-1, -2)  # [R, h, N, L]
    pen = torch.zeros_like(logits)
    pen[:B] = alpha * m.double().flatten(1)[:, None, :, None] * \
        (~edit).double()[:, None, None, :]
    probs = torch.softmax((logits - pen) / q.shape[-1] ** 0.5, -1)
    return (probs @ v.double()).float()


@pytest.mark.parametrize("alpha", [0.7, 5.0, 1e4])
def test_penalty_equals_explicit_softmax(alpha):
    g = torch.Generator().manual_seed(0)
    B, heads, h, w, L, d = 2, 2, 4, 6, 7, 8
    q = torch.randn(3 * B, heads, h * w, d, generator=g)
    k = torch.randn(3 * B, heads, L, d, generator=g)
    v = torch.randn(3 * B, heads, L, d, generator=g)
    m = torch.rand(B, h, w, generator=g) > 0.5
    edit = torch.zeros(B, L, dtype=torch.bool)
    edit[0, 2:4], edit[1, 1] = True, True
    ctl = LocalizeController(RegularisationSettings(alpha=alpha))
    ctl.configure(m.float(), edit, steps=4, latent_hw=(h, w))
    got = ctl.attend(LAYER, True, q, k, v, None)
    want = explicit(q, k, v, m, edit, alpha, B)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert ctl.calls == 1
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(got, plain, atol=1e-4)  # the penalty did something
    torch.testing.assert_close(got[B:], plain[B:])  # rows without the instruction: untouched
    # outside the window, on self-attention or an unchosen part: plain attention
    ctl.step = 4
    torch.testing.assert_close(ctl.attend(LAYER, True, q, k, v, None), plain)
    ctl.step = 0
    torch.testing.assert_close(ctl.attend(LAYER.replace("attn2", "attn1"), False, q, k, v,
                                          None), plain)
    up = LocalizeController(RegularisationSettings(alpha=alpha, layers=("up",)))
    up.configure(m.float(), edit, steps=4, latent_hw=(h, w))
    torch.testing.assert_close(up.attend(LAYER, True, q, k, v, None), plain)


def test_bad_settings_are_refused():
    for bad in (dict(alpha=-1), dict(start=0.8, end=0.2), dict(layers=("side",))):
        with pytest.raises(DsbuildError):
            RegularisationSettings(**bad).check()


@pytest.fixture(scope="module")
def editor():
    from dsbuild.models.editor import load_editor

    return load_editor("tiny", "cpu", "fp32", quiet=True)


def _image(seed=0, size=32):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


def _call(seed=0):
    return dict(num_inference_steps=2, guidance_scale=7.5, image_guidance_scale=1.5,
                generator=torch.Generator().manual_seed(seed))


def test_edit_tokens_are_the_instruction_content_words(editor):
    tok = editor.tokenizer
    got = edit_token_mask(tok, ["remove the lamp"])[0]
    ids = tok("remove the lamp", padding="max_length", max_length=77)["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    # the char tokenizer: one token per letter; "remove" and "lamp" are edit tokens, "the",
    # start/end of text and padding are not
    assert int(got.sum()) == len("remove") + len("lamp")
    assert not got[0] and not got[7:10].any()  # start of text, then r-e-m-o-v-e, t-h-e
    assert "".join(w.replace("</w>", "") for w, e in zip(words, got.tolist(), strict=True)
                   if e) == "removelamp"


def test_empty_mask_is_plain_editing(editor, one_torch_thread):
    src = _image()
    with torch.no_grad():
        plain = editor(["remove the lamp"], image=[src], output_type="np", **_call()).images
    empty = np.zeros((32, 32), dtype=bool)
    s = RegularisationSettings()
    got = localized_edit(editor, ["remove the lamp"], [src], [empty], s, output_type="np",
                         **_call())
    np.testing.assert_allclose(got, plain, atol=1e-6)
    full = np.zeros((32, 32), dtype=bool)
    full[8:24, 8:24] = True
    moved = localized_edit(editor, ["remove the lamp"], [src], [full], s, output_type="np",
                           **_call())
    assert np.abs(moved - plain).max() > 1e-4  # a region changes the edit
    # the editor's own processors are back: a plain call again gives the plain edit
    with torch.no_grad():
        again = editor(["remove the lamp"], image=[src], output_type="np", **_call()).images
    np.testing.assert_array_equal(again, plain)


def test_edit_cli_localize(tmp_path, one_torch_thread):
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    _image().save(src)
    m = np.zeros((32, 32), dtype=np.uint8)
    m[4:20, 10:30] = 255
    Image.fromarray(m).save(mask)
    out = tmp_path / "out.png"
    base = ["edit", "tiny", str(src), "remove the lamp", "--steps", "2", "--device", "cpu",
            "--localize"]
    r = CliRunner().invoke(cli, [*base, "--mask", str(mask), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (32, 32)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out_mask.png")) > 127,
                                  m > 127)
    # no mask: the rules refer to "lamp", the tiny CLIPSeg segments it
    out2 = tmp_path / "seg.png"
    r = CliRunner().invoke(cli, [*base, "--segmenter", "tiny", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    assert out2.exists() and (tmp_path / "seg_mask.png").exists()
    r = CliRunner().invoke(cli, ["edit", "tiny", str(src), "x", "--mask", str(mask), "--out",
                                 str(out)])
    assert isinstance(r.exception, DsbuildError) and "--mask needs --localize" in str(r.exception)


def test_edit_localize_says_phrase_and_coverage_and_checks_the_segmenter_first(
        tmp_path, one_torch_thread):
    """One line names what the region is (the referred phrase, or --mask) and how much of the
    image it covers; a bad --segmenter is refused in one line before the editor loads."""
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    _image().save(src)
    m = np.zeros((32, 32), dtype=np.uint8)
    m[4:20, 10:26] = 255  # 256 of 1024 pixels
    Image.fromarray(m).save(mask)
    base = ["edit", "tiny", str(src), "remove the lamp", "--steps", "2", "--device", "cpu",
            "--localize"]
    r = CliRunner().invoke(cli, [*base, "--mask", str(mask), "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert f"localize: --mask {mask} -> mask covers 25.0 % of the image\n" in r.output
    r = CliRunner().invoke(cli, [*base, "--segmenter", "tiny", "--out", str(tmp_path / "b.png")])
    assert r.exit_code == 0, r.output
    got = np.asarray(Image.open(tmp_path / "b_mask.png")) > 127
    line = next(x for x in r.output.splitlines() if x.startswith("localize:"))
    assert line.startswith(f"localize: 'lamp' -> mask covers {100 * got.mean():.1f} % of the "
                           "image")
    assert line.endswith("the edit is plain") == (not got.any())
    # the editor named here does not exist: the segmenter's error comes first, in one line
    for bad in ([str(tmp_path / "no-clipseg")], ["sam", "--detector", str(tmp_path / "no-owl")]):
        r = CliRunner().invoke(cli, ["edit", str(tmp_path / "no-editor"), str(src), "remove the "
                                     "lamp", "--localize", "--segmenter", *bad, "--out",
                                     str(tmp_path / "c.png")])
        assert isinstance(r.exception, DsbuildError), r.output
        msg = str(r.exception)
        assert msg.startswith(("--segmenter:", "--detector:")) and "\n" not in msg, msg
        assert "no-editor" not in msg and not (tmp_path / "c_mask.png").exists()
    # eval too: the segmenter is checked before the data is read
    r = CliRunner().invoke(cli, ["eval", "tiny", "--data", str(tmp_path / "no-data"), "--out",
                                 str(tmp_path / "ev"), "--localize", "--segmenter",
                                 str(tmp_path / "no-clipseg")])
    assert isinstance(r.exception, DsbuildError) and str(r.exception).startswith("--segmenter:")


def test_tiny_clipseg_masks_are_seeded_and_thresholded():
    from dsbuild.models.segment import Segmenter

    im = _image(1, 48)
    a, b = Segmenter.load("tiny"), Segmenter.load("tiny")
    pa = a.probabilities(im, ["lamp", "red chair"])
    assert pa.shape == (2, 48, 48)
    torch.testing.assert_close(pa, b.probabilities(im, ["lamp", "red chair"]))
    assert not a.mask(im, [], 0.4).any()  # nothing referred: nothing edited
    assert not a.mask(im, ["lamp"], 1.0).any()  # nothing above the threshold: empty
    np.testing.assert_array_equal(a.mask(im, ["lamp", "red chair"], 0.4),
                                  (pa > 0.4).any(0).numpy())


@pytest.mark.parametrize("text, want", [
    ("remove the lamp", ["lamp"]),
    ("Make the right blue chair red.", ["right blue chair"]),
    ("replace the sofa with a leather couch", ["sofa"]),
    ("add a vase on the dining table", ["dining table"]),
    ("add a mirror", []),
    ("take away the rug and the floor lamp", ["rug", "floor lamp"]),
    ("change the colour of the rug to blue", ["rug"]),
    ("paint the walls green", ["walls"]),
    ("make it look like winter", []),
])
def test_rules_fallback(text, want):
    assert referred_by_rules(text) == want
    assert ReferringAgent()([text])[0].phrases == want


@pytest.mark.server
def test_referring_llm_against_local_server(tmp_path):
    answers = {"make the left lamp brighter": '{"objects": ["left lamp"]}',
               "put a cushion on the sofa": '```json\n{"objects": ["sofa"]}\n```',
               "remove the rug": "I think it is the rug."}

    def handler(body, n):
        return chat(answers[body["messages"][-1]["content"]])

    with OpenAIServer(handler=handler) as srv:
        settings = LLMSettings(model="test-model", base_url=srv.base_url, temperature=0.0)
        agent = ReferringAgent(settings, tmp_path / "cache")
        got = agent(list(answers))
        assert [(r.phrases, r.source) for r in got] == [
            (["left lamp"], "llm"), (["sofa"], "llm"),
            (["rug"], "rules (llm reply unusable)")]
        first = srv.chat_requests[0]["body"]
        assert first["messages"][0]["role"] == "system"
        assert len(first["messages"]) == 2 + 2 * 6  # system, six worked examples, the ask
        assert agent.stats["sent"] == 3
        again = ReferringAgent(settings, tmp_path / "cache")(list(answers))
        assert [r.phrases for r in again] == [r.phrases for r in got]
        assert len(srv.chat_requests) == 3  # replayed from the request cache
    assert json.loads(json.dumps(agent.stats))["usage"]["total_tokens"] > 0


def test_eval_localize_reports_region_scores_next_to_plain(tmp_path, one_torch_thread):
    pytest.importorskip("open_clip")
    pytest.importorskip("datasets")
    from test_train import build_export

    from dsbuild.core import metrics

    export = build_export(tmp_path)
    out = tmp_path / "ev"
    args = ["eval", "tiny", "--data", str(export), "--out", str(out), "--offline", "--steps",
            "2", "--resolution", "32", "--rows", "4", "--localize", "--segmenter", "tiny",
            "--mask-threshold", "0.3", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    m = res["models"]["tiny"]
    assert set(m["regions"]) == {"referred"}  # this export has no blend masks
    assert set(m["regions"]["referred"]) == {"plain", "localized"}
    assert "edit" in m["localized"] and m["localized"]["edits"] != m["edits"]
    masks = Path(res["masks"])
    referred = json.loads((masks / "referred.json").read_text())
    assert referred and all(v["source"] == "rules" for v in referred.values())
    # L1 outside recomputed here from the written files
    plain, loc = Path(m["edits"]), Path(m["localized"]["edits"])
    rows = [k for k in sorted(referred) if (plain / f"{k}.png").exists()]
    edit_rows = [k for k in rows if (out / "region" / "tiny-plain" / f"{k}_in_out.png").exists()]
    assert edit_rows
    for run, folder in (("plain", plain), ("localized", loc)):
        vals = []
        for k in edit_rows:
            x = np.asarray(Image.open(out / "rows" / f"{k}_input.png"), dtype=np.float32) / 255
            e = np.asarray(Image.open(folder / f"{k}.png"), dtype=np.float32) / 255
            mk = np.asarray(Image.open(masks / f"{k}.png")) > 127
            vals.append(np.abs(e - x).mean(-1)[~mk].mean() if (~mk).any() else np.nan)
        want = float(np.nanmean(vals))
        reg = m["regions"]["referred"][run]
        assert reg["l1_outside"] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert np.isfinite(reg["dino_outside"])
    md = (out / "eval.md").read_text()
    assert "L1 outside" in md and "| localized |" in md
    # a re-run reuses masks and edits
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["models"]["tiny"]["regions"] == \
        m["regions"]
    assert metrics  # imported for the same formulas the eval uses


def test_generate_blend_mask_segment(one_torch_thread):
    """blend_mask=segment: the source's blend words segmented by a tiny CLIPSeg are the local
    blend mask; outside it the target's latents are the source's, and no attention map is
    materialised."""
    from dsbuild.generate.settings import GenerateSettings
    from dsbuild.models.segment import Segmenter

    assert GenerateSettings(blend=True, blend_mask="segment").blend_mask == "segment"
    with pytest.raises(ValueError):
        GenerateSettings(blend_mask="boxes")
    # the default signs as before segmented blend existed: old builds keep their markers
    assert "blend_mask" not in GenerateSettings().signature_dict()
    assert GenerateSettings(blend=True, blend_mask="segment", segmenter="tiny"
                            ).signature_dict()["segmenter"] == "tiny"
    check_segmented_blend(Segmenter.load("tiny", threshold=0.3))


def check_segmented_blend(seg):
    """P2P with ``seg`` making the local-blend mask: the mask is segmented, not read from
    attention (no map materialised), partial, and outside it the target's latents are exactly
    the source's."""
    from dsbuild.generate.generators.p2p.sampler import P2PGenerator, SourceGroup, TargetSpec
    from dsbuild.models import load_sd_pipeline

    gen = P2PGenerator(load_sd_pipeline("tiny", quiet=True), "euler_ancestral",
                       blend_start=0.5, segmenter=seg)
    t = TargetSpec("a room with a green sofa", mode="replace", cross_replace=0.8,
                   blend_words=(["red", "sofa"], ["green", "sofa"]))
    final = {}

    def grab(i, latents, ctrl, layout):
        final["latents"], final["mask"] = latents.clone(), ctrl.last_mask

    res = gen.generate([SourceGroup("a room with a red sofa", 3, 7.5, [t])], steps=4,
                       height=32, width=32, callback=grab)
    assert gen.controller.calls["probs"] == 0
    m = final["mask"][0, 0].bool()
    assert m.any() and not m.all(), f"{seg.name} at {seg.threshold} should give a partial mask"
    src, tgt = final["latents"][0], final["latents"][1]
    torch.testing.assert_close(tgt[:, ~m], src[:, ~m], rtol=0, atol=0)
    assert not torch.equal(tgt[:, m], src[:, m])
    assert res[0].masks[0] is not None and res[0].masks[0].shape == (32, 32)


def _bool_png(path):
    return np.asarray(Image.open(path).convert("L")) > 127


def test_eval_localize_scores_the_ground_truth_regions_of_blend_masks(tmp_path,
                                                                      one_torch_thread):
    """An export whose pairs carry P2P blend masks (``edit_mask``) is scored on those
    ground-truth regions too, next to the referred ones, with the referred-vs-truth IoU; with
    ``--region truth`` the penalty itself goes on the ground-truth region."""
    pytest.importorskip("open_clip")
    datasets = pytest.importorskip("datasets")
    from test_train import build_export

    from dsbuild.core.exports import load_export

    export = build_export(tmp_path, masks=True)
    split = load_export(export)["train"].cast_column("edit_mask", datasets.Image(decode=False))
    n = 8
    with_mask = [i for i in range(n) if split[i]["edit_mask"] and not split[i]["no_change"]]
    assert with_mask and len(with_mask) < n
    out = tmp_path / "ev"
    base = ["eval", "tiny", "--data", str(export), "--split", "train", "--out", str(out),
            "--offline", "--steps", "2", "--resolution", "32", "--rows", str(n), "--localize",
            "--segmenter", "tiny", "--mask-threshold", "0.3", "--json"]
    r = CliRunner().invoke(cli, base)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    m = res["models"]["tiny"]
    assert set(m["regions"]) == {"referred", "truth"}
    assert {k: res["localize"][k] for k in ("region", "regions")} == \
        {"region": "referred", "regions": ["referred", "truth"]}
    # the ground-truth masks are the export's, fitted like the inputs (32 px: unchanged)
    truth = {i: np.asarray(Image.open(io.BytesIO(split[i]["edit_mask"]["bytes"]))) > 127
             for i in with_mask}
    cover = res["localize"]["coverage"]  # the share of the image each region covers
    assert cover["truth"]["rows"] == len(with_mask)
    assert cover["truth"]["mean"] == pytest.approx(np.mean([truth[i].mean() for i in with_mask]))
    assert set(cover) == {"referred", "truth"} and 0 <= cover["referred"]["mean"] <= 1
    for i in with_mask:
        np.testing.assert_array_equal(_bool_png(out / "rows" / f"{i:05d}_edit_mask.png"),
                                      truth[i])
    # L1 outside the truth region, recomputed from the written files
    for run, folder in (("plain", Path(m["edits"])), ("localized", Path(m["localized"]["edits"]))):
        vals = []
        for i in with_mask:
            x = np.asarray(Image.open(out / "rows" / f"{i:05d}_input.png"), dtype=np.float32)
            e = np.asarray(Image.open(folder / f"{i:05d}.png"), dtype=np.float32)
            vals.append((np.abs(e - x) / 255).mean(-1)[~truth[i]].mean())
        got = m["regions"]["truth"][run]
        assert got["l1_outside"] == pytest.approx(float(np.mean(vals)), rel=1e-5)
        assert got["rows_with_region"] == len(with_mask)
    # referred vs truth agreement
    referred = {i: _bool_png(Path(res["masks"]) / f"{i:05d}.png") for i in with_mask}
    ious = [(referred[i] & truth[i]).sum() / (referred[i] | truth[i]).sum() for i in with_mask]
    agree = res["mask_agreement"]
    assert agree["rows"] == len(with_mask)
    assert agree["iou"] == pytest.approx(float(np.mean(ious)))
    assert agree["referred_empty"] == sum(not referred[i].any() for i in with_mask)
    md = (out / "eval.md").read_text()
    assert "truth (edit_mask)" in md and "mean IoU" in md

    # --region truth: the penalty on the ground truth; rows without one are edited plainly
    r2 = CliRunner().invoke(cli, [*base, "--region", "truth"])
    assert r2.exit_code == 0, r2.output
    res2 = json.loads(r2.stdout)
    m2 = res2["models"]["tiny"]
    assert set(m2["regions"]) == {"truth"} and "masks" not in res2
    assert m2["edits"] == m["edits"]  # the plain edits are reused
    loc2 = Path(m2["localized"]["edits"])
    assert loc2 != Path(m["localized"]["edits"])
    plain = Path(m["edits"])
    for i in range(n):
        a = np.asarray(Image.open(plain / f"{i:05d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(loc2 / f"{i:05d}.png"), dtype=np.int16)
        if i not in with_mask:  # an empty region: the plain edit, up to float noise
            assert np.abs(a - b).max() <= 1, i
    assert any(np.abs(np.asarray(Image.open(plain / f"{i:05d}.png"), dtype=np.int16)
                      - np.asarray(Image.open(loc2 / f"{i:05d}.png"), dtype=np.int16)).max() > 1
               for i in with_mask)


def test_eval_region_truth_needs_blend_masks(tmp_path):
    pytest.importorskip("datasets")
    from test_train import build_export

    export = build_export(tmp_path)
    r = CliRunner().invoke(cli, ["eval", "tiny", "--data", str(export), "--out",
                                 str(tmp_path / "ev"), "--offline", "--steps", "1",
                                 "--resolution", "32", "--rows", "2", "--localize",
                                 "--region", "truth"])
    assert r.exit_code != 0
    assert "no edit_mask" in str(r.exception) and "generate.blend=true" in str(r.exception)
    r = CliRunner().invoke(cli, ["eval", "tiny", "--data", str(export), "--out",
                                 str(tmp_path / "ev"), "--region", "truth"])
    assert r.exit_code != 0 and "--region needs --localize" in str(r.exception)


# ---------------------------------------------------------------- detector boxes + SAM
def _tiny_sam_segmenter(box_threshold=0.2, sam_model="tiny"):
    from dsbuild.models.segment import load_segmenter

    return load_segmenter("sam", 0.4, "tiny", sam_model, box_threshold)


def test_tiny_detector_boxes_equal_the_owlv2_forward(one_torch_thread):
    """OwlDetector.boxes: the model's own forward scores and boxes, in pixels, above the
    threshold, NMS'd per phrase."""
    from torchvision.ops import nms

    seg = _tiny_sam_segmenter()
    det, im = seg.detector, _image(2, 40)
    found = det.boxes(im, ["lamp", "red chair", "lamp"], 0.5)
    assert list(found) == ["lamp", "red chair"]
    tok = det.tokenizer(["lamp", "red chair"], padding="max_length",
                        max_length=det.text_len, return_tensors="pt")
    px = det.image_processor(images=im, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = det.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        pixel_values=px)
    scores = out.logits[0].sigmoid()
    cx, cy, w, h = out.pred_boxes[0].unbind(-1)  # a square image: no padding to undo
    xyxy = (torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * 40).clamp(0, 40)
    for q, phrase in enumerate(["lamp", "red chair"]):
        keep = scores[:, q] > 0.5
        want = xyxy[keep][nms(xyxy[keep], scores[keep, q], 0.5)]
        assert 0 < len(want) < len(scores)
        torch.testing.assert_close(found[phrase], want, rtol=1e-5, atol=1e-4)
    assert all(len(b) == 0 for b in det.boxes(im, ["lamp", "sofa"], 1.0).values())


def test_tiny_boxes_sam_masks_are_the_union_of_sams_box_masks(one_torch_thread):
    from transformers import SamModel, SamProcessor

    from dsbuild.models.segment import SamSegmenter, tiny_sam

    im = _image(2, 40)
    a, b = _tiny_sam_segmenter(), _tiny_sam_segmenter()
    assert isinstance(a, SamSegmenter) and a.threshold == 0.2 and a.name == "sam"
    state = torch.random.get_rng_state()
    got = a.mask(im, ["lamp", "red chair"])
    assert torch.equal(torch.random.get_rng_state(), state)
    np.testing.assert_array_equal(got, b.mask(im, ["lamp", "red chair"]))  # seeded
    assert got.shape == (40, 40) and got.dtype == bool
    assert got.any() and not got.all(), "the tiny boxes + SAM should give a partial mask"
    assert not a.mask(im, []).any()  # nothing referred: nothing edited
    assert not a.mask(im, ["lamp"], 1.0).any()  # no box above the threshold: empty
    assert not _tiny_sam_segmenter(1.0).mask(im, ["lamp"]).any()
    # SAM run here on each of the detector's boxes, one box a call, masks united
    boxes = [bx for bs in a.detector.boxes(im, ["lamp", "red chair"], 0.2).values()
             for bx in bs.tolist()]
    assert len(boxes) >= 2
    model, proc = tiny_sam()
    assert isinstance(model, SamModel) and isinstance(proc, SamProcessor)
    want, each = np.zeros((40, 40), dtype=bool), []
    for box in boxes:
        inp = proc(images=im, input_boxes=[[box]], return_tensors="pt")
        with torch.no_grad():
            out = model(pixel_values=inp["pixel_values"],
                        input_boxes=inp["input_boxes"].float(), multimask_output=False)
        m = proc.post_process_masks(out.pred_masks, inp["original_sizes"],
                                    inp["reshaped_input_sizes"])[0][0, 0].numpy()
        each.append(m)
        want |= m
    assert not all((m == each[0]).all() for m in each)  # the boxes do steer SAM
    np.testing.assert_array_equal(got, want)


def test_edit_cli_localize_boxes_sam(tmp_path, one_torch_thread):
    """`dsbuild edit --localize --segmenter sam`: tiny detector and SAM, and the same tiny SAM
    saved with save_pretrained and loaded from its folder, give the same region."""
    from dsbuild.models.segment import tiny_sam

    src = tmp_path / "in.png"
    _image().save(src)
    model, proc = tiny_sam()
    model.save_pretrained(tmp_path / "sam")
    proc.save_pretrained(tmp_path / "sam")
    base = ["edit", "tiny", str(src), "remove the lamp", "--steps", "2", "--device", "cpu",
            "--localize", "--segmenter", "sam", "--detector", "tiny", "--box-threshold", "0.0"]
    masks = {}
    for name, sam in (("tiny", "tiny"), ("folder", str(tmp_path / "sam"))):
        out = tmp_path / f"{name}.png"
        r = CliRunner().invoke(cli, [*base, "--sam-model", sam, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert Image.open(out).size == (32, 32)
        masks[name] = np.asarray(Image.open(tmp_path / f"{name}_mask.png")) > 127
    # the rules refer to "lamp"; every tiny box counts at 0.0
    want = _tiny_sam_segmenter(0.0).mask(_image(), ["lamp"])
    assert want.any() and not want.all()
    np.testing.assert_array_equal(masks["tiny"], want)
    np.testing.assert_array_equal(masks["folder"], want)
    r = CliRunner().invoke(cli, [*base, "--sam-model", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "x.png")])
    assert isinstance(r.exception, DsbuildError) and "--sam-model" in str(r.exception)
    assert "\n" not in str(r.exception)
    r = CliRunner().invoke(cli, [*base, "--box-threshold", "1.5", "--out", str(src)])
    assert r.exit_code != 0 and "--box-threshold" in r.output


def test_generate_blend_mask_segment_boxes_sam(one_torch_thread):
    """blend_mask=segment with segmenter=sam: the tiny detector's boxes of the source's blend
    words, segmented by the tiny SAM, are the local blend mask; outside it the target's latents
    are the source's. The box settings sign the stage only with segmenter=sam."""
    from dsbuild.generate.settings import GenerateSettings

    new = {"detector", "sam_model", "box_threshold"}
    assert not new & set(GenerateSettings().signature_dict())
    assert not new & set(GenerateSettings(blend=True, blend_mask="segment", segmenter="tiny",
                                          detector="tiny").signature_dict())
    assert not new & set(GenerateSettings(segmenter="sam").signature_dict())  # no blend
    s = GenerateSettings(blend=True, blend_mask="segment", segmenter="sam", detector="tiny",
                         sam_model="tiny", box_threshold=0.5)
    sig = s.signature_dict()
    assert (sig["detector"], sig["sam_model"], sig["box_threshold"]) == ("tiny", "tiny", 0.5)
    with pytest.raises(ValueError):
        GenerateSettings(box_threshold=1.5)
    seg = _tiny_sam_segmenter(0.5)
    check_segmented_blend(seg)


def test_bench_localize_reports_ratios_and_same_maths():
    """The bench runs end to end; fused and materialised penalties give the same pixels."""
    from dsbuild.bench.localize import bench_localize

    r = CliRunner().invoke(bench_localize, ["--arch", "tiny", "--rows", "2", "--steps", "2",
                                            "--resolution", "32", "--repeats", "1", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert set(res["ratios"]) == {"dsbuild/plain", "dsbuild/materialised"}
    assert all(v > 0 for v in res["ratios"].values())
    assert res["max_abs_diff_vs_materialised"] < 1e-4
    assert res["max_abs_change_vs_plain"] > 1e-3  # the penalty did change the edit


def test_eval_localize_with_boxes_sam_segmenter(tmp_path, one_torch_thread):
    """eval --localize --segmenter sam: the referred masks come from the detector + SAM, and
    their folder is signed by the detector, SAM and box threshold."""
    pytest.importorskip("open_clip")
    pytest.importorskip("datasets")
    from test_train import build_export

    from dsbuild.models.segment import load_segmenter

    export = build_export(tmp_path)
    out = tmp_path / "ev"
    args = ["eval", "tiny", "--data", str(export), "--out", str(out), "--offline", "--steps",
            "1", "--resolution", "64", "--rows", "3", "--localize", "--segmenter", "sam",
            "--detector", "tiny", "--sam-model", "tiny", "--json"]
    r = CliRunner().invoke(cli, [*args, "--box-threshold", "0.0"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    masks = Path(res["masks"])
    referred = json.loads((masks / "referred.json").read_text())
    seg = load_segmenter("sam", detector="tiny", sam_model="tiny", box_threshold=0.0)
    for key, v in referred.items():
        with Image.open(out / "rows" / f"{key}_input.png") as im:
            want = seg.mask(im.convert("RGB"), v["phrases"])
        np.testing.assert_array_equal(_bool_png(masks / f"{key}.png"), want)
    assert any(v["pixels"] for v in referred.values())
    r2 = CliRunner().invoke(cli, [*args, "--box-threshold", "1.0"])
    assert r2.exit_code == 0, r2.output
    res2 = json.loads(r2.stdout)
    assert res2["masks"] != res["masks"]  # another threshold, another mask folder
    assert not any(v["pixels"] for v in json.loads(
        (Path(res2["masks"]) / "referred.json").read_text()).values())
    # another resolution segments its own (differently fitted) inputs
    small = [a if a != "64" else "32" for a in args]
    r3 = CliRunner().invoke(cli, [*small, "--box-threshold", "0.0"])
    assert r3.exit_code == 0, r3.output
    res3 = json.loads(r3.stdout)
    assert res3["masks"] != res["masks"]
    assert _bool_png(next(Path(res3["masks"]).glob("0*.png"))).shape == (32, 32)


def test_bad_detector_names_the_setting():
    from dsbuild.models.segment import load_segmenter

    with pytest.raises(DsbuildError, match=r"^--detector \(generate.detector\): 'nope' is "
                                           r"neither 'tiny'"):
        load_segmenter("sam", detector="nope", sam_model="tiny")


def test_region_covering_the_whole_image_has_no_outside_score(tmp_path):
    """A mask over every pixel leaves nothing outside: L1 and DINO outside are undefined (not a
    perfect 1.0 from two all-grey images); a partial mask gets both."""
    pytest.importorskip("open_clip")
    from dsbuild.localize.region import region_scores
    from dsbuild.models import ClipEncoder, DinoEncoder, ImageEmbedder
    from dsbuild.train.data import EditRow

    emb = ImageEmbedder({"clip": ClipEncoder.load("tiny", "none"),
                         "dino": DinoEncoder.load("tiny")}, batch_size=4)
    paths = {}
    for i in range(2):
        for kind, seed in (("in", i), ("ed", 10 + i)):
            p = tmp_path / f"{kind}{i}.png"
            _image(seed, 32).save(p)
            paths[kind, i] = p
    rows = [EditRow(i, None, None, "remove the lamp") for i in range(2)]
    inputs = {i: paths["in", i] for i in range(2)}
    edits = {i: paths["ed", i] for i in range(2)}
    full = {i: np.ones((32, 32), dtype=bool) for i in range(2)}
    got = region_scores(rows, full, edits, inputs, tmp_path / "full", emb, {})
    assert np.isnan(got["l1_outside"]) and np.isnan(got["dino_outside"])
    assert got["rows_with_region"] == 2 and got["l1_inside"] > 0
    half = {i: np.zeros((32, 32), dtype=bool) for i in range(2)}
    for m in half.values():
        m[:, :16] = True
    got = region_scores(rows, half, edits, inputs, tmp_path / "half", emb, {})
    assert np.isfinite(got["dino_outside"]) and got["dino_outside"] < 1.0
    assert np.isfinite(got["l1_outside"])
