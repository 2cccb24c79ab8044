"""The Emu Edit test set (``facebook/emu_edit_test_set``; Sheynin et al., arXiv 2311.10089).

Each row is edited once from its input image. The set has no ground-truth edit, so every metric
compares the edit with the image the model was given (the input fitted to the edit
resolution, kept under ``inputs/``): CLIP_im and DINO (how much stays), L1 on pixels in [0, 1],
and, with the row's captions, CLIP_dir (does the image move the way the caption does) and
CLIP_out (does the edit match the output caption). Means over the rows, overall and per task
(background, global, style, remove, add, local, texture).

The paper names the metrics, not the backbones: the defaults are InstructPix2Pix's CLIP
(ViT-L/14, openai) and MagicBrush's DINO (``facebook/dino-vits16``, CLS token, resize 256 +
crop 224). The companion ``facebook/emu_edit_test_set_generations`` (Emu Edit's own outputs)
names its splits the other way round (its ``validation`` has the test set's 3,589 rows): pair
with it by ``idx``/``hash``, never by split name.
"""

from __future__ import annotations

from dsbuild.core.errors import DsbuildError
from dsbuild.evaluate.suites import (
    Suite,
    SuiteContext,
    SuiteRow,
    by_category,
    means,
    open_checked,
    rgb,
)

COLUMNS = ("idx", "instruction", "image", "task", "input_caption", "output_caption")
METRICS = ("clip_dir", "clip_im", "clip_out", "l1", "dino")


def _caption(value) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


class EmuEdit(Suite):
    name = "emu-edit"
    title = "Emu Edit test set"
    hub = "facebook/emu_edit_test_set"
    split = "test"
    reference = ("Emu Edit (Sheynin et al., arXiv 2311.10089) and the Hub dataset card of "
                 "facebook/emu_edit_test_set")
    resolution = 512
    clip_model = "ViT-L-14"
    clip_pretrained = "openai"
    dino_model = "facebook/dino-vits16"
    dino_preprocess = "magicbrush"
    columns = (("clip_dir", "CLIP_dir ↑", "cos"), ("clip_im", "CLIP_im ↑", "cos100"),
               ("clip_out", "CLIP_out ↑", "cos100"), ("l1", "L1 ↓", "lower"),
               ("dino", "DINO ↑", "cos100"))
    headline = "clip_dir"
    category_label = "task"

    def load(self, source: str | None, split: str | None, limit: int | None) -> list[SuiteRow]:
        ds, split, where = open_checked(self, source, split, COLUMNS)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        rows: list[SuiteRow] = []
        seen: set[str] = set()
        for rec in ds:
            key = str(rec["idx"])
            at = f"suite {self.name}: {where} row idx {key}"
            if key in seen:
                raise DsbuildError(f"{at}: idx appears twice; each row needs its own idx")
            seen.add(key)
            instruction = str(rec["instruction"] or "").strip()
            if not instruction:
                raise DsbuildError(f"{at}: empty instruction")
            if not rec["task"]:
                raise DsbuildError(f"{at}: empty task")
            rows.append(SuiteRow(
                key=key, input_image=rgb(rec["image"], at), instruction=instruction,
                category=str(rec["task"]), input_caption=_caption(rec["input_caption"]),
                output_caption=_caption(rec["output_caption"]),
                extra={"hash": rec["hash"]} if rec.get("hash") is not None else {}))
        return rows

    def make_edits(self, ctx: SuiteContext) -> None:
        self.fitted_inputs(ctx)
        super().make_edits(ctx)

    def score(self, ctx: SuiteContext) -> dict:
        import torch

        from dsbuild.core import metrics
        from dsbuild.core.records import write_json
        from dsbuild.evaluate.run import pixels

        inputs = self.fitted_inputs(ctx)
        edits = list(self.edits(ctx).values())
        emb = ctx.embed([*inputs, *edits])

        def stack(paths, enc):
            return torch.stack([emb[p][enc] for p in paths])

        per_row: list[dict] = [{} for _ in ctx.rows]
        clip_im = metrics.clip_image(stack(inputs, "clip"), stack(edits, "clip"))
        dino = metrics.dino(stack(inputs, "dino"), stack(edits, "dino"))
        for i, (x, e) in enumerate(zip(inputs, edits, strict=True)):
            px, pe = pixels(x), pixels(e)
            if px.shape != pe.shape:
                raise DsbuildError(f"{e}: {tuple(pe.shape[:2])} px, its input {x} "
                                   f"{tuple(px.shape[:2])}; delete the edit and run eval again")
            per_row[i] = {"clip_im": float(clip_im[i]), "dino": float(dino[i]),
                          "l1": float(metrics.l1_distance(px, pe)),
                          "clip_dir": None, "clip_out": None}
        cap = [i for i, r in enumerate(ctx.rows) if r.input_caption and r.output_caption]
        if cap:
            texts = sorted({c for i in cap
                            for c in (ctx.rows[i].input_caption, ctx.rows[i].output_caption)})
            text = dict(zip(texts, ctx.encoders()["clip"].encode_text(texts), strict=True))
            em = metrics.edit_metrics(
                stack([inputs[i] for i in cap], "clip"), stack([edits[i] for i in cap], "clip"),
                torch.stack([text[ctx.rows[i].input_caption] for i in cap]),
                torch.stack([text[ctx.rows[i].output_caption] for i in cap]))
            for j, i in enumerate(cap):
                per_row[i]["clip_dir"] = float(em["CLIP_dir"][j])
                per_row[i]["clip_out"] = float(em["CLIP_out"][j])
        overall = {**means({k: [v[k] for v in per_row if v[k] is not None] for k in METRICS}),
                   "rows": len(ctx.rows), "rows_with_captions": len(cap)}
        categories = by_category(ctx.rows, per_row, METRICS)
        for c, got in categories.items():
            got["rows_with_captions"] = sum(1 for i in cap if ctx.rows[i].category == c)
        write_json(ctx.folder / "per_row.json",
                   [{"idx": r.key, "task": r.category, **v}
                    for r, v in zip(ctx.rows, per_row, strict=True)])
        return {"metrics": overall, "categories": categories,
                "rows_without_captions": len(ctx.rows) - len(cap),
                "settings": {"scored_against": "the input fitted to the edit resolution "
                                               "(no ground truth in Emu Edit)"}}

    def protocol(self) -> str:
        return ("Each row edited once from its input; no ground truth, so CLIP_im, DINO, L1 "
                "(pixels in [0, 1]) compare the edit with the fitted input, and CLIP_dir/CLIP_out "
                "use the row's input/output captions (rows lacking one are left out of those "
                "two, counted as rows_without_captions); means over rows, overall and per task. "
                "The paper does not name its backbones: CLIP ViT-L-14/openai (InstructPix2Pix's) "
                "and DINO facebook/dino-vits16 CLS (MagicBrush's preprocessing) by default. "
                "Default split test (3,589 rows; --suite-split emu-edit=validation for the "
                "2,022-row one); the split names of facebook/emu_edit_test_set_generations are "
                "swapped relative to these, so pair with Emu Edit's outputs by idx/hash.")
