"""``dsbuild bench editor``: rows/s of the editor generator against a plain loop over the same
diffusers editing pipeline making the same edits, in one process on the same loaded models.

Both sides make the same pairs (the generator's own plans: triples sharing captions, several
variants per source): the plain loop makes each source once with a plain text-to-image call
(one per caption and seed) and calls the editing pipeline once per edit with the source image,
its instruction, seed and knobs; the generator makes a batch's sources in one call, encodes
each once and edits the variants of a batch together. CPU seconds (``time.process_time``) with
``threads`` torch threads on CPU, wall seconds on CUDA; both sides warmed up once. Images are
compared too (``max_abs_diff``: float noise when both made the same edits).
"""

from __future__ import annotations

import click

from dsbuild.bench.harness import (
    clock_of,
    device_option,
    emit,
    json_option,
    per_second,
    ratio,
    setup,
    table,
    time_cases,
    timer_label,
    torch_threads,
    verdict,
)

MODELS = ("tiny-ip2p", "tiny-kontext")
# two captions, three instructions: sources are shared across triples of one caption
TRIPLES = (
    ("a red velvet armchair in a bright living room", "make the armchair blue"),
    ("a red velvet armchair in a bright living room", "add a cushion to the armchair"),
    ("a grey linen sofa with three cushions", "remove the cushions"),
)


def _triples() -> list[dict]:
    from dsbuild.core.hashing import content_id

    return [{"id": content_id("bench-editor", inp, edit), "input": inp, "edit": edit,
             "output": inp, "level": "object", "agent": "bench"} for inp, edit in TRIPLES]


def bench_model(model: str, dev: str, steps: int, resolution: int, per_triple: int,
                variants: int, batch_size: int, repeats: int) -> dict:
    """One model's two sides: rows/s, their ratio and the largest pixel difference."""
    import numpy as np
    import torch

    from dsbuild.generate.generators.editor.drivers import to_pil
    from dsbuild.generate.generators.editor.generator import InstructionEditor
    from dsbuild.generate.settings import GenerateSettings

    s = GenerateSettings(generator="editor", model=model, steps=steps, height=resolution,
                         width=resolution, per_triple=per_triple, batch_size=batch_size,
                         editor={"variants": variants})
    gen = InstructionEditor(s, s.section("editor"), dev, "fp32")
    plans = [p for t in _triples() for p in gen.plan(t)]
    src = gen.source
    out: dict[str, dict[str, np.ndarray]] = {}

    def edit_kwargs(p) -> dict:
        kw = {"guidance_scale": p.params["guidance"]}
        if p.params["image_guidance"] is not None:
            kw["image_guidance_scale"] = p.params["image_guidance"]
        if p.params["pipeline"] == "FluxKontextPipeline":  # the generate size, no auto-resize
            kw.update(height=resolution, width=resolution, max_area=resolution ** 2,
                      _auto_resize=False)
        return kw

    @torch.no_grad()
    def plain():
        made, sources = {}, {}
        for p in plans:
            if p.group not in sources:
                caption, seed = p.group
                im = gen.source_pipe(caption, num_inference_steps=src["steps"],
                                     guidance_scale=src["guidance"], height=resolution,
                                     width=resolution, output_type="np",
                                     generator=torch.Generator().manual_seed(seed)).images[0]
                sources[p.group] = to_pil(im)
            made[p.id] = gen.pipe(prompt=p.triple["edit"], image=sources[p.group],
                                  num_inference_steps=steps, output_type="np",
                                  generator=torch.Generator().manual_seed(p.seed),
                                  **edit_kwargs(p)).images[0]
        out["plain"] = made

    def ours():
        out["dsbuild"] = {m.plan.id: m.target for m in gen.generate(plans)}

    t = time_cases({"plain": plain, "dsbuild": ours}, dev, repeats=repeats, alternate=True)
    rps = per_second(len(plans), t.seconds(clock_of(dev)))
    diff = max(float(np.abs(np.asarray(out["plain"][k], dtype=np.float64) - v).max())
               for k, v in out["dsbuild"].items())
    return {"pipeline": gen.pipeline, "rows": len(plans),
            "sources": len({p.group for p in plans}), "batched": gen.driver.batched,
            "rows_per_s": rps, "ratio": ratio(rps["dsbuild"], rps["plain"]),
            "max_abs_diff": round(diff, 7)}


def run_bench(models=MODELS, steps: int = 4, resolution: int = 64, per_triple: int = 4,
              variants: int = 2, batch_size: int = 8, device: str = "auto",
              threads: int | None = 1, repeats: int = 1) -> dict:
    """Both sides for every model; the ratios in one result (no assertions)."""
    dev = setup(device, threads)
    res = {m: bench_model(m, dev, steps, resolution, per_triple, variants, batch_size, repeats)
           for m in models}
    return {"device": dev, "threads": torch_threads(), "timer": timer_label(dev),
            "steps": steps, "resolution": resolution, "per_triple": per_triple,
            "variants": variants, "batch_size": batch_size, "models": res,
            "ratios": {m: r["ratio"] for m, r in res.items()}, "goal": 1.0}


@click.command("editor")
@click.option("--model", "models", multiple=True, default=MODELS, show_default=True,
              help="editing pipeline (folder, Hub id or built-in tiny name; repeatable)")
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--resolution", type=int, default=64, show_default=True,
              help="image side, pixels")
@click.option("--per-triple", type=int, default=4, show_default=True,
              help="pairs per triple (3 triples, 2 captions)")
@click.option("--variants", type=int, default=2, show_default=True,
              help="edits per source image")
@click.option("--batch-size", type=int, default=8, show_default=True,
              help="edits per batch (generate.batch_size)")
@device_option
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--repeats", type=int, default=1, show_default=True)
@json_option
def bench_editor(models, steps, resolution, per_triple, variants, batch_size, device, threads,
                 repeats, as_json):
    """Editor generator rows/s vs a plain loop over the same editing pipeline, same run."""
    emit(run_bench(models, steps, resolution, per_triple, variants, batch_size, device, threads,
                   repeats), as_json, _lines)


def _lines(res: dict):
    """The result for people."""
    yield (f"bench editor on {res['device']}: {res['resolution']}px, {res['steps']} steps, "
           f"{res['variants']} variants per source, batch {res['batch_size']}, "
           f"{res['threads']} thread(s), {res['timer']}")
    rows = []
    for m, r in res["models"].items():
        rps = r["rows_per_s"]
        rows.append((m, str(r["rows"]), f"{rps['plain']:.3f}", f"{rps['dsbuild']:.3f}",
                     f"{r['ratio']:.3f}x", verdict(r["ratio"], res["goal"]),
                     f"{r['max_abs_diff']:.1e}"))
    yield from table([("model", 16), ("rows", 6), ("plain r/s", 11), ("dsbuild r/s", 13),
                      ("ratio", 9), ("1.0x goal", 11), ("max diff", 10)], rows)
