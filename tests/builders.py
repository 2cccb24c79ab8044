"""Write small, contract-true builds for tests of downstream stages.

These write records exactly as the record contract (dsbuild.core.schema) says (through the real
``Build.run_stage``), with small real PNGs, so filter/review/export tests need not run
generation. Score records go through the filter stage's own ``decide`` (keep, reason, rank,
failed), and test_filter.py checks their keys against a record the real filter wrote.
End-to-end tests use the real stages instead.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dsbuild.core.build import Build
from dsbuild.core.hashing import content_id

# a raw score that passes every default threshold, and a clip_sim_dir that fails its own
PASSING = {"clip_sim_0": 0.3, "clip_sim_1": 0.3, "clip_sim_image": 0.8}
FAILING_DIR = 0.1

TRIPLES = [
    ("chairs", "object", "change", "a red velvet armchair", "make the armchair blue",
     "a blue velvet armchair"),
    ("chairs", "object", "add", "an oak dining chair without a cushion", "add a cushion",
     "an oak dining chair with a cushion"),
    ("chairs", "object", "remove", "a rustic armchair with armrests", "remove the armrests",
     "a rustic armchair"),
    ("living-room", "room", "add", "a modern living room with a grey sofa and no rug",
     "add a rug", "a modern living room with a grey sofa and a rug"),
    ("living-room", "room", "replace", "a scandinavian living room with a floor lamp",
     "replace the floor lamp with a coffee table",
     "a scandinavian living room with a coffee table"),
    ("living-room", "room", "change", "a living room with a white linen sofa",
     "make the sofa green", "a living room with a green linen sofa"),
]


def triple_record(recipe: str, agent: str, level: str, op: str, inp: str, edit: str, out: str,
                  backend: str = "template") -> dict:
    return {
        "id": content_id(recipe, agent, inp, edit, out), "recipe": recipe, "agent": agent,
        "level": level, "operation": op, "input": inp, "edit": edit, "output": out,
        "source": {"backend": backend, "model": None}, "no_change": False,
    }


def write_png(path, seed: int, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_mask(path, index: int, size: int = 32) -> None:
    """A local-blend mask as generate writes it (mode L, 255 = may change): a box that moves
    with ``index``."""
    m = np.zeros((size, size), dtype="uint8")
    x, y = 2 + (3 * index) % (size // 2), 4 + (5 * index) % (size // 2)
    m[y:y + size // 3, x:x + size // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(m).save(path)


def make_build(build: Build, samples: int = 3, triples=TRIPLES, scores: bool = True,
               keep_every: int = 2, masks: bool = False) -> dict[str, list[dict]]:
    """Write triples, pairs (+PNGs) and, optionally, scores; returns the records written.
    ``masks``: every second pair also has a local-blend mask (``images.mask``), as pairs made
    with ``generate.blend=true`` do."""
    recipe = build.recipe.name
    tr = [triple_record(recipe, *t) for t in triples]
    build.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None, report=False)
    pairs: list[dict] = []
    for ti, t in enumerate(tr):
        for s in range(samples):
            params = {"mode": "self", "steps": 2, "guidance": 7.5 + s, "cross_replace": 0.8,
                      "self_replace": 0.2 + 0.1 * s, "blend_words": None, "equalizer": None,
                      "scheduler": "euler_ancestral"}
            pid = content_id(t["id"], s, params)
            rel = f"pairs/img/{t['id']}/{pid}"
            write_png(build.root / f"{rel}_0.png", ti * 100 + s)
            write_png(build.root / f"{rel}_1.png", ti * 100 + s + 50)
            pairs.append({"id": pid, "triple_id": t["id"], "seed": s, "params": params,
                          "model": "tiny", "images": {"input": f"{rel}_0.png",
                                                      "output": f"{rel}_1.png"}})
            if masks and len(pairs) % 2:
                write_mask(build.root / f"{rel}_mask.png", len(pairs))
                pairs[-1]["images"]["mask"] = f"{rel}_mask.png"
    build.run_stage("generate", 0, 1, lambda w: [w.write(p) for p in pairs] and None, report=False)
    sc: list[dict] = []
    if scores:
        # pair i passes (clip_sim_dir 0.3 + 0.01 i) when i % keep_every == 0, else fails
        sc = write_scores(build, pairs, [0.3 + 0.01 * i if i % keep_every == 0 else FAILING_DIR
                                         for i in range(len(pairs))])
    return {"triples": tr, "pairs": pairs, "scores": sc}


def score_records(build: Build, pairs: list[dict], clip_sim_dir: list[float]) -> list[dict]:
    """What the filter stage writes for ``pairs``: raw scores (the given clip_sim_dir, the rest
    passing), decided per triple (per session: top-k over its runs) by the filter's own
    ``decide`` under the build's settings."""
    from dsbuild.filter.stage import decide, group_key

    groups: dict[str, list[dict]] = {}
    of_group: dict[str, dict[str, dict]] = {}
    for p, d in zip(pairs, clip_sim_dir, strict=True):
        groups.setdefault(group_key(p), []).append(
            {"pair_id": p["id"], "triple_id": p["triple_id"], **PASSING, "clip_sim_dir": d})
        of_group.setdefault(group_key(p), {})[p["id"]] = p
    runs = {k: ps if any(p.get("session_id") for p in ps.values()) else None
            for k, ps in of_group.items()}
    decided = {r["pair_id"]: r for k, g in groups.items()
               for r in decide(g, build.config.filter, runs[k])}
    return [decided[p["id"]] for p in pairs]


