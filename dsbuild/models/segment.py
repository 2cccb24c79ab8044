"""Referring segmenters: phrases + image -> one bool mask at the image's size.

The default segmenter is CLIPSeg from transformers (``CIDAS/clipseg-rd64-refined``): open
vocabulary, installable from pip, no custom CUDA build. 'tiny' is a CLIPSeg built from config
with random weights (seeded; tests and offline runs: its masks are placeholders). Each phrase's
probability map is thresholded and the phrases' masks are united; an object that is not there
gives an empty mask (as generalised referring segmentation does), and then nothing is edited.

Segmenter ``sam`` is the option of detector boxes + SAM: the open-vocabulary detector
(:class:`dsbuild.models.owl.OwlDetector`, OWLv2 by default) finds each phrase's boxes
scoring above ``box_threshold``, transformers' ``SamModel`` segments each box, and the boxes'
masks are united; no box above the threshold gives an empty mask. :func:`load_segmenter` builds
either kind from the settings, so every caller chooses the same way.
"""

from __future__ import annotations

import numpy as np

from dsbuild.core import model_ids as ids
from dsbuild.core.deps import require
from dsbuild.core.errors import DsbuildError
from dsbuild.core.settings.localize import BOX_THRESHOLD, SAM_SEGMENTER, SEGMENT_THRESHOLD
from dsbuild.models import checkpoint

TINY_SAM_SEED = 2  # its placeholder masks of the tiny detector's boxes are partial, not full


def tiny_clipseg(seed: int = 0):
    """A CLIPSeg model and processor built from config (random weights, 64 px, char tokenizer)."""
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        ViTImageProcessor,
    )

    from dsbuild.models.sd import char_tokenizer

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


def _pretrained(model_cls, processor_cls, name: str, setting: str, example: str, what: str,
                remedy: str):
    """(model in eval mode, processor) from a Hub id or folder (else an error naming
    ``setting``); any load failure (network, missing repo, another architecture) becomes one
    line: ``what (error); remedy``."""
    src = checkpoint(name, setting, example=example)
    try:
        return model_cls.from_pretrained(src).eval(), processor_cls.from_pretrained(src)
    except Exception as exc:  # noqa: BLE001 - every load failure becomes one message
        first = (str(exc).splitlines() or [""])[0][:200]
        raise DsbuildError(f"{what} ({type(exc).__name__}: {first}); {remedy}") from None


class Segmenter:
    """Referring segmentation with CLIPSeg: phrases + image -> one bool mask at the image's
    size; ``threshold`` is the pixel probability mask() uses when it is given none."""

    def __init__(self, model, processor, name: str, device: str = "cpu",
                 threshold: float = SEGMENT_THRESHOLD):
        self.model, self.processor, self.name, self.device = model, processor, name, device
        self.threshold = threshold

    @classmethod
    def load(cls, name: str = ids.CLIPSEG, device: str = "cpu",
             threshold: float = SEGMENT_THRESHOLD,
             setting: str = "--segmenter (generate.segmenter)") -> Segmenter:
        """'tiny' or a CLIPSeg checkpoint (Hub id or folder); errors name ``setting``."""
        require("transformers")
        if name == "tiny":
            model, proc = tiny_clipseg()
        else:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            model, proc = _pretrained(
                CLIPSegForImageSegmentation, CLIPSegProcessor, name, setting, ids.CLIPSEG,
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
                 device: str = "cpu", threshold: float = BOX_THRESHOLD, nms_iou: float = 0.5):
        self.detector, self.model, self.processor = detector, model, processor
        self.name, self.device, self.threshold, self.nms_iou = name, device, threshold, nms_iou

    @classmethod
    def load(cls, detector: str = ids.OWL, sam_model: str = ids.SAM,
             device: str = "cpu", threshold: float = BOX_THRESHOLD,
             detector_setting: str = "--detector (generate.detector)",
             sam_setting: str = "--sam-model (generate.sam_model)") -> SamSegmenter:
        """The detector ('tiny', OWLv2/OWL-ViT Hub id or folder) and SAM ('tiny', Hub id or
        folder); errors name ``detector_setting`` / ``sam_setting``."""
        require("transformers")
        if not 0 <= threshold <= 1:
            raise DsbuildError(f"box threshold must be in [0, 1] (got {threshold}); set "
                               "--box-threshold or generate.box_threshold")
        from dsbuild.models.owl import OwlDetector

        det = OwlDetector.load(detector, device=device, quiet=True, workers=0,
                               setting=detector_setting)
        if sam_model == "tiny":
            model, proc = tiny_sam()
        else:
            from transformers import SamModel, SamProcessor

            model, proc = _pretrained(
                SamModel, SamProcessor, sam_model, sam_setting, ids.SAM,
                f"sam model {sam_model!r}: cannot load a SAM model",
                f"give {sam_setting} a SAM checkpoint or folder, 'tiny' (placeholder masks), "
                "or --mask PNG")
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


def load_segmenter(segmenter: str = ids.CLIPSEG, threshold: float = SEGMENT_THRESHOLD,
                   detector: str = ids.OWL, sam_model: str = ids.SAM,
                   box_threshold: float = BOX_THRESHOLD, device: str = "cpu"
                   ) -> Segmenter | SamSegmenter:
    """The segmenter the settings name: 'sam' -> detector boxes + SAM masking at
    ``box_threshold`` (a box score); anything else -> CLIPSeg masking at ``threshold`` (a
    pixel probability). Either's ``mask(image, phrases)`` uses that threshold by default."""
    if segmenter == SAM_SEGMENTER:
        return SamSegmenter.load(detector, sam_model, device, box_threshold)
    return Segmenter.load(segmenter, device, threshold)
