"""``dsbuild bench eval``: rows/s of ``dsbuild eval``'s editing path against a plain loop over
``StableDiffusionInstructPix2PixPipeline``, in one process on one pipeline.

Both sides make the same edits (same rows, seeds, steps, guidance, image guidance) and write
one PNG per row: the plain loop calls the pipeline once per row; dsbuild calls ``make_edits``
(batches of ``batch_size`` rows, one seeded generator per row). Scoring is not timed (the
plain loop has none). CPU seconds (``time.process_time``) with ``threads`` torch threads on
CPU, wall seconds on CUDA.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click

from dsbuild.bench.train import ARCHS, PROMPTS, _images, _sync


def _pipeline(arch: str, device: str):
    from dsbuild.models import tiny_sd
    from dsbuild.train.model import editor_pipeline, widen_conv_in

    comps = {"tiny": tiny_sd.tiny_components, "small": tiny_sd.small_components,
             "sd15": tiny_sd.sd15_components}[arch]()
    widen_conv_in(comps["unet"])
    sched = comps.pop("scheduler")
    return editor_pipeline(scheduler_config=dict(sched.config), **comps).to(device)


def run_bench(arch: str = "small", rows: int = 8, batch_size: int = 4, steps: int = 4,
              resolution: int = 64, device: str = "auto", threads: int | None = 1) -> dict:
    import torch

    from dsbuild.evaluate.run import EvalSettings, make_edits
    from dsbuild.models import resolve_device
    from dsbuild.train.data import EditRow

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    pipe = _pipeline(arch, dev)
    imgs = _images(rows, resolution, 0)
    data = [EditRow(i, im, im, PROMPTS[i % len(PROMPTS)]) for i, im in enumerate(imgs)]
    s = EvalSettings(steps=steps, batch_size=batch_size, resolution=resolution, seed=0)
    ig = s.main_image_guidance
    with tempfile.TemporaryDirectory(prefix="dsbuild-bench-eval-") as tmp:
        tmp = Path(tmp)

        def plain():
            for r in data:
                with torch.no_grad():
                    im = pipe(r.edit_prompt, image=r.input_image, num_inference_steps=steps,
                              guidance_scale=s.guidance, image_guidance_scale=ig,
                              generator=torch.Generator().manual_seed(s.seed + r.index)).images[0]
                im.save(tmp / f"plain-{r.index:05d}.png")
            _sync(dev)

        def ours():
            make_edits(pipe, data, tmp / "ours", s, ig, "bench")
            _sync(dev)

        with torch.no_grad():  # warm-up
            pipe(PROMPTS[0], image=imgs[0], num_inference_steps=1, image_guidance_scale=ig)
        timer = time.perf_counter if dev.startswith("cuda") else time.process_time
        t = {}
        for name, fn in (("plain", plain), ("dsbuild", ours)):
            t0 = timer()
            fn()
            t[name] = timer() - t0
        same = all(
            (tmp / f"plain-{r.index:05d}.png").read_bytes() == (tmp / "ours" / f"{r.index:05d}.png"
                                                                 ).read_bytes() for r in data)
    rps = {k: round(rows / v, 3) for k, v in t.items()}
    return {"arch": arch, "device": dev, "rows": rows, "batch_size": batch_size, "steps": steps,
            "resolution": resolution, "threads": torch.get_num_threads(),
            "timer": "wall seconds" if dev.startswith("cuda") else "cpu seconds",
            "rows_per_s": rps, "ratio": round(rps["dsbuild"] / rps["plain"], 3),
            "identical_pngs": same, "goal": 1.0}


@click.command("eval")
@click.option("--arch", type=click.Choice(ARCHS), default="small", show_default=True)
@click.option("--rows", type=int, default=8, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--resolution", type=int, default=64, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def bench_eval(arch, rows, batch_size, steps, resolution, device, threads, as_json):
    """Eval rows/s of dsbuild's batched editing vs a plain IP2P pipeline loop, same run."""
    res = run_bench(arch, rows, batch_size, steps, resolution, device, threads)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    r = res["rows_per_s"]
    click.echo(f"bench eval: arch {res['arch']} on {res['device']}, {res['rows']} rows "
               f"{res['resolution']}px, {res['steps']} steps, batch {res['batch_size']}, "
               f"{res['threads']} thread(s), {res['timer']}")
    click.echo(f"  plain pipeline loop: {r['plain']:>8.3f} rows/s")
    click.echo(f"  dsbuild eval edits:  {r['dsbuild']:>8.3f} rows/s")
    verdict = "meets" if res["ratio"] >= res["goal"] else "below"
    click.echo(f"  ratio = {res['ratio']:.3f}x ({verdict} the 1.0x goal); same PNGs: "
               f"{res['identical_pngs']}")