def write_scores(build: Build, pairs: list[dict], clip_sim_dir: list[float],
                 force: bool = False) -> list[dict]:
    """Write ``score_records`` as the filter stage's output (complete, with its marker)."""
    sc = score_records(build, pairs, clip_sim_dir)
    build.run_stage("filter", 0, 1, lambda w: [w.write(s) for s in sc] and None, force=force,
        report=False)
    return sc


# Sessions (issue 28): (agent, level, root caption, [(op, edit, output, parent index or None)])
# a node's input is its parent's output (the root caption for parent None); indexes count
# the session's nodes in order
SESSIONS = [
    ("living-room", "room", "a modern living room with a grey sofa and no rug", [
        ("add", "add a rug", "a modern living room with a grey sofa and a rug", None),
        ("change", "make the sofa green", "a modern living room with a green sofa and a rug", 0),
        ("add", "add a floor lamp",
         "a modern living room with a green sofa, a rug and a floor lamp", 1),
    ]),
    ("chairs", "object", "a red velvet armchair without a cushion", [
        ("change", "make the armchair blue", "a blue velvet armchair without a cushion", None),
        ("add", "add a cushion", "a red velvet armchair with a cushion", None),
        ("add", "add a cushion", "a blue velvet armchair with a cushion", 0),
    ]),
]


def session_triples(recipe: str, sessions=SESSIONS) -> list[dict]:
    """Triple records of ``sessions`` with their session fields (dsbuild.core.sessions)."""
    from dsbuild.core import sessions as S

    out = []
    for k, (agent, level, root, nodes) in enumerate(sessions):
        sid = S.session_id(recipe, agent, root, k)
        made: list[dict] = []
        for op, edit, output, parent in nodes:
            up = made[parent] if parent is not None else None
            inp = up["output"] if up else root
            t = triple_record(recipe, agent, level, op, inp, edit, output)
            t["id"] = S.node_id(recipe, agent, inp, edit, output, sid, up["id"] if up else None)
            t.update(session_id=sid, node_id=t["id"], parent_id=up["id"] if up else None,
                     turn=(up["turn"] + 1) if up else 1)
            made.append(t)
        out += made
    return out


