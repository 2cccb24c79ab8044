"""The build directory: frozen config, stage outputs, completion markers and status.

Layout (see docs/concepts.md)::

    build/
      dsbuild.yaml                 frozen config (recipe + stage settings); never holds secrets
      triples/ pairs/ scores/ augment/   stage outputs, rNNNNN.jsonl per rank
      pairs/img/<triple_id>/<pair_id>_0.png, _1.png
      decisions.jsonl              curator verdicts
      reports/                     json/md/png reports
      cache/                       request caches (LLM), safe to delete
      .done/<stage>/<signature>/rNNNNN   completion markers, written last
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsbuild.config import BuildConfig, Recipe, apply_overrides, dump_config, load_build_config
from dsbuild.errors import DsbuildError
from dsbuild.hashing import signature
from dsbuild.records import ShardWriter, read_jsonl, shard_name, write_json, write_text

CONFIG_NAME = "dsbuild.yaml"

# stage -> (output folder, upstream stages whose signatures feed into this one)
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "captions": ("triples", ()),
    "generate": ("pairs", ("captions",)),
    "filter": ("scores", ("generate",)),
    "augment": ("augment", ("filter",)),
}


def shard_of(key: str, world_size: int) -> int:
    """Deterministic shard of a record key (stable when other records come and go)."""
    if world_size == 1:
        return 0
    return int(hashlib.sha256(str(key).encode()).hexdigest()[:8], 16) % world_size


def select_shard(items: Iterable[Any], rank: int, world_size: int, key: Callable[[Any], str]):
    """The items that belong to ``rank`` of ``world_size``."""
    check_rank(rank, world_size)
    return [it for it in items if shard_of(key(it), world_size) == rank]


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise DsbuildError(f"--world-size must be at least 1 (got {world_size})")
    if not 0 <= rank < world_size:
        raise DsbuildError(f"--rank must be in 0..{world_size - 1} (got {rank})")


@dataclass
class StageResult:
    stage: str
    rank: int
    world_size: int
    skipped: bool
    records: int
    stats: dict = field(default_factory=dict)
    report: dict | None = None  # the stage's report over every rank, where it writes one


class Build:
    """A build directory and its frozen config."""

    def __init__(self, root: str | Path, config: BuildConfig):
        self.root = Path(root)
        self.config = config

    # ------------------------------------------------------------------ open / create
    @classmethod
    def init(cls, root: str | Path, recipe: Recipe, recipe_path: str | None = None,
             overrides: list[str] | tuple[str, ...] = (), exist_ok: bool = False) -> Build:
        root = Path(root)
        cfg_path = root / CONFIG_NAME
        if cfg_path.exists() and not exist_ok:
            raise DsbuildError(
                f"{cfg_path} already exists; use that build, or pass --force to overwrite its "
                "config (outputs whose settings changed are recomputed)"
            )
        config = BuildConfig(recipe=recipe, recipe_path=recipe_path)
        config = apply_overrides(config, overrides)
        # the few-shot examples must pass the captions validator: fail here, before any write
        from dsbuild.captions.validate import check_examples

        s = config.captions
        check_examples(recipe, recipe_path, s.max_changed_fraction, s.max_diff_spans)
        build = cls(root, config)
        root.mkdir(parents=True, exist_ok=True)
        build.save_config()
        return build

    @classmethod
    def open(cls, root: str | Path) -> Build:
        root = Path(root)
        cfg = root / CONFIG_NAME
        if not cfg.exists():
            raise DsbuildError(
                f"{root} is not a dsbuild build (no {CONFIG_NAME}); create one with "
                f"`dsbuild init {root} --recipe recipes/interior-design.yaml`"
            )
        return cls(root, load_build_config(cfg))

    def save_config(self) -> None:
        header = "# dsbuild build config (frozen). Secrets come from the environment, never here.\n"
        write_text(self.root / CONFIG_NAME, header + dump_config(self.config))

    def update(self, overrides: list[str] | tuple[str, ...]) -> None:
        """Apply ``stage.key=value`` overrides and save them into dsbuild.yaml."""
        if overrides:
            self.config = apply_overrides(self.config, overrides)
            self.save_config()

    # ------------------------------------------------------------------ paths
    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def recipe(self) -> Recipe:
        return self.config.recipe

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def images_dir(self) -> Path:
        return self.root / "pairs" / "img"

    @property
    def decisions_path(self) -> Path:
        return self.root / "decisions.jsonl"

    def output_dir(self, stage: str) -> Path:
        return self.root / STAGES[stage][0]

    def scored_pairs(self, kept_only: bool = False):
        """Yield (score, pair, triple) for every filter score (or only the kept ones): the join
        augment and export share, with a clear error where the stages' outputs disagree."""
        triples = {t["id"]: t for t in self.records("captions")}
        pairs = {p["id"]: p for p in self.records("generate")}
        for sc in self.records("filter"):
            if kept_only and not sc.get("keep"):
                continue
            pair = pairs.get(sc["pair_id"])
            if pair is None:
                raise DsbuildError(f"{self.root}: score for unknown pair {sc['pair_id']!r} "
                                   "(filter output does not match generate output); rerun "
                                   "`dsbuild filter`")
            triple = triples.get(pair["triple_id"])
            if triple is None:
                raise DsbuildError(f"{self.root}: pair {pair['id']} names unknown triple "
                                   f"{pair['triple_id']!r}; rerun `dsbuild generate`")
            yield sc, pair, triple

    # ------------------------------------------------------------------ signatures / markers
    def stage_settings(self, stage: str) -> dict:
        settings = getattr(self.config, stage).signature_dict()
        if stage in ("captions", "augment"):
            settings = {"settings": settings, "recipe": self.recipe.model_dump(mode="json")}
        if stage == "augment":  # it places samples by the export's split, so it follows it
            e = self.config.export
            settings["split"] = {"seed": e.seed, "test_ratio": e.test_ratio}
        return settings

    def signature(self, stage: str) -> str:
        upstream = {u: self.signature(u) for u in STAGES[stage][1]}
        return signature({"stage": stage, "settings": self.stage_settings(stage), "up": upstream})

    def marker_dir(self, stage: str) -> Path:
        return self.root / ".done" / stage / self.signature(stage)

    def markers(self, stage: str) -> dict[int, dict]:
        """Completed ranks of a stage under its current signature: rank -> marker content."""
        d = self.marker_dir(stage)
        out: dict[int, dict] = {}
        if d.is_dir():
            for f in d.glob("r[0-9]*"):
                try:
                    out[int(f.name[1:])] = json.loads(f.read_text() or "{}")
                except (ValueError, json.JSONDecodeError):
                    continue
        return out

    def stage_world_size(self, stage: str) -> int | None:
        ws = {m.get("world_size") for m in self.markers(stage).values()}
        ws.discard(None)
        return max(ws) if ws else None

    def is_complete(self, stage: str) -> bool:
        marks = self.markers(stage)
        ws = self.stage_world_size(stage)
        return ws is not None and set(range(ws)) <= set(marks)

    def require_complete(self, stage: str) -> None:
        """Raise a clear error when an upstream stage has not finished under its settings."""
        if self.is_complete(stage):
            return
        marks = self.markers(stage)
        ws = self.stage_world_size(stage)
        if ws is None:
            raise DsbuildError(
                f"stage '{stage}' has no finished output for the current settings in {self.root}; "
                f"run `dsbuild {stage} {self.root}` first"
            )
        missing = sorted(set(range(ws)) - set(marks))
        raise DsbuildError(
            f"stage '{stage}' is incomplete in {self.root}: ranks {missing} of world size {ws} "
            f"are not done; run `dsbuild {stage} {self.root} --rank R --world-size {ws}` for them"
        )

    def records(self, stage: str, *, require: bool = True) -> Iterator[dict]:
        """Records of a stage's committed shards (all ranks of its current signature)."""
        if require:
            self.require_complete(stage)
        marks = self.markers(stage)
        out_dir = self.output_dir(stage)
        for rank in sorted(marks):
            f = out_dir / shard_name(rank)
            if f.exists():
                yield from read_jsonl(f)

    def run_stage(self, stage: str, rank: int, world_size: int,
                  work: Callable[[ShardWriter], dict | None], *, force: bool = False,
                  key: str = "id") -> StageResult:
        """Run one rank of a stage: skip if done, else resume its partial shard, commit, mark.

        ``work(writer)`` writes records with ``writer.write`` (skipping keys in
        ``writer.done``) and may return stats that go into the completion marker.
        """
        check_rank(rank, world_size)
        for up in STAGES[stage][1]:
            self.require_complete(up)
        mdir = self.marker_dir(stage)
        marks = self.markers(stage)
        prev_ws = self.stage_world_size(stage)
        if prev_ws is not None and prev_ws != world_size and not force:
            raise DsbuildError(
                f"stage '{stage}' already ran with --world-size {prev_ws} for these settings; "
                f"use --world-size {prev_ws}, or --force to start the stage over"
            )
        if force:
            shutil.rmtree(mdir, ignore_errors=True)
            marks = {}
        if rank in marks:
            m = marks[rank]
            return StageResult(stage, rank, world_size, True, m.get("records", 0),
                               m.get("stats", {}))
        out = self.output_dir(stage) / shard_name(rank)
        sig = self.signature(stage)
        sig_file = out.with_name(out.name + ".partial.sig")
        fresh = force or not sig_file.exists() or sig_file.read_text().strip() != sig
        out.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(out, key=key, fresh=fresh) as writer:
            write_text(sig_file, sig)
            stats = work(writer) or {}
            n = writer.commit()
        sig_file.unlink(missing_ok=True)
        mdir.mkdir(parents=True, exist_ok=True)
        write_json(mdir / f"r{rank:05d}", {
            "world_size": world_size, "records": n, "stats": stats,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        return StageResult(stage, rank, world_size, False, n, stats)

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        """Per stage: signature, world size, done ranks, records; plus decisions and reports."""
        out: dict[str, Any] = {"build": str(self.root), "recipe": self.recipe.name, "stages": {}}
        for stage in STAGES:
            marks = self.markers(stage)
            ws = self.stage_world_size(stage)
            stale = [p.name for p in (self.root / ".done" / stage).glob("*")
                     if p.is_dir() and p.name != self.signature(stage)]
            partial = sorted(p.name for p in self.output_dir(stage).glob("r*.jsonl.partial"))
            out["stages"][stage] = {
                "signature": self.signature(stage),
                "world_size": ws,
                "done_ranks": sorted(marks),
                "missing_ranks": sorted(set(range(ws)) - set(marks)) if ws else [],
                "complete": self.is_complete(stage),
                "records": sum(m.get("records", 0) for m in marks.values()),
                "in_progress": partial,
                "stale_signatures": stale,
            }
        from dsbuild.decisions import WITHDRAWN, current_by_tool

        dec = self.decisions_path
        verdicts: dict[str, int] = {}
        if dec.exists():
            for (_, tool), d in current_by_tool(read_jsonl(dec, strict=False)).items():
                if d.get("verdict") != WITHDRAWN:
                    k = f"{tool or '?'}:{d.get('verdict', '?')}"
                    verdicts[k] = verdicts.get(k, 0) + 1
        out["decisions"] = verdicts  # pairs per tool and verdict, counting the decision in force
        out["reports"] = sorted(p.name for p in self.reports_dir.glob("*")) \
            if self.reports_dir.exists() else []
        return out
