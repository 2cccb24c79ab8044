"""``dsbuild eval MODEL... --suite NAME...``: every model on every suite, one report.

Per suite the rows are loaded once (the Hub dataset or ``--suite-data NAME=DIR``); per model
the rows are edited at the suite's resolution into ``OUT/<suite>/<model>-<signature>/`` (the
signature covers the suite, its source and split, the rows, guidance, image guidance, steps,
seed and resolution), one PNG per edit written atomically, so a killed run resumes where it
stopped and a changed setting never reuses an edit. Scores are written beside the edits
(``scores.json``, signed by the backbones, preprocessing, judge and rows) and reused when
nothing changed; judge replies are cached under ``OUT/<suite>/judge-cache/``. The ``export``
suite is :func:`dsbuild.evaluate.run.evaluate` into ``OUT/export/``. The report
(``OUT/report.{json,md,png}``, :mod:`dsbuild.evaluate.suites.report`) puts the models side by
side per suite, with the first model as the base every delta is taken from.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsbuild.core.deps import check
from dsbuild.core.errors import DsbuildError
from dsbuild.core.hashing import content_id
from dsbuild.core.pause import pause_point
from dsbuild.core.progress import progress
from dsbuild.core.records import write_image, write_json
from dsbuild.evaluate.run import slug
from dsbuild.evaluate.settings import EvalSettings, SuiteJudgeSettings
from dsbuild.evaluate.suites import SUITES, Suite, SuiteContext, SuiteRow, suite
from dsbuild.train import data as rows_mod
from dsbuild.train.loop import lock_out

TINY = {"clip_model": "tiny", "clip_pretrained": "none", "dino_model": "tiny"}


def backbones(su: Suite, s: EvalSettings) -> dict:
    """The suite's own backbones, each replaced where a ``suite_*`` setting names one."""
    b = {"clip_model": su.clip_model, "clip_pretrained": su.clip_pretrained,
         "clip_preprocess": su.clip_preprocess, "dino_model": su.dino_model,
         "dino_preprocess": su.dino_preprocess}
    for k in ("clip_model", "clip_pretrained", "dino_model"):
        if getattr(s, f"suite_{k}") is not None:
            b[k] = getattr(s, f"suite_{k}")
    if b["clip_model"] == "tiny":
        b["clip_pretrained"] = "none"
    return b


def run_dir(out: Path, su: Suite, model: str, source: str | None, split: str,
            rows: list[SuiteRow], s: EvalSettings, resolution: int) -> Path:
    sig = content_id(model, su.name, source or su.hub, split, [r.key for r in rows], s.guidance,
                     s.main_image_guidance, s.steps, s.seed, resolution, length=10)
    return out / su.name / f"{slug(model)}-{sig}"


class Editor:
    """Edits (name, image, instruction, seed index) items with one model, resumably."""

    def __init__(self, model: str, s: EvalSettings, device: str, dtype: str):
        self.model, self.s, self.device, self.dtype = model, s, device, dtype
        self.pipe = None
        self.edited = 0

    def _pipe(self):
        from dsbuild.models import load_editor

        self.pipe = self.pipe or load_editor(self.model, self.device, self.dtype)
        return self.pipe

    def edit(self, folder: Path, pause: str, resolution: int, items, sub: str, desc: str
             ) -> dict[str, Path]:
        """Edit the items whose ``folder/sub/<name>.png`` is missing (batches of
        ``batch_size``; item ``i`` seeded ``seed + i``); returns name -> path for all."""
        import torch

        s = self.s
        paths = {name: folder / sub / f"{name}.png" for name, *_ in items}
        todo = [it for it in items if not paths[it[0]].exists()]
        done = len(items) - len(todo)
        with progress(total=len(items), initial=done, desc=desc, unit="edit") as bar:
            for i in range(0, len(todo), s.batch_size):
                batch = todo[i:i + s.batch_size]
                images = [rows_mod.fit(im, resolution) for _, im, _, _ in batch]
                gens = [torch.Generator().manual_seed(s.seed + int(seed)) for *_, seed in batch]
                with torch.no_grad():
                    edits = self._pipe()([instr for _, _, instr, _ in batch], image=images,
                                         generator=gens, num_inference_steps=s.steps,
                                         guidance_scale=s.guidance,
                                         image_guidance_scale=s.main_image_guidance).images
                for (name, *_), im in zip(batch, edits, strict=True):
                    write_image(paths[name], im)
                    done += 1
                    self.edited += 1
                    pause_point(Path(pause) / sub, done)  # a test hook: kill here, resume
                bar.update(len(batch))
        return paths

    def close(self) -> None:
        import torch

        self.pipe = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


