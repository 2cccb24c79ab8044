"""The verify stage: one record per pair the filter kept, with each check's result and reason.

Checks (rules in ``dsbuild.verify.checks``): the operation's detector check (add, remove,
replace; change adds the CLIP direction of the detected region and DINO similarity of the rest),
the near-copy bound, and, when enabled, the vision-language judge. The verdict is ``reject``
when any check failed, with the first failed check's reason; export drops those pairs.

Ranks shard by the pair's source (input caption and seed), so pairs that share a P2P source
land on one rank and the detector sees that image once. Work is resumable per pair (the shard writer's keys); judge
replies are cached, and a pair whose judge request failed gets no record, so the stage stops
without a marker (exit 1) and a re-run asks again. With ``verify.recaption.enabled`` each pair
that passed is re-captioned after the checks (``dsbuild.llm.recaption``; its ``recaption``
field), cached and resumed the same way. Torch, transformers and open_clip are
imported only when there is work; ``run_verify`` checks first that they are installed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from dsbuild.core import join
from dsbuild.core.build import Build, StageResult, select_shard, shard_sizes
from dsbuild.core.deps import check
from dsbuild.core.errors import DsbuildError, StageFailed
from dsbuild.core.progress import progress
from dsbuild.verify import STAGE, checks
from dsbuild.verify.checks import Found, Targets
from dsbuild.verify.settings import VerifySettings

WHOLE_IMAGE = 0.9  # a region covering more than this share of the image leaves no "rest"
GREY = (127, 127, 127)


def queries(op: str, t: Targets) -> tuple[set[str], set[str]]:
    """Phrases to detect in the input and in the output image of one pair."""
    if op == "change":
        both = {t.thing} if t.thing else set()
        return both, set(both)
    if op == "replace":
        return set(t.old) | set(t.new), set(t.old) | set(t.new)
    phrases = set(t.new if op == "add" else t.old)
    return phrases, set(phrases)


def pixel_similarity(a, b) -> float:
    """1 - mean absolute difference of two images in [0, 1] (b resized to a's size)."""
    import numpy as np

    if b.size != a.size:
        b = b.resize(a.size)
    x = np.asarray(a.convert("RGB"), dtype=np.float32)
    y = np.asarray(b.convert("RGB"), dtype=np.float32)
    return float(1.0 - np.abs(x - y).mean() / 255.0)


def masked_similarity(a, b, mask) -> float | None:
    """1 - mean absolute difference of two images over the pixels where ``mask`` is black
    (the region an edit may not touch); None when the mask is white everywhere."""
    import numpy as np

    if b.size != a.size:
        b = b.resize(a.size)
    if mask.size != a.size:
        mask = mask.resize(a.size)
    keep = np.asarray(mask.convert("L")) < 128
    if not keep.any():
        return None
    x = np.asarray(a.convert("RGB"), dtype=np.float32)[keep]
    y = np.asarray(b.convert("RGB"), dtype=np.float32)[keep]
    return float(1.0 - np.abs(x - y).mean() / 255.0)


def region(f_in: Found | None, f_out: Found | None, s: VerifySettings
           ) -> tuple[float, float, float, float] | None:
    """The union of the thing's best boxes where the detector saw it."""
    boxes = [f.box for f in (f_in, f_out) if f is not None and f.box and f.score >= s.present_min]
    if not boxes:
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
            max(b[3] for b in boxes))


