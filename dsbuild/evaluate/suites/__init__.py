"""Public evaluation suites for ``dsbuild eval --suite``: MagicBrush, Emu Edit, GEdit-Bench,
ImgEdit-Bench, beside ``export`` (a dsbuild export's own test split, :mod:`dsbuild.evaluate.run`).

A suite (:class:`Suite`) knows its Hub dataset (or reads a local copy in the same layout), turns
its rows into :class:`SuiteRow` s, edits them the way its protocol does (its own resolution,
multi-turn where it has turns) and scores the edits with its own metrics, backbones and
aggregation. :mod:`dsbuild.evaluate.suites.run` runs suites for many models, caches each
(model, suite, settings) under ``OUT/<suite>/<model>-<signature>/`` and resumes; the one report
is :mod:`dsbuild.evaluate.suites.report`'s.

Suites are looked up by name in :data:`SUITES` and imported on first use, so the CLI lists them
without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from dsbuild.core.errors import DsbuildError

# name -> "module:Class"; ``export`` is dsbuild.evaluate.run's own split and has no class
SUITES: dict[str, str] = {
    "export": "",
    "magicbrush": "dsbuild.evaluate.suites.magicbrush:MagicBrush",
    "emu-edit": "dsbuild.evaluate.suites.emu_edit:EmuEdit",
    "gedit-bench": "dsbuild.evaluate.suites.gedit:GEditBench",
    "imgedit": "dsbuild.evaluate.suites.imgedit:ImgEdit",
}


def suite(name: str) -> Suite:
    """The suite called ``name`` (one of :data:`SUITES` but ``export``)."""
    if name not in SUITES or not SUITES[name]:
        raise DsbuildError(f"unknown suite {name!r}: use one of {', '.join(SUITES)}")
    module, cls = SUITES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


@dataclass
class SuiteRow:
    """One row of a suite: what to edit, with what, and what a score needs.

    ``key`` is the suite's own id of the row (file names, the report); ``truth`` the
    ground-truth edited image (MagicBrush); ``input_caption``/``output_caption`` the captions
    CLIP_dir and CLIP_out read (Emu Edit); ``session``/``turn`` a multi-turn session's id and
    1-based turn (MagicBrush); ``extra`` whatever else the suite aggregates by (GEdit-Bench's
    language and intersection flag)."""

    key: str
    input_image: object
    instruction: str
    category: str | None = None
    truth: object | None = None
    input_caption: str | None = None
    output_caption: str | None = None
    session: str | None = None
    turn: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class SuiteContext:
    """What a suite's ``make_edits`` and ``score`` get for one model.

    ``folder``: this (model, suite, settings) run's folder (``edits/`` below it);
    ``resolution``: the side inputs are fitted to before editing; ``edit(items, sub, desc)``:
    edits ``(name, PIL image, instruction, seed index)`` items into ``folder/sub/<name>.png``
    that are not there yet (batched, item seeded ``seed + seed index``; the resumable loop of
    :mod:`dsbuild.evaluate.suites.run`) and returns their paths; ``encoders()``: ``{"clip":
    ClipEncoder, "dino": DinoEncoder}`` with this suite's backbones; ``embed(paths)``: path ->
    ``{"clip": tensor, "dino": tensor}`` (normalised); ``judge(rubric, shows, key)``: a
    :class:`dsbuild.llm.judge.Judge` on the suite judge's endpoint (a DsbuildError naming the
    settings when none is set)."""

    suite: Suite
    model: str
    rows: list[SuiteRow]
    folder: Path
    resolution: int
    settings: object
    edit: Callable[..., dict[str, Path]]
    encoders: Callable[[], dict]
    embed: Callable[[list[Path]], dict]
    judge: Callable[..., object]
    backbones: dict = field(default_factory=dict)


class Suite:
    """A public suite. Subclasses set the class attributes and write ``load`` and ``score``;
    ``make_edits`` edits every row from its input image unless the protocol says otherwise."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    hub: ClassVar[str | None] = None  # the Hub dataset id (None: a local copy is needed)
    split: ClassVar[str] = "test"
    reference: ClassVar[str] = ""  # where the protocol comes from (paper, code)
    resolution: ClassVar[int] = 512
    clip_model: ClassVar[str] = "ViT-L-14"
    clip_pretrained: ClassVar[str] = "openai"
    clip_preprocess: ClassVar[str] = "openclip"
    dino_model: ClassVar[str] = "facebook/dino-vits16"
    dino_preprocess: ClassVar[str] = "model"
    needs_encoders: ClassVar[bool] = True
    needs_judge: ClassVar[bool] = False
    # (key in the metrics, title, "cos" | "cos100" | "plain" | "lower") for the report
    columns: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    headline: ClassVar[str] = ""  # the metric the summary compares models on
    category_label: ClassVar[str] = "category"

    def load(self, source: str | None, split: str | None, limit: int | None) -> list[SuiteRow]:
        raise NotImplementedError

    def make_edits(self, ctx: SuiteContext) -> None:
        """The default protocol: every row edited once from its own input image."""
        ctx.edit([(f"{i:05d}", r.input_image, r.instruction, i)
                  for i, r in enumerate(ctx.rows)], "edits", f"{self.name} edit")

    def edit_path(self, ctx: SuiteContext, i: int) -> Path:
        return ctx.folder / "edits" / f"{i:05d}.png"

    def edits(self, ctx: SuiteContext, indices: list[int] | None = None,
              paths: list[Path] | None = None) -> dict[int, Path] | list[Path]:
        """The edit PNGs of rows ``indices`` (row -> path; default every row) or the given
        ``paths``, all there, else one line saying to run eval again."""
        got = paths if paths is not None else {
            i: self.edit_path(ctx, i)
            for i in (range(len(ctx.rows)) if indices is None else indices)}
        missing = [p for p in (got if paths is not None else got.values()) if not p.exists()]
        if missing:
            raise DsbuildError(f"suite {self.name}: {len(missing)} edit(s) missing under "
                               f"{missing[0].parent} (first: {missing[0].name}); run eval again")
        return got

    @staticmethod
    def fitted_inputs(ctx: SuiteContext) -> list[Path]:
        """The inputs as the model got them (fitted to the edit resolution), written once
        under ``inputs/``: what suites without a ground truth compare each edit with."""
        from dsbuild.core.records import write_image
        from dsbuild.train.data import fit

        paths = [ctx.folder / "inputs" / f"{i:05d}.png" for i in range(len(ctx.rows))]
        for p, r in zip(paths, ctx.rows, strict=True):
            if not p.exists():
                write_image(p, fit(r.input_image, ctx.resolution))
        return paths

    def score(self, ctx: SuiteContext) -> dict:
        """``{"metrics": {...}, "categories": {name: {..., "rows": n}}, ...}``: means over the
        suite's rows as its protocol aggregates them; more keys (``settings``: the protocol's
        sub-settings, ``judge``: who judged) go into the report as they are."""
        raise NotImplementedError

    def protocol(self) -> str:
        """One sentence for the report: what is edited, against what, with which backbones."""
        return ""

    def split_label(self, source: str | None, split: str) -> str:
        """What the report calls the rows' split (a local layout may have none of its own)."""
        return split


