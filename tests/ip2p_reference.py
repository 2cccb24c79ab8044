"""InstructPix2Pix's filter scores written out independently, in float64 numpy.

Transcribed from InstructPix2Pix ``metrics/clip_similarity.py`` (``ClipSimilarity.forward``):
each CLIP embedding is divided by its norm, then the four cosines are taken, the direction
one on differences of the normalised embeddings. Tests compare ``dsbuild.core.metrics`` and the
filter stage with this, never with the dsbuild functions themselves.
"""

from __future__ import annotations

import numpy as np


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = dot / (na * nb)
    return np.where((na == 0) | (nb == 0), 0.0, out)  # a zero vector: cosine 0


def ip2p_scores(image_0, image_1, text_0, text_1) -> dict[str, np.ndarray]:
    """clip_sim_0, clip_sim_1, clip_sim_dir, clip_sim_image as InstructPix2Pix computes them."""
    i0, i1, t0, t1 = (_unit(x) for x in (image_0, image_1, text_0, text_1))
    return {"clip_sim_0": _cos(i0, t0), "clip_sim_1": _cos(i1, t1),
            "clip_sim_dir": _cos(i1 - i0, t1 - t0), "clip_sim_image": _cos(i0, i1)}
