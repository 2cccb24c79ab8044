"""Measure and use an editor: ``dsbuild eval`` (metrics tables) and ``dsbuild edit``; see docs/eval.md."""