class Verifier:
    """The models of one verify run, loaded when first needed, and the checks of many pairs."""

    def __init__(self, build: Build, detector=None, encoders: tuple | None = None,
                 quiet: bool = False):
        self.build = build
        self.s: VerifySettings = build.config.verify
        self.detector = detector
        self._encoded0 = getattr(detector, "encoded", 0)  # a reused detector's earlier images
        self._encoders = encoders  # (clip, dino) for the change check
        self.quiet = quiet
        self.preserved: dict[str, float | None] = {}  # photo pairs with a mask, by pair id
        self.judge = None
        if self.s.judge.enabled:
            from dsbuild.llm.judge import Judge

            self.judge = Judge(self.s.judge, build.cache_dir / "verify-judge",
                               self.s.judge.resolved())
        self.recaptioner = None
        self.recaption_failed = 0  # this run's re-caption requests that failed (no record)
        if self.s.recaption.enabled:
            from dsbuild.llm.recaption import Recaptioner

            self.recaptioner = Recaptioner(self.s.recaption,
                                           build.cache_dir / "verify-recaption")

    def _detector(self):
        """The settings' detector, loaded once per worker process (shards reuse it)."""
        if self.detector is None:
            from dsbuild.models import keep_loaded, model_key
            from dsbuild.verify.detector import Detector

            s = self.s
            self.detector = keep_loaded(
                "verify-detector", (*model_key(s.detector), s.device, s.dtype, s.batch_size,
                                    s.workers),
                lambda: Detector.load(s.detector, s.device, s.dtype, quiet=self.quiet,
                                      batch_size=s.batch_size, workers=s.workers,
                                      setting="verify.detector"))
            self._encoded0 = self.detector.encoded
        return self.detector

    def encoders(self):
        """(CLIP, DINOv2) of the change check, loaded once per worker process."""
        if self._encoders is None:
            from dsbuild.models import ClipEncoder, DinoEncoder, keep_loaded, model_key

            s = self.s
            self._encoders = keep_loaded(
                "verify-encoders", (*model_key(s.clip_model), s.clip_pretrained,
                                    *model_key(s.dino_model), s.device, s.dtype),
                lambda: (ClipEncoder.load(s.clip_model, s.clip_pretrained, s.device, s.dtype,
                                          quiet=self.quiet, setting="verify.clip_model",
                                          pretrained_setting="verify.clip_pretrained"),
                         DinoEncoder.load(s.dino_model, s.device, s.dtype, quiet=self.quiet,
                                          setting="verify.dino_model")))
        return self._encoders

    def images_detected(self) -> int | None:
        """Distinct images this run sent through the detector (None: a detector that does not
        count them)."""
        n = getattr(self.detector, "encoded", None)
        return None if n is None else n - self._encoded0

    def verify(self, rows: list[join.Joined]) -> tuple[list[dict], int]:
        """Verify records for these pairs, and how many judge requests failed (no record)."""
        root, s = self.build.root, self.s
        tg = {j.pair["id"]: checks.targets(j.pair, j.triple) for j in rows}
        want: dict[Path, set[str]] = {}
        for j in rows:
            q_in, q_out = queries(j.triple.get("operation"), tg[j.pair["id"]])
            want.setdefault(root / j.pair["images"]["input"], set()).update(q_in)
            want.setdefault(root / j.pair["images"]["output"], set()).update(q_out)
        found, errors = ({}, {}) if not any(want.values()) else \
            self._detector().detect(want, s.present_min, s.nms_iou)
        sims, changes = self._measure(rows, tg, found, errors)
        judged: dict[str, dict | None] = {}
        if self.judge is not None:
            items = [(j.pair["id"], j.triple["edit"], root / j.pair["images"]["input"],
                      root / j.pair["images"]["output"]) for j in rows
                     if j.pair["id"] in sims]
            judged = self.judge.ask(items)
        out, failed = [], 0
        for j in rows:
            pid = j.pair["id"]
            if self.judge is not None and pid in sims and judged.get(pid) is None:
                failed += 1  # asked again on the next run
                continue
            out.append(self.record(j, tg[pid], found, errors, sims.get(pid), changes.get(pid),
                                   judged.get(pid)))
        if self.recaptioner is not None:
            out, n = self.recaption(out, rows)
            failed += n
        return out, failed

    def recaption(self, recs: list[dict], rows: list[join.Joined]) -> tuple[list[dict], int]:
        """The records with a ``recaption`` on each pair that passed; a pair whose request
        failed after its retries loses its record (asked again on the next run)."""
        root = self.build.root
        by_id = {j.pair["id"]: j for j in rows}
        items = [(r["pair_id"], by_id[r["pair_id"]].triple["edit"],
                  root / by_id[r["pair_id"]].pair["images"]["input"],
                  root / by_id[r["pair_id"]].pair["images"]["output"])
                 for r in recs if r["verdict"] == "pass"]
        if not items:
            return recs, 0
        got = self.recaptioner.ask(items)
        out, failed = [], 0
        for r in recs:
            if r["verdict"] == "pass":
                if got.get(r["pair_id"]) is None:
                    failed += 1
                    continue
                r["recaption"] = got[r["pair_id"]]
            out.append(r)
        self.recaption_failed += failed
        return out, failed

    def record(self, j: join.Joined, t: Targets, found, errors, sim: float | None,
               change: dict | None, judged: dict | None) -> dict:
        root, s = self.build.root, self.s
        p_in, p_out = root / j.pair["images"]["input"], root / j.pair["images"]["output"]
        op = j.triple.get("operation")
        err = errors.get(p_in) or errors.get(p_out)
        rec = {"pair_id": j.pair["id"], "triple_id": j.triple["id"], "operation": op,
               "agent": j.triple.get("agent"), "targets": t.as_dict()}
        if err or sim is None:
            cs = [checks.check("image", False, "image_error", error=err or "unreadable image")]
        else:
            exempt = bool(j.triple.get("no_change"))
            cs = [checks.near_copy_check(sim, s, exempt),
                  *([checks.preserve_check(self.preserved[j.pair["id"]], s)]
                    if j.pair["id"] in self.preserved else []),
                  checks.operation_check(op, t, found.get(p_in, {}), found.get(p_out, {}), s,
                                         change)]
            if self.judge is not None:
                cs.append(checks.judge_check(judged, s))
        verdict, reason = checks.verdict(cs)
        rec.update(checks=cs, verdict=verdict, reason=reason)
        if judged is not None:
            rec["judge"] = judged  # the judge record: identity, raw reply, scores, verdict
        return rec

    def _measure(self, rows, tg, found, errors) -> tuple[dict[str, float], dict[str, dict]]:
        """Pixel similarity per pair; for change pairs with a detected region, the CLIP
        direction of the region and the DINO cosine of the images with the region painted out."""
        from PIL import Image

        root, s = self.build.root, self.s
        sims: dict[str, float] = {}
        todo: list[tuple[str, object, object, tuple, dict]] = []
        for j in rows:
            pid = j.pair["id"]
            p_in, p_out = root / j.pair["images"]["input"], root / j.pair["images"]["output"]
            if p_in in errors or p_out in errors:
                continue
            try:
                with Image.open(p_in) as a, Image.open(p_out) as b:
                    a, b = a.convert("RGB"), b.convert("RGB")
            except Exception:  # noqa: BLE001 - a broken file is an image error, not a crash
                continue
            sims[pid] = pixel_similarity(a, b)
            mask = j.pair["images"].get("mask")
            if j.pair.get("photo_id") and mask:  # input is the photo: compare outside the mask
                try:
                    with Image.open(root / mask) as m:
                        self.preserved[pid] = masked_similarity(a, b, m)
                except Exception:  # noqa: BLE001 - an unreadable mask is an image error
                    sims.pop(pid)
                    continue
            t = tg[pid]
            if j.triple.get("operation") == "change" and t.thing:
                box = region(found.get(p_in, {}).get(t.thing), found.get(p_out, {}).get(t.thing),
                             s)
                if box is not None:
                    todo.append((pid, a, b.resize(a.size), box, j.triple))
        changes = self._change(todo) if todo else {}
        return sims, changes

    def _change(self, todo) -> dict[str, dict]:
        import torch

        from dsbuild.core import metrics

        clip, dino = self.encoders()
        out: dict[str, dict] = {}
        crops0, crops1, masked0, masked1, texts0, texts1, whole = [], [], [], [], [], [], []
        for _pid, a, b, box, triple in todo:
            w, h = a.size
            x0, y0, x1, y1 = (int(box[0]), int(box[1]), max(int(box[2]), int(box[0]) + 2),
                              max(int(box[3]), int(box[1]) + 2))
            crops0.append(a.crop((x0, y0, x1, y1)))
            crops1.append(b.crop((x0, y0, x1, y1)))
            whole.append((x1 - x0) * (y1 - y0) >= WHOLE_IMAGE * w * h)
            m0, m1 = a.copy(), b.copy()
            m0.paste(GREY, (x0, y0, x1, y1))
            m1.paste(GREY, (x0, y0, x1, y1))
            masked0.append(m0)
            masked1.append(m1)
            texts0.append(triple["input"])
            texts1.append(triple["output"])

        def enc(e, images):
            return e.encode_pixels(torch.stack([e.preprocess_image(im) for im in images]))

        c0, c1 = enc(clip, crops0), enc(clip, crops1)
        t = clip.encode_text(list(dict.fromkeys(texts0 + texts1)))
        idx = {c: i for i, c in enumerate(dict.fromkeys(texts0 + texts1))}
        t0 = torch.stack([t[idx[c]] for c in texts0])
        t1 = torch.stack([t[idx[c]] for c in texts1])
        dirs = metrics.clip_direction(c0, c1, t0, t1)
        rest = metrics.dino(enc(dino, masked0), enc(dino, masked1))
        for i, (pid, _a, _b, box, _t) in enumerate(todo):
            out[pid] = {"region_dir": round(float(dirs[i]), 4),
                        "rest": None if whole[i] else round(float(rest[i]), 4),
                        "box": [round(v, 1) for v in box]}
        return out


