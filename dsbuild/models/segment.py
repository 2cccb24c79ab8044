"""The edit's region: a referring segmentation of the input image, or a mask the user gives.

The default segmenter is CLIPSeg from transformers (``CIDAS/clipseg-rd64-refined``): open
vocabulary, installable from pip, no custom CUDA build. 'tiny' is a CLIPSeg built from config
with random weights (seeded; tests and offline runs: its masks are placeholders). Each phrase's
probability map is thresholded and the phrases' masks are united; an object that is not there
gives an empty mask (as generalised referring segmentation does), and then nothing is edited.

Segmenter ``sam`` is the option of detector boxes + SAM: dsbuild's open-vocabulary detector
(:class:`dsbuild.verify.detector.OwlDetector`, OWLv2 by default) finds each phrase's boxes
scoring above ``box_threshold``, transformers' ``SamModel`` segments each box, and the boxes'
masks are united; no box above the threshold gives an empty mask. :func:`load_segmenter` builds
either kind from the settings, so every caller chooses the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsbuild.core.errors import DsbuildError, require
from dsbuild.localize.settings import (
    DEFAULT_DETECTOR,
    DEFAULT_SAM,
    DEFAULT_SEGMENTER,
    SAM_SEGMENTER,
)

TINY_SAM_SEED = 2  # its placeholder masks of the tiny detector's boxes are partial, not full


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A user's mask PNG as an ``H x W`` bool array at ``size`` (W, H): pixels brighter than
    half are the region; alpha, if any, counts as opacity."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            gray = im.convert("LA") if im.mode in ("RGBA", "LA", "PA") else im.convert("L")
            gray = gray.resize(size, Image.NEAREST)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DsbuildError(f"--mask {path}: unreadable image ({type(exc).__name__}: {exc})"
                           ) from None
    arr = np.asarray(gray, dtype=np.float32) / 255.0
    if arr.ndim == 3:  # luminance x alpha
        arr = arr[..., 0] * arr[..., 1]
    return arr > 0.5


def save_mask(path: str | Path, mask: np.ndarray) -> Path:
    """Write a bool mask as a black/white PNG (atomically)."""
    from PIL import Image

    from dsbuild.core.records import write_image

    write_image(Path(path), Image.fromarray(mask.astype(np.uint8) * 255, "L"))
    return Path(path)


def tiny_clipseg(seed: int = 0):
    """A CLIPSeg model and processor built from config (random weights, 64 px, char tokenizer)."""
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        ViTImageProcessor,
    )

    from dsbuild.models.tiny_sd import char_tokenizer

    tok = char_tokenizer()
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=2)
    cfg = CLIPSegConfig(
        text_config=dict(**small, num_hidden_layers=2, vocab_size=len(tok),
                         max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(**small, num_hidden_layers=3, image_size=64, patch_size=16),
        projection_dim=32, reduce_dim=16, extract_layers=[0, 1, 2],
        decoder_num_attention_heads=2, decoder_intermediate_size=32)
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(cfg).eval()
    proc = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 64, "width": 64}),
                            tokenizer=tok)
    return model, proc


def tiny_sam(seed: int = TINY_SAM_SEED):
    """A SAM model and processor built from config (random weights, 64 px), seeded without
    touching the caller's random state."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2,
                           num_attention_heads=2, image_size=64, patch_size=8, window_size=4,
                           global_attn_indexes=[1], num_pos_feats=8, mlp_dim=37),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2,
                                 num_attention_heads=2, iou_head_hidden_dim=16, iou_head_depth=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(cfg).eval()
    proc = SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    return model, proc


def _pretrained(model_cls, processor_cls, name: str, what: str, remedy: str):
    """(model in eval mode, processor) from a Hub id or folder; any failure (network, missing
    repo, another architecture) becomes one line: ``what (error); remedy``."""
    try:
        return model_cls.from_pretrained(name).eval(), processor_cls.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - every load failure becomes one message
        first = (str(exc).splitlines() or [""])[0][:200]
        raise DsbuildError(f"{what} ({type(exc).__name__}: {first}); {remedy}") from None


class Segmenter:
    """Referring segmentation with CLIPSeg: phrases + image -> one bool mask at the image's
    size; ``threshold`` is the pixel probability mask() uses when it is given none."""

    def __init__(self, model, processor, name: str, device: str = "cpu",
                 threshold: float = 0.4):
        self.model, self.processor, self.name, self.device = model, processor, name, device
        self.threshold = threshold

    @classmethod
    def load(cls, name: str = DEFAULT_SEGMENTER, device: str = "cpu",
             threshold: float = 0.4) -> Segmenter:
        """'tiny' or a CLIPSeg checkpoint (Hub id or folder)."""
        require("transformers", "train")
        if name == "tiny":
            model, proc = tiny_clipseg()
        else:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            model, proc = _pretrained(
                CLIPSegForImageSegmentation, CLIPSegProcessor, name,
                f"segmenter {name!r}: cannot load a CLIPSeg model",
                "offline, give --mask PNG or --segmenter tiny (placeholder masks)")
        return cls(model.to(device), proc, name, device, threshold)

    def probabilities(self, image, phrases: list[str]):
        """``[len(phrases), H, W]`` float probabilities at the image's size."""
        import torch
        import torch.nn.functional as F

        inputs = self.processor(text=phrases, images=[image] * len(phrases), padding=True,
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**inputs).logits
        if logits.dim() == 2:  # one phrase: transformers drops the batch dimension
            logits = logits[None]
        w, h = image.size
        return F.interpolate(logits[:, None].float().sigmoid(), size=(h, w),
                             mode="bilinear", align_corners=False)[:, 0].cpu()

    def mask(self, image, phrases: list[str], threshold: float | None = None) -> np.ndarray:
        """The union of the phrases' regions (CLIPSeg probability > ``threshold``, by default
        the segmenter's own); empty when no phrase is given or none is found."""
        w, h = image.size
        if not phrases:
            return np.zeros((h, w), dtype=bool)
        threshold = self.threshold if threshold is None else threshold
        return (self.probabilities(image, phrases) > threshold).any(0).numpy()


