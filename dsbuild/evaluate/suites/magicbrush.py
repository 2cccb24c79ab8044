"""MagicBrush (Zhang et al., NeurIPS 2023 Datasets and Benchmarks): multi-turn, mask-free
instruction editing scored against ground-truth edits.

Rows come from either layout of the suite: the Hub dataset ``osunlp/MagicBrush`` (columns
``img_id``, ``turn_index``, ``source_img``, ``instruction``, ``target_img``; splits ``train``
and ``dev``) or the unzipped test zip (``edit_sessions.json`` with ``images/<img_id>/``), which
is not on the Hub and must never be redistributed: dsbuild reads it where it lies and copies no
ground-truth image anywhere. Two settings, as the suite's ``evaluation/image_eval.py`` scores
them:

- single-turn ("all turns"): every turn edited from its ground-truth input (turn 1: the source
  image, turn k: the ground truth of turn k-1), each scored against its ground truth;
- multi-turn ("final turn"): each session edited turn by turn on the model's own previous
  output, only the last turn scored against the session's last ground truth (the per-turn
  means of the chain are the report's per-turn table). Turn 1 is the same edit in both.

Per image pair: L1 and L2 (mean absolute / squared difference of pixels in [0, 1], the edit
resized to the ground truth's size with PIL bicubic first), CLIP-I (cosine of CLIP ViT-B/32
image embeddings) and DINO (cosine of DINO v1 ViT-S/16 CLS tokens, resize 256 + crop 224);
ground truths keep their own size. Means over the pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsbuild.core.errors import DsbuildError
from dsbuild.evaluate.suites import (
    Suite,
    SuiteContext,
    SuiteRow,
    by_category,
    means,
    open_split,
    rgb,
)

COLUMNS = ("img_id", "turn_index", "source_img", "instruction", "target_img")
METRICS = ("l1", "l2", "clip_i", "dino")
FINAL = tuple(f"final_{k}" for k in METRICS)


def keep_sessions(sessions: list[tuple[str, list]], limit: int | None) -> list[tuple[str, list]]:
    """The first sessions holding at most ``limit`` turns in all (at least one session): a
    session is never cut, its later turns need its earlier ones."""
    if limit is None:
        return sessions
    kept, n = [], 0
    for sid, turns in sessions:
        if kept and n + len(turns) > limit:
            break
        kept.append((sid, turns))
        n += len(turns)
    return kept


def pixel_distances(edit: Path, truth) -> tuple[float, float]:
    """(L1, L2) of one edit against its ground truth: the edit resized to the truth's size
    (PIL bicubic), both as pixels in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(edit) as im:
        gen = im.convert("RGB").resize(truth.size, Image.Resampling.BICUBIC)
    a = np.asarray(gen, dtype=np.float32) / 255.0
    b = np.asarray(truth.convert("RGB"), dtype=np.float32) / 255.0
    diff = a - b
    return float(np.abs(diff).mean()), float((diff * diff).mean())


