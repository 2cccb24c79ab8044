"""Open-vocabulary detection with transformers' OWLv2 / OWL-ViT (verify's detector, the SAM
segmenter's boxes), and a tiny OWLv2 built from config.

The model's own heads do the work (``image_embedder``, ``class_predictor``, ``box_predictor``,
exactly what ``forward`` calls), so scores equal those of ``model(**processor(...))``; each
phrase is run through the text tower once and cached. 'tiny' builds a real
``Owlv2ForObjectDetection`` from a tiny config with seeded random weights and the char-level
CLIP tokenizer of :mod:`dsbuild.models.sd`: the real code path, no download, placeholder scores.
"""

from __future__ import annotations

import io

import torch

from dsbuild.core import model_ids as ids
from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.models import amp_dtype, autocast, checkpoint, resolve_device
from dsbuild.models import warn_tiny as _warn

TINY_SEED = 0
TINY_IMAGE = 64
TINY_TEXT_LEN = 32


def tiny_owlv2(seed: int = TINY_SEED):
    """(model, image processor, tokenizer) of a tiny OWLv2 built from config, seeded."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

    from dsbuild.models.sd import char_tokenizer

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
        require("transformers")
        device = resolve_device(device)
        if model == "tiny":
            m, proc, tok = tiny_owlv2()
            if not quiet:
                _warn(f"{setting} 'tiny'", "detections", "use a real OWLv2 checkpoint")
        else:
            src = checkpoint(model, setting, example=ids.OWL)
            from transformers import AutoConfig, AutoProcessor

            try:
                kind = AutoConfig.from_pretrained(src).model_type
                if kind == "owlv2":
                    from transformers import Owlv2ForObjectDetection as Model
                elif kind == "owlvit":
                    from transformers import OwlViTForObjectDetection as Model
                else:
                    raise DsbuildError(f"{setting}: {model!r} is a {kind!r} model; give "
                                       "an OWLv2 or OWL-ViT checkpoint")
                processor = AutoProcessor.from_pretrained(src)
                m = Model.from_pretrained(src)
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
    def prepare(self, data: bytes):
        """Image bytes -> (pixel_values (C, H, W), (W, H), None), or (None, None, error)."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
            pixels = self.image_processor(images=im, return_tensors="pt")["pixel_values"][0]
            return pixels, im.size, None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            return None, None, f"{type(exc).__name__}: {exc}"

    @torch.inference_mode()
    def run(self, pixels: torch.Tensor, phrases: list[str]):
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

    def pixel_boxes(self, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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
        scores, boxes = self.run(pixels, phrases)
        px = self.pixel_boxes(boxes[0], image.size)
        out: dict[str, torch.Tensor] = {}
        for q, phrase in enumerate(phrases):
            s = scores[0, :, q]
            keep = s > threshold
            out[phrase] = px[keep][nms(px[keep], s[keep], nms_iou)]
        return out
