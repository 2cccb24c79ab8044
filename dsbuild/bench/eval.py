"""``dsbuild bench eval``: rows/s of ``dsbuild eval``'s editing path against a plain loop over
``StableDiffusionInstructPix2PixPipeline``, in one process on one pipeline.

Both sides make the same edits (same rows, seeds, steps, guidance, image guidance) and write
one PNG per row: the plain loop calls the pipeline once per row; dsbuild calls ``make_edits``
(batches of ``batch_size`` rows, one seeded generator per row). Scoring is not timed (the
plain loop has none). CPU seconds (``time.process_time``) with ``threads`` torch threads on
CPU, wall seconds on CUDA (one run of each side after a one-step warm-up).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from dsbuild.bench.harness import (
    ARCHS,
    PROMPTS,
    clock_of,
    device_option,
    emit,
    images,
    json_option,
    per_second,
    random_editor,
    ratio,
    setup,
    time_cases,
    timer_label,
    torch_threads,
    verdict,
)


def run_bench(arch: str = "small", rows: int = 8, batch_size: int = 4, steps: int = 4,
              resolution: int = 64, device: str = "auto", threads: int | None = 1) -> dict:
    """Make the same edits both ways; rows/s, their ratio and whether the PNGs are identical."""
    import torch

    from dsbuild.evaluate.run import make_edits
    from dsbuild.evaluate.settings import EvalSettings
    from dsbuild.train.data import EditRow

    dev = setup(device, threads)
    pipe = random_editor(arch, dev)
    imgs = images(rows, resolution, 0)
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

        def ours():
            make_edits(pipe, data, tmp / "ours", s, ig, "bench")

        @torch.no_grad()
        def warmup():
            pipe(PROMPTS[0], image=imgs[0], num_inference_steps=1, image_guidance_scale=ig)

        t = time_cases({"plain": plain, "dsbuild": ours}, dev, warmup=warmup)
        same = all(
            (tmp / f"plain-{r.index:05d}.png").read_bytes() == (tmp / "ours" / f"{r.index:05d}.png"
                                                                 ).read_bytes() for r in data)
    rps = per_second(rows, t.seconds(clock_of(dev)))
    return {"arch": arch, "device": dev, "rows": rows, "batch_size": batch_size, "steps": steps,
            "resolution": resolution, "threads": torch_threads(), "timer": timer_label(dev),
            "rows_per_s": rps, "ratio": ratio(rps["dsbuild"], rps["plain"]),
            "identical_pngs": same, "goal": 1.0}


@click.command("eval")
@click.option("--arch", type=click.Choice(ARCHS), default="small", show_default=True)
@click.option("--rows", type=int, default=8, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--resolution", type=int, default=64, show_default=True)
@device_option
@click.option("--threads", type=int, default=1, show_default=True)
@json_option
def bench_eval(arch, rows, batch_size, steps, resolution, device, threads, as_json):
    """Eval rows/s of dsbuild's batched editing vs a plain IP2P pipeline loop, same run."""
    emit(run_bench(arch, rows, batch_size, steps, resolution, device, threads), as_json, _lines)


def _lines(res: dict):
    """The result for people."""
    r = res["rows_per_s"]
    yield (f"bench eval: arch {res['arch']} on {res['device']}, {res['rows']} rows "
           f"{res['resolution']}px, {res['steps']} steps, batch {res['batch_size']}, "
           f"{res['threads']} thread(s), {res['timer']}")
    yield f"  plain pipeline loop: {r['plain']:>8.3f} rows/s"
    yield f"  dsbuild eval edits:  {r['dsbuild']:>8.3f} rows/s"
    yield (f"  ratio = {res['ratio']:.3f}x ({verdict(res['ratio'], res['goal'])} the 1.0x goal); "
           f"same PNGs: {res['identical_pngs']}")
