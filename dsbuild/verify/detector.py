"""Open-vocabulary detection with transformers' OWLv2 / OWL-ViT, each image and phrase once.

``OwlDetector.detect({path: phrases})`` returns, per image and phrase, a
:class:`dsbuild.verify.checks.Found` (best score, boxes above ``present_min`` after NMS, best
box in pixels). Images are keyed by the SHA-1 of their bytes, so a P2P source shared by many
targets (one file per pair, same content) is decoded and run through the vision tower once,
whatever phrases its pairs ask for; each phrase is run through the text tower once and cached.
The model's own heads do the rest (``image_embedder``, ``class_predictor``, ``box_predictor``,
exactly what ``forward`` calls), so scores equal those of ``model(**processor(...))``.
'tiny' builds a real ``Owlv2ForObjectDetection`` from a tiny config with seeded random weights
and the char-level CLIP tokenizer of ``dsbuild.models.tiny_sd``: the real code path, no
download, placeholder scores.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dsbuild.core.errors import DsbuildError, require
from dsbuild.filter.encoders import amp_dtype, autocast
from dsbuild.models import resolve_device
from dsbuild.verify.checks import Found

TINY_SEED = 0
TINY_IMAGE = 64
TINY_TEXT_LEN = 32
TINY_WARNING = ("warning: verify.detector 'tiny' has random weights built from config; its "
                "detections are placeholders with no meaning (use a real OWLv2 checkpoint)")


def tiny_owlv2(seed: int = TINY_SEED):
    """(model, image processor, tokenizer) of a tiny OWLv2 built from config, seeded."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    from dsbuild.models.tiny_sd import char_tokenizer

    tok = char_tokenizer(TINY_TEXT_LEN)
    cfg = Owlv2Config(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                     "num_hidden_layers": 2, "vocab_size": len(tok),
                     "max_position_embeddings": TINY_TEXT_LEN, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "image_size": TINY_IMAGE, "patch_size": 8},
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(cfg)
    proc = Owlv2ImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    return model, proc, tok


def nms_count(boxes: torch.Tensor, scores: torch.Tensor, present_min: float, iou: float) -> int:
    """How many distinct boxes score at least ``present_min`` (overlaps above ``iou`` are one)."""
    keep = scores >= present_min
    if not bool(keep.any()):
        return 0
    from torchvision.ops import nms

    return int(nms(boxes[keep].float(), scores[keep].float(), iou).numel())


