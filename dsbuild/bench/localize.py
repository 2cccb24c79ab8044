"""``dsbuild bench localize``: what the LIME penalty costs, in one process on one editor.

Three ways to make the same edits (same rows, masks, seeds, steps, guidance):

- **plain**: diffusers' ``StableDiffusionInstructPix2PixPipeline`` with its own attention
  processors, no penalty (the cost floor);
- **dsbuild**: :func:`dsbuild.localize.edit.localized_edit`, the penalty as an additive bias on
  fused ``scaled_dot_product_attention`` (no attention map materialised);
- **materialised**: the same penalty the way LIME's processor applies it, on explicit
  attention maps ``softmax(QKᵀ/√d + bias) V`` in every attention layer (what an implementation
  that edits the probabilities has to build).

It reports rows/s ratios (dsbuild / plain, dsbuild / materialised), the peak memory of each side
and the largest pixel difference between dsbuild and materialised (the same maths, so float
noise). CPU seconds (``time.process_time``) with ``threads`` torch threads on CPU, wall seconds
on CUDA; each side runs ``repeats`` times round-robin and its best time counts.
"""

from __future__ import annotations

import click
import numpy as np

from dsbuild.bench.harness import (
    ARCHS,
    PROMPTS,
    clock_of,
    device_option,
    emit,
    images,
    json_option,
    on_cuda,
    per_second,
    random_editor,
    ratio,
    rounded,
    setup,
    time_cases,
    timer_label,
    torch_threads,
    trim,
    verdict,
)


def _materialised_controller(settings):
    """A ``LocalizeController`` whose every attention call builds its probabilities."""
    import torch

    from dsbuild.attention.lime import LocalizeController

    class Materialised(LocalizeController):
        def attend(self, name, is_cross, q, k, v, mask):
            bias = None
            B = self.mask.shape[0]
            if is_cross and self.wants(name) and self.in_window() and not q.shape[0] % B:
                N, L, d = q.shape[2], k.shape[2], q.shape[3]
                H, W = self.latent_hw
                f = max(1, round((H * W / N) ** 0.5))
                from dsbuild.attention.lime import penalty_bias

                own = penalty_bias(self.mask.to(q.device), self.edit_tokens.to(q.device),
                                   self.s.alpha, d, (H // f, W // f)).to(q.dtype)
                bias = torch.zeros(q.shape[0], 1, N, L, device=q.device, dtype=q.dtype)
                bias[:B] = own
                self.calls += 1
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if mask is not None:
                scores = scores + mask
            if bias is not None:
                scores = scores + bias
            return torch.softmax(scores, -1) @ v

    return Materialised(settings)


def run_bench(arch: str = "small", rows: int = 4, steps: int = 4, resolution: int = 64,
              alpha: float = 1e4, repeats: int = 2, device: str = "auto",
              threads: int | None = 1) -> dict:
    """Make the same edits three ways; rows/s, ratios, peak memory and pixel differences."""
    import torch

    from dsbuild.core.settings.localize import RegularisationSettings
    from dsbuild.localize.edit import localized_edit

    dev = setup(device, threads)
    pipe = random_editor(arch, dev)
    inputs = images(rows, resolution, 0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    masks = []
    for i in range(rows):  # a box a quarter of the image, moving with the row
        m = np.zeros((resolution, resolution), dtype=bool)
        o = (i * resolution // 8) % (resolution // 2)
        m[o:o + resolution // 2, o:o + resolution // 2] = True
        masks.append(m)
    reg = RegularisationSettings(alpha=alpha)

    def call():
        return dict(num_inference_steps=steps, guidance_scale=7.5, image_guidance_scale=1.5,
                    generator=[torch.Generator().manual_seed(i) for i in range(rows)],
                    output_type="np")

    out: dict[str, np.ndarray] = {}

    def plain():
        with torch.no_grad():
            out["plain"] = pipe(prompts, image=inputs, **call()).images

    def ours():
        out["dsbuild"] = localized_edit(pipe, prompts, inputs, masks, reg, **call())

    def materialised():
        out["materialised"] = localized_edit(pipe, prompts, inputs, masks, reg,
                                             controller=_materialised_controller(reg), **call())

    @torch.no_grad()
    def warmup():
        pipe(prompts[0], image=inputs[0], num_inference_steps=1)

    sides = {"plain": plain, "dsbuild": ours, "materialised": materialised}
    t = time_cases(sides, dev, repeats, warmup=warmup, memory=True, before=trim)
    rps = per_second(rows, t.seconds(clock_of(dev), pick="best"), 4)
    diff = float(np.abs(np.asarray(out["dsbuild"], dtype=np.float64)
                        - np.asarray(out["materialised"], dtype=np.float64)).max())
    moved = float(np.abs(np.asarray(out["dsbuild"], dtype=np.float64)
                         - np.asarray(out["plain"], dtype=np.float64)).max())
    return {"arch": arch, "device": dev, "rows": rows, "steps": steps,
            "resolution": resolution, "alpha": alpha, "threads": torch_threads(),
            "timer": timer_label(dev),
            "memory": "CUDA allocator peak" if on_cuda(dev)
            else "process RSS high-water mark (includes the model; CPU)",
            "rows_per_s": rps,
            "ratios": {"dsbuild/plain": ratio(rps["dsbuild"], rps["plain"]),
                       "dsbuild/materialised": ratio(rps["dsbuild"], rps["materialised"])},
            "peak_mb": rounded(t.peak_mb, 1),
            "max_abs_diff_vs_materialised": diff, "max_abs_change_vs_plain": moved,
            "goals": {"dsbuild/plain": 0.9, "dsbuild/materialised": 1.0}}


@click.command("localize")
@click.option("--arch", type=click.Choice(ARCHS), default="small", show_default=True)
@click.option("--rows", type=int, default=4, show_default=True)
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--resolution", type=int, default=64, show_default=True)
@click.option("--alpha", type=float, default=1e4, show_default=True)
@click.option("--repeats", type=int, default=2, show_default=True)
@device_option
@click.option("--threads", type=int, default=1, show_default=True)
@json_option
def bench_localize(arch, rows, steps, resolution, alpha, repeats, device, threads, as_json):
    """Localized editing (LIME penalty on fused attention) vs plain IP2P and vs materialised
    attention maps, same run."""
    emit(run_bench(arch, rows, steps, resolution, alpha, repeats, device, threads), as_json,
         _lines)


def _lines(res: dict):
    """The result for people."""
    r, p = res["rows_per_s"], res["peak_mb"]
    yield (f"bench localize: arch {res['arch']} on {res['device']}, {res['rows']} rows "
           f"{res['resolution']}px, {res['steps']} steps, alpha {res['alpha']:g}, "
           f"{res['threads']} thread(s), {res['timer']}")
    for k, label in (("plain", "plain IP2P pipeline"), ("dsbuild", "dsbuild localized (fused)"),
                     ("materialised", "penalty on materialised maps")):
        mem = "" if p.get(k) is None else f", peak {p[k]:.0f} MB"
        yield f"  {label:<30} {r[k]:>8.3f} rows/s{mem}"
    for k, v in res["ratios"].items():
        yield f"  {k} = {v:.3f}x ({verdict(v, res['goals'][k])} the {res['goals'][k]}x goal)"
    yield (f"  max |dsbuild - materialised| = {res['max_abs_diff_vs_materialised']:.2e} "
           f"(same maths); max change vs plain = {res['max_abs_change_vs_plain']:.3f}")
    yield f"  memory: {res['memory']}"