class SamSegmenter:
    """Detector boxes + SAM: each phrase's boxes from an open-vocabulary detector, each box
    segmented by SAM, all united; ``threshold`` is the detector score a box must exceed."""

    def __init__(self, detector, model, processor, name: str = SAM_SEGMENTER,
                 device: str = "cpu", threshold: float = 0.2, nms_iou: float = 0.5):
        self.detector, self.model, self.processor = detector, model, processor
        self.name, self.device, self.threshold, self.nms_iou = name, device, threshold, nms_iou

    @classmethod
    def load(cls, detector: str = DEFAULT_DETECTOR, sam_model: str = DEFAULT_SAM,
             device: str = "cpu", threshold: float = 0.2) -> SamSegmenter:
        """The detector ('tiny', OWLv2/OWL-ViT Hub id or folder) and SAM ('tiny', Hub id or
        folder)."""
        require("transformers", "train")
        if not 0 <= threshold <= 1:
            raise DsbuildError(f"box threshold must be in [0, 1] (got {threshold}); set "
                               "--box-threshold or generate.box_threshold")
        from dsbuild.verify.detector import OwlDetector

        det = OwlDetector.load(detector, device=device, quiet=True, workers=0,
                               setting="--detector (generate.detector)")
        if sam_model == "tiny":
            model, proc = tiny_sam()
        else:
            from transformers import SamModel, SamProcessor

            model, proc = _pretrained(
                SamModel, SamProcessor, sam_model,
                f"sam model {sam_model!r}: cannot load a SAM model",
                "give --sam-model (generate.sam_model) a SAM checkpoint or folder, 'tiny' "
                "(placeholder masks), or --mask PNG")
        return cls(det, model.to(device), proc, SAM_SEGMENTER, device, threshold)

    def segment_boxes(self, image, boxes) -> np.ndarray:
        """The union of SAM's masks of ``boxes`` (``(k, 4)`` xyxy pixels of ``image``), one
        mask per box (``multimask_output=False``), at the image's size."""
        import torch

        w, h = image.size
        if len(boxes) == 0:
            return np.zeros((h, w), dtype=bool)
        boxes = [[float(v) for v in b] for b in boxes]
        inputs = self.processor(images=image, input_boxes=[boxes], return_tensors="pt")
        sizes = inputs.pop("original_sizes"), inputs.pop("reshaped_input_sizes")
        inputs = {k: v.to(self.device, torch.float32) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model(**inputs, multimask_output=False)
        masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), *sizes)[0]
        return masks.any(0).any(0).numpy()

    def mask(self, image, phrases: list[str], threshold: float | None = None) -> np.ndarray:
        """The union of SAM's masks of every phrase's boxes scoring above ``threshold`` (the
        detector's box score, by default the segmenter's own; not a pixel probability);
        empty when no phrase is given or no box scores above it."""
        image = image.convert("RGB")
        threshold = self.threshold if threshold is None else threshold
        found = self.detector.boxes(image, phrases, threshold, self.nms_iou) if phrases else {}
        boxes = [b for bs in found.values() for b in bs.tolist()]
        return self.segment_boxes(image, boxes)


def segmenter_for(s, device: str = "cpu") -> Segmenter | SamSegmenter:
    """The segmenter a ``LocalizeSettings`` names (see :func:`load_segmenter`)."""
    return load_segmenter(s.segmenter, s.threshold, s.detector, s.sam_model, s.box_threshold,
                          device)


def load_segmenter(segmenter: str = DEFAULT_SEGMENTER, threshold: float = 0.4,
                   detector: str = DEFAULT_DETECTOR, sam_model: str = DEFAULT_SAM,
                   box_threshold: float = 0.2, device: str = "cpu") -> Segmenter | SamSegmenter:
    """The segmenter the settings name: 'sam' -> detector boxes + SAM masking at
    ``box_threshold`` (a box score); anything else -> CLIPSeg masking at ``threshold`` (a
    pixel probability). Either's ``mask(image, phrases)`` uses that threshold by default."""
    if segmenter == SAM_SEGMENTER:
        return SamSegmenter.load(detector, sam_model, device, box_threshold)
    return Segmenter.load(segmenter, device, threshold)