class OwlDetector:
    """An OWLv2 or OWL-ViT detector with its image processor and tokenizer."""

    def __init__(self, model, image_processor, tokenizer, device: str = "cpu",
                 dtype: torch.dtype | None = None, name: str = "owl", batch_size: int = 16,
                 workers: int = 4):
        self.model = model.eval().requires_grad_(False).to(device)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.name = name
        self.batch_size = batch_size
        self.workers = workers
        self.kind = model.config.model_type  # "owlv2" pads to a square, "owlvit" stretches
        self.base = getattr(model, "owlv2", None) or model.owlvit
        self.text_len = model.config.text_config.max_position_embeddings
        self.text_cache: dict[str, torch.Tensor] = {}
        self.encoded = 0  # distinct images run through the vision tower

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", quiet: bool = False,
             batch_size: int = 16, workers: int = 4,
             setting: str = "verify.detector") -> OwlDetector:
        """'tiny', a folder saved with save_pretrained, or a Hub id of an OWLv2/OWL-ViT model;
        errors name ``setting`` (what the user changes to fix them)."""
        require("transformers", "gen")
        device = resolve_device(device)
        if model == "tiny":
            m, proc, tok = tiny_owlv2()
            if not quiet:
                import sys

                print(TINY_WARNING, file=sys.stderr)
        else:
            if not Path(model).exists() and (model.startswith((".", "/"))
                                              or model.count("/") != 1):
                raise DsbuildError(f"{setting}: {model!r} is neither 'tiny', an existing "
                                   "folder, nor a Hub id like 'google/owlv2-base-patch16-ensemble'")
            from transformers import AutoConfig, AutoProcessor

            try:
                kind = AutoConfig.from_pretrained(model).model_type
                if kind == "owlv2":
                    from transformers import Owlv2ForObjectDetection as Model
                elif kind == "owlvit":
                    from transformers import OwlViTForObjectDetection as Model
                else:
                    raise DsbuildError(f"{setting}: {model!r} is a {kind!r} model; give "
                                       "an OWLv2 or OWL-ViT checkpoint")
                processor = AutoProcessor.from_pretrained(model)
                m = Model.from_pretrained(model)
            except DsbuildError:
                raise
            except Exception as exc:  # noqa: BLE001 - any load failure becomes one message
                raise DsbuildError(f"{setting}: cannot load {model!r}: "
                                   f"{type(exc).__name__}: {exc}") from None
            proc, tok = processor.image_processor, processor.tokenizer
        return cls(m, proc, tok, device, amp_dtype(dtype, device), name=model,
                   batch_size=batch_size, workers=workers)

    # ------------------------------------------------------------------ text
    @torch.inference_mode()
    def text_embeds(self, phrases: list[str]) -> torch.Tensor:
        """Query embeddings (n, d) of phrases, each phrase encoded once per detector."""
        new = [p for p in dict.fromkeys(phrases) if p not in self.text_cache]
        if new:
            if len(self.text_cache) > 100_000:
                self.text_cache.clear()
            tok = self.tokenizer(new, padding="max_length", max_length=self.text_len,
                                 truncation=True, return_tensors="pt").to(self.device)
            with autocast(self.device, self.dtype):
                out = self.base.get_text_features(input_ids=tok["input_ids"],
                                                  attention_mask=tok["attention_mask"])
            emb = out.pooler_output if hasattr(out, "pooler_output") else out
            for p, e in zip(new, emb.float(), strict=True):
                self.text_cache[p] = e
        return torch.stack([self.text_cache[p] for p in phrases])

    # ------------------------------------------------------------------ images
    def _prepare(self, data: bytes):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
            pixels = self.image_processor(images=im, return_tensors="pt")["pixel_values"][0]
            return pixels, im.size, None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            return None, None, f"{type(exc).__name__}: {exc}"

    @torch.inference_mode()
    def _run(self, pixels: torch.Tensor, phrases: list[str]):
        """(scores (b, boxes, q), boxes cxcywh in [0, 1] (b, boxes, 4)) for one batch."""
        m = self.model
        q = self.text_embeds(phrases).to(self.device)
        with autocast(self.device, self.dtype):
            fmap = m.image_embedder(pixel_values=pixels.to(self.device, non_blocking=True))[0]
            b, h, w, d = fmap.shape
            feats = fmap.reshape(b, h * w, d)
            logits = m.class_predictor(feats, q.unsqueeze(0).expand(b, -1, -1).to(feats.dtype),
                                       None)[0]
            boxes = m.box_predictor(feats, fmap)
        return logits.float().sigmoid().cpu(), boxes.float().cpu()

    def _pixel_boxes(self, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """cxcywh in [0, 1] of the processed image -> xyxy pixels of the original image."""
        w, h = size
        sx, sy = (max(w, h), max(w, h)) if self.kind == "owlv2" else (w, h)
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([(cx - bw / 2) * sx, (cy - bh / 2) * sy, (cx + bw / 2) * sx,
                            (cy + bh / 2) * sy], -1)
        lim = torch.tensor([w, h, w, h], dtype=xyxy.dtype)
        return torch.minimum(xyxy.clamp(min=0), lim)

    def boxes(self, image, phrases: list[str], threshold: float = 0.2, nms_iou: float = 0.5
              ) -> dict[str, torch.Tensor]:
        """Per phrase, the boxes of one PIL image scoring above ``threshold`` (strictly, so 1.0
        keeps none), overlaps above ``nms_iou`` suppressed: ``(k, 4)`` xyxy pixels of the
        image, best score first; ``k`` is 0 where the phrase is not found."""
        from torchvision.ops import nms

        image = image.convert("RGB")
        phrases = list(dict.fromkeys(phrases))
        if not phrases:
            return {}
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        scores, boxes = self._run(pixels, phrases)
        px = self._pixel_boxes(boxes[0], image.size)
        out: dict[str, torch.Tensor] = {}
        for q, phrase in enumerate(phrases):
            s = scores[0, :, q]
            keep = s > threshold
            out[phrase] = px[keep][nms(px[keep], s[keep], nms_iou)]
        return out

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
            prepared = (pool.map(self._prepare, (data[k] for k in keys)) if pool
                        else map(self._prepare, (data[k] for k in keys)))
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
        scores, boxes = self._run(torch.stack([px for _, px, _ in batch]), phrases)
        self.encoded += len(batch)
        for i, (k, _, size) in enumerate(batch):
            px_boxes = self._pixel_boxes(boxes[i], size)
            res: dict[str, Found] = {}
            for p in wanted[k]:
                s = scores[i, :, col[p]]
                best = int(s.argmax())
                res[p] = Found(float(s[best]), nms_count(px_boxes, s, present_min, nms_iou),
                               tuple(round(float(v), 1) for v in px_boxes[best]))
            found[k] = res
