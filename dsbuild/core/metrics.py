"""Image-editing metrics on embedding tensors, shared by the filter stage and ``eval``.

All functions take embeddings of shape ``(d,)`` or ``(n, d)`` (any float dtype; computed in
float32) and return cosines of shape ``()`` or ``(n,)``. Embeddings are L2-normalised first,
exactly as InstructPix2Pix's ``metrics/clip_similarity.py`` (``ClipSimilarity``) does before
it takes the differences for the direction score. Formulas (docs/filter.md)::

    ê = e / ‖e‖
    clip_sim_0     = cos(ê(img0), ê(txt0))                      image 0 vs input caption
    clip_sim_1     = cos(ê(img1), ê(txt1))        = CLIP_out    image 1 vs output caption
    clip_sim_dir   = cos(ê(img1) − ê(img0), ê(txt1) − ê(txt0))   = CLIP_dir
    clip_sim_image = cos(ê(img0), ê(img1))        = CLIP_im
    dino           = cos(DINOv2 CLS(img0), DINOv2 CLS(img1))   = DINO

A zero vector (e.g. two identical images in ``clip_sim_dir``) has cosine 0 with anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension in float32 (zero vectors stay zero)."""
    return F.normalize(x.float(), dim=-1, eps=EPS)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension; 0 where either side is a zero vector."""
    return (normalize(a) * normalize(b)).sum(-1)


def clip_text_image(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """cos(image, text): clip_sim_0 for (img0, input caption), clip_sim_1 for (img1, output)."""
    return cosine(image, text)


def clip_image(image_0: torch.Tensor, image_1: torch.Tensor) -> torch.Tensor:
    """CLIP_im = clip_sim_image: how alike the edited image stays to the input image."""
    return cosine(image_0, image_1)


def clip_direction(image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor,
                   text_1: torch.Tensor) -> torch.Tensor:
    """CLIP_dir = clip_sim_dir: does the image change point the way the caption change does."""
    return cosine(normalize(image_1) - normalize(image_0), normalize(text_1) - normalize(text_0))


def clip_output(image_1: torch.Tensor, text_1: torch.Tensor) -> torch.Tensor:
    """CLIP_out = clip_sim_1: the edited image against the output caption."""
    return cosine(image_1, text_1)


def dino(cls_0: torch.Tensor, cls_1: torch.Tensor) -> torch.Tensor:
    """DINO: cosine of DINOv2 CLS embeddings of the two images (structure/appearance kept)."""
    return cosine(cls_0, cls_1)


def clip_scores(image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor,
                text_1: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four InstructPix2Pix filter scores at once (InstructPix2Pix ``ClipSimilarity``)."""
    return {
        "clip_sim_0": clip_text_image(image_0, text_0),
        "clip_sim_1": clip_output(image_1, text_1),
        "clip_sim_dir": clip_direction(image_0, image_1, text_0, text_1),
        "clip_sim_image": clip_image(image_0, image_1),
    }


def edit_metrics(image_0: torch.Tensor, image_1: torch.Tensor, text_0: torch.Tensor,
                 text_1: torch.Tensor, dino_0: torch.Tensor | None = None,
                 dino_1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Evaluation names: CLIP_im, CLIP_dir, CLIP_out and (given DINOv2 CLS embeddings) DINO."""
    s = clip_scores(image_0, image_1, text_0, text_1)
    out = {"CLIP_im": s["clip_sim_image"], "CLIP_dir": s["clip_sim_dir"],
           "CLIP_out": s["clip_sim_1"]}
    if dino_0 is not None and dino_1 is not None:
        out["DINO"] = dino(dino_0, dino_1)
    return out


def mean_metrics(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of each metric over the rows (NaNs skipped), as plain floats for reports."""
    return {k: float(torch.nanmean(v.float())) for k, v in metrics.items()}


def l1_distance(image_a: torch.Tensor, image_b: torch.Tensor) -> torch.Tensor:
    """L1: mean absolute pixel difference per image, for pixels scaled to [0, 1] (MagicBrush's
    L1 against the ground-truth edit; 0 = identical). Shapes ``(..., H, W, C)`` or ``(n, ...)``:
    the mean runs over everything but the first dimension of a batch."""
    diff = (image_a.float() - image_b.float()).abs()
    return diff.mean() if diff.dim() <= 3 else diff.flatten(1).mean(1)
