"""Perceptual hashes of photos (imagehash's DCT pHash, 64 bits): near-duplicates (a re-encode,
a small resize, a slight colour shift) land a few bits apart, different photos about half."""

from __future__ import annotations

from PIL import Image

from dsbuild.core.deps import require


def phash(image: Image.Image) -> str:
    """The photo's perceptual hash as 16 hex digits."""
    return str(require("imagehash", "the sources stage").phash(image))


def distance(a: str, b: str) -> int:
    """Hamming distance of two hashes (bits that differ)."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
