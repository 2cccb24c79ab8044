"""``dsbuild bench filter``: images/s of dsbuild's CLIP image path vs raw open_clip.

Both sides use the same model object, preprocess transform, batch size, device and autocast
dtype, on the same freshly written PNG files (all distinct, so dsbuild's dedupe cannot help):

- raw: ``torch.stack([preprocess(Image.open(p).convert("RGB")) ...])`` then
  ``model.encode_image`` per batch: how one would score with plain open_clip;
- dsbuild: ``ImageEmbedder.embed(paths)``, the path the filter stage runs (read + hash,
  threaded decode/preprocess, batched encode, normalise, cache);
- encode-only: ``model.encode_image`` on already-preprocessed batches (the model's floor).

Wall seconds (the thread pool's overlap of decoding with encoding is part of what is measured,
which CPU time would hide); runs interleave (order reversed each repeat) and the best of
``repeats`` counts for each side. The default model is ViT-B-32 with random weights (timing
does not depend on the weights), so it runs offline.
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


def _write_images(folder: Path, n: int, size: int) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        arr = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # blocky: PNG-sized like photos
        arr = (arr + rng.integers(0, 16, arr.shape, dtype=np.uint8)).astype(np.uint8)
        p = folder / f"img{i:05d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def run_bench(model: str = "ViT-B-32", pretrained: str = "none", batch_size: int = 32,
              images: int = 128, device: str = "auto", precision: str = "auto",
              workers: int = 4, repeats: int = 3, resolution: int = 256) -> dict:
    """Time raw open_clip and dsbuild on the same images; returns images/s and ratios."""
    check("filter", what="dsbuild bench filter")
    import torch
    from PIL import Image

    from dsbuild.models import autocast
    from dsbuild.models.clip import ClipEncoder
    from dsbuild.models.embed import ImageEmbedder

    enc = ClipEncoder.load(model, pretrained, device=device, dtype=precision, quiet=True)
    dev = enc.device
    with tempfile.TemporaryDirectory(prefix="dsbuild-bench-filter-") as tmp:
        paths = _write_images(Path(tmp), images, resolution)

        @torch.inference_mode()
        def raw() -> None:
            for i in range(0, len(paths), batch_size):
                x = torch.stack([enc.preprocess(Image.open(p).convert("RGB"))
                                 for p in paths[i:i + batch_size]]).to(dev)
                with autocast(dev, enc.dtype):
                    enc.model.encode_image(x)

        def ours() -> None:
            embedder = ImageEmbedder({"clip": enc}, batch_size=batch_size, workers=workers)
            out, errors = embedder.embed(paths)
            assert len(out) == len(paths) and not errors

        batches = [torch.stack([enc.preprocess(Image.open(p).convert("RGB"))
                                for p in paths[i:i + batch_size]]).to(dev)
                   for i in range(0, len(paths), batch_size)]

        @torch.inference_mode()
        def encode_only() -> None:
            for x in batches:
                with autocast(dev, enc.dtype):
                    enc.model.encode_image(x)

        @torch.inference_mode()
        def warmup() -> None:  # allocator, kernels, thread pools: one batch's worth of work
            with autocast(dev, enc.dtype):
                enc.model.encode_image(batches[0])

        # order reversed each repeat, so neither side always pays for running first
        t = time_cases({"raw": raw, "dsbuild": ours, "encode_only": encode_only}, dev, repeats,
                       warmup=warmup, alternate=True)
    ips = per_second(images, t.seconds("wall", pick="best"), 2)
    return {
        "model": model, "pretrained": pretrained, "device": dev,
        "precision": str(enc.dtype).replace("torch.", "") if enc.dtype else "float32",
        "batch_size": batch_size, "images": images, "resolution": resolution,
        "workers": workers, "repeats": repeats, "threads": torch_threads(),
        "images_per_s": ips,
        "ratio": ratio(ips["dsbuild"], ips["raw"]),
        "ratio_vs_encode_only": ratio(ips["dsbuild"], ips["encode_only"]),
        "goal": 0.9,
    }


@click.command("filter")
@click.option("--model", default="ViT-B-32", show_default=True,
              help="open_clip model name, or 'tiny'")
@click.option("--pretrained", default="none", show_default=True,
              help="pretrained tag or checkpoint file; 'none' = random weights (offline)")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--images", type=int, default=128, show_default=True, help="distinct images")
@resolution_option(256, "PNG side, pixels", old="--image-size")
@device_option
@autocast_option
@decode_workers_option
@best_of_option
@json_option
def bench_filter(model, pretrained, batch_size, images, resolution, device, precision, workers,
                 repeats, as_json):
    """Images/s of dsbuild's CLIP scoring path vs raw open_clip encode_image, same run."""
    emit(run_bench(model, pretrained, batch_size, images, device, precision, workers, repeats,
                   resolution), as_json, _lines)


def _lines(res: dict):
    """The result for people."""
    ips = res["images_per_s"]
    yield (f"bench filter: {res['model']} ({res['pretrained']}) on {res['device']} "
           f"{res['precision']}, batch {res['batch_size']}, {res['images']} images "
           f"{res['resolution']}px, best of {res['repeats']}")
    yield f"  raw open_clip (load+preprocess+encode_image): {ips['raw']:>9.2f} images/s"
    yield f"  dsbuild ImageEmbedder.embed:                  {ips['dsbuild']:>9.2f} images/s"
    yield (f"  encode_image only (preprocessed batches):     {ips['encode_only']:>9.2f} "
           "images/s")
    yield (f"  ratio dsbuild/raw = {res['ratio']:.3f}x ({verdict(res['ratio'], res['goal'])} "
           f"the {res['goal']}x goal); dsbuild/encode-only = {res['ratio_vs_encode_only']:.3f}x")
