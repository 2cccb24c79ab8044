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
