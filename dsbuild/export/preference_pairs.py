"""Preference pairs (chosen, rejected) from the joined rows of one build (issue 29, item 4).

Candidates are every scored generated pair (not no-change samples), the filter's drops
included. A group is one input image and one instruction: the same triple and the same
input image file content (sha256 of the input image's bytes; P2P pairs of one triple and
seed share their source image). Within a group candidates are ordered by evidence, strongest
first: the curators' verdict in force (accept > none > reject), verify (pass > not run >
reject), the judge's weighted score (higher better; missing: no evidence), then the filter
(kept > dropped, then clip_sim_dir). A pair is emitted where the chosen is strictly better by
the first signal that separates them; ``reason`` names it and ``margin`` is its difference.

Settings: export.preferences (max_per_group, min_margin). The card: README.md in the folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

REASONS = ("review", "verify", "judge", "filter")
_REVIEW = {"accept": 1, None: 0, "reject": -1}
_VERIFY = {"pass": 1, None: 0, "reject": -1}


def image_key(path: str | Path) -> str:
    """The content hash of an image file (groups candidates that share an input image)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def signals(row: dict) -> dict[str, float | None]:
    """A candidate's evidence per signal; None: no evidence on that signal."""
    review = row.get("review")
    return {"review": _REVIEW.get(review if review in ("accept", "reject") else None, 0),
            "verify": _VERIFY.get(row.get("verify") if row.get("verify") in ("pass", "reject")
                                  else None, 0),
            "judge": row.get("judge_score"),
            "filter_keep": 1 if row.get("filter_keep") else 0,
            "filter": row.get("clip_sim_dir")}


def separate(a: dict, b: dict, min_margin: float = 0.0) -> tuple[str, float] | None:
    """The first signal on which candidate ``a`` is strictly better than ``b``, and the
    margin; None where ``a`` is not better (equal, worse, or only below ``min_margin``)."""
    sa, sb = signals(a), signals(b)
    for name in ("review", "verify"):
        if sa[name] != sb[name]:
            return (name, 1.0) if sa[name] > sb[name] else None
    if sa["judge"] is not None and sb["judge"] is not None and sa["judge"] != sb["judge"]:
        d = float(sa["judge"]) - float(sb["judge"])
        return ("judge", d) if d > 0 and d >= min_margin else None
    if sa["filter_keep"] != sb["filter_keep"]:
        d = float(sa["filter"] or 0.0) - float(sb["filter"] or 0.0)
        return ("filter", abs(d)) if sa["filter_keep"] > sb["filter_keep"] else None
    if sa["filter"] is not None and sb["filter"] is not None:
        d = float(sa["filter"]) - float(sb["filter"])
        return ("filter", d) if d > 0 and d >= min_margin else None
    return None


def _order_key(row: dict):
    s = signals(row)
    return (-s["review"], -s["verify"], -(s["judge"] if s["judge"] is not None else -1.0),
            -s["filter_keep"], -(s["filter"] if s["filter"] is not None else -1.0),
            row["pair_id"])


def groups(rows: Iterable[dict], root: Path | str = "."
           ) -> dict[tuple[str, str, str], list[dict]]:
    """Candidates by (triple, input image content, instruction shown), strongest first;
    ``root``: the build folder the rows' image paths are relative to."""
    out: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r.get("no_change") or not r.get("scored"):
            continue
        key = (r["triple_id"], image_key(Path(root) / r["_images"]["input"]), r["edit_prompt"])
        out.setdefault(key, []).append(r)
    return {k: sorted(v, key=_order_key) for k, v in sorted(out.items())}


def pairs(rows: Iterable[dict], root: Path | str = ".", max_per_group: int = 4,
          min_margin: float = 0.0) -> list[dict]:
    """(chosen, rejected) records: per group the best candidate against each of the worst
    ones it beats (worst first), at most ``max_per_group`` per group."""
    out = []
    for (_triple, _image, prompt), cands in groups(rows, root).items():
        best = cands[0]
        n = 0
        for worse in reversed(cands[1:]):
            if n >= max_per_group:
                break
            sep = separate(best, worse, min_margin)
            if sep is None:
                continue
            out.append({"chosen": best, "rejected": worse, "edit_prompt": prompt,
                        "reason": sep[0], "margin": sep[1]})
            n += 1
    return out


def _nodes(row: dict) -> list[str]:
    from dsbuild.core.split import row_nodes
    return row_nodes(row["triple_id"], [row["original_prompt"], row["edited_prompt"]],
                     session=row.get("session_id"))


def assign_splits(prefs: list[dict], main_splits: dict[str, list[dict]], test_ratio: float,
                  seed: int) -> dict[str, list[dict]]:
    """Preference records by split: a record whose triple, caption or session is in the main
    export goes to that side; the others are split among themselves by the main export's
    function (dsbuild.core.split.split_rows), so no group crosses sides."""
    from dsbuild.core.split import SPLITS, split_rows
    side = {n: s for s, rs in main_splits.items() for r in rs for n in _nodes(r)}
    out: dict[str, list[dict]] = {k: [] for k in SPLITS}
    rest: dict[str, list[str]] = {}
    for i, p in enumerate(prefs):
        nodes = _nodes(p["chosen"]) + _nodes(p["rejected"])
        known = next((side[n] for n in nodes if n in side), None)
        if known is not None:
            out[known].append(p)
        else:
            rest[str(i)] = nodes
    if rest:
        row_split, _ = split_rows(rest, test_ratio, seed)
        for rid, s in row_split.items():
            out[s].append(prefs[int(rid)])
    return out


