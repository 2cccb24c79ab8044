"""``dsbuild bench verify``: pairs/s of verify's detector path vs raw transformers detection.

Both sides use the same model object, image processor, tokenizer, batch size and device, on
the same freshly written PNG pairs laid out as generate writes them: every pair has its own
input file, and ``--targets-per-source`` pairs share one source's content (P2P batches many
targets behind one source).

- raw: per batch of pairs, ``processor(text=..., images=[inputs..., outputs...])``, then
  ``model(**inputs)`` and ``post_process_grounded_object_detection``: how one would detect
  with plain transformers;
- dsbuild: ``Detector.detect`` (read + hash, each distinct image through the vision tower
  once, each phrase through the text tower once, threaded decode/preprocess).

Wall seconds (the decode thread pool's overlap is part of what is measured); runs interleave
(order reversed each repeat) and the best of ``repeats`` counts. The default
model is 'tiny' (offline, seconds on a CPU); ``arch:owlv2-base`` has OWLv2-base's shapes
(960 px, ViT-B/16) with random weights, for timing real-sized work on a GPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import numpy as np

from dsbuild.bench.harness import (
    autocast_option,
    best_of_option,
    decode_workers_option,
    device_option,
    emit,
    json_option,
    per_second,
    ratio,
    resolution_option,
    time_cases,
    torch_threads,
    verdict,
)
from dsbuild.core.deps import check

PHRASES = ("sofa", "floor lamp", "rug", "coffee table", "armchair", "cushion", "mirror",
           "plant")


def _write_pairs(folder: Path, pairs: int, per_source: int, size: int) -> list[tuple]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out, src = [], None
    for i in range(pairs):
        if i % per_source == 0:
            base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
            src = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))
        a, b = folder / f"p{i:05d}_0.png", folder / f"p{i:05d}_1.png"
        Image.fromarray(src).save(a)  # one file per pair, as generate writes them
        noise = rng.integers(0, 32, src.shape, dtype=np.uint8)
        Image.fromarray((src // 2 + noise).astype(np.uint8)).save(b)
        out.append((a, b, PHRASES[i % len(PHRASES)]))
    return out


def _load(model: str, device: str, dtype: str, batch_size: int, workers: int):
    """(Detector, processor) for 'tiny', 'arch:owlv2-base' or a Hub id / folder."""
    from transformers import Owlv2Processor

    from dsbuild.verify.detector import Detector

    if model == "arch:owlv2-base":
        import torch
        from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

        from dsbuild.models import amp_dtype, resolve_device
        from dsbuild.models.sd import char_tokenizer

        tok = char_tokenizer(16)
        cfg = Owlv2Config(text_config={"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                                       "eos_token_id": tok.eos_token_id,
                                       "pad_token_id": tok.pad_token_id})
        torch.manual_seed(0)
        dev = resolve_device(device)
        det = Detector(Owlv2ForObjectDetection(cfg), Owlv2ImageProcessor(), tok, dev,
                       amp_dtype(dtype, dev), name=model, batch_size=batch_size,
                       workers=workers)
    else:
        det = Detector.load(model, device, dtype, quiet=True, batch_size=batch_size,
                               workers=workers)
    if model in ("tiny", "arch:owlv2-base"):
        proc = Owlv2Processor(image_processor=det.image_processor, tokenizer=det.tokenizer)
    else:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(model)
    return det, proc


def run_bench(model: str = "tiny", pairs: int = 64, per_source: int = 4, batch_size: int = 16,
              resolution: int = 256, device: str = "auto", precision: str = "auto",
              workers: int = 4, repeats: int = 3) -> dict:
    """Time raw transformers detection and dsbuild's detector on the same pairs."""
    check("filter", what="dsbuild bench verify")
    import torch
    from PIL import Image

    from dsbuild.models import autocast

    det, proc = _load(model, device, precision, batch_size, workers)
    dev = det.device
    with tempfile.TemporaryDirectory(prefix="dsbuild-bench-verify-") as tmp:
        items = _write_pairs(Path(tmp), pairs, per_source, resolution)
        half = max(1, batch_size // 2)  # a batch of pairs is 2 images each

        @torch.inference_mode()
        def raw() -> None:
            for i in range(0, len(items), half):
                chunk = items[i:i + half]
                images = [Image.open(p).convert("RGB") for a, b, _ in chunk for p in (a, b)]
                texts = [[ph] for _, _, ph in chunk for _ in (0, 1)]
                inputs = proc(text=texts, images=images, return_tensors="pt",
                              padding="max_length", max_length=det.text_len, truncation=True)
                inputs = {k: v.to(dev) for k, v in inputs.items()}
                with autocast(dev, det.dtype):
                    out = det.model(**inputs)
                side = [(max(im.size), max(im.size)) for im in images]
                out.logits, out.pred_boxes = out.logits.float(), out.pred_boxes.float()
                proc.post_process_grounded_object_detection(out, threshold=0.2,
                                                            target_sizes=side)

        def ours() -> None:
            det.text_cache.clear()
            want: dict[Path, set[str]] = {}
            for a, b, ph in items:
                want.setdefault(a, set()).add(ph)
                want.setdefault(b, set()).add(ph)
            found, errors = det.detect(want)
            assert len(found) == 2 * len(items) and not errors

        def warmup() -> None:  # both sides (lazy imports, allocator, kernels, thread pool)
            raw()
            ours()
            det.encoded = 0  # count only the timed runs' distinct images

        t = time_cases({"raw": raw, "dsbuild": ours}, dev, repeats, warmup=warmup,
                       alternate=True)
    pps = per_second(pairs, t.seconds("wall", pick="best"), 2)
    return {
        "model": model, "device": dev, "batch_size": batch_size, "pairs": pairs,
        "targets_per_source": per_source, "resolution": resolution, "workers": workers,
        "repeats": repeats, "threads": torch_threads(),
        "images_raw": 2 * pairs, "images_dsbuild": det.encoded // max(1, repeats),
        "pairs_per_s": pps, "ratio": ratio(pps["dsbuild"], pps["raw"]), "goal": 0.9,
    }


@click.command("verify")
@click.option("--model", default="tiny", show_default=True,
              help="'tiny', 'arch:owlv2-base' (random weights) or an OWL Hub id / folder")
@click.option("--pairs", type=int, default=64, show_default=True)
@click.option("--targets-per-source", "per_source", type=int, default=4, show_default=True,
              help="pairs whose input images share one content")
@click.option("--batch-size", type=int, default=16, show_default=True, help="images per batch")
@resolution_option(256, "PNG side, pixels", old="--image-size")
@device_option
@autocast_option
@decode_workers_option
@best_of_option
@json_option
def bench_verify(model, pairs, per_source, batch_size, resolution, device, precision, workers,
                 repeats, as_json):
    """Pairs/s of verify's detector vs raw transformers OWLv2 detection, same run."""
    emit(run_bench(model, pairs, max(1, per_source), batch_size, resolution, device, precision,
                   workers, repeats), as_json, _lines)


def _lines(res: dict):
    """The result for people."""
    pps = res["pairs_per_s"]
    yield (f"bench verify: {res['model']} on {res['device']}, batch {res['batch_size']}, "
           f"{res['pairs']} pairs ({res['targets_per_source']} per source) "
           f"{res['resolution']}px, best of {res['repeats']}")
    yield (f"  raw transformers (processor+model+post-process): {pps['raw']:>9.2f} pairs/s "
           f"({res['images_raw']} images)")
    yield (f"  dsbuild Detector.detect:                         {pps['dsbuild']:>9.2f} "
           f"pairs/s ({res['images_dsbuild']} distinct images)")
    yield (f"  ratio dsbuild/raw = {res['ratio']:.3f}x ({verdict(res['ratio'], res['goal'])} "
           f"the {res['goal']}x goal)")
