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

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsbuild.core import deps, locks, stages
from dsbuild.core.config import (
    BuildConfig,
    Recipe,
    apply_overrides,
    config_changes,
    dump_config,
    load_build_config,
)
from dsbuild.core.errors import DsbuildError, RecordError
from dsbuild.core.hashing import signature
from dsbuild.core.records import (
    ShardWriter,
    count_lines,
    read_jsonl,
    shard_name,
    shard_problem,
    write_json,
    write_jsonl,
    write_text,
)

CONFIG_NAME = "dsbuild.yaml"
WORKER_ENV = "DSBUILD_WORKER"  # set by an executor in its workers; recorded in each marker


def worker_info() -> dict:
    """Who wrote a rank (for ``dsbuild status``): the executor's worker id, host and PID."""
    return {"id": os.environ.get(WORKER_ENV, "main"), "host": socket.gethostname(),
            "pid": os.getpid()}


def shard_of(key: str, world_size: int) -> int:
    """Deterministic shard of a record key (stable when other records come and go)."""
    if world_size == 1:
        return 0
    return int(hashlib.sha256(str(key).encode()).hexdigest()[:8], 16) % world_size


def select_shard(items: Iterable[Any], rank: int, world_size: int, key: Callable[[Any], str]):
    """The items that belong to ``rank`` of ``world_size``."""
    check_rank(rank, world_size)
    return [it for it in items if shard_of(key(it), world_size) == rank]


def shard_sizes(items: Iterable[Any], world_size: int, key: Callable[[Any], str],
                weight: Callable[[Any], int] = lambda _: 1) -> list[int]:
    """Per rank of ``world_size``, the summed ``weight`` of the items :func:`select_shard`
    gives it (a stage's ``expected`` records per shard), in one pass."""
    sizes = [0] * world_size
    for it in items:
        sizes[shard_of(key(it), world_size)] += weight(it)
    return sizes


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


ConfigCheck = Callable[[BuildConfig | None, BuildConfig], None]


def _check_config(old: BuildConfig | None, new: BuildConfig, check: ConfigCheck | None) -> None:
    """Every stage's ``check`` of ``new`` (e.g. few-shot examples the validator refuses), then
    the caller's ``check(old, new)``; either raises to keep ``new`` unsaved."""
    for stage in stages.all_stages():
        if stage.check:
            deps.load_target(stage.check, f"stage {stage.name}")(new)
    if check is not None:
        check(old, new)


def _sig_file(shard: Path) -> Path:
    """The signature a rank's partial shard was started under."""
    return shard.with_name(shard.name + ".partial.sig")


def _pending(shard: Path) -> Path:
    """What a commit produced (signature, sharding, records, stats), until the marker is
    written."""
    return shard.with_name(shard.name + ".commit.json")


_RANK_FILE = re.compile(r"^\.?r(\d{5})\.jsonl")  # a rank's shard, partial, side or temp file


def _recorded(f: Path) -> dict:
    """The signature and sharding (world_size, key) a partial shard or a commit was made
    under; {} when unknown. Older builds' ``.partial.sig`` holds only the signature."""
    try:
        raw = f.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return {}
    try:
        got = json.loads(raw)
    except json.JSONDecodeError:
        got = None
    return got if isinstance(got, dict) else {"signature": raw}


def _fits(recorded: dict, rank: int, world_size: int, key: str) -> bool:
    """Whether records written for ``rank`` under the ``recorded`` sharding all belong to
    ``rank`` of this one: the same sharding, or one rank now (it owns every record)."""
    return (rank < world_size and recorded.get("key", key) == key
            and (recorded.get("world_size") == world_size or world_size == 1))