class Encoders:
    """CLIP and DINO encoders by backbone, loaded once per run."""

    def __init__(self, s: EvalSettings):
        self.s = s
        self.loaded: dict[tuple, dict] = {}

    def get(self, b: dict) -> dict:
        from dsbuild.models import ClipEncoder, DinoEncoder

        key = tuple(sorted(b.items()))
        if key not in self.loaded:
            hint = (" (offline? pass --offline for dsbuild's tiny backbones, placeholder scores, "
                    "or point --suite-clip-model/--suite-dino-model at local copies)")
            try:
                clip = ClipEncoder.load(b["clip_model"], b["clip_pretrained"],
                                        device=self.s.device, dtype=self.s.precision,
                                        setting="--suite-clip-model",
                                        pretrained_setting="--suite-clip-pretrained",
                                        preprocess=b["clip_preprocess"])
                dino = DinoEncoder.load(b["dino_model"], device=self.s.device,
                                        dtype=self.s.precision, setting="--suite-dino-model",
                                        preprocess=b["dino_preprocess"])
            except DsbuildError as exc:
                raise DsbuildError(f"suite backbones: {exc}{hint}") from None
            self.loaded[key] = {"clip": clip, "dino": dino}
        return self.loaded[key]


def _embedder(enc: dict, s: EvalSettings):
    from dsbuild.models import ImageEmbedder

    emb = ImageEmbedder(enc, batch_size=s.batch_size * 4)

    def embed(paths: list[Path]) -> dict:
        got, errors = emb.embed(list(dict.fromkeys(paths)))
        if errors:
            p, (kind, detail) = next(iter(errors.items()))
            raise DsbuildError(f"{p}: {kind} {detail}; delete it and run eval again")
        return got

    return embed


def no_judge(names: list[str]) -> DsbuildError:
    """The one line for judged suites run without a judge."""
    return DsbuildError(f"suite(s) {', '.join(names)} are scored by a vision-language judge: "
                        "pass --judge-model (a pinned snapshot) and --judge-base-url (any "
                        "OpenAI-compatible endpoint; key in --judge-api-key-env)")


def _judge_factory(su: Suite, out: Path, judge: SuiteJudgeSettings | None):
    def make(rubric, shows: str = "pair", key: str = ""):
        from dsbuild.llm.judge import Judge

        if judge is None:
            raise no_judge([su.name])
        return Judge(judge, out / su.name / "judge-cache", rubric, section="eval --judge",
                     offline_hint="or leave the judged suites out", key=key or su.name,
                     shows=shows)

    return make


def score_signature(su: Suite, b: dict, rows: list[SuiteRow], judge: SuiteJudgeSettings | None,
                    s: EvalSettings) -> str:
    j = None
    if su.needs_judge and judge is not None:
        # who is asked and how, not where it is served (a new port answers the same)
        j = [judge.model, judge.temperature, judge.image_side, judge.max_tokens]
    return content_id("suite-scores", su.name, b if su.needs_encoders else None,
                      [r.key for r in rows], j, s.gedit_language, length=16)


def run_suites(models: list[str], names: list[str], out: str | Path,
               s: EvalSettings | None = None, *, data: str | None = None,
               sources: dict[str, str] | None = None, splits: dict[str, str] | None = None,
               judge: SuiteJudgeSettings | None = None, update_cards: bool = True,
               agent=None) -> dict:
    """Every model on every named suite; writes the one report under ``out`` and returns it."""
    check("train", what="dsbuild eval")
    from dsbuild.models import checkpoint

    s = s or EvalSettings()
    sources, splits = dict(sources or {}), dict(splits or {})
    out = Path(out)
    if not models:
        raise DsbuildError("name at least one MODEL to evaluate")
    if len(set(models)) != len(models):
        raise DsbuildError(f"a model is named twice: {' '.join(models)}")
    names = list(dict.fromkeys(names))
    for n in names:
        if n not in SUITES:
            raise DsbuildError(f"unknown suite {n!r}: use one of {', '.join(SUITES)}")
    for n in [*sources, *splits]:
        if n not in names or n == "export":
            raise DsbuildError(f"--suite-data/--suite-split name {n!r}, which is not a public "
                               f"suite of this run (suites: {', '.join(names)})")
    if "export" in names and not data:
        raise DsbuildError("the export suite edits a dsbuild export's test split: pass --data "
                           "EXPORT (or leave --suite export out)")
    for model in models:
        if model != "tiny":
            checkpoint(model, "MODEL", "diffusers folder")
    public = [suite(n) for n in names if n != "export"]
    if judge is None and (judged := [su.name for su in public if su.needs_judge]):
        raise no_judge(judged)
    loaded: dict[str, list[SuiteRow]] = {}
    for su in public:  # every suite's rows are read and checked before anything is edited
        split = splits.get(su.name, su.split)
        loaded[su.name] = su.load(sources.get(su.name), split, s.rows)
        if not loaded[su.name]:
            raise DsbuildError(f"suite {su.name}: no rows to evaluate")
    with lock_out(out, "eval"):
        return _run(models, names, out, s, data, sources, splits, judge, public, loaded,
                    update_cards, agent)


