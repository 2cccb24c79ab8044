"""GEdit-Bench (``stepfun-ai/GEdit-Bench``; Step1X-Edit, arXiv 2504.17761), scored with
VIEScore by a vision-language judge.

Each row is edited once from its input image (fitted to the edit resolution). The judge answers
two questions per edit, both on 0-10: semantic consistency (SC: it sees the instruction, the
image the model was given and the edit; ``success`` = how well the edit does what was asked,
``overediting`` = 10 when nothing beyond the instruction changed) and perceptual quality (PQ: it
sees the edit alone; ``naturalness`` and ``artifacts``, 10 = none). Per row SC = min of the SC
scores, PQ = min of the PQ scores, O = sqrt(SC * PQ). Before judging both images are resized to
about 512*512 pixels of area, keeping the aspect ratio. A row whose SC or PQ reply is unusable
(or whose request failed) has no SC, PQ or O: counted as missing, never a 0.

``EvalSettings.gedit_language`` picks the instructions scored (``en``: GEdit-Bench-EN, ``cn``,
``all``); the row limit applies per language. Means per task type, overall over rows
(``o``) and over the task-type means (``o_macro``), and over the intersection subset
(``Intersection_exist``). Every judge record is kept in ``judge.json`` beside the edits.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

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

COLUMNS = ("key", "task_type", "instruction", "instruction_language", "input_image")
LANGUAGES = ("en", "cn")
METRICS = ("sc", "pq", "o")
JUDGE_AREA = 512 * 512  # VIEScore's images: about this many pixels, aspect kept

SC_CRITERIA = (
    {"name": "success", "description": "editing success: how completely and correctly the "
     "edited image carries out the instruction (0: not at all, 10: exactly as asked)"},
    {"name": "overediting", "description": "over-editing: how little of the image changed "
     "beyond what the instruction asks (10: nothing else changed, 0: the image is unrelated "
     "to the input)"},
)
PQ_CRITERIA = (
    {"name": "naturalness", "description": "how natural and realistic the image looks "
     "(lighting, shadows, proportions, a believable scene)"},
    {"name": "artifacts", "description": "freedom from artefacts: blur, noise, distortions, "
     "seams, broken parts or garbled text (10: none at all)"},
)


def rubrics():
    """The SC and PQ rubrics (0-10)."""
    from dsbuild.llm.rubric import resolve

    return resolve(SC_CRITERIA, scale=(0, 10)), resolve(PQ_CRITERIA, scale=(0, 10))


def area_resize(image, area: int = JUDGE_AREA):
    """``image`` resized to about ``area`` pixels keeping its aspect ratio (w = sqrt(area *
    ratio), h = w / ratio, both truncated to integers)."""
    from PIL import Image

    ratio = image.width / image.height
    w = int(math.sqrt(area * ratio))
    h = int(w / ratio)
    return image.resize((max(1, w), max(1, h)), Image.Resampling.BICUBIC)  # PIL's default


def judge_summary(model: str, records: list[dict | None], rubric_list, prompt_hashes,
                  missing: Counter) -> dict:
    """Who judged: the model asked, the models the server reported (with counts), the rubric
    and prompt hashes, the missing scores by reason."""
    got = [r for r in records if r is not None]
    return {"model_requested": model,
            "models_reported": dict(sorted(Counter(str(r.get("model_reported"))
                                                   for r in got).items())),
            "rubric_hashes": sorted({r.hash for r in rubric_list}),
            "prompt_hashes": sorted(set(prompt_hashes)),
            "missing": dict(sorted(missing.items()))}


def judge_images(ctx: SuiteContext, indices: list[int], edits: dict[int, Path]
                 ) -> dict[int, tuple[Path, Path]]:
    """Per row: (input, edit) as the judge sees them, written once under ``judge/``: the
    input the model was given (fitted to the edit resolution) and its edit, each resized to
    about 512*512 pixels of area."""
    from PIL import Image

    from dsbuild.core.records import write_image
    from dsbuild.train.data import fit

    out = {}
    for i in indices:
        a = ctx.folder / "judge" / f"{i:05d}-input.png"
        b = ctx.folder / "judge" / f"{i:05d}-edit.png"
        if not a.exists():
            write_image(a, area_resize(fit(ctx.rows[i].input_image, ctx.resolution)))
        if not b.exists():
            try:
                with Image.open(edits[i]) as im:
                    write_image(b, area_resize(im.convert("RGB")))
            except OSError as exc:
                raise DsbuildError(f"{edits[i]}: unreadable edit ({exc}); delete it and run "
                                   "eval again") from None
        out[i] = (a, b)
    return out


class GEditBench(Suite):
    name = "gedit-bench"
    title = "GEdit-Bench (VIEScore by a vision-language judge)"
    hub = "stepfun-ai/GEdit-Bench"
    split = "train"
    reference = ("Step1X-Edit, arXiv 2504.17761 (GEdit-Bench); VIEScore, TIGER-Lab "
                 "(arXiv 2312.14867)")
    resolution = 512
    needs_encoders = False
    needs_judge = True
    columns = (("sc", "SC ↑", "plain"), ("pq", "PQ ↑", "plain"), ("o", "O ↑", "plain"),
               ("o_macro", "O, mean of task means ↑", "plain"))
    headline = "o"
    category_label = "task type"

    def load(self, source: str | None, split: str | None, limit: int | None) -> list[SuiteRow]:
        ds, split, where = open_checked(self, source, split, COLUMNS)
        has_inter = "Intersection_exist" in ds.column_names
        lang = ds["instruction_language"]
        bad = sorted({str(x) for x in lang if x not in LANGUAGES})
        if bad:
            raise DsbuildError(f"suite {self.name}: {where} column instruction_language holds "
                               f"{', '.join(bad)}; expected en or cn")
        keep: list[int] = []
        count: Counter = Counter()
        for i, x in enumerate(lang):  # the limit applies per language
            if limit is None or count[x] < limit:
                keep.append(i)
                count[x] += 1
        rows: list[SuiteRow] = []
        for i in keep:
            rec = ds[i]
            key = str(rec["key"])
            at = f"suite {self.name}: {where} row {i} (key {key})"
            instruction = str(rec["instruction"] or "").strip()
            if not instruction:
                raise DsbuildError(f"{at}: empty instruction")
            if not rec["task_type"]:
                raise DsbuildError(f"{at}: empty task_type")
            inter = rec["Intersection_exist"] if has_inter else None
            rows.append(SuiteRow(
                key=key, input_image=rgb(rec["input_image"], f"{at} column input_image"),
                instruction=instruction, category=str(rec["task_type"]),
                extra={"language": rec["instruction_language"],
                       "intersection": None if inter is None else bool(inter)}))
        return rows

    def selected(self, ctx: SuiteContext) -> list[int]:
        """The rows of the language ``gedit_language`` picks."""
        lang = getattr(ctx.settings, "gedit_language", "en")
        return [i for i, r in enumerate(ctx.rows)
                if lang == "all" or r.extra.get("language") == lang]

    def make_edits(self, ctx: SuiteContext) -> None:
        ctx.edit([(f"{i:05d}", ctx.rows[i].input_image, ctx.rows[i].instruction, i)
                  for i in self.selected(ctx)], "edits", f"{self.name} edit")

    def score(self, ctx: SuiteContext) -> dict:
        from dsbuild.core.records import write_json

        idx = self.selected(ctx)
        if not idx:
            raise DsbuildError(f"suite {self.name}: no rows in language "
                               f"{ctx.settings.gedit_language!r}; set gedit_language "
                               "(--gedit-language) to en, cn or all")
        images = judge_images(ctx, idx, self.edits(ctx, idx))
        sc_rubric, pq_rubric = rubrics()
        sc_judge = ctx.judge(sc_rubric, shows="pair", key="gedit-sc")
        pq_judge = ctx.judge(pq_rubric, shows="output", key="gedit-pq")
        sc_got = sc_judge.ask([(f"{i:05d}", ctx.rows[i].instruction, *images[i]) for i in idx])
        pq_got = pq_judge.ask([(f"{i:05d}", "", None, images[i][1]) for i in idx])
        missing: Counter = Counter()
        per_row: list[dict] = []
        sub_rows: list[SuiteRow] = []
        dump = []
        for i in idx:
            r = ctx.rows[i]
            sc_rec, pq_rec = sc_got.get(f"{i:05d}"), pq_got.get(f"{i:05d}")
            why = []
            for q, rec in (("sc", sc_rec), ("pq", pq_rec)):
                reason = "request_failed" if rec is None else rec.get("missing")
                if reason:
                    why.append(f"{q}: {reason}")
                    missing[f"{q} {reason}"] += 1
            v: dict = {"sc": None, "pq": None, "o": None}
            if not why:
                sc = float(min(sc_rec["scores"].values()))
                pq = float(min(pq_rec["scores"].values()))
                v = {"sc": sc, "pq": pq, "o": math.sqrt(sc * pq)}
            per_row.append(v)
            sub_rows.append(r)
            dump.append({"index": i, "key": r.key, "task_type": r.category,
                         "language": r.extra.get("language"),
                         "intersection": r.extra.get("intersection"),
                         "instruction": r.instruction, **v, "missing": why or None,
                         "sc_record": sc_rec, "pq_record": pq_rec})
        write_json(ctx.folder / "judge.json", dump)
        scored = [v for v in per_row if v["o"] is not None]
        categories = by_category(sub_rows, per_row, METRICS)
        for c, got in categories.items():
            got["scored"] = sum(1 for r, v in zip(sub_rows, per_row, strict=True)
                                if r.category == c and v["o"] is not None)
        macro = {f"{k}_macro": _mean([got[k] for got in categories.values()
                                      if got[k] is not None]) for k in METRICS}
        overall = {**means({k: [v[k] for v in scored] for k in METRICS}), **macro,
                   "rows": len(idx), "scored": len(scored), "missing": len(idx) - len(scored)}
        inter_rows = [v for r, v in zip(sub_rows, per_row, strict=True)
                      if r.extra.get("intersection")]
        intersection = {**means({k: [v[k] for v in inter_rows if v[k] is not None]
                                 for k in METRICS}),
                        "rows": len(inter_rows),
                        "scored": sum(1 for v in inter_rows if v["o"] is not None)}
        records = [*sc_got.values(), *pq_got.values()]
        return {"metrics": overall, "categories": categories, "intersection": intersection,
                "judge": {**judge_summary(sc_judge.settings.model, records,
                                          (sc_rubric, pq_rubric),
                                          (sc_judge.prompt_hash, pq_judge.prompt_hash), missing),
                          "requests": {"sc": sc_judge.stats(), "pq": pq_judge.stats()}},
                "settings": {"language": ctx.settings.gedit_language,
                             "judge_image_area": JUDGE_AREA,
                             "judged_input": "the input fitted to the edit resolution"}}

    def protocol(self) -> str:
        return ("Each row edited once from its input; VIEScore by the judge on 0-10: SC = min("
                "editing success, over-editing) from the instruction, the fitted input and the "
                "edit; PQ = min(naturalness, artifacts) from the edit alone; O = sqrt(SC·PQ); "
                "both images resized to about 512·512 px of area first. Means per task type; "
                "overall over rows (o) and over task-type means (o_macro); the intersection "
                "subset in the JSON. Rows with an unusable reply are missing, not 0. Language: "
                "gedit_language (en by default: GEdit-Bench-EN).")


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None