class Build:
    """A build directory and its frozen config."""

    def __init__(self, root: str | Path, config: BuildConfig):
        self.root = Path(root)
        self.config = config

    # ------------------------------------------------------------------ open / create
    @classmethod
    def init(cls, root: str | Path, recipe: Recipe, recipe_path: str | None = None,
             overrides: list[str] | tuple[str, ...] = (), exist_ok: bool = False,
             check: ConfigCheck | None = None) -> Build:
        """Create ROOT with its frozen config; ``check(defaults, config)`` (e.g. that the
        models the overrides name load) runs before anything is written."""
        root = Path(root)
        cfg_path = root / CONFIG_NAME
        if cfg_path.exists() and not exist_ok:
            raise DsbuildError(
                f"{cfg_path} already exists; use that build, or pass --force to overwrite its "
                "config (outputs whose settings changed are recomputed)"
            )
        defaults = BuildConfig(recipe=recipe, recipe_path=recipe_path)
        config = apply_overrides(defaults, [*recipe.setting_overrides(), *overrides])
        _check_config(defaults, config, check)
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

    def update(self, overrides: list[str] | tuple[str, ...],
               check: ConfigCheck | None = None) -> list[tuple[str, Any, Any]]:
        """Apply ``stage.key=value`` overrides and save them into dsbuild.yaml, only once
        they validate, every stage's ``check`` accepts them and ``check(old, new)`` does (e.g.
        that the models they name load); on any error the file is left as it was. Returns
        the settings changed (:func:`dsbuild.core.config.config_changes`)."""
        config = apply_overrides(self.config, overrides)
        changes = config_changes(self.config, config)
        if changes:
            _check_config(self.config, config, check)
            self.config = config
            self.save_config()
        return changes

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
        """Where a stage writes: the folder of its rNNNNN.jsonl shards, or its file/folder."""
        return self.root / stages.get(stage).output

    def _output_exists(self, stage: stages.Stage, rank: int) -> bool:
        out = self.root / stage.output
        return (out / shard_name(rank)).exists() if stage.records else out.exists()

    # ------------------------------------------------------------------ signatures / markers
    def signed_input(self, name: str):
        """A build input a stage signs besides its settings (see ``stages.SIGNABLE``)."""
        if name == "recipe":
            return self.recipe.signed()
        if name == "decisions":
            f = self.decisions_path
            return hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else None
        if "." in name:  # one setting of another section ("generate.height")
            section, key = name.split(".", 1)
            return getattr(self.config.stage_settings(section), key)
        return getattr(self.config, name).signature_dict()

    def is_active(self, stage: str) -> bool:
        """Whether this build runs ``stage`` (an optional stage, e.g. sources, may be off)."""
        return stages.get(stage).is_active(self.config)

    def active_uses(self, stage: str) -> tuple[str, ...]:
        """The optional inputs of ``stage`` this build has: those of its ``uses`` that are not
        off (a stage that is off is not signed, so builds without it keep their signatures)."""
        return tuple(u for u in stages.get(stage).uses if self.is_active(u))

    def required(self, stage: str) -> tuple[str, ...]:
        """What must be complete before ``stage`` runs: its upstream stages and the stages it
        uses that declare ``active`` and are on for this build (sources with photos)."""
        return (*stages.get(stage).upstream,
                *(u for u in self.active_uses(stage) if stages.get(u).active))

    def stage_settings(self, stage: str) -> dict:
        """What a stage's signature covers besides its upstream stages."""
        st = stages.get(stage)
        settings = self.config.stage_settings(stage).signature_dict()
        if st.signs:
            settings = {"settings": settings, **{k: self.signed_input(k) for k in st.signs}}
        return settings

    def signature(self, stage: str) -> str:
        """Hash of a stage's settings, signed inputs and upstream signatures: it names the
        marker folder, so changing any of them reruns this stage and what reads it."""
        st = stages.get(stage)
        parts = {"stage": stage, "settings": self.stage_settings(stage),
                 "up": {u: self.signature(u) for u in st.upstream}}
        if st.fingerprint:  # inputs from outside the build (declared by the stage)
            parts["input"] = deps.load_target(st.fingerprint, f"stage {stage}")(self)
        uses = self.active_uses(stage)
        if uses:  # optional inputs: signed as they are when this stage runs (off: not at all)
            parts["uses"] = {u: self.signature(u) if self.is_complete(u) else None
                             for u in uses}
        return signature(parts)

    def marker_dir(self, stage: str) -> Path:
        return self.root / ".done" / stage / self.signature(stage)

    def markers(self, stage: str) -> dict[int, dict]:
        """Completed ranks of a stage under its current signature: rank -> marker content.
        A marker whose output was deleted does not count (that rank runs again)."""
        st = stages.get(stage)
        d = self.marker_dir(stage)
        out: dict[int, dict] = {}
        if d.is_dir():
            for f in d.glob("r[0-9]*"):
                try:
                    rank = int(f.name[1:])
                    mark = json.loads(f.read_text() or "{}")
                except (ValueError, json.JSONDecodeError):
                    continue
                if self._output_exists(st, rank):
                    out[rank] = mark
        return out

    def stale_output(self, stage: str) -> dict | None:
        """What an earlier run under other settings or inputs left on disk, when the current
        signature has no output: the newest older signature whose marked outputs are still
        there, with their record count and command to refresh it; None when there is none."""
        st, sig, best = stages.get(stage), self.signature(stage), None
        for d in (self.root / ".done" / stage).glob("*"):
            if not d.is_dir() or d.name == sig:
                continue
            marks = []
            for f in d.glob("r[0-9]*"):
                try:
                    rank, mark = int(f.name[1:]), json.loads(f.read_text() or "{}")
                except (ValueError, json.JSONDecodeError, OSError):
                    continue
                if self._output_exists(st, rank):
                    marks.append(mark)
            when = max((m.get("finished_at") or "" for m in marks), default=None)
            if marks and (best is None or when > best["finished_at"]):
                best = {"signature": d.name, "records": sum(m.get("records", 0) for m in marks),
                        "ranks": len(marks), "finished_at": when,
                        "refresh": self.command_of(stage)}
        return best

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
                f"run `{self.command_of(stage)}` first"
            )
        missing = sorted(set(range(ws)) - set(marks))
        raise DsbuildError(
            f"stage '{stage}' is incomplete in {self.root}: ranks {missing} of world size {ws} "
            f"are not done; run `dsbuild {stage} {self.root} --rank R --world-size {ws}` for them"
        )

    def invalidate(self, stage: str) -> None:
        """Forget a stage's completion (its output was replaced by something else)."""
        shutil.rmtree(self.root / ".done" / stage, ignore_errors=True)

    def command_of(self, stage: str) -> str:
        """The shell command that runs a stage on this build."""
        st = stages.get(stage)
        if st.command_name and st.command_name != st.name:
            return f"dsbuild run {self.root} --until {stage}"
        return f"dsbuild {stage} {self.root}"

    def records(self, stage: str, *, require: bool = True) -> Iterator[dict]:
        """Records of a stage's committed shards (all ranks of its current signature)."""
        if not stages.get(stage).records:
            raise DsbuildError(f"stage '{stage}' writes files, not records")
        if require:
            self.require_complete(stage)
        marks = self.markers(stage)
        out_dir = self.output_dir(stage)
        for rank in sorted(marks):
            f = out_dir / shard_name(rank)
            n = 0
            try:
                for rec in read_jsonl(f):
                    n += 1
                    yield rec
            except RecordError as exc:
                raise RecordError(exc.path, exc.line, f"{exc.msg}; "
                                  f"{self._repair_hint(stage, rank)}") from None
            expected = marks[rank].get("records")
            if expected is not None and n != expected:
                raise DsbuildError(f"{f}: holds {n} records but its completion marker says "
                                   f"{expected}; {self._repair_hint(stage, rank)}")

    def _repair_hint(self, stage: str, rank: int) -> str:
        ws = self.stage_world_size(stage) or 1
        return (f"repair it with `dsbuild repair {self.root} {stage}` (keeps the intact "
                f"records, then `{self.command_of(stage)}` redoes the rest), or rerun the rank "
                f"with `{self.command_of(stage)} --rank {rank} --world-size {ws} --force`")

    def lock_path(self, stage: str, rank: int) -> Path:
        return self.root / ".locks" / f"{stage}.r{rank:05d}.lock"

    def run_stage(self, stage: str, rank: int, world_size: int,
                  work: Callable[[ShardWriter | None], dict | None], *, force: bool = False,
                  report: bool = True) -> StageResult:
        """Run one rank of a stage: skip if done, else resume its partial shard, commit, mark.

        Record stages: ``work(writer)`` writes records with ``writer.write`` (skipping keys in
        ``writer.done``). File stages (``records=False``): ``work(None)`` writes the stage's
        output atomically itself. Either may return stats that go into the completion marker
        (a file stage's ``stats["records"]`` is its record count). The marker is written last.
        One process at a time holds the rank (``dsbuild.core.locks``); a second one stops with who
        is writing, or waits with ``--wait``. Once every rank is done, the stage's declared
        ``report`` is written (``report=False``: not by this call).
        """
        st = stages.get(stage)
        if not st.sharded and (rank, world_size) != (0, 1):
            raise DsbuildError(f"stage '{stage}' does not shard: run it without --rank/"
                               "--world-size")
        check_rank(rank, world_size)
        if not self.is_active(stage):
            raise DsbuildError(f"stage '{stage}' is off in {self.root} (no setting turns it "
                               f"on); see `dsbuild {st.cli_name} --help`")
        for up in self.required(stage):
            self.require_complete(up)
        what = f"rank {rank} of {stage} in {self.root}" if st.sharded else \
            f"{stage} of {self.root}"
        with self._sharding(st, rank, world_size, what, force):
            result = self._run_locked(st, rank, world_size, work, force)
        if report and st.report and (st.report_each_rank or self.is_complete(stage)):
            result.report = deps.load_target(st.report, what=f"stage {stage}")(self)
        return result

    def _rank_mutex(self, stage: str) -> Path:
        """Held briefly by whoever takes one of the stage's rank locks (see ``_sharding``)."""
        return self.root / ".locks" / f"{stage}.sharding.lock"

    def sharding_lock(self, stage: str, world_size: int) -> Path:
        """Held shared by every running rank of ``stage`` sharded ``world_size`` ways."""
        return self.root / ".locks" / f"{stage}.ws{world_size}.lock"

    @contextlib.contextmanager
    def _sharding(self, st: stages.Stage, rank: int, world_size: int, what: str,
                  force: bool) -> Iterator[None]:
        """Hold the rank's lock and, shared with its other ranks, the sharding's. While
        another sharding of the stage runs this one is refused, naming it (or waits, with
        --wait): rank locks of two shardings cannot see each other. Both locks are taken under
        the stage's brief mutex, so a rank lock found free there stays free while ``_claim``
        tidies that rank's files."""
        stage = st.name
        said = False
        with contextlib.ExitStack() as held:
            while True:
                with locks.exclusive(self._rank_mutex(stage)):
                    other = self._other_sharding(stage, world_size)
                    if other is None:
                        held.enter_context(locks.shared(self.sharding_lock(stage, world_size)))
                        held.enter_context(locks.hold(self.lock_path(stage, rank), what))
                        self._claim(st, rank, world_size, force)
                        break
                ws, who = other
                msg = (f"{stage} of {self.root} is running sharded {ws} way{'s' * (ws != 1)} "
                       f"(--world-size {ws}) by {who}; two shardings of one stage cannot run at "
                       f"once: wait for it to finish (or rerun with --wait), or run "
                       f"--world-size {ws}")
                if not locks.waits():
                    raise locks.Busy(msg)
                if not said:
                    print(f"waiting: {msg}", file=sys.stderr)
                    said = True
                locks.wait_free(self.sharding_lock(stage, ws))
            yield

    def _other_sharding(self, stage: str, world_size: int) -> tuple[int, str] | None:
        """(world size, who) of another sharding of ``stage`` running now, or None."""
        for lock in sorted((self.root / ".locks").glob(f"{stage}.ws*.lock")):
            ws = lock.name[len(stage) + 3:-len(".lock")]
            if ws.isdigit() and int(ws) != world_size and locks.busy(lock):
                who = next((f"rank {r}: {locks.describe(h)}" for r in range(int(ws))
                            if (h := locks.holder(self.lock_path(stage, r)))), "another process")
                return int(ws), who
        return None

    def _claim(self, st: stages.Stage, rank: int, world_size: int, force: bool) -> None:
        """Make the stage's files this sharding's, while no other sharding runs: markers of
        another world size refuse (or, with --force, are dropped), and what earlier runs left
        in the shard folder is tidied (``_tidy_rank``)."""
        prev_ws = self.stage_world_size(st.name)
        if prev_ws is not None and prev_ws != world_size:
            if not force:
                raise DsbuildError(
                    f"stage '{st.name}' already ran with --world-size {prev_ws} for these "
                    f"settings; use --world-size {prev_ws}, or --force to start the stage over")
            shutil.rmtree(self.marker_dir(st.name), ignore_errors=True)  # start it over
        out_dir = self.output_dir(st.name)
        if not st.records or not out_dir.is_dir():
            return
        ranks = sorted({int(m.group(1)) for p in out_dir.iterdir()
                        if (m := _RANK_FILE.match(p.name))})
        marks, sig = self.markers(st.name), self.signature(st.name)
        for k in ranks:  # a rank another process holds is left to it
            if k == rank or not locks.busy(self.lock_path(st.name, k)):
                self._tidy_rank(st, sig, k, world_size, k in marks, ranks)

    def _tidy_rank(self, st: stages.Stage, sig: str, k: int, world_size: int, done: bool,
                   ranks: list[int]) -> None:
        """Clean rank ``k``'s commit-point litter (temp files, a finished rank's commit note and
        signature file, a note or a partial of older settings no rank resumes) and hand on
        what another sharding left: a partial, or a commit without its marker, is kept where
        its records all belong to rank ``k`` now (``_fits``), else set aside, never resumed
        whole."""
        shard = self.output_dir(st.name) / shard_name(k)
        partial = shard.with_name(shard.name + ".partial")
        sig_file, pending = _sig_file(shard), _pending(shard)
        for tmp in (*shard.parent.glob(f".{shard.name}*.tmp"),
                    *self.marker_dir(st.name).glob(f".r{k:05d}.*.tmp")):
            tmp.unlink(missing_ok=True)  # an atomic write a kill cut short
        if done:  # killed after the marker, before its side files went
            for f in (pending, sig_file):
                f.unlink(missing_ok=True)
            return
        note = _recorded(pending) if shard.exists() else {}
        if pending.exists() and note.get("signature") != sig:
            pending.unlink()  # older settings' commit (its shard stays for their markers)
        elif note:
            legacy = "world_size" not in note and world_size == 1 and ranks == [0]
            if not (note.get("world_size") == world_size or legacy) \
                    or note.get("key", st.key) != st.key:
                if _fits(note, k, world_size, st.key) and not partial.exists():
                    os.replace(shard, partial)  # rank k resumes from its records
                    write_json(sig_file, {"signature": sig, "world_size": world_size,
                                          "key": st.key})
                else:
                    self._set_aside(st, shard, note)
                pending.unlink()
        if not partial.exists():
            sig_file.unlink(missing_ok=True)
            return
        started = _recorded(sig_file)
        if started.get("signature") != sig:
            if k >= world_size:  # no rank of this sharding would start it afresh
                partial.unlink()
                sig_file.unlink(missing_ok=True)
        elif not _fits(started, k, world_size, st.key):
            self._set_aside(st, partial, started)
            sig_file.unlink()

    def _set_aside(self, st: stages.Stage, path: Path, recorded: dict) -> None:
        """Move a shard written under another sharding into ``<output>/set-aside/`` and say so:
        its records are redone by the ranks that own them now."""
        folder = path.parent / "set-aside"
        folder.mkdir(exist_ok=True)
        stem = f"{path.name.split('.')[0]}-ws{recorded.get('world_size', 'unknown')}-" \
               f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        dest, n = folder / f"{stem}.jsonl", 1
        while dest.exists():
            dest, n = folder / f"{stem}-{n}.jsonl", n + 1
        os.replace(path, dest)
        print(f"note: {path} was written under another sharding of {st.name} (world size "
              f"{recorded.get('world_size', 'unknown')}); its {count_lines(dest)} records are "
              f"set aside in {dest} and redone by the ranks that own them now", file=sys.stderr)

    def _run_locked(self, st: stages.Stage, rank: int, world_size: int,
                    work: Callable[[ShardWriter | None], dict | None], force: bool
                    ) -> StageResult:
        stage = st.name
        mdir = self.marker_dir(stage)
        marks = self.markers(stage)
        marker = mdir / f"r{rank:05d}"
        if force:  # a file stage replaces its output atomically: its marker stays till then
            if st.records:
                marker.unlink(missing_ok=True)
            marks.pop(rank, None)
        if rank in marks:
            m = marks[rank]
            return StageResult(stage, rank, world_size, True, m.get("records", 0),
                               m.get("stats", {}))
        committed = None if force or not st.records else \
            self._committed_unmarked(st, rank, world_size)
        if committed is not None:  # killed between the shard's commit and its marker
            stats, n = committed
        elif st.records:
            stats, n = self._write_shard(st, rank, world_size, force, work)
        else:
            stats = work(None) or {}
            n = int(stats.get("records", 0))
        mdir.mkdir(parents=True, exist_ok=True)
        write_json(marker, {
            "world_size": world_size, "records": n, "stats": stats, "worker": worker_info(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        if st.records:
            out = self.output_dir(stage) / shard_name(rank)
            for f in (_pending(out), _sig_file(out)):
                f.unlink(missing_ok=True)
        return StageResult(stage, rank, world_size, False, n, stats)

    def _committed_unmarked(self, st: stages.Stage, rank: int, world_size: int
                            ) -> tuple[dict, int] | None:
        """(stats, records) of a shard committed under the current signature and sharding
        whose marker was never written, once the shard checks out against what the commit
        recorded (a commit of another sharding was handed on by ``_claim``)."""
        out = self.output_dir(st.name) / shard_name(rank)
        info = _recorded(_pending(out)) if out.exists() else {}
        if info.get("signature") != self.signature(st.name) or "records" not in info:
            return None
        if info.get("world_size", world_size) != world_size:
            return None
        if shard_problem(out, info.get("records")) is not None:
            return None
        return info.get("stats", {}), int(info["records"])

    def _write_shard(self, st: stages.Stage, rank: int, world_size: int, force: bool,
                     work: Callable[[ShardWriter | None], dict | None]) -> tuple[dict, int]:
        """Resume (or start) the rank's partial shard, run ``work`` on it, commit it. The
        partial is signed with the signature and the sharding (world size, key) it is written
        under; what the commit produced is noted beside the shard first, so a kill before the
        marker costs a check, not a rerun."""
        out = self.output_dir(st.name) / shard_name(rank)
        sig = self.signature(st.name)
        sig_file = _sig_file(out)
        fresh = force or _recorded(sig_file).get("signature") != sig  # else _claim kept it
        sharding = {"signature": sig, "world_size": world_size, "key": st.key}
        out.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(out, key=st.key, fresh=fresh) as writer:
            write_json(sig_file, sharding)
            stats = work(writer) or {}
            n = len(writer.records)
            write_json(_pending(out), {**sharding, "records": n, "stats": stats})
            writer.commit()
        return stats, n

    # ------------------------------------------------------------------ repair
    def shard_problems(self, stage: str, *, parse: bool = True) -> dict[int, str]:
        """Done ranks whose committed shard does not match its marker (torn or bad lines, a
        different record count): rank -> what is wrong. ``parse=False`` counts lines and
        checks the last one without decoding records (what ``status`` can afford)."""
        if not stages.get(stage).records:
            return {}
        out_dir = self.output_dir(stage)
        problems = {}
        for rank, m in self.markers(stage).items():
            why = shard_problem(out_dir / shard_name(rank), m.get("records"), parse=parse)
            if why:
                problems[rank] = why
        return problems

    def repair(self, stage: str, ranks: list[int] | None = None) -> dict[int, dict]:
        """Turn damaged committed shards back into partial ones: their intact records are kept
        as the rank's partial shard and the marker is removed, so the next run of the stage
        redoes only what was lost. A record is intact when its line parses and, where the
        stage declares a ``verify`` check (generate: both images decode), the check passes.
        Returns rank -> {kept, dropped, why} for the ranks it changed."""
        st = stages.get(stage)
        if not st.records:
            raise DsbuildError(f"stage '{stage}' writes files, not shards: rerun it with "
                               f"`{self.command_of(stage)}` (add --force to rewrite it)")
        verify = deps.load_target(st.verify) if st.verify else None
        problems = self.shard_problems(stage)
        marks = self.markers(stage)
        todo = sorted(set(marks) | set(problems)) if ranks is None else sorted(ranks)
        out_dir = self.output_dir(stage)
        sig = self.signature(stage)
        done: dict[int, dict] = {}
        for rank in todo:
            with contextlib.ExitStack() as held:
                with locks.exclusive(self._rank_mutex(stage)):  # as ``_sharding`` takes it
                    held.enter_context(locks.hold(self.lock_path(stage, rank),
                                                  f"rank {rank} of {stage}"))
                shard = out_dir / shard_name(rank)
                kept, dropped, reasons = [], 0, []
                if shard.exists():
                    with open(shard, "rb") as fh:
                        for line in fh:
                            try:
                                rec = json.loads(line) if line.endswith(b"\n") else None
                            except (json.JSONDecodeError, UnicodeDecodeError):
                                rec = None
                            why = None if isinstance(rec, dict) else "bad line"
                            if why is None and verify is not None:
                                why = verify(self, rec)
                            if why is None:
                                kept.append(rec)
                            elif line.strip():
                                dropped += 1
                                reasons.append(why)
                if rank not in problems and not dropped and ranks is None:
                    continue  # intact
                partial = shard.with_name(shard.name + ".partial")
                write_jsonl(partial, kept)
                ws = marks.get(rank, {}).get("world_size") or self.stage_world_size(stage) or 1
                write_json(_sig_file(shard), {"signature": sig, "world_size": ws, "key": st.key})
                (self.marker_dir(stage) / f"r{rank:05d}").unlink(missing_ok=True)
                _pending(shard).unlink(missing_ok=True)
                shard.unlink(missing_ok=True)
                why = problems.get(rank) or (reasons[0] if reasons else "asked to")
                done[rank] = {"kept": len(kept), "dropped": dropped, "why": why}
        return done

    # ------------------------------------------------------------------ status
    def _committed_ranks(self, st: stages.Stage, sig: str, marks: dict) -> list[int]:
        """Ranks killed between commit and marker: their shard and commit note under the
        current signature are there, so the next run only checks and marks them."""
        out_dir = self.output_dir(st.name)
        if not st.records or not out_dir.is_dir():
            return []
        return sorted(int(p.name[1:6]) for p in out_dir.glob("r[0-9]*.jsonl.commit.json")
                      if int(p.name[1:6]) not in marks
                      and (out_dir / p.name[:-len(".commit.json")]).exists()
                      and _recorded(p).get("signature") == sig)

    def status(self) -> dict:
        """Per stage: signature, world size, done ranks, records; plus decisions and reports."""
        out: dict[str, Any] = {"build": str(self.root), "recipe": self.recipe.name, "stages": {}}
        for st in stages.all_stages():
            stage = st.name
            marks = self.markers(stage)
            ws = self.stage_world_size(stage)
            sig = self.signature(stage)
            stale = [p.name for p in (self.root / ".done" / stage).glob("*")
                     if p.is_dir() and p.name != sig]
            partial = sorted(p.name for p in self.output_dir(stage).glob("r*.jsonl.partial")) \
                if st.records and self.output_dir(stage).is_dir() else []
            committed = self._committed_ranks(st, sig, marks)
            damaged = self.shard_problems(stage, parse=False)
            out["stages"][stage] = {
                "active": self.is_active(stage),
                "damaged": {str(r): why for r, why in damaged.items()},
                "signature": sig,
                "output": st.output,
                "sharded": st.sharded,
                "world_size": ws,
                "done_ranks": sorted(marks),
                "missing_ranks": sorted(set(range(ws)) - set(marks)) if ws else [],
                "complete": self.is_complete(stage) and not damaged,
                "records": sum(m.get("records", 0) for m in marks.values()),
                "workers": _shards_per_worker(marks),
                "in_progress": partial,
                "committed": committed,
                "stale_signatures": stale,
                "stale": None if marks else self.stale_output(stage),
            }
        from dsbuild.core.decisions import summary

        dec = self.decisions_path
        decided = summary(read_jsonl(dec, strict=False) if dec.exists() else [])
        out["decisions"] = decided["verdicts"]  # pairs per tool and verdict in force
        out["agreement"] = decided["agreement"]  # per tool, between reviewers of one pair
        out["reports"] = sorted(p.name for p in self.reports_dir.glob("*")) \
            if self.reports_dir.exists() else []
        return out


def _shards_per_worker(marks: dict[int, dict]) -> dict[str, int]:
    """Done shards per worker that wrote them ("<id>@<host>"; "?" for older markers)."""
    out: dict[str, int] = {}
    for m in marks.values():
        w = m.get("worker") or {}
        key = f"{w.get('id', '?')}@{w.get('host', '?')}" if w else "?"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))
