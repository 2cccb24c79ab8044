"""The filter stage: score every pair with CLIP (and DINOv2), apply thresholds, keep top k.

InstructPix2Pix's rule (``dataset_creation/generate_img_dataset.py``): a pair passes when
clip_sim_image ≥ 0.7, clip_sim_dir ≥ 0.2, clip_sim_0 ≥ 0.2 and clip_sim_1 ≥ 0.2; of the pairs
of one caption triple that pass, the k (default 4) with the highest clip_sim_dir are kept.
Top-k needs all of a triple's pairs, so ranks shard by ``triple_id`` (a session's pairs by
``session_id``: top-k counts a session's runs, :func:`decide_session`). Work is resumable per
pair: a triple interrupted half-way is finished by re-ranking its written scores together with
the ones still missing (rounded scores make the re-ranking identical). A rank that keeps no
pair fails (exit 1, no marker, its report written) when that leaves the stage nothing to pass
on (``refuse_empty``).

The keep/rank rules import without torch; the encoders (torch, open_clip, transformers) are
imported when there are pairs to score, and ``run_filter`` checks first that they are installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dsbuild.core import join
from dsbuild.core.build import Build, StageResult, select_shard, shard_sizes
from dsbuild.core.deps import check
from dsbuild.core.errors import StageFailed
from dsbuild.core.progress import progress
from dsbuild.filter import STAGE
from dsbuild.filter.settings import THRESHOLDS, FilterSettings

if TYPE_CHECKING:
    import torch

DIGITS = 6


def _round(x: float) -> float:
    return round(float(x), DIGITS)


@dataclass
class Scorer:
    """CLIP (+ optional DINOv2) encoders with caches: each caption and image encoded once."""

    clip: object
    dino: object | None = None
    batch_size: int = 32
    workers: int = 4
    text_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        from dsbuild.models import ImageEmbedder

        encs = {"clip": self.clip} | ({"dino": self.dino} if self.dino is not None else {})
        self.images = ImageEmbedder(encs, batch_size=self.batch_size, workers=self.workers)

    @classmethod
    def from_settings(cls, s: FilterSettings, quiet: bool = False) -> Scorer:
        """Load the encoders named in the filter settings."""
        from dsbuild.models import ClipEncoder, DinoEncoder

        clip = ClipEncoder.load(s.clip_model, s.clip_pretrained, s.device, s.dtype, quiet=quiet,
                                preprocess=s.clip_preprocess)
        dino = DinoEncoder.load(s.dino_model, s.device, s.dtype, quiet=quiet) if s.dino else None
        return cls(clip, dino, batch_size=s.batch_size, workers=s.workers)

    def texts(self, captions: Iterable[str]) -> dict[str, torch.Tensor]:
        """Normalised CLIP text embeddings, encoding only captions not seen before."""
        captions = list(dict.fromkeys(captions))
        if len(self.text_cache) > 100_000:  # bound memory; clear before finding what is new
            self.text_cache.clear()
        new = [c for c in captions if c not in self.text_cache]
        if new:
            embs = self.clip.encode_text(new, batch_size=max(self.batch_size, 64))
            for c, e in zip(new, embs, strict=True):
                self.text_cache[c] = e.clone()
        return {c: self.text_cache[c] for c in captions}

    def score(self, pairs: list[dict], triples: dict[str, dict], root: Path) -> dict[str, dict]:
        """Raw scores (no keep/rank yet) per pair id; unusable images give an ``error``."""
        import torch

        from dsbuild.core import metrics

        paths = {}
        for p in pairs:
            for side in ("input", "output"):
                rel = p["images"][side]
                paths[rel] = root / rel
        embs, errors = self.images.embed(list(paths.values()))
        texts = self.texts(c for p in pairs for c in (triples[p["triple_id"]]["input"],
                                                      triples[p["triple_id"]]["output"]))
        out: dict[str, dict] = {}
        good: list[dict] = []
        for p in pairs:
            rec = {"pair_id": p["id"], "triple_id": p["triple_id"]}
            for side in ("input", "output"):
                rel = p["images"][side]
                err = errors.get(paths[rel])
                if err:
                    kind, detail = err
                    rec["error"] = f"{kind}: {rel}" + (f" ({detail})" if detail else "")
                    if self.dino is not None:
                        rec["dino"] = None
                    break
            out[p["id"]] = rec
            if "error" not in rec:
                good.append(p)
        if good:
            e0 = [embs[paths[p["images"]["input"]]] for p in good]
            e1 = [embs[paths[p["images"]["output"]]] for p in good]
            t0 = torch.stack([texts[triples[p["triple_id"]]["input"]] for p in good])
            t1 = torch.stack([texts[triples[p["triple_id"]]["output"]] for p in good])
            s = metrics.clip_scores(torch.stack([e["clip"] for e in e0]),
                                    torch.stack([e["clip"] for e in e1]), t0, t1)
            if self.dino is not None:
                s["dino"] = metrics.dino(torch.stack([e["dino"] for e in e0]),
                                         torch.stack([e["dino"] for e in e1]))
            for i, p in enumerate(good):
                out[p["id"]].update({k: _round(v[i]) for k, v in s.items()})
        return out


def failed_thresholds(rec: dict, s: FilterSettings) -> list[str]:
    """Names of the thresholds a scored pair misses, in InstructPix2Pix's check order."""
    failed = [name for name in THRESHOLDS if rec[name] < getattr(s, name)]
    if s.dino_min is not None and rec.get("dino") is not None and rec["dino"] < s.dino_min:
        failed.append("dino")
    return failed