def make_session_build(build: Build, runs: int = 2, sessions=SESSIONS, singles=TRIPLES[:2],
                       samples: int = 2, fail: set[tuple[int, int, int]] = frozenset(),
                       size: int = 32) -> dict[str, list[dict]]:
    """A build whose captions hold ``sessions`` (plus ``singles``, single-edit triples), whose
    pairs hold ``runs`` generated runs per session as a generator writes them (one seed and
    guidance per run; each node's pair takes its parent's image as ``images.input`` and the
    run's root image as ``images.session_source``) and ``samples`` pairs per single triple,
    and whose scores pass except the pairs ``fail`` names as (session index, run, node index).
    Returns the records written."""
    from dsbuild.core import sessions as S

    recipe = build.recipe.name
    st = session_triples(recipe, sessions)
    singles_tr = [triple_record(recipe, *t) for t in singles]
    tr = st + singles_tr
    build.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None, report=False)
    pairs: list[dict] = []
    failing: set[str] = set()
    by_session: dict[str, list[dict]] = {}
    for t in st:
        by_session.setdefault(t["session_id"], []).append(t)
    for si, (sid, nodes) in enumerate(by_session.items()):
        for r in range(runs):
            seed, guidance = 1000 * si + r, 7.5 + r
            run = S.run_id(sid, seed, guidance, r)
            root_rel = f"pairs/img/sessions/{run}_root.png"
            write_png(build.root / root_rel, seed, size)
            image_of: dict[str | None, str] = {None: root_rel}
            for ni, t in enumerate(nodes):
                params = {"mode": "self", "steps": 2, "guidance": guidance, "cross_replace": 0.8,
                          "self_replace": 0.3, "blend_words": None, "equalizer": None,
                          "scheduler": "euler_ancestral"}
                pid = content_id(t["id"], seed, params)
                rel = f"pairs/img/{t['id']}/{pid}"
                (build.root / f"{rel}_0.png").parent.mkdir(parents=True, exist_ok=True)
                (build.root / f"{rel}_0.png").write_bytes(
                    (build.root / image_of[t["parent_id"]]).read_bytes())
                write_png(build.root / f"{rel}_1.png", seed * 10 + ni + 1, size)
                (build.root / f"{rel}_session_source.png").write_bytes(
                    (build.root / root_rel).read_bytes())
                image_of[t["id"]] = f"{rel}_1.png"
                pairs.append({
                    "id": pid, "triple_id": t["id"], "seed": seed, "generator": "p2p",
                    "params": params, "model": "tiny", "agent": t["agent"], "level": t["level"],
                    "images": {"input": f"{rel}_0.png", "output": f"{rel}_1.png",
                               "session_source": f"{rel}_session_source.png"},
                    "source_id": content_id(run, t["parent_id"] or "root"),
                    **S.session_fields(t), "session_run": run})
                if (si, r, ni) in fail:
                    failing.add(pid)
    for ti, t in enumerate(singles_tr):
        for s in range(samples):
            params = {"mode": "self", "steps": 2, "guidance": 7.5 + s, "cross_replace": 0.8,
                      "self_replace": 0.3, "blend_words": None, "equalizer": None,
                      "scheduler": "euler_ancestral"}
            pid = content_id(t["id"], s, params)
            rel = f"pairs/img/{t['id']}/{pid}"
            write_png(build.root / f"{rel}_0.png", 5000 + ti * 100 + s, size)
            write_png(build.root / f"{rel}_1.png", 5000 + ti * 100 + s + 50, size)
            pairs.append({"id": pid, "triple_id": t["id"], "seed": s, "generator": "p2p",
                          "params": params, "model": "tiny", "agent": t["agent"],
                          "level": t["level"], "images": {"input": f"{rel}_0.png",
                                                          "output": f"{rel}_1.png"}})
    build.run_stage("generate", 0, 1, lambda w: [w.write(p) for p in pairs] and None,
                    report=False)
    sc = write_scores(build, pairs, [FAILING_DIR if p["id"] in failing else 0.3
                                     for p in pairs])
    return {"triples": tr, "pairs": pairs, "scores": sc, "failing": sorted(failing)}