def shard_stats(records: list[dict]) -> dict:
    """Counts for the completion marker: pairs, passed, and rejects per reason."""
    reasons = Counter(r["reason"] for r in records if r.get("verdict") == "reject")
    unchecked = Counter(c["reason"] for r in records for c in r.get("checks", [])
                        if c.get("pass") is None)
    return {"pairs": len(records), "passed": sum(r.get("verdict") == "pass" for r in records),
            "reasons": dict(sorted(reasons.items())), "unchecked": dict(sorted(unchecked.items()))}


def _by_source(j: join.Joined) -> str:
    # a P2P source is (input caption, seed): its pairs, one input file each, share a rank
    return f"{j.triple['input']}\x00{j.pair.get('seed')}"


def expected(build: Build, world_size: int) -> list[int]:
    """Kept pairs each rank is to verify: the driver's bar total."""
    return shard_sizes(join.scored_pairs(build, kept_only=True), world_size, key=_by_source)


def run_verify(build: Build, rank: int = 0, world_size: int = 1, *, force: bool = False,
               overrides: Iterable[str] = (), detector=None, encoders: tuple | None = None,
               quiet: bool = False, report: bool = True) -> StageResult:
    """Verify one rank's kept pairs; write the report when every rank is done.

    ``detector`` / ``encoders`` replace the models named in the settings (an object with
    ``detect`` as ``verify.detector.Detector`` has; ``(ClipEncoder, DinoEncoder)``); the
    settings' models load once per worker process (``dsbuild.models.keep_loaded``)."""
    if detector is None:
        check("filter", what="dsbuild verify")
    build.update(list(overrides))
    s = build.config.verify
    if s.judge.enabled:
        from dsbuild.llm.client import check_endpoint

        try:
            s.judge.resolved()
        except ValueError as exc:
            raise DsbuildError(f"verify.judge.rubric: {exc}") from None
        check_endpoint(s.judge, "verify.judge", "or set verify.judge.enabled=false")
    if s.recaption.enabled:
        from dsbuild.llm.client import check_endpoint

        check_endpoint(s.recaption, "verify.recaption", "or set verify.recaption.enabled=false")
    build.require_complete("filter")
    kept = [j for j in join.scored_pairs(build, kept_only=True)]
    mine = select_shard(kept, rank, world_size, key=_by_source)
    verifier: Verifier | None = None
    failed = 0

    def work(writer) -> dict:
        nonlocal verifier, failed
        todo = [j for j in mine if j.pair["id"] not in writer.done]
        if todo:
            verifier = Verifier(build, detector, encoders, quiet)
            bar = progress(total=len(mine), initial=len(mine) - len(todo),
                           desc=f"verify r{rank}", unit=STAGE.unit)
            step = 4 * s.batch_size
            for i in range(0, len(todo), step):
                recs, n_failed = verifier.verify(todo[i:i + step])
                failed += n_failed
                for r in recs:
                    writer.write(r)
                bar.update(len(recs))
            bar.close()
        if failed:
            n_rc = verifier.recaption_failed if verifier else 0
            what = " and ".join(
                _failed_requests(n, w, r, asker) for n, w, r, asker in (
                    (failed - n_rc, "judge", s.judge.max_retries, verifier and verifier.judge),
                    (n_rc, "re-caption", s.recaption.max_retries,
                     verifier and verifier.recaptioner)) if n)
            raise StageFailed(
                f"verify: {what}; the other pairs are "
                "written; run the same command again to resume (replies already received come "
                "from the cache)")
        stats = shard_stats(writer.records)
        if s.judge.enabled:
            judged = [c for r in writer.records for c in r.get("checks", [])
                      if c["name"] == "judge"]
            stats["judge_scored"] = sum(c.get("pass") is not None for c in judged)
            if judged and not stats["judge_scored"] and not s.judge.optional:
                refuse_unjudged(build, rank, world_size, writer.records, len(judged))
        if verifier is not None and verifier.judge is not None:
            stats["judge"] = verifier.judge.stats()
        if s.recaption.enabled:
            from dsbuild.llm.recaption import counts

            stats["recaption"] = counts(writer.records,
                                        {j.pair["id"]: j.triple["edit"] for j in mine})
            if verifier is not None and verifier.recaptioner is not None:
                stats["recaption"]["requests"] = verifier.recaptioner.stats()
        if verifier is not None and verifier.detector is not None:
            stats["images_detected"] = verifier.images_detected()
        return stats

    return build.run_stage("verify", rank, world_size, work, force=force, report=report)


