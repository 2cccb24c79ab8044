"""An image embedder that encodes each distinct image once with one or more encoders
(:class:`~dsbuild.models.clip.ClipEncoder`, :class:`~dsbuild.models.dino.DinoEncoder`).

``ImageEmbedder`` keys images by the SHA-1 of their bytes, so a file shared by many pairs, or
two files with the same content, is decoded and encoded once; decoding and preprocessing run
in a thread pool while the model encodes the previous batch.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsbuild.models.clip import ClipEncoder
    from dsbuild.models.dino import DinoEncoder


class ImageEmbedder:
    """Encode image files with one or more encoders, each distinct image content once.

    ``embed(paths)`` returns ``(embeddings, errors)``: ``embeddings[path][encoder_name]`` is a
    normalised vector; ``errors[path]`` is ``(kind, detail)`` with kind ``"missing_image"`` or
    ``"unreadable_image"``.
    """

    def __init__(self, encoders: dict[str, ClipEncoder | DinoEncoder], batch_size: int = 32,
                 workers: int = 4, cache_size: int = 20000):
        self.encoders = encoders
        self.batch_size = batch_size
        self.workers = workers
        self.cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size
        self.encoded = 0  # images actually run through the models (after dedupe)

    @staticmethod
    def _read(path: Path) -> tuple[str | None, bytes | None, tuple[str, str] | None]:
        """(content key, bytes, error) for one file."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, None, ("missing_image", "")
        except OSError as exc:
            return None, None, ("unreadable_image", str(exc.strerror or exc))
        return hashlib.sha1(data).hexdigest(), data, None

    def _prepare(self, data: bytes) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """Decode bytes and run each encoder's preprocessing (runs in worker threads)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
            return {n: e.preprocess_image(im) for n, e in self.encoders.items()}, None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            return None, f"{type(exc).__name__}: {exc}"

    def _encode_batch(self, keys: list[str], tensors: list[dict[str, torch.Tensor]],
                      fresh: dict[str, dict[str, torch.Tensor]]) -> None:
        embs = {n: e.encode_pixels(torch.stack([t[n] for t in tensors]))
                for n, e in self.encoders.items()}
        for i, k in enumerate(keys):
            fresh[k] = self.cache[k] = {n: embs[n][i].clone() for n in self.encoders}
            self.cache.move_to_end(k)
        self.encoded += len(keys)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def embed(self, paths: Sequence[str | Path]):
        """Embeddings and errors for these files (each distinct content encoded once)."""
        unique = list(dict.fromkeys(Path(p) for p in paths))
        key_of: dict[Path, str] = {}
        errors: dict[Path, tuple[str, str]] = {}
        todo: dict[str, bytes] = {}
        found: dict[str, dict[str, torch.Tensor]] = {}
        for p in unique:
            key, data, err = self._read(p)
            if err:
                errors[p] = err
                continue
            key_of[p] = key
            if key in self.cache:
                self.cache.move_to_end(key)
                found[key] = self.cache[key]
            elif key not in todo:
                todo[key] = data
        bad: dict[str, str] = {}
        keys = list(todo)
        if keys:
            pool = ThreadPoolExecutor(self.workers) if self.workers > 0 else None
            results = (pool.map(self._prepare, (todo[k] for k in keys)) if pool
                       else map(self._prepare, (todo[k] for k in keys)))
            batch_keys: list[str] = []
            batch: list[dict[str, torch.Tensor]] = []
            try:
                for k, (tensors, err) in zip(keys, results, strict=True):
                    todo[k] = b""  # free the bytes as soon as they are decoded
                    if err:
                        bad[k] = err
                        continue
                    batch_keys.append(k)
                    batch.append(tensors)
                    if len(batch) == self.batch_size:
                        self._encode_batch(batch_keys, batch, found)
                        batch_keys, batch = [], []
                if batch:
                    self._encode_batch(batch_keys, batch, found)
            finally:
                if pool:
                    pool.shutdown(wait=True, cancel_futures=True)
        out: dict[Path, dict[str, torch.Tensor]] = {}
        for p, k in key_of.items():
            if k in bad:
                errors[p] = ("unreadable_image", bad[k])
            else:
                out[p] = found[k]
        return out, errors
