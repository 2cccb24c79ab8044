"""The edit's region: a referring segmentation of the input image, or a mask the user gives.

The default segmenter is CLIPSeg from transformers (``CIDAS/clipseg-rd64-refined``): open
vocabulary, installable from pip, no custom CUDA build. 'tiny' is a CLIPSeg built from config
with random weights (seeded; tests and offline runs: its masks are placeholders). Each phrase's
probability map is thresholded and the phrases' masks are united; an object that is not there
gives an empty mask (as generalised referring segmentation does), and then nothing is edited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dsbuild.errors import DsbuildError, require
from dsbuild.localize.settings import DEFAULT_SEGMENTER


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

    from dsbuild.records import write_image

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


class Segmenter:
    """Referring segmentation: phrases + image -> one bool mask at the image's size."""

    def __init__(self, model, processor, name: str, device: str = "cpu"):
        self.model, self.processor, self.name, self.device = model, processor, name, device

    @classmethod
    def load(cls, name: str = DEFAULT_SEGMENTER, device: str = "cpu") -> Segmenter:
        """'tiny' or a CLIPSeg checkpoint (Hub id or folder)."""
        require("transformers", "train")
        if name == "tiny":
            model, proc = tiny_clipseg()
        else:
            from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

            try:
                model = CLIPSegForImageSegmentation.from_pretrained(name).eval()
                proc = CLIPSegProcessor.from_pretrained(name)
            except Exception as exc:  # noqa: BLE001 - network, missing repo, not CLIPSeg
                raise DsbuildError(
                    f"segmenter {name!r}: cannot load a CLIPSeg model ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}); offline, give --mask PNG or "
                    "--segmenter tiny (placeholder masks)") from None
        return cls(model.to(device), proc, name, device)

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

    def mask(self, image, phrases: list[str], threshold: float = 0.4) -> np.ndarray:
        """The union of the phrases' regions (probability > ``threshold``); empty when no
        phrase is given or none is found."""
        w, h = image.size
        if not phrases:
            return np.zeros((h, w), dtype=bool)
        return (self.probabilities(image, phrases) > threshold).any(0).numpy()
