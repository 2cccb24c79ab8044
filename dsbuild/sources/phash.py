"""A 64-bit DCT perceptual hash (the pHash of imagehash.phash, in numpy): grey, 32x32 Lanczos,
2-D DCT-II, the 8x8 lowest frequencies against their median. Near-duplicates (a re-encode, a
small resize, a slight colour shift) land a few bits apart; different photos about half."""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE, LOW = 32, 8


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    m[0] *= 1 / np.sqrt(2)
    return m * np.sqrt(2 / n)


_DCT = _dct_matrix(SIZE)


def phash(image: Image.Image) -> str:
    """The photo's perceptual hash as 16 hex digits."""
    grey = np.asarray(image.convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS),
                      dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:LOW, :LOW]
    bits = (low > np.median(low)).ravel()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def distance(a: str, b: str) -> int:
    """Hamming distance of two hashes (bits that differ)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