def decide(records: list[dict], s: FilterSettings, runs: dict[str, dict] | None = None
           ) -> list[dict]:
    """keep / reason / rank for all pairs of ONE triple (new dicts; inputs are not changed).

    reason: the first failed threshold, ``"top_k"`` (passed but ranked below k), the image
    error, or None when kept. rank: 1-based position by clip_sim_dir among the pairs that
    passed every threshold (ties broken by pair id), None for the others.

    ``runs``: for the pairs of ONE session, pair id -> its pair (session fields and
    ``session_run``); see :func:`decide_session`.
    """
    if runs:
        return decide_session(records, s, runs)
    out: list[dict] = []
    passing: list[dict] = []
    for r in records:
        error = r.get("error") or (r.get("reason") if r.get("clip_sim_dir") is None else None)
        r = {k: v for k, v in r.items() if k not in ("keep", "reason", "rank", "failed", "error")}
        if error:
            r.update(keep=False, reason=error, rank=None, failed=[])
            for name in THRESHOLDS:
                r.setdefault(name, None)
        else:
            failed = failed_thresholds(r, s)
            r.update(keep=False, reason=failed[0] if failed else None, rank=None, failed=failed)
            if not failed:
                passing.append(r)
        out.append(r)
    passing.sort(key=lambda r: (-r["clip_sim_dir"], r["pair_id"]))
    for i, r in enumerate(passing, 1):
        r["rank"] = i
        r["keep"] = i <= s.top_k
        r["reason"] = None if r["keep"] else "top_k"
    return out


def decide_session(records: list[dict], s: FilterSettings, pairs: dict[str, dict]
                   ) -> list[dict]:
    """keep / reason / rank for all pairs of ONE session (every node of every run).

    Thresholds apply per turn, as to any pair. Top-k counts runs, not pairs: a session's runs
    are ranked by the mean clip_sim_dir over their scored turns (ties broken by run id), and
    the pairs of the ``top_k`` best runs that pass every threshold are kept, so the kept turns
    of a session form whole image chains. A run none of whose turns survives
    (:func:`dsbuild.core.sessions.cut`, prefix) takes no place in the ranking. rank: the
    run's rank within its session, on its pairs that passed every threshold."""
    from dsbuild.core import sessions

    # thresholds only (a top_k above the count keeps every pair that passes them)
    decided = decide(records, s.model_copy(update={"top_k": len(records) + 1}))
    passed = {r["pair_id"] for r in decided if r["rank"] is not None}
    items = [{**pairs[r["pair_id"]], "id": r["pair_id"]} for r in decided]
    alive = sessions.cut(items, lambda it: it["id"] in passed, "prefix")
    dir_of = {r["pair_id"]: r.get("clip_sim_dir") for r in decided}
    means: dict[str, float] = {}
    for run, members in sessions.by_run(items).items():
        dirs = [dir_of[m["id"]] for m in members if dir_of[m["id"]] is not None]
        if dirs and any(m["id"] in alive for m in members):
            means[run] = sum(dirs) / len(dirs)
    order = sorted(means, key=lambda run: (-means[run], run))
    rank_of = {run: i for i, run in enumerate(order, 1)}
    for r in decided:
        if r["pair_id"] not in passed:
            continue
        rank = rank_of.get(pairs[r["pair_id"]].get("session_run"))
        r["rank"] = rank
        r["keep"] = rank is not None and rank <= s.top_k
        r["reason"] = None if r["keep"] else "top_k"
    return decided


def group_key(pair: dict) -> str:
    """What the filter decides together: a session's pairs (top-k over its runs), else a
    triple's (top-k over its pairs)."""
    return pair.get("session_id") or pair["triple_id"]


def _chunks(groups: list[list[dict]], size: int) -> Iterable[list[list[dict]]]:
    chunk: list[list[dict]] = []
    n = 0
    for g in groups:
        chunk.append(g)
        n += len(g)
        if n >= size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def shard_stats(records: list[dict]) -> dict:
    """Counts for the completion marker: scored, kept, and pairs per reason."""
    reasons: dict[str, int] = {}
    for r in records:
        reason = r.get("reason")
        if reason:
            reason = reason.split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return {"pairs": len(records), "kept": sum(bool(r.get("keep")) for r in records),
            "reasons": reasons}