# ------------------------------------------------------------------ shared loading helpers

def open_split(source: str | None, hub: str | None, split: str, suite_name: str):
    """A ``datasets.Dataset``: split ``split`` of ``source`` (a folder holding the Hub repo's
    files, e.g. ``data/<split>-*.parquet``, or a ``save_to_disk`` folder; or a Hub id), or of
    the suite's Hub dataset ``hub`` when ``source`` is None."""
    from dsbuild.core.deps import require

    datasets = require("datasets")
    where = source or hub
    if where is None:
        raise DsbuildError(f"suite {suite_name}: no Hub dataset to load; pass a local copy with "
                           f"--suite-data {suite_name}=DIR")
    path = Path(where)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists()
                              or (path / "dataset_info.json").exists()):
            dd = datasets.load_from_disk(str(path))
        else:
            if source is not None and not path.exists():
                raise DsbuildError(f"suite {suite_name}: {source} does not exist")
            dd = datasets.load_dataset(str(where))
    except DsbuildError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, auth, layout: one message
        hint = (f" (offline? download it on a machine with access and pass --suite-data "
                f"{suite_name}=DIR)" if source is None else "")
        raise DsbuildError(f"suite {suite_name}: cannot load {where!r}: {type(exc).__name__}: "
                           f"{exc}{hint}") from None
    if isinstance(dd, datasets.Dataset):
        return dd
    if split not in dd:
        raise DsbuildError(f"suite {suite_name}: {where} has no split {split!r} (splits: "
                           f"{', '.join(dd)}); pass --suite-split {suite_name}=SPLIT")
    return dd[split]


def open_checked(suite: Suite, source: str | None, split: str | None,
                 columns: tuple[str, ...]):
    """(dataset, split, where): :func:`open_split` of the suite's Hub dataset or ``source``,
    checked to hold ``columns``; ``where`` names it in errors."""
    split = split or suite.split
    ds = open_split(source, suite.hub, split, suite.name)
    where = f"{source or suite.hub} [{split}]"
    need_columns(ds, columns, suite.name, where)
    return ds, split, where


def need_columns(ds, columns: tuple[str, ...], suite_name: str, where: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DsbuildError(f"suite {suite_name}: {where} lacks column(s) {', '.join(missing)} "
                           f"(it has: {', '.join(ds.column_names)}); is it the suite's layout?")


def rgb(value, where: str):
    """A PIL RGB image from a datasets Image cell, a PIL image or a path."""
    from dsbuild.train.data import decode_image

    return decode_image(value, where).convert("RGB")


def means(values: dict[str, list[float]]) -> dict[str, float | None]:
    """The mean of each list (None for an empty one)."""
    return {k: (sum(v) / len(v) if v else None) for k, v in values.items()}


def by_category(rows: list[SuiteRow], per_row: list[dict[str, float | None]],
                keys: tuple[str, ...]) -> dict[str, dict]:
    """Per category: the mean of each key over its rows that have it, and ``rows``."""
    out: dict[str, dict] = {}
    cats = sorted({r.category for r in rows if r.category is not None})
    for c in cats:
        vals = [v for r, v in zip(rows, per_row, strict=True) if r.category == c]
        out[c] = {**means({k: [v[k] for v in vals if v.get(k) is not None] for k in keys}),
                  "rows": len(vals)}
    return out
