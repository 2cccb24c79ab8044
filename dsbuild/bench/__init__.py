"""Benchmarks: speed and memory as ratios against the plain libraries doing the same work in
the same run; one module per bench over one harness (``harness.py``). Their ``dsbuild bench``
command group is :mod:`dsbuild.cli.bench`."""
