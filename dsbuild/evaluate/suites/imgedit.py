"""ImgEdit-Bench's single-turn suite (sysuyy/ImgEdit; arXiv 2505.20275), scored by a
vision-language judge.

The benchmark ships as ``Benchmark.tar`` in the Hub repo ``sysuyy/ImgEdit`` (not a loadable
dataset): it unpacks to ``Benchmark/singleturn/singleturn.json`` = ``{key: {"id": "<sub/path>
.jpg", "prompt": instruction, "edit_type": type}}`` with the images under
``Benchmark/singleturn/<id>``. ``--suite-data imgedit=DIR`` names that folder (or one above it,
or the json itself), or a ``datasets`` folder with columns key, prompt, edit_type and
input_image (or image).

Each row is edited once from its input (fitted to the edit resolution). The judge sees the
instruction, the input the model was given and the edit, and scores three criteria from 1 to 5
worded for the row's edit type: prompt compliance, visual naturalness, physical and detail
integrity. A row's score is the mean of the three; means per edit type and over rows. A row
whose reply is unusable (or whose request failed) is missing, never a 0; every judge record is
kept in ``judge.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from dsbuild.core.errors import DsbuildError
from dsbuild.evaluate.suites import (
    Suite,
    SuiteContext,
    SuiteRow,
    by_category,
    means,
    need_columns,
    open_split,
    rgb,
)
from dsbuild.evaluate.suites.gedit import judge_summary

CRITERIA = ("compliance", "naturalness", "integrity")
METRICS = (*CRITERIA, "overall")
DOWNLOAD = ("download Benchmark.tar from the Hub repo sysuyy/ImgEdit, unpack it and pass "
            "--suite-data imgedit=DIR (DIR holding singleturn/singleturn.json)")

# edit type -> (what compliance checks, what naturalness checks, what integrity checks)
TYPES: dict[str, tuple[str, str, str]] = {
    "replace": ("the object the instruction names was swapped for the requested one, and "
                "nothing else was swapped",
                "the new object sits in the scene believably: size, pose, lighting, shadows",
                "no artefacts or broken shapes where the object was swapped; the rest intact"),
    "add": ("the requested object was added, where and as the instruction describes",
            "the added object fits the scene: scale, perspective, lighting, shadows, contact",
            "the added object is whole and clean, no artefacts; existing content undamaged"),
    "adjust": ("the named attribute of the named object (colour, material, size, shape ...) "
               "changed as asked, and only that",
               "the adjusted object still looks real and consistent with the scene's light",
               "the object keeps its structure and detail; no smears, seams or artefacts"),
    "remove": ("the named object is gone completely, with no other object removed",
               "the place it left is filled seamlessly with plausible background",
               "no holes, smudges or ghost outlines remain; the rest of the image intact"),
    "style": ("the whole image now shows the requested artistic style",
              "the style is applied consistently and looks like a coherent artwork",
              "the content and layout of the input stay recognisable; no artefacts"),
    "action": ("the subject now performs the requested action, pose or expression",
               "the new pose or action is anatomically and physically plausible",
               "the subject keeps its identity and body structure; no distortions"),
    "extract": ("the named object was isolated as asked (on its own, clean background)",
                "the extracted object looks complete and natural, with clean edges",
                "the object keeps its shape and detail; no missing parts or artefacts"),
    "background": ("the background was changed to the requested one and the foreground "
                   "subject kept",
                   "subject and new background blend: consistent light, scale and edges",
                   "the subject is intact, no halos, cut-out edges or artefacts"),
    "compose": ("every one of the requested changes was carried out",
                "the combined result looks like one coherent, believable image",
                "no artefacts, distortions or broken structure from the several edits"),
}


def rubric(edit_type: str):
    """The 1-5 rubric of one edit type."""
    from dsbuild.llm.rubric import resolve

    c, n, i = TYPES[edit_type]
    return resolve([
        {"name": "compliance", "description": f"prompt compliance for a {edit_type} edit: {c}"},
        {"name": "naturalness", "description": f"visual naturalness and seamlessness: {n}"},
        {"name": "integrity", "description": f"physical and detail integrity: {i}"},
    ], scale=(1, 5))


def find_json(source: Path) -> Path | None:
    """singleturn.json: ``source`` itself, or inside it, its ``singleturn/`` or
    ``Benchmark/singleturn/``."""
    if source.is_file() and source.suffix == ".json":
        return source
    for sub in ("", "singleturn", "Benchmark/singleturn"):
        p = source / sub / "singleturn.json" if sub else source / "singleturn.json"
        if p.is_file():
            return p
    return None


class ImgEdit(Suite):
    name = "imgedit"
    title = "ImgEdit-Bench single-turn (1-5 rubric by a vision-language judge)"
    hub = None
    split = "singleturn"
    reference = "ImgEdit, arXiv 2505.20275 (ImgEdit-Bench, sysuyy/ImgEdit)"
    resolution = 512
    needs_encoders = False
    needs_judge = True
    columns = (("compliance", "compliance ↑", "plain"), ("naturalness", "naturalness ↑", "plain"),
               ("integrity", "integrity ↑", "plain"), ("overall", "overall ↑", "plain"))
    headline = "overall"
    category_label = "edit type"

    def load(self, source: str | None, split: str | None, limit: int | None) -> list[SuiteRow]:
        if source is None:
            raise DsbuildError(f"suite {self.name}: no Hub dataset to load; {DOWNLOAD}")
        path = Path(source)
        if not path.exists():
            raise DsbuildError(f"suite {self.name}: {source} does not exist; {DOWNLOAD}")
        js = find_json(path)
        rows = self._json_rows(js, limit) if js else self._dataset_rows(source, split, limit)
        for r in rows:
            if r.category not in TYPES:
                raise DsbuildError(f"suite {self.name}: row {r.key} has edit_type "
                                   f"{r.category!r}; expected one of {', '.join(TYPES)}")
        return rows

    def _json_rows(self, js: Path, limit: int | None) -> list[SuiteRow]:
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DsbuildError(f"suite {self.name}: {js}: not readable JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DsbuildError(f"suite {self.name}: {js}: expected an object of key -> "
                               '{"id", "prompt", "edit_type"}')
        rows = []
        for key, rec in list(data.items())[:limit]:
            at = f"suite {self.name}: {js} key {key}"
            if not isinstance(rec, dict) or any(k not in rec for k in ("id", "prompt",
                                                                       "edit_type")):
                raise DsbuildError(f"{at}: needs id, prompt and edit_type")
            prompt = str(rec["prompt"] or "").strip()
            if not prompt:
                raise DsbuildError(f"{at}: empty prompt")
            image = js.parent / str(rec["id"])
            if not image.is_file():
                raise DsbuildError(f"{at}: image {image} not found (images live beside "
                                   "singleturn.json, at its id)")
            rows.append(SuiteRow(key=str(key), input_image=rgb(image, at), instruction=prompt,
                                 category=str(rec["edit_type"]), extra={"id": str(rec["id"])}))
        return rows

    def _dataset_rows(self, source: str, split: str | None, limit: int | None
                      ) -> list[SuiteRow]:
        split = split or self.split
        try:
            ds = open_split(source, None, split, self.name)
        except DsbuildError as exc:
            raise DsbuildError(f"{exc} (no singleturn.json under {source} either; "
                               f"{DOWNLOAD})") from None
        where = f"{source} [{split}]"
        need_columns(ds, ("key", "prompt", "edit_type"), self.name, where)
        col = next((c for c in ("input_image", "image") if c in ds.column_names), None)
        if col is None:
            raise DsbuildError(f"suite {self.name}: {where} lacks an input_image (or image) "
                               f"column (it has: {', '.join(ds.column_names)})")
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        rows = []
        for rec in ds:
            at = f"suite {self.name}: {where} key {rec['key']}"
            prompt = str(rec["prompt"] or "").strip()
            if not prompt:
                raise DsbuildError(f"{at}: empty prompt")
            rows.append(SuiteRow(key=str(rec["key"]), input_image=rgb(rec[col], at),
                                 instruction=prompt, category=str(rec["edit_type"])))
        return rows

    def score(self, ctx: SuiteContext) -> dict:
        from dsbuild.core.records import write_json

        n = len(ctx.rows)
        edits = self.edits(ctx)
        inputs = self.fitted_inputs(ctx)
        types = sorted({r.category for r in ctx.rows})
        rubrics = {t: rubric(t) for t in types}
        got: dict[int, dict | None] = {}
        judges = {}
        for t in types:
            j = judges[t] = ctx.judge(rubrics[t], shows="pair", key=f"imgedit-{t}")
            idx = [i for i, r in enumerate(ctx.rows) if r.category == t]
            ans = j.ask([(f"{i:05d}", ctx.rows[i].instruction, inputs[i], edits[i])
                         for i in idx])
            got.update({i: ans.get(f"{i:05d}") for i in idx})
        missing: Counter = Counter()
        per_row, dump = [], []
        for i, r in enumerate(ctx.rows):
            rec = got[i]
            reason = "request_failed" if rec is None else rec.get("missing")
            v: dict = dict.fromkeys(METRICS)
            if reason:
                missing[reason] += 1
            else:
                v = {k: float(rec["scores"][k]) for k in CRITERIA}
                v["overall"] = sum(v.values()) / len(CRITERIA)
            per_row.append(v)
            dump.append({"index": i, "key": r.key, "edit_type": r.category,
                         "instruction": r.instruction, **v, "missing": reason,
                         "record": rec})
        write_json(ctx.folder / "judge.json", dump)
        scored = [v for v in per_row if v["overall"] is not None]
        overall = {**means({k: [v[k] for v in scored] for k in METRICS}), "rows": n,
                   "scored": len(scored), "missing": n - len(scored)}
        categories = by_category(ctx.rows, per_row, METRICS)
        for c, cat in categories.items():
            cat["scored"] = sum(1 for r, v in zip(ctx.rows, per_row, strict=True)
                                if r.category == c and v["overall"] is not None)
        first = next(iter(judges.values()))
        return {"metrics": overall, "categories": categories,
                "judge": {**judge_summary(first.settings.model, list(got.values()),
                                          rubrics.values(),
                                          [j.prompt_hash for j in judges.values()], missing),
                          "requests": {t: j.stats() for t, j in judges.items()}},
                "settings": {"scale": [1, 5], "judged_input": "the input fitted to the edit "
                             "resolution"}}

    def protocol(self) -> str:
        return ("Each single-turn row edited once from its input; the judge sees the "
                "instruction, the fitted input and the edit and scores 1-5, worded per edit "
                "type: prompt compliance, visual naturalness, physical/detail integrity; a row "
                "is the mean of the three; means per edit type and over rows. Rows with an "
                "unusable reply are missing, not 0. Local copy only (Benchmark.tar from "
                "sysuyy/ImgEdit).")