def _run(models, names, out, s, data, sources, splits, judge, public, loaded, update_cards,
         agent) -> dict:
    from dsbuild.evaluate.suites.report import write_report
    from dsbuild.models import resolve_device, resolve_dtype

    result: dict = {"models": list(models), "base": models[0], "suites": {},
                    "scale": "raw values: cosines in [-1, 1], L1/L2 on pixels in [0, 1], "
                             "judge scores on their own scales"}
    if "export" in names:
        from dsbuild.evaluate.run import evaluate

        result["suites"]["export"] = {"title": "own test split (dsbuild export)",
                                      "source": data, "eval": evaluate(
                                          list(models), data, out / "export", s,
                                          update_cards=False, agent=agent)}
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.precision, device)
    folders: dict[tuple[str, str], Path] = {}
    stats: dict[str, int] = {}
    for model in models:  # edit: one pipeline per model, every suite
        ed = Editor(model, s, device, dtype)
        for su in public:
            rows = loaded[su.name]
            res = s.suite_resolution or su.resolution
            split = splits.get(su.name, su.split)
            folder = folders[model, su.name] = run_dir(out, su, model, sources.get(su.name),
                                                       split, rows, s, res)
            ctx = _context(su, model, rows, folder, res, s, ed, None, out, judge)
            su.make_edits(ctx)
        stats[model] = ed.edited
        ed.close()
    enc = Encoders(s)
    for su in public:
        rows = loaded[su.name]
        b = backbones(su, s)
        res = s.suite_resolution or su.resolution
        split = splits.get(su.name, su.split)
        entry = {"title": su.title, "reference": su.reference,
                 "source": sources.get(su.name) or su.hub,
                 "split": su.split_label(sources.get(su.name), split), "rows": len(rows),
                 "resolution": res, "columns": [list(c) for c in su.columns],
                 "headline": su.headline, "category_label": su.category_label,
                 "protocol": su.protocol(), "models": {}}
        if su.needs_encoders:
            entry["backbones"] = b
        if su.needs_judge and judge is not None:
            entry["judge_settings"] = {"model": judge.model, "base_url": judge.base_url,
                                       "temperature": judge.temperature,
                                       "image_side": judge.image_side}
        sig = score_signature(su, b, rows, judge, s)
        for model in models:
            folder = folders[model, su.name]
            cached = folder / "scores.json"
            if cached.exists():
                got = json.loads(cached.read_text())
                if got.get("signature") == sig:
                    entry["models"][model] = {**got["result"], "edits": str(folder)}
                    continue
            ctx = _context(su, model, rows, folder, res, s, None,
                           enc.get(b) if su.needs_encoders else None, out, judge)
            scored = su.score(ctx)
            write_json(cached, {"signature": sig, "result": scored})
            entry["models"][model] = {**scored, "edits": str(folder)}
        scored = {v["metrics"].get("rows") for v in entry["models"].values()} - {None}
        if len(scored) == 1:  # rows the protocol scored (GEdit-Bench: one language's)
            entry["rows"] = scored.pop()
        result["suites"][su.name] = entry
    result["edited"] = stats
    md = write_report(out, result)
    if update_cards:
        from dsbuild.train.card import update_eval

        for model in models:
            if Path(model).is_dir():
                update_eval(Path(model), md)
    return result


def _context(su, model, rows, folder, res, s, editor: Editor | None, enc: dict | None, out,
             judge) -> SuiteContext:
    def edit(items, sub: str = "edits", desc: str = ""):
        if editor is None:
            raise DsbuildError(f"suite {su.name}: edits are missing under {folder}/{sub}; run "
                               "eval again to make them")
        return editor.edit(folder, su.name, res, items, sub, desc or f"{su.name} {slug(model)}")

    def encoders():
        if enc is None:
            raise DsbuildError(f"suite {su.name}: no encoders while editing")
        return enc

    def embed(paths):
        return _embedder(encoders(), s)(paths)

    return SuiteContext(suite=su, model=model, rows=rows, folder=folder, resolution=res,
                        settings=s, edit=edit, encoders=encoders, embed=embed,
                        judge=_judge_factory(su, out, judge), backbones=backbones(su, s))