class MagicBrush(Suite):
    name = "magicbrush"
    title = "MagicBrush (single-turn and multi-turn, against ground truth)"
    hub = "osunlp/MagicBrush"
    split = "dev"
    reference = ("Zhang et al. 2023, MagicBrush (NeurIPS Datasets and Benchmarks); "
                 "OSU-NLP-Group/MagicBrush evaluation/image_eval.py")
    resolution = 512
    clip_model = "ViT-B-32"
    clip_pretrained = "openai"
    clip_preprocess = "openclip"
    dino_model = "facebook/dino-vits16"
    dino_preprocess = "magicbrush"
    columns = (("l1", "L1 ↓", "lower"), ("l2", "L2 ↓", "lower"),
               ("clip_i", "CLIP-I ↑", "cos100"), ("dino", "DINO ↑", "cos100"),
               ("final_l1", "final L1 ↓", "lower"), ("final_l2", "final L2 ↓", "lower"),
               ("final_clip_i", "final CLIP-I ↑", "cos100"),
               ("final_dino", "final DINO ↑", "cos100"))
    headline = "final_dino"
    category_label = "multi-turn turn"

    # ------------------------------------------------------------------ loading

    def load(self, source: str | None, split: str | None, limit: int | None) -> list[SuiteRow]:
        """Rows of whole sessions, sorted by ``img_id`` (as the suite's evaluation lists
        them), turns in order; ``limit`` keeps the first sessions up to that many rows."""
        if source is not None:
            root = Path(source)
            for folder in (root, root / "test"):  # the zip unpacks into test/
                if (folder / "edit_sessions.json").is_file():
                    return self._load_sessions(folder, limit)
        return self._load_hub(source, split or self.split, limit)

    def _load_sessions(self, folder: Path, limit: int | None) -> list[SuiteRow]:
        path = folder / "edit_sessions.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DsbuildError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(data, dict) or not data:
            raise DsbuildError(f"{path}: expected a non-empty object {{img_id: [turns]}}")
        sessions = []
        for sid in sorted(data):
            turns = data[sid]
            if not isinstance(turns, list) or not turns or not all(
                    isinstance(t, dict) and all(isinstance(t.get(k), str) and t[k]
                                                for k in ("input", "output", "instruction"))
                    for t in turns):
                raise DsbuildError(f"{path}: session {sid!r} must be a non-empty list of turns, "
                                   "each with 'input', 'output' and 'instruction' strings")
            sessions.append((sid, turns))
        images: dict[Path, object] = {}  # turn k's input is turn k-1's truth: read it once

        def image(sid: str, name: str):
            p = folder / "images" / sid / name
            if p not in images:
                if not p.is_file():
                    raise DsbuildError(f"{path}: session {sid!r} names {name}, but {p} does not "
                                       "exist (unzip the test images beside edit_sessions.json)")
                images[p] = rgb(p, str(p))
            return images[p]

        rows = []
        for sid, turns in keep_sessions(sessions, limit):
            for k, t in enumerate(turns, 1):
                rows.append(SuiteRow(key=f"{sid}-{k}", input_image=image(sid, t["input"]),
                                     instruction=t["instruction"], category=f"turn {k}",
                                     truth=image(sid, t["output"]), session=sid, turn=k))
        return rows

    def _load_hub(self, source: str | None, split: str, limit: int | None) -> list[SuiteRow]:
        where = source or self.hub
        try:
            ds = open_split(source, self.hub, split, self.name)
        except DsbuildError as exc:
            if source is not None and Path(source).is_dir():
                raise DsbuildError(
                    f"suite magicbrush: {source} holds no edit_sessions.json (the test zip, "
                    f"unzipped) and no dataset in the Hub layout ({exc})".replace("\n", " ")
                ) from None
            raise
        missing = [c for c in COLUMNS if c not in ds.column_names]
        if missing:
            raise DsbuildError(
                f"suite magicbrush: {where} [{split}] has no edit_sessions.json and lacks "
                f"column(s) {', '.join(missing)} (it has: {', '.join(ds.column_names)}); give "
                "the unzipped test folder or a copy of osunlp/MagicBrush")
        meta = ds.select_columns(["img_id", "turn_index"])
        by_session: dict[str, dict[int, int]] = {}
        for i, (sid, turn) in enumerate(zip(meta["img_id"], meta["turn_index"], strict=True)):
            turns = by_session.setdefault(str(sid), {})
            if int(turn) in turns:
                raise DsbuildError(f"suite magicbrush: {where} [{split}]: session {sid!r} has "
                                   f"turn_index {turn} twice")
            turns[int(turn)] = i
        sessions = []
        for sid in sorted(by_session):
            turns = by_session[sid]
            if sorted(turns) != list(range(1, len(turns) + 1)):
                raise DsbuildError(f"suite magicbrush: {where} [{split}]: session {sid!r} has "
                                   f"turn_index {sorted(turns)}; expected 1..{len(turns)}")
            sessions.append((sid, [turns[k] for k in sorted(turns)]))
        rows = []
        for sid, indices in keep_sessions(sessions, limit):
            for k, i in enumerate(indices, 1):
                rec = ds[i]
                at = f"{where} [{split}] row {i} ({sid} turn {k})"
                rows.append(SuiteRow(key=f"{sid}-{k}", input_image=rgb(rec["source_img"], at),
                                     instruction=str(rec["instruction"]), category=f"turn {k}",
                                     truth=rgb(rec["target_img"], at), session=sid, turn=k))
        return rows

    def split_label(self, source: str | None, split: str) -> str:
        if source is not None and any((Path(source) / sub / "edit_sessions.json").is_file()
                                      for sub in ("", "test")):
            return "edit_sessions.json (the test zip)"
        return split

    # ------------------------------------------------------------------ editing

    @staticmethod
    def chain_path(ctx: SuiteContext, i: int) -> Path:
        """Row ``i``'s edit in the multi-turn chain (turn 1: the single-turn edit)."""
        sub = "edits" if ctx.rows[i].turn == 1 else "iter"
        return ctx.folder / sub / f"{i:05d}.png"

    def make_edits(self, ctx: SuiteContext) -> None:
        """Single-turn: every row from its ground-truth input (``edits/``). Multi-turn: depth
        by depth, turn k from the chain's own turn k-1 (``iter/``); row ``i`` is seeded ``i``
        in both, so the two settings differ only in the input."""
        from dsbuild.evaluate.run import slug

        rows = ctx.rows
        super().make_edits(ctx)
        index = {(r.session, r.turn): i for i, r in enumerate(rows)}
        depth = 2
        while todo := [i for i, r in enumerate(rows) if r.turn == depth]:
            items = []
            for i in todo:
                parent = self.chain_path(ctx, index[rows[i].session, depth - 1])
                items.append((f"{i:05d}", rgb(parent, str(parent)), rows[i].instruction, i))
            ctx.edit(items, "iter", f"{self.name} turn {depth} {slug(ctx.model)}")
            depth += 1

    # ------------------------------------------------------------------ scoring

    def score(self, ctx: SuiteContext) -> dict:
        """``metrics``: single-turn means over every turn (``l1`` …) and multi-turn means over
        the sessions' final turns (``final_l1`` …); ``categories``: the chain's means per turn
        under the multi-turn keys; ``pairs``: how many pairs each setting scored."""
        import torch

        from dsbuild.core import metrics

        rows = ctx.rows
        single = [self.edit_path(ctx, i) for i in range(len(rows))]
        chain = [self.chain_path(ctx, i) for i in range(len(rows))]
        emb = ctx.embed(self.edits(ctx, paths=list(dict.fromkeys([*single, *chain]))))
        truth = self._embed_truths(ctx)

        def per_pair(paths: list[Path]) -> list[dict]:
            def pair(key):
                return torch.stack([emb[p][key] for p in paths]), truth[key]

            clip_i = metrics.clip_image(*pair("clip")).tolist()
            dino = metrics.dino(*pair("dino")).tolist()
            out = []
            for i, p in enumerate(paths):
                l1, l2 = pixel_distances(p, rows[i].truth)
                out.append({"l1": l1, "l2": l2, "clip_i": clip_i[i], "dino": dino[i]})
            return out

        one, multi = per_pair(single), per_pair(chain)
        last = {r.session: r.turn for r in rows}
        final = [v for r, v in zip(rows, multi, strict=True) if r.turn == last[r.session]]
        got = {**means({k: [v[k] for v in one] for k in METRICS}),
               **means({f"final_{k}": [v[k] for v in final] for k in METRICS})}
        renamed = [{f"final_{k}": v[k] for k in METRICS} for v in multi]
        return {"metrics": got, "categories": by_category(rows, renamed, FINAL),
                "pairs": {"single_turn": len(one), "final_turn": len(final)}}

    def _embed_truths(self, ctx: SuiteContext) -> dict:
        """{"clip": (n, d), "dino": (n, d)}: the rows' ground truths at their own size, each
        through its encoder's own preprocessing (in memory: nothing is written); encoded once
        per rows and encoders, however many models are scored."""
        import torch

        enc = ctx.encoders()
        made_for = (id(ctx.rows), id(enc["clip"]), id(enc["dino"]))
        cached = getattr(self, "_truths", None)
        if cached is not None and cached[0] == made_for:
            return cached[1]
        batch = max(1, ctx.settings.batch_size * 4)
        out = {}
        for key in ("clip", "dino"):
            parts = []
            for i in range(0, len(ctx.rows), batch):
                pixels = torch.stack([enc[key].preprocess_image(r.truth.convert("RGB"))
                                      for r in ctx.rows[i:i + batch]])
                parts.append(enc[key].encode_pixels(pixels))
            out[key] = torch.cat(parts)
        self._truths = (made_for, out)
        return out

    def protocol(self) -> str:
        return ("Single-turn: every turn edited from its ground-truth input and scored against "
                "its ground truth (L1, L2, CLIP-I, DINO: means over all turns); multi-turn: each "
                "session edited turn by turn on the model's own outputs, its final turn scored "
                "against the final ground truth (final_*), per-turn means below. Default rows: "
                "the Hub's dev split; the test split is not on the Hub, pass the unzipped test "
                "folder (edit_sessions.json + images/) as --suite-data magicbrush=DIR.")
