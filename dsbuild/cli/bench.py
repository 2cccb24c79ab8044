"""``dsbuild bench``: the benchmark commands (dsbuild/bench/: one module per bench, one
harness), reported as ratios against the plain libraries in one run."""

from __future__ import annotations

import click

from dsbuild.cli import LazyGroup

BENCHES = {
    "p2p": ("dsbuild.bench.p2p:bench_p2p", "Prompt-to-Prompt vs plain diffusers"),
    "filter": ("dsbuild.bench.filter:bench_filter", "CLIP scoring vs raw open_clip"),
    "verify": ("dsbuild.bench.verify:bench_verify", "OWLv2 detection vs raw transformers"),
    "train": ("dsbuild.bench.train:bench_train", "training steps vs diffusers' IP2P loop"),
    "editor": ("dsbuild.bench.editor:bench_editor",
               "editor generator rows vs a plain editing-pipeline loop"),
    "invert": ("dsbuild.bench.invert:bench_invert",
               "real-photo P2P pair (inversion) vs a synthetic P2P pair"),
    "eval": ("dsbuild.bench.eval:bench_eval", "eval rows vs a plain IP2P pipeline loop"),
    "scale": ("dsbuild.bench.scale:bench_scale", "generate with 1 vs 2 local workers"),
    "localize": ("dsbuild.bench.localize:bench_localize",
                 "localized editing vs plain IP2P and materialised maps"),
    "session": ("dsbuild.bench.session:bench_session",
                "a multi-turn session in one P2P pass vs independent pairs"),
}


@click.group("bench", cls=LazyGroup, lazy=BENCHES)
def bench_group():
    """Benchmarks, reported as ratios against the plain library doing the same work."""