def _failed_requests(n: int, what: str, retries: int, asker) -> str:
    """``N judge request(s) failed after R retries (last error: ...)``."""
    errs = (asker.stats().get("errors") if asker else None) or ["?"]
    return f"{n} {what} request(s) failed after {retries} retries (last error: {errs[-1]})"


def refuse_unjudged(build: Build, rank: int, world_size: int, records: list[dict],
                    judged: int) -> None:
    """StageFailed (no marker) when the judge scored none of this rank's pairs and no other
    finished rank's either: an endpoint that answers only nonsense is a failure, not a pass
    with every pair unchecked (``verify.judge.optional=true`` accepts it). The rank's report
    is written first, to be opened."""
    others = {r: m for r, m in build.markers("verify").items() if r != rank}
    if any(m.get("stats", {}).get("judge_scored") for m in others.values()):
        return
    from dsbuild.verify.report import write_report

    rep = write_report(build, records)
    md = next(f for f in rep["files"] if f.endswith(".md"))
    why = Counter(c["reason"] for r in records for c in r.get("checks", [])
                  if c["name"] == "judge")
    reasons = ", ".join(f"{k.removeprefix('judge_')}={v}" for k, v in sorted(why.items()))
    j = build.config.verify.judge
    where = f" in rank {rank} of {world_size}" if world_size > 1 else ""
    raise StageFailed(
        f"verify: the judge ({j.model} at {j.base_url or 'the OpenAI API'}) scored none of the "
        f"{judged} pairs it was asked about{where} ({reasons}); no completion marker written; "
        f"see {md}; fix verify.judge.model or verify.judge.base_url (its replies are cached "
        f"in {build.cache_dir / 'verify-judge'}: delete that folder to ask again), or set "
        "verify.judge.optional=true to accept pairs the judge could not score")
