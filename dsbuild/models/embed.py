"""CLIP (open_clip) and DINOv2 (transformers) encoders, and an image embedder that encodes
each image once.

Every encoder uses its model's own preprocessing (open_clip's ``preprocess`` transform,
DINOv2's image processor), returns L2-normalised float32 embeddings on the CPU, and runs
under autocast (fp16 on CUDA by default) inside ``torch.inference_mode``.
``ImageEmbedder`` keys images by the SHA-1 of their bytes, so a file shared by many pairs, or
two files with the same content, is decoded and encoded once; decoding and preprocessing run
in a thread pool while the model encodes the previous batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

from dsbuild.core.errors import DsbuildError, require
from dsbuild.core.metrics import normalize
from dsbuild.models import resolve_device, resolve_dtype, torch_dtype
from dsbuild.models import tiny_clip as tiny

RANDOM_WEIGHTS = ("", "none", "random")


def amp_dtype(dtype: str, device: str) -> torch.dtype | None:
    """Autocast dtype for a filter ``dtype`` setting: 'auto' is fp16 on CUDA, fp32 elsewhere."""
    td = torch_dtype(resolve_dtype(dtype, device))  # the same rule as generate.dtype
    return None if td is torch.float32 else td


def autocast(device: str, dtype: torch.dtype | None):
    """torch.autocast for the device type, or a no-op for fp32."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


RANDOM_SEED = 0  # seeds models built with random weights ('tiny', pretrained 'none')


class ClipEncoder:
    """An open_clip model with its preprocess transform and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, device: str = "cpu",
                 dtype: torch.dtype | None = None, name: str = "clip"):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.name = name

    @classmethod
    def load(cls, model: str = "ViT-L-14", pretrained: str | None = "openai",
             device: str = "auto", dtype: str = "auto", quiet: bool = False) -> ClipEncoder:
        """Load by open_clip name + tag/checkpoint file, 'hf-hub:'/'local-dir:' or 'tiny'."""
        open_clip = require("open_clip", "filter", "open_clip_torch")
        device = resolve_device(device)
        name, pre, placeholder = model, pretrained, False
        if pre is not None and pre.strip().lower() in RANDOM_WEIGHTS:
            pre, placeholder = None, True
        if model == "tiny":
            name = tiny.register_tiny_clip()
            if pre is None or not Path(pre).is_file():
                pre, placeholder = None, True
        elif model.startswith(("hf-hub:", "local-dir:")):
            pre = None
        else:
            if name not in open_clip.list_models():
                raise DsbuildError(
                    f"filter.clip_model: {model!r} is not an open_clip model name (see "
                    "open_clip.list_models()), 'hf-hub:owner/name', 'local-dir:PATH' or 'tiny'")
            tags = open_clip.list_pretrained_tags_by_model(name)
            if pre is not None and not Path(pre).is_file() and pre not in tags:
                raise DsbuildError(
                    f"filter.clip_pretrained: {pre!r} is neither a checkpoint file nor a "
                    f"pretrained tag of {name} (tags: {', '.join(tags) or 'none'}; 'none' "
                    "gives random weights)")
        root = logging.getLogger()
        was_disabled, root.disabled = root.disabled, True  # open_clip's root-logger chatter
        try:
            with torch.random.fork_rng(devices=[]):  # random weights: the same every run
                torch.manual_seed(RANDOM_SEED)
                m, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pre, device=device)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear message
            raise DsbuildError(f"filter.clip_model: cannot load {model!r} with pretrained "
                               f"{pretrained!r}: {type(exc).__name__}: {exc}") from None
        finally:
            root.disabled = was_disabled
        if placeholder and not quiet:
            tiny.warn_tiny(model if model == "tiny" else f"{model} without pretrained weights")
        return cls(m, preprocess, tokenizer, device, amp_dtype(dtype, device), name=model)

    def preprocess_image(self, image) -> torch.Tensor:
        """One PIL image -> the model's input tensor (C, H, W)."""
        return self.preprocess(image)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images -> normalised embeddings (n, d), float32 on CPU."""
        with autocast(self.device, self.dtype):
            emb = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return normalize(emb).cpu()

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> normalised embeddings (n, d), float32 on CPU (long ones truncated)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i:i + batch_size])).to(self.device)
            with autocast(self.device, self.dtype):
                emb = self.model.encode_text(tokens)
            out.append(normalize(emb).cpu())
        return torch.cat(out) if out else torch.empty(0)


class DinoEncoder:
    """A DINOv2 model (transformers) with its image processor; embeddings are the CLS token."""

    def __init__(self, model, processor, device: str = "cpu", dtype: torch.dtype | None = None,
                 name: str = "dino"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.name = name

    @classmethod
    def load(cls, model: str = "facebook/dinov2-base", device: str = "auto", dtype: str = "auto",
             quiet: bool = False) -> DinoEncoder:
        """Load from 'tiny', a folder saved with save_pretrained, or a Hub id."""
        require("transformers", "filter")
        device = resolve_device(device)
        if model == "tiny":
            m, proc = tiny.tiny_dino()
            if not quiet:
                tiny.warn_tiny("tiny (DINOv2)")
        else:
            if not Path(model).exists() and (model.startswith((".", "/"))
                                              or model.count("/") != 1):
                raise DsbuildError(f"filter.dino_model: {model!r} is neither 'tiny', an "
                                   "existing folder, nor a Hub id like 'facebook/dinov2-base'")
            from transformers import AutoImageProcessor, AutoModel

            try:
                proc = AutoImageProcessor.from_pretrained(model)
                m = AutoModel.from_pretrained(model)
            except Exception as exc:  # noqa: BLE001
                raise DsbuildError(f"filter.dino_model: cannot load {model!r}: "
                                   f"{type(exc).__name__}: {exc}") from None
        return cls(m, proc, device, amp_dtype(dtype, device), name=model)

    def preprocess_image(self, image) -> torch.Tensor:
        """One PIL image -> pixel_values (C, H, W) via the model's image processor."""
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images -> normalised CLS embeddings (n, d), float32 on CPU."""
        with autocast(self.device, self.dtype):
            out = self.model(pixel_values=pixels.to(self.device, non_blocking=True))
        cls_emb = getattr(out, "pooler_output", None)
        if cls_emb is None:
            cls_emb = out.last_hidden_state[:, 0]
        return normalize(cls_emb).cpu()


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