def _by_triple(j: join.Joined) -> str:
    # a rank scores every pair of its triples (top-k per triple) and of its sessions (top-k
    # over a session's runs)
    return group_key(j.pair)


def expected(build: Build, world_size: int) -> list[int]:
    """Pairs each rank is to score: the driver's bar total."""
    return shard_sizes(join.all_pairs(build, scores=False), world_size, key=_by_triple)


def run_filter(build: Build, rank: int = 0, world_size: int = 1, *, force: bool = False,
               overrides: Iterable[str] = (), scorer: Scorer | None = None,
               quiet: bool = False, report: bool = True) -> StageResult:
    """Score one rank's pairs (all pairs of its triples), write scores; report when complete."""
    if scorer is None:
        check("filter", what="dsbuild filter")
    build.update(list(overrides))
    s = build.config.filter
    build.require_complete("captions")
    build.require_complete("generate")
    mine = select_shard(join.all_pairs(build, scores=False), rank, world_size, key=_by_triple)
    triples = {j.triple["id"]: j.triple for j in mine}
    groups: dict[str, list[dict]] = {}
    for j in mine:
        groups.setdefault(group_key(j.pair), []).append(j.pair)

    def work(writer) -> dict:
        nonlocal scorer
        from dsbuild.models import keep_loaded, model_key

        written = {r["pair_id"]: r for r in writer.records}
        todo = [g for g in groups.values() if any(p["id"] not in writer.done for p in g)]
        total = sum(len(g) for g in groups.values())
        if todo:
            scorer = scorer or keep_loaded(
                "filter", (*model_key(s.clip_model), s.clip_pretrained, s.dino,
                           *model_key(s.dino_model), s.device, s.dtype, s.batch_size,
                           s.workers), lambda: Scorer.from_settings(s, quiet=quiet))
            bar = progress(total=total, initial=len(written), desc=f"filter r{rank}",
                           unit=STAGE.unit)
            for chunk in _chunks(todo, 4 * s.batch_size):
                new = [p for g in chunk for p in g if p["id"] not in writer.done]
                scored = scorer.score(new, triples, build.root)
                for g in chunk:
                    recs = [written.get(p["id"]) or scored[p["id"]] for p in g]
                    runs = {p["id"]: p for p in g} if g[0].get("session_id") else None
                    for r in decide(recs, s, runs):
                        if r["pair_id"] not in writer.done:
                            writer.write(r)
                bar.update(len(new))
            bar.close()
        stats = shard_stats(writer.records)
        if stats["pairs"] and not stats["kept"]:
            refuse_empty(build, rank, world_size, mine, writer.records, stats)
        return stats

    return build.run_stage("filter", rank, world_size, work, force=force, report=report)


def refuse_empty(build: Build, rank: int, world_size: int, mine: list[join.Joined],
                 records: list[dict], stats: dict) -> None:
    """StageFailed (no marker) when this rank kept no pair and that leaves nothing to pass on:
    no pair of the rank could be scored (every image missing or unreadable), or every other
    rank is done and kept none either. A rank that kept none beside ranks that kept some is a
    small shard, not an empty output. The rank's report is written first, to be opened."""
    unscored = [r for r in records if r.get("clip_sim_dir") is None]
    if len(unscored) < len(records):
        others = {r: m for r, m in build.markers("filter").items() if r != rank}
        if len(others) < world_size - 1 or any(m.get("stats", {}).get("kept")
                                               for m in others.values()):
            return
    from dsbuild.filter.report import write_report

    by_pair = {r["pair_id"]: r for r in records}
    rep = write_report(build, [join.Joined(j.pair, j.triple, by_pair[j.pair["id"]])
                               for j in mine if j.pair["id"] in by_pair])
    md = next(f for f in rep["files"] if f.endswith(".md"))
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats["reasons"].items()))
    where = f" in rank {rank} of {world_size}" if world_size > 1 else ""
    root = build.root
    if len(unscored) == len(records):
        fix = (f"no pair's images could be read (e.g. {unscored[0].get('reason')}): `dsbuild "
               f"repair {root} generate` drops the pairs whose images are gone, `dsbuild "
               f"generate {root}` makes them again, then `dsbuild filter {root} --force` scores "
               "them")
    else:
        missed = [k for k in sorted(stats["reasons"], key=lambda k: -stats["reasons"][k])
                  if k in (*THRESHOLDS, "dino")]
        name = {"dino": "dino_min"}.get(missed[0], missed[0]) if missed else "clip_sim_dir"
        fix = (f"every pair missed a threshold or top_k: lower the thresholds (e.g. --set "
               f"filter.{name}=VALUE) and run the same command again")
    raise StageFailed(f"filter kept 0 of {stats['pairs']} pairs{where} ({reasons}); no "
                      f"completion marker written; see {md}; {fix}")
