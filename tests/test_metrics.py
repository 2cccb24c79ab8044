"""The metric formulas: against InstructPix2Pix's definitions written out independently
(tests/ip2p_reference.py) on a tiny real open_clip model's embeddings, and on hand-made
vectors whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ip2p_reference import ip2p_scores

from dsbuild.core import metrics
from dsbuild.core.errors import DsbuildError


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_direction_is_one_when_parallel_and_minus_one_when_opposite():
    img0, img1 = t(1, 0, 0), t(0, 1, 0)
    txt0, txt1 = t(1, 0, 0), t(0, 1, 0)
    assert metrics.clip_direction(img0, img1, txt0, txt1).item() == pytest.approx(1.0)
    assert metrics.clip_direction(img0, img1, txt1, txt0).item() == pytest.approx(-1.0)
    # a caption change orthogonal to the image change: 0
    assert metrics.clip_direction(img0, img1, t(0, 0, 1), t(1, 1, 0)).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_direction_normalises_embeddings_before_the_difference():
    # InstructPix2Pix normalises each embedding, then subtracts: scale of img1 must not matter
    img0, img1 = t(1, 0), t(0, 3)
    txt0, txt1 = t(1, 0), t(0, 1)
    assert metrics.clip_direction(img0, img1, txt0, txt1).item() == pytest.approx(1.0)
    raw = F.cosine_similarity(img1 - img0, txt1 - txt0, dim=0).item()
    assert raw < 0.95  # the un-normalised difference would give a different answer


@pytest.fixture(scope="module")
def clip_embeddings():
    """Raw (unnormalised) embeddings of 6 image/caption pairs from a tiny real open_clip model."""
    from PIL import Image

    from dsbuild.models.clip import tiny_clip

    model, preprocess, tok = tiny_clip(seed=4)
    rng = np.random.default_rng(0)
    ims = [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in range(12)]
    caps = [f"a {c} {m} armchair" for c in ("red", "blue", "green")
            for m in ("velvet", "oak", "linen", "leather")]
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(i) for i in ims]))
        txt = model.encode_text(tok(caps))
    assert not torch.allclose(img.norm(dim=1), torch.ones(12), atol=1e-2)  # really raw
    return img[:6], img[6:], txt[:6], txt[6:]


def test_clip_scores_equal_instructpix2pix_on_real_clip_embeddings(clip_embeddings):
    i0, i1, t0, t1 = clip_embeddings
    want = ip2p_scores(*(x.numpy() for x in clip_embeddings))
    got = metrics.clip_scores(i0, i1, t0, t1)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].shape == (6,) and got[k].dtype == torch.float32
        np.testing.assert_allclose(got[k].numpy(), v, atol=1e-6, err_msg=k)
    # the single-metric functions and the evaluation names give the same numbers
    np.testing.assert_allclose(metrics.clip_text_image(i0, t0).numpy(), want["clip_sim_0"],
                               atol=1e-6)
    np.testing.assert_allclose(metrics.clip_output(i1, t1).numpy(), want["clip_sim_1"],
                               atol=1e-6)
    np.testing.assert_allclose(metrics.clip_direction(i0, i1, t0, t1).numpy(),
                               want["clip_sim_dir"], atol=1e-6)
    np.testing.assert_allclose(metrics.clip_image(i0, i1).numpy(), want["clip_sim_image"],
                               atol=1e-6)
    ev = metrics.edit_metrics(i0, i1, t0, t1)
    for name, key in (("CLIP_im", "clip_sim_image"), ("CLIP_dir", "clip_sim_dir"),
                      ("CLIP_out", "clip_sim_1")):
        np.testing.assert_allclose(ev[name].numpy(), want[key], atol=1e-6, err_msg=name)
    # one row at a time (shape (d,)) and in half precision: the same answers
    one = metrics.clip_scores(i0[2], i1[2], t0[2], t1[2])
    half = metrics.clip_scores(i0.half(), i1.half(), t0.half(), t1.half())
    for k, v in want.items():
        assert one[k].shape == () and one[k].item() == pytest.approx(v[2], abs=1e-6)
        np.testing.assert_allclose(half[k].numpy(), v, atol=2e-3, err_msg=k)


def test_image_and_dino_similarity_and_zero_vectors():
    assert metrics.clip_image(t(1, 0), t(1, 0)).item() == pytest.approx(1.0)
    assert metrics.clip_image(t(1, 0), t(-2, 0)).item() == pytest.approx(-1.0)
    assert metrics.dino(t(3, 4), t(4, 3)).item() == pytest.approx(24 / 25)
    # identical images: the image change is a zero vector, direction is 0 (not NaN)
    d = metrics.clip_direction(t(1, 0), t(1, 0), t(1, 0), t(0, 1)).item()
    assert d == 0.0 and not math.isnan(d)
    # half precision input is computed in float32
    assert metrics.cosine(t(1, 0).half(), t(1, 0).half()).dtype == torch.float32


def test_edit_metrics_names_and_means():
    i0, i1 = torch.eye(3)[:2], torch.eye(3)[[1, 0]]
    m = metrics.edit_metrics(i0, i1, i0, i1, dino_0=i0, dino_1=i0)
    assert set(m) == {"CLIP_im", "CLIP_dir", "CLIP_out", "DINO"}
    assert m["CLIP_dir"].tolist() == pytest.approx([1.0, 1.0])
    assert m["DINO"].tolist() == pytest.approx([1.0, 1.0])
    assert "DINO" not in metrics.edit_metrics(i0, i1, i0, i1)
    means = metrics.mean_metrics({"a": t(1, float("nan"), 3), "b": t(float("nan"))})
    assert means["a"] == pytest.approx(2.0) and math.isnan(means["b"])


# ------------------------------------------------ reproducible metrics (InstructPix2Pix, MagicBrush)

IP2P_MEAN = (0.48145466, 0.4578275, 0.40821073)  # InstructPix2Pix ClipSimilarity's buffers
IP2P_STD = (0.26862954, 0.26130258, 0.27577711)


class Ip2pClipSimilarity:
    """InstructPix2Pix ``metrics/clip_similarity.py`` ``ClipSimilarity`` written out again
    around an open_clip model (it loads OpenAI's ``clip``; its ``size`` is the model's input
    side, 224 for ViT-L/14, 32 for the tiny model)."""

    def __init__(self, model, tokenizer, size: int):
        self.model, self.tokenizer, self.size = model, tokenizer, size
        self.mean = torch.tensor(IP2P_MEAN)
        self.std = torch.tensor(IP2P_STD)

    def encode_text(self, text):
        f = self.model.encode_text(self.tokenizer(text))
        return f / f.norm(dim=1, keepdim=True)

    def encode_image(self, image):  # input images in range [0, 1]
        image = F.interpolate(image.float(), size=self.size, mode="bicubic", align_corners=False)
        image = image - self.mean.reshape(1, 3, 1, 1)
        image = image / self.std.reshape(1, 3, 1, 1)
        f = self.model.encode_image(image)
        return f / f.norm(dim=1, keepdim=True)

    def __call__(self, image_0, image_1, text_0, text_1):
        i0, i1 = self.encode_image(image_0), self.encode_image(image_1)
        t0, t1 = self.encode_text(text_0), self.encode_text(text_1)
        return {"clip_sim_0": F.cosine_similarity(i0, t0),
                "clip_sim_1": F.cosine_similarity(i1, t1),
                "clip_sim_dir": F.cosine_similarity(i1 - i0, t1 - t0),
                "clip_sim_image": F.cosine_similarity(i0, i1)}


def _room(seed: int, size=(56, 40)):
    """A non-square RGB picture with structure near its borders (what a centre crop cuts)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    base = (np.concatenate([x + 0 * y, y + 0 * x, (x * y)], axis=2) * 200).astype("uint8")
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        d.rectangle([x0, y0, x0 + 8, y0 + 8], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def _filter_scores(tmp_path, preprocess: str) -> dict:
    """(scorer, pairs, triples, scores): the filter stage scoring three non-square pairs
    with the tiny CLIP."""
    from dsbuild.filter.settings import FilterSettings
    from dsbuild.filter.stage import Scorer

    pairs, triples = [], {}
    for i in range(3):
        for side, seed in (("input", 2 * i), ("output", 2 * i + 1)):
            _room(seed).save(tmp_path / f"{i}-{side}.png")
        pairs.append({"id": f"p{i}", "triple_id": f"t{i}",
                      "images": {"input": f"{i}-input.png", "output": f"{i}-output.png"}})
        triples[f"t{i}"] = {"input": f"a {('grey', 'oak', 'linen')[i]} sofa",
                            "output": f"a {('red', 'blue', 'green')[i]} velvet sofa"}
    s = FilterSettings(clip_model="tiny", clip_pretrained="none", clip_preprocess=preprocess,
                       device="cpu", dtype="fp32", workers=0)
    scorer = Scorer.from_settings(s, quiet=True)
    return scorer, pairs, triples, scorer.score(pairs, triples, tmp_path)


def test_ip2p_preprocessing_equals_instructpix2pix_clip_similarity(tmp_path):
    from PIL import Image

    scorer, pairs, triples, got = _filter_scores(tmp_path, "ip2p")
    assert scorer.clip.preprocessing == "ip2p" and scorer.clip.size == (32, 32)
    ref = Ip2pClipSimilarity(scorer.clip.model, scorer.clip.tokenizer, size=32)

    def tensor(rel):  # as InstructPix2Pix feeds it: a float image in [0, 1], (1, 3, H, W)
        a = np.asarray(Image.open(tmp_path / rel).convert("RGB"), dtype=np.float32) / 255
        return torch.from_numpy(a).permute(2, 0, 1)[None]

    with torch.no_grad():
        want = ref(torch.cat([tensor(p["images"]["input"]) for p in pairs]),
                   torch.cat([tensor(p["images"]["output"]) for p in pairs]),
                   [triples[p["triple_id"]]["input"] for p in pairs],
                   [triples[p["triple_id"]]["output"] for p in pairs])
    for k, v in want.items():
        np.testing.assert_allclose([got[p["id"]][k] for p in pairs], v.numpy(), atol=1e-5,
                                   err_msg=k)
    # open_clip's preprocessing (short side resize + centre crop) scores these otherwise
    _, _, _, other = _filter_scores(tmp_path, "openclip")
    gap = max(abs(other[p["id"]][k] - got[p["id"]][k]) for p in pairs for k in want)
    assert gap > 1e-3


def test_ip2p_is_a_whole_image_resize_without_crop():
    from PIL import Image

    from dsbuild.models.clip import ClipEncoder

    enc = ClipEncoder.load("tiny", "none", device="cpu", dtype="fp32", quiet=True,
                           preprocess="ip2p")
    # a picture whose left and right quarters differ: a centre crop drops them, ip2p keeps them
    a = np.zeros((32, 64, 3), dtype="uint8")
    a[:, :16] = 255
    x = enc.preprocess_image(Image.fromarray(a))
    assert x.shape == (3, 32, 32)
    mean, std = torch.tensor(IP2P_MEAN), torch.tensor(IP2P_STD)
    # the squashed white quarter fills the left 8 columns (bicubic rings only at its edge)
    np.testing.assert_allclose(x[:, :, :6], ((1 - mean) / std)[:, None, None].expand(3, 32, 6),
                               atol=1e-6)
    crop = enc.preprocess(Image.fromarray(a))
    assert crop.shape == (3, 32, 32) and torch.allclose(
        crop[:, :, :6], ((0 - mean) / std)[:, None, None].expand(3, 32, 6), atol=1e-6)
    with pytest.raises(DsbuildError, match="clip preprocess: 'pil' is not one of openclip, ip2p"):
        ClipEncoder.load("tiny", "none", device="cpu", quiet=True, preprocess="pil")


def test_clip_preprocess_signs_only_when_changed_and_reaches_eval():
    from dsbuild.evaluate.run import load_encoders
    from dsbuild.evaluate.settings import EvalSettings, GeneratorEvalSettings
    from dsbuild.filter.settings import FilterSettings

    assert "clip_preprocess" not in FilterSettings().signature_dict()
    assert FilterSettings(clip_preprocess="ip2p").signature_dict()["clip_preprocess"] == "ip2p"
    assert FilterSettings().signature_dict() == \
        FilterSettings(clip_preprocess="openclip").signature_dict()
    with pytest.raises(ValueError, match="clip_preprocess"):
        FilterSettings(clip_preprocess="pil")
    assert GeneratorEvalSettings().clip_preprocess == "openclip"
    tiny = dict(clip_model="tiny", clip_pretrained="none", dino_model="tiny", device="cpu")
    for mode in ("openclip", "ip2p"):
        clip, _ = load_encoders(EvalSettings(**tiny, clip_preprocess=mode))
        assert clip.preprocessing == mode
    # eval's table names the preprocessing when it is InstructPix2Pix's
    from dsbuild.evaluate.report import markdown_table

    def header(mode):
        res = {"split": "test", "data": "d", "rows": {"edit": 1, "no_change": 0},
               "settings": {"image_guidance": [1.5], "guidance": 7.5, "steps": 4, "seed": 0,
                            "main_image_guidance": 1.5},
               "backbones": {"clip": "tiny/none", "dino": "tiny", "clip_preprocess": mode},
               "models": {}}
        return markdown_table(res).splitlines()[1]

    assert header("ip2p").startswith("CLIP: tiny/none (InstructPix2Pix's metric preprocessing")
    assert header("openclip").startswith("CLIP: tiny/none; DINO: tiny.")


def _tiny_vit(tmp_path):
    """A tiny DINO v1-shaped ``ViTModel`` (with its pooler, as facebook/dino-vits16 loads) and
    its image processor, saved as a checkpoint folder."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(7)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, image_size=32, patch_size=8)).eval()
    assert model.pooler is not None
    proc = ViTImageProcessor(do_resize=True, size={"height": 32, "width": 32}, resample=3,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(tmp_path / "dino-v1")
    proc.save_pretrained(tmp_path / "dino-v1")
    return model, proc, tmp_path / "dino-v1"


def test_dino_v1_vit_checkpoint_is_scored_on_its_cls_token(tmp_path):
    from transformers import ViTModel

    from dsbuild.models.dino import DinoEncoder

    model, proc, folder = _tiny_vit(tmp_path)
    enc = DinoEncoder.load(str(folder), device="cpu", dtype="fp32", quiet=True)
    assert isinstance(enc.model, ViTModel)
    ims = [_room(s) for s in range(4)]
    emb = [enc.encode_pixels(torch.stack([enc.preprocess_image(i) for i in ims[k::2]]))
           for k in (0, 1)]
    got = metrics.dino(*emb)
    with torch.no_grad():  # MagicBrush: cosine of the CLS token of the last hidden state
        out = [model(pixel_values=proc(images=ims[k::2], return_tensors="pt")["pixel_values"])
               for k in (0, 1)]
    want = F.cosine_similarity(out[0].last_hidden_state[:, 0], out[1].last_hidden_state[:, 0])
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
    pooled = F.cosine_similarity(out[0].pooler_output, out[1].pooler_output)
    assert (pooled - want).abs().max() > 1e-3  # the dense + tanh head is another number


def test_dinov2_scores_are_unchanged_by_the_cls_token_rule(tmp_path):
    from dsbuild.models.dino import DinoEncoder, tiny_dino

    model, proc = tiny_dino(seed=5)
    model.save_pretrained(tmp_path / "dinov2")
    proc.save_pretrained(tmp_path / "dinov2")
    enc = DinoEncoder.load(str(tmp_path / "dinov2"), device="cpu", dtype="fp32", quiet=True)
    ims = [_room(s) for s in range(3)]
    got = enc.encode_pixels(torch.stack([enc.preprocess_image(i) for i in ims]))
    with torch.no_grad():
        out = model(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"])
    # Dinov2Model's pooler_output (what was scored before) is the layer-normed CLS token
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    np.testing.assert_allclose(got.numpy(), metrics.normalize(out.pooler_output).numpy(),
                               atol=1e-6)


def test_magicbrush_dino_preprocessing_is_torchvisions_on_any_aspect():
    """MagicBrush's DINO transform (Resize(256, bicubic), CenterCrop(224), ImageNet norm) on a
    non-square image, against torchvision called here: the crop offset and the resize agree."""
    from PIL import Image
    from torchvision import transforms as T

    from dsbuild.models.dino import DinoEncoder

    rng = np.random.default_rng(3)
    im = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    enc = DinoEncoder.load("tiny", device="cpu", dtype="fp32", quiet=True,
                           preprocess="magicbrush")
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
                     T.CenterCrop(224), T.ToTensor(),
                     T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(im)
    got = enc.preprocess_image(im)
    assert got.shape == (3, 224, 224)
    assert torch.equal(got, ref)
