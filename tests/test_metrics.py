"""The metric formulas on hand-made embeddings (no model)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsbuild import metrics


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


def test_clip_scores_match_instructpix2pix_formulas_batched():
    g = torch.Generator().manual_seed(0)
    i0, i1, t0, t1 = (torch.randn(5, 8, generator=g) for _ in range(4))
    s = metrics.clip_scores(i0, i1, t0, t1)
    n = [x / x.norm(dim=1, keepdim=True) for x in (i0, i1, t0, t1)]
    assert torch.allclose(s["clip_sim_0"], F.cosine_similarity(n[0], n[2]), atol=1e-6)
    assert torch.allclose(s["clip_sim_1"], F.cosine_similarity(n[1], n[3]), atol=1e-6)
    assert torch.allclose(s["clip_sim_dir"],
                          F.cosine_similarity(n[1] - n[0], n[3] - n[2]), atol=1e-6)
    assert torch.allclose(s["clip_sim_image"], F.cosine_similarity(n[0], n[1]), atol=1e-6)
    assert all(v.shape == (5,) for v in s.values())
    assert torch.allclose(metrics.clip_image(i0, i1), s["clip_sim_image"])
    assert torch.allclose(metrics.clip_output(i1, t1), s["clip_sim_1"])
    assert torch.allclose(metrics.clip_text_image(i0, t0), s["clip_sim_0"])


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
