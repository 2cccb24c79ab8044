"""verify's detection: what each phrase found in each image file, each image and phrase once.

:class:`Detector` is :class:`dsbuild.models.owl.OwlDetector` (loaded there) plus ``detect``:
per image and phrase a :class:`dsbuild.verify.checks.Found` (best score, boxes above
``present_min`` after NMS, best box in pixels). Images are keyed by the SHA-1 of their bytes,
so a P2P source shared by many targets (one file per pair, same content) is decoded and run
through the vision tower once, whatever phrases its pairs ask for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dsbuild.models.owl import OwlDetector
from dsbuild.verify.checks import Found


def nms_count(boxes: torch.Tensor, scores: torch.Tensor, present_min: float, iou: float) -> int:
    """How many distinct boxes score at least ``present_min`` (overlaps above ``iou`` are one)."""
    keep = scores >= present_min
    if not bool(keep.any()):
        return 0
    from torchvision.ops import nms

    return int(nms(boxes[keep].float(), scores[keep].float(), iou).numel())


class Detector(OwlDetector):
    """An OWLv2 / OWL-ViT detector that answers verify's queries about image files."""

    def detect(self, queries: Mapping[Path, Iterable[str]], present_min: float = 0.2,
               nms_iou: float = 0.5) -> tuple[dict[Path, dict[str, Found]], dict[Path, str]]:
        """Per image, what each of its phrases found; images that cannot be read in ``errors``."""
        key_of: dict[Path, str] = {}
        errors: dict[Path, str] = {}
        data: dict[str, bytes] = {}
        wanted: dict[str, set[str]] = {}
        for path, phrases in queries.items():
            path = Path(path)
            try:
                raw = path.read_bytes()
            except OSError as exc:
                errors[path] = f"unreadable image {path.name}: {exc.strerror or exc}"
                continue
            k = hashlib.sha1(raw).hexdigest()
            key_of[path] = k
            data.setdefault(k, raw)
            wanted.setdefault(k, set()).update(phrases)
        found: dict[str, dict[str, Found]] = {}
        bad: dict[str, str] = {}
        keys = [k for k in data if wanted[k]]
        pool = ThreadPoolExecutor(self.workers) if self.workers > 0 else None
        try:
            prepared = (pool.map(self.prepare, (data[k] for k in keys)) if pool
                        else map(self.prepare, (data[k] for k in keys)))
            batch: list[tuple[str, torch.Tensor, tuple[int, int]]] = []
            for k, (pixels, size, err) in zip(keys, prepared, strict=True):
                data[k] = b""
                if err:
                    bad[k] = err
                    continue
                batch.append((k, pixels, size))
                if len(batch) == self.batch_size:
                    self._detect_batch(batch, wanted, found, present_min, nms_iou)
                    batch = []
            if batch:
                self._detect_batch(batch, wanted, found, present_min, nms_iou)
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)
        out: dict[Path, dict[str, Found]] = {}
        for path, k in key_of.items():
            if k in bad:
                errors[path] = f"unreadable image {path.name}: {bad[k]}"
            else:
                out[path] = found.get(k, {})
        return out, errors

    def _detect_batch(self, batch, wanted, found, present_min: float, nms_iou: float) -> None:
        phrases = sorted(set().union(*(wanted[k] for k, _, _ in batch)))
        col = {p: i for i, p in enumerate(phrases)}
        scores, boxes = self.run(torch.stack([px for _, px, _ in batch]), phrases)
        self.encoded += len(batch)
        for i, (k, _, size) in enumerate(batch):
            px_boxes = self.pixel_boxes(boxes[i], size)
            res: dict[str, Found] = {}
            for p in wanted[k]:
                s = scores[i, :, col[p]]
                best = int(s.argmax())
                res[p] = Found(float(s[best]), nms_count(px_boxes, s, present_min, nms_iou),
                               tuple(round(float(v), 1) for v in px_boxes[best]))
            found[k] = res