# Judge, re-caption and decisions (issue 29)
def judge_rec(build: Build, scores: dict | None, *, missing: str | None = None,
              model: str = "judge-vlm", reported: str | None = "judge-vlm-2026-01",
              raw: str | None = None) -> dict:
    """A judge record as verify writes it under the build's rubric (``scores`` None with
    ``missing``: a reply that could not be used)."""
    import json

    from dsbuild.llm.rubric import judge_record

    j = build.config.verify.judge
    return judge_record(j.resolved(), model_requested=model, model_reported=reported,
                        prompt_hash="p" * 16, temperature=j.temperature,
                        raw=raw if raw is not None else (json.dumps(scores) if scores else None),
                        scores=scores, missing=missing)


def make_judged_build(build: Build, samples: int = 3, *, judge: dict[int, dict | None] | None
                      = None, reject: set[int] = frozenset(), recaption: dict[int, str | None]
                      | None = None, decisions: dict[int, tuple] | None = None
                      ) -> dict[str, list[dict]]:
    """``make_build`` plus verify records for the kept pairs (complete, with a marker) and
    curator decisions. Keys are indexes into the kept pairs (score order): ``judge`` their
    judge scores (None: a missing reply; unnamed pairs: judged all 8), ``reject`` the pairs
    verify rejects (a failed ``add`` check), ``recaption`` their re-captions (None: "nothing
    changed"), ``decisions`` (verdict, tool[, corrected_edit]). Returns the records written,
    with ``kept`` (the kept pairs' ids, in that order) and ``verify``."""
    from dsbuild.core.decisions import add_decisions, make_decision

    out = make_build(build, samples=samples)
    kept = [s["pair_id"] for s in out["scores"] if s["keep"]]
    triple_of = {p["id"]: p["triple_id"] for p in out["pairs"]}
    ops = {t["id"]: t for t in out["triples"]}
    recs = []
    for i, pid in enumerate(kept):
        t = ops[triple_of[pid]]
        sc = (judge or {}).get(i, {n: 8 for n in build.config.verify.judge.resolved().names})
        jr = judge_rec(build, sc, missing=None if sc else "not_json")
        bad = i in reject
        checks = [{"name": "near_copy", "pass": True, "reason": None},
                  {"name": t["operation"], "pass": not bad,
                   "reason": f"{t['operation']}_not_detected" if bad else None},
                  {"name": "judge", "pass": jr["passed"],
                   "reason": None if jr["passed"] else
                   (f"judge_{jr['failed']}" if jr["passed"] is False else
                    f"judge_bad_reply:{jr['missing']}")}]
        verdict = "reject" if bad or jr["passed"] is False else "pass"
        reason = next((c["reason"] for c in checks if c["pass"] is False), None)
        rec = {"pair_id": pid, "triple_id": t["id"], "operation": t["operation"],
               "agent": t["agent"], "targets": {}, "checks": checks, "verdict": verdict,
               "reason": reason, "judge": jr}
        if recaption and i in recaption:
            text = recaption[i]
            rec["recaption"] = {"instruction": text, "unchanged": text is None,
                                "model_requested": "judge-vlm",
                                "model_reported": "judge-vlm-2026-01", "prompt_hash": "r" * 16,
                                "temperature": 0.0, "raw": text or "unchanged", "missing": None}
        recs.append(rec)
    build.run_stage("verify", 0, 1, lambda w: [w.write(r) for r in recs] and None, report=False)
    if decisions:
        add_decisions(build, [make_decision(kept[i], d[0], tool=d[1], reviewer="cur",
                                               corrected_edit=d[2] if len(d) > 2 else None)
                                 for i, d in sorted(decisions.items())])
    return {**out, "kept": kept, "verify": recs}