_FIELDS = ("pair_id", "filter_keep", "clip_sim_dir", "verify", "verify_reason", "judge_score",
           "review", "session_run")
_SHARED = ("triple_id", "agent", "level", "operation", "original_prompt", "edited_prompt",
           "session_id", "turn", "node_id")


def features():
    """The preference dataset's features (fixed, so an empty split has them too)."""
    import datasets

    text, num = datasets.Value("string"), datasets.Value("float64")
    f = {k: datasets.Image() for k in ("input_image", "chosen_image", "rejected_image")}
    f |= {k: datasets.Value("int64") if k == "turn" else text for k in _SHARED}
    f |= {"edit_prompt": text, "reason": text, "margin": num}
    for side in ("chosen", "rejected"):
        f |= {f"{side}_{k}": (num if k in ("clip_sim_dir", "judge_score") else
                              datasets.Value("bool") if k == "filter_keep" else text)
              for k in _FIELDS}
    return datasets.Features(f)


def record(p: dict) -> dict:
    """The flat (image-less) record of one preference pair."""
    c, r = p["chosen"], p["rejected"]
    out = {k: c.get(k) for k in _SHARED}
    out |= {"edit_prompt": p["edit_prompt"], "reason": p["reason"],
            "margin": float(p["margin"])}
    for side, row in (("chosen", c), ("rejected", r)):
        out |= {f"{side}_{k}": row.get(k) for k in _FIELDS}
    return out


def card(source: str, counts: dict) -> str:
    """The short README.md dataset card of a preference folder."""
    lines = ["---", "tags:", "- image-editing", "- preference", "- dpo", "---", "",
             f"# Preference pairs of {source}", "",
             "Pairs of edits of one input image under one instruction: `chosen_image` is the "
             "edit with the stronger evidence (curators' verdict, then verify, then the judge's "
             "score, then the filter), `rejected_image` the weaker; `reason` names the signal "
             "that separates them and `margin` its difference.", "",
             "| split | pairs |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts["splits"].items()]
    lines += ["", "| reason | pairs |", "|---|---|"]
    lines += [f"| {k} | {counts['reasons'].get(k, 0)} |" for k in REASONS]
    lines += ["", "Columns: `input_image`, `chosen_image`, `rejected_image` (images), "
              "`edit_prompt`, `reason`, `margin`, " + ", ".join(f"`{k}`" for k in _SHARED)
              + ", and `chosen_`/`rejected_` + " + ", ".join(f"`{k}`" for k in _FIELDS) + ".",
              "", "```python", "import datasets",
              'dd = datasets.load_from_disk("DIR")',
              'x = dd["train"][0]  # (x["edit_prompt"], x["input_image"]) -> '
              'x["chosen_image"] over x["rejected_image"]', "```", ""]
    return "\n".join(lines)


def write(root: Path | str, splits: dict[str, list[dict]], out_dir: Path | str,
          source: str | None = None) -> dict:
    """Write ``splits`` (from :func:`assign_splits`) as a datasets.DatasetDict with the
    input/chosen/rejected images embedded; atomic (a sibling temp folder, then a rename).
    Returns the counts per split and per reason."""
    import os
    import shutil

    import datasets

    from dsbuild.core.progress import progress

    root, out_dir = Path(root), Path(out_dir)
    total = sum(map(len, splits.values()))
    bar = progress(total=total, desc="preference pairs", unit="pair")
    dd = {}
    for split, ps in splits.items():
        cols: dict[str, list] = {}
        for p in ps:
            rec = record(p) | {
                "input_image": {"bytes": (root / p["chosen"]["_images"]["input"]).read_bytes(),
                                "path": None},
                "chosen_image": {"bytes": (root / p["chosen"]["_images"]["output"]
                                           ).read_bytes(), "path": None},
                "rejected_image": {"bytes": (root / p["rejected"]["_images"]["output"]
                                             ).read_bytes(), "path": None}}
            for k, v in rec.items():
                cols.setdefault(k, []).append(v)
            bar.update(1)
        dd[split] = datasets.Dataset.from_dict(cols or {k: [] for k in features()},
                                               features=features())
    bar.close()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.DatasetDict(dd).save_to_disk(str(tmp), num_shards={k: 1 for k in dd})
    by_reason: dict[str, int] = {}
    for ps in splits.values():
        for p in ps:
            by_reason[p["reason"]] = by_reason.get(p["reason"], 0) + 1
    counts = {"splits": {k: len(v) for k, v in splits.items()}, "reasons": by_reason}
    (tmp / "README.md").write_text(card(source or root.name, counts))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return counts


def export_preferences(build, out_dir: Path | str | None = None) -> dict:
    """The preference dataset of ``build`` in ``out_dir`` (default BUILD/export-preferences):
    every scored pair's rows, paired, split on the main export's sides, written."""
    from dsbuild.core import join
    from dsbuild.export.dataset import collect_rows

    out_dir = Path(out_dir) if out_dir else build.root / "export-preferences"
    ps = build.config.export.preferences
    rows, _ = join.rows(build, policy="scored")
    splits = assign_splits(pairs(rows, build.root, ps.max_per_group, ps.min_margin),
                           collect_rows(build).splits, build.config.split.test_ratio,
                           build.config.split.seed)
    return write(build.root, splits, out_dir, source=build.root.name) | {"path": str(out_dir)}
