"""``dsbuild bench invert``: what a real-photo P2P pair costs against a synthetic one.

Every case runs through the P2P generator (``generate/generators/p2p/generator.py``) on one
loaded model, making one replace-mode pair at the same steps, size and guidance:
``synthetic_pair`` from a caption; ``photo_negative_prompt`` and ``photo_null_text`` from a
photo with its inversion computed in the call (VAE encode, DDIM inversion, negative-prompt or
null-text inversion, the round trip the PSNR is measured against); ``photo_cached`` from the
photo once its inversion is cached (what every further variant of the photo costs). CPU seconds
(``time.process_time``) with one torch thread by default on CPU, wall seconds on CUDA; every
case warmed up once.
"""

from __future__ import annotations

import click

from dsbuild.bench.harness import (
    clock_of,
    device_option,
    emit,
    json_option,
    ratio,
    resolution_option,
    rounded,
    setup,
    table,
    time_cases,
    timer_label,
    torch_threads,
)

SRC = "a red velvet armchair in a bright living room"
TGT = "a blue velvet armchair in a bright living room"


def _photo(resolution: int):
    """A room drawn with PIL at the generation size, as a prepared photo reads."""
    import numpy as np
    from PIL import Image, ImageDraw

    r = resolution
    im = Image.new("RGB", (r, r), (200, 190, 170))
    d = ImageDraw.Draw(im)
    d.rectangle([0, r * 2 // 3, r, r], fill=(120, 90, 60))
    d.rectangle([r // 4, r // 3, r * 2 // 3, r * 5 // 6], fill=(170, 30, 40))
    return np.asarray(im, dtype=np.float32) / 255.0


def run_bench(model: str = "tiny", steps: int = 8, resolution: int = 64,
              device: str = "auto", repeats: int = 3, threads: int | None = 1) -> dict:
    """Time the four cases; returns figures, ratios and goals (no assertions)."""
    from dsbuild.core.hashing import content_id
    from dsbuild.generate.generators.p2p.generator import PromptToPrompt
    from dsbuild.generate.generators.p2p.invert import Inverter
    from dsbuild.generate.settings import GenerateSettings

    dev = setup(device, threads)
    image = _photo(resolution)
    base = dict(model=model, steps=steps, height=resolution, width=resolution, per_triple=1,
                batch_size=2, mode="replace", sweep="grid", grid_guidance=[7.5],
                grid_self_replace=[0.4], grid_cross_replace=[0.8], device=dev)
    conf = {m: GenerateSettings(**base, inversion=m) for m in ("negative-prompt", "null-text")}
    gen = PromptToPrompt(conf["negative-prompt"], None, dev, "fp32")  # one sampler, one model
    gen.use_photos({"p": {"id": "p", "image": "bench.png"}}, lambda _: image, None)
    synthetic = {"id": content_id("bench-invert", SRC, TGT), "input": SRC, "output": TGT,
                 "level": "object", "agent": "bench"}
    real = {**synthetic, "id": content_id("bench-invert-photo", SRC, TGT), "photo_id": "p"}
    plans = {}
    for m, s in conf.items():
        gen.settings = s
        plans[m] = gen.plan(real)
    plans["synthetic"] = gen.plan(synthetic)
    cached = Inverter(gen.sampler, gen.model, "negative-prompt")

    def pair(method, key, fresh):
        def run():
            gen.settings = conf[method]
            # fresh: a new inverter, nothing cached, the inversion is part of the pair
            gen.inverter = Inverter(gen.sampler, gen.model, method) if fresh else cached
            list(gen.generate(plans[key]))
        return run

    cases = {"synthetic_pair": pair("negative-prompt", "synthetic", False),
             "photo_negative_prompt": pair("negative-prompt", "negative-prompt", True),
             "photo_null_text": pair("null-text", "null-text", True),
             "photo_cached": pair("negative-prompt", "negative-prompt", False)}
    t = time_cases(cases, dev, repeats)  # the warm-up fills photo_cached's inverter
    clock = clock_of(dev)
    sec = t.seconds(clock)
    base_s = sec["synthetic_pair"]
    out = {"model": model, "device": dev, "steps": steps, "resolution": resolution,
           "threads": torch_threads(), "repeats": repeats, "clock": timer_label(dev),
           "seconds": rounded(sec, 4),
           "ratios": {
               "negative_prompt/synthetic": ratio(sec["photo_negative_prompt"], base_s),
               "null_text/synthetic": ratio(sec["photo_null_text"], base_s),
               "cached/synthetic": ratio(sec["photo_cached"], base_s)}}
    r = out["ratios"]
    out["goals"] = {"negative_prompt/synthetic <= 1.6": r["negative_prompt/synthetic"] <= 1.6,
                    "cached/synthetic <= 1.05": r["cached/synthetic"] <= 1.05}
    return out


@click.command("invert")
@click.option("--model", default="tiny", show_default=True,
              help="SD 1.x/2.x diffusers dir or Hub id, or tiny")
@click.option("--steps", type=int, default=8, show_default=True)
@resolution_option(64, "image height and width")
@device_option
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch CPU threads")
@json_option
def bench_invert(model, steps, resolution, device, repeats, threads, as_json):
    """Real-photo P2P pair (inversion included, or cached) vs a synthetic P2P pair."""
    emit(run_bench(model, steps, resolution, device, repeats, threads), as_json, _lines)


def _lines(res: dict):
    yield (f"model {res['model']} on {res['device']}, {res['resolution']}px, {res['steps']} "
           f"steps, threads={res['threads']}, median of {res['repeats']} ({res['clock']})")
    yield from table([("case", 26), ("seconds", 10)],
                     [(name, f"{s:.3f}") for name, s in res["seconds"].items()])
    for name, r in res["ratios"].items():
        yield f"  {name:<28}{r:>7.3f}"
    for goal, ok in res["goals"].items():
        yield f"  goal {goal}: {'met' if ok else 'NOT met'}"
