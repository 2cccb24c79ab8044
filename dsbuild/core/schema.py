"""The record schema: what each stage writes, and the one joined row every reader shares.

Stages write JSON lines whose field names are the contract between them; the TypedDicts below
are that contract (records stay plain dicts: these only name and type their fields). Export,
FiftyOne, Label Studio, augment and the reports all read one :func:`row` per pair (triple ⋈
pair ⋈ score ⋈ verify ⋈ decision) or :func:`no_change_row` per augment sample, so a field has
one name everywhere: an export column, a FiftyOne field and a Label Studio task key are the
same word (:data:`FIELDS`). A generator's parameters are columns of their own, named and typed
by its declaration (:mod:`dsbuild.core.generators`); ``params`` keeps them all as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal, TypedDict

from dsbuild.core.errors import DsbuildError
from dsbuild.core.generators import Param, generator_of, param_values

# the scores a filter record carries (dino only when enabled); one list for every reader
SCORE_KEYS: tuple[str, ...] = ("clip_sim_0", "clip_sim_1", "clip_sim_dir", "clip_sim_image",
                               "dino")


class Triple(TypedDict, total=False):
    """A caption triple (captions/): ``id`` hashes recipe/agent/input/edit/output.

    ``level`` is ``object`` or ``room``; ``source`` is ``{backend, model}`` of the captioner;
    ``no_change`` is true where input and output say the same.
    """

    id: str
    recipe: str
    agent: str
    level: str
    operation: str
    input: str
    edit: str
    output: str
    source: dict
    no_change: bool
    # made from a real photo (sources/): its id and provenance, carried to every row
    photo_id: str
    license: str | None
    photo_source: str | None
    attribution: str | None
    # a node of a multi-turn session (dsbuild.core.sessions): input = the parent's output
    session_id: str
    node_id: str
    parent_id: str | None
    turn: int


class Photo(TypedDict, total=False):
    """A real photo (sources/): ``id`` is the hash of its file's bytes; ``path`` the file as
    given (or ``dataset:<name>#<index>``); ``image`` the build-relative PNG prepared at the
    generation resolution (crop/resize policy applied); ``width``/``height`` the original
    size; ``caption`` with ``caption_source`` (``sidecar``, ``given`` or ``vlm``); provenance:
    ``license`` (None: unknown), ``source``, ``attribution``; ``phash`` its perceptual hash."""

    id: str
    path: str
    image: str
    width: int
    height: int
    caption: str
    caption_source: str
    license: str | None
    source: str | None
    attribution: str | None
    phash: str


class Images(TypedDict, total=False):
    """Build-relative PNG paths of a pair: ``input``, ``output`` and, where the generator let
    only a region change, ``mask`` (white = may change)."""

    input: str
    output: str
    mask: str
    reconstruction: str  # a real photo's: the inverted source branch's image (P2P)
    session_source: str  # a session pair's: the run's root image (turn 0)


class Pair(TypedDict, total=False):
    """A generated pair (generate/): ``id`` is a content hash of its triple, seed and params.

    ``generator`` names what made it (pairs written before generators existed have none: they
    are ``p2p``); ``params`` holds whatever that generator declares (its ``Param`` list);
    ``model`` is the model it ran; ``source_id`` the id of the source image it shares.
    """

    id: str
    triple_id: str
    seed: int
    generator: str
    params: dict
    model: str
    images: Images
    agent: str
    level: str
    source_id: str
    # from a real photo: the photo's id, and the PSNR (dB) of the source branch's
    # reconstruction against the photo's VAE round trip (P2P through inversion)
    photo_id: str
    reconstruction_psnr: float
    # a session pair (dsbuild.core.sessions): its triple's session fields, and the run (one
    # seed and guidance, one image chain) whose parent pair's output is its input
    session_id: str
    node_id: str
    parent_id: str | None
    turn: int
    session_run: str


class Score(TypedDict, total=False):
    """The filter's score of one pair (filter/): the :data:`SCORE_KEYS` (``dino`` only when
    enabled), ``keep``, the first failed threshold as ``reason`` and ``rank`` within its triple."""

    pair_id: str
    clip_sim_0: float
    clip_sim_1: float
    clip_sim_dir: float
    clip_sim_image: float
    dino: float
    keep: bool
    reason: str | None
    rank: int


# one verify check: ``pass`` is True, False or None (could not be checked)
Check = TypedDict("Check", {"name": str, "pass": bool | None, "reason": str | None},
                  total=False)


class Judge(TypedDict, total=False):
    """What the vision-language judge said about one pair (verify's ``judge`` field), enough to
    reproduce and audit it: the model asked for and the model the server reported, the rubric
    (its name and hash) and prompt hash, the temperature, the raw reply text, the parsed 0-10
    ``scores`` per criterion, their weighted ``score`` in [0, 1], the rubric's ``threshold``
    and ``pass``. A failed or unusable reply is ``missing`` (its reason: ``no_reply``,
    ``not_json``, ``refused``, ``missing_field``, ``out_of_range``) with ``scores``/``score``/
    ``pass`` None: never a 0 and never a reject."""

    model_requested: str
    model_reported: str | None
    rubric: str
    rubric_hash: str
    prompt_hash: str
    temperature: float
    raw: str | None
    scores: dict[str, int] | None
    score: float | None
    threshold: float
    passed: bool | None
    failed: str | None
    reason: str | None
    missing: str | None


class Recaption(TypedDict, total=False):
    """The instruction a vision-language model wrote for a pair after seeing both images
    (verify's ``recaption`` field): ``instruction`` (None when it said nothing changed, or the
    reply was missing), ``unchanged``, the identity fields of :class:`Judge` and ``missing``."""

    instruction: str | None
    unchanged: bool
    model_requested: str
    model_reported: str | None
    prompt_hash: str
    temperature: float
    raw: str | None
    missing: str | None


class Verify(TypedDict, total=False):
    """verify's verdict on one kept pair (verify/): ``verdict`` pass or reject, the first failed
    check's ``reason``, every ``checks`` entry, the detector's ``targets``, the ``judge``'s
    record (when the judge ran) and the ``recaption`` (when re-captioning ran)."""

    pair_id: str
    triple_id: str
    operation: str
    agent: str
    targets: dict
    checks: list[Check]
    verdict: Literal["pass", "reject"]
    reason: str | None
    judge: Judge
    recaption: Recaption


class NoChangeSample(TypedDict, total=False):
    """An augment sample (augment/): the source pair's input image on both sides, an
    instruction naming a ``target`` the caption does not show, ``output`` = ``input``.

    ``pair_id`` and ``source_pair_id`` name the source pair; ``id`` hashes it with the edit.
    """

    id: str
    pair_id: str
    source_pair_id: str
    triple_id: str
    recipe: str
    agent: str
    level: str
    operation: str
    input: str
    edit: str
    output: str
    target: str
    no_change: bool
    seed: int
    params: dict
    images: Images


class Decision(TypedDict, total=False):
    """A reviewer's verdict on a pair (decisions.jsonl, appended by review tools): ``verdict``
    accept or reject (``withdrawn`` undoes an earlier one), ``reason``, ``corrected_edit`` (the
    instruction the pair really shows), who (``reviewer``, ``tool``) and when (``at``)."""

    pair_id: str
    verdict: str
    reason: str | None
    corrected_edit: str | None
    reviewer: str
    tool: str
    at: str
    annotators: int
    agreement: float | None


FieldType = Literal["string", "int", "float", "bool", "json", "image"]


@dataclass(frozen=True)
class RowField:
    """A field of the joined row: its type and whether export writes it as a column."""

    type: FieldType
    export: bool = True
    description: str = ""


# The joined row, in export column order; the generator's declared parameter columns go after
# ``generator`` (see :func:`fields`). Image fields hold build-relative paths until export
# embeds them.
FIELDS: dict[str, RowField] = {
    "input_image": RowField("image", description="the source image"),
    "edit_prompt": RowField("string", description="the instruction (a reviewer's correction wins)"),
    "edited_image": RowField("image", description="the edited image"),
    "original_prompt": RowField("string", description="caption of the input image"),
    "edited_prompt": RowField("string", description="caption the edited image was made from"),
    "pair_id": RowField("string"), "triple_id": RowField("string"),
    "source_pair_id": RowField("string", description="the generated pair a row shows"),
    "agent": RowField("string"), "level": RowField("string"), "operation": RowField("string"),
    "no_change": RowField("bool", description="an augment sample: nothing should change"),
    "corrected": RowField("bool", description="a reviewer corrected the instruction"),
    "original_edit": RowField("string", description="the planned instruction"),
    "edit_prompt_generated": RowField("string", description="the instruction the captions "
                                      "stage wrote (= original_edit)"),
    "edit_prompt_recaptioned": RowField("string", description="the instruction a "
                                        "vision-language model wrote from the two images "
                                        "(None: not re-captioned, or it saw no change)"),
    "review": RowField("string", description="the verdict in force: accept, reject or None"),
    "seed": RowField("int"), "model": RowField("string"),
    "generator": RowField("string", description="the generator that made the pair"),
    "params": RowField("json", description="the generator's parameters (canonical JSON)"),
    "edit_mask": RowField("image", description="what the generator let change, where it has one"),
    "photo_id": RowField("string", description="the real photo the row starts from, if any"),
    "license": RowField("string", description="the photo's license (None: unknown)"),
    "source": RowField("string", description="where the photo came from"),
    "attribution": RowField("string", description="the photo's attribution"),
    "reconstruction_psnr": RowField("float", description="PSNR (dB) of the inverted photo's "
                                    "reconstruction against its VAE round trip"),
    "session_id": RowField("string", description="the multi-turn session the row is a turn "
                           "of (None: a single edit)"),
    "session_run": RowField("string", description="the session's generated image chain (one "
                            "seed) the row belongs to"),
    "turn": RowField("int", description="the turn within the session (1 = an edit of the "
                     "session's source image)"),
    "node_id": RowField("string", description="the session node (its triple)"),
    "parent_id": RowField("string", description="the parent node, whose edited image is this "
                          "row's input image (None at turn 1)"),
    "source_image": RowField("image", description="the session's source image (turn 0)"),
    **{k: RowField("float") for k in SCORE_KEYS},
    "filter_rank": RowField("int", description="rank within its triple by the filter"),
    "judge_score": RowField("float", description="the judge's weighted rubric score in [0, 1] "
                            "(None: not judged, or its reply was missing)"),
    # read by review and reports, not exported
    "recipe": RowField("string", False), "caption_backend": RowField("string", False),
    "caption_model": RowField("string", False),
    "target": RowField("string", False, "what a no-change instruction names"),
    "scored": RowField("bool", False, "the filter scored the pair"),
    "filter_keep": RowField("bool", False), "filter_reason": RowField("string", False),
    "verify": RowField("string", False, "verify's verdict: pass, reject or None (not run)"),
    "verify_reason": RowField("string", False), "verify_checks": RowField("string", False),
    "review_reason": RowField("string", False), "review_tool": RowField("string", False),
    "review_reviewer": RowField("string", False), "review_at": RowField("string", False),
    "corrected_edit": RowField("string", False), "review_count": RowField("int", False),
    "review_reviewers": RowField("int", False), "review_agreement": RowField("float", False),
    "judge_pass": RowField("bool", False, "the judge's verdict (None: not judged or missing)"),
    "judge_missing": RowField("string", False, "why the judge's score is missing"),
    "judge_model": RowField("string", False, "the model the judge's server reported"),
    "judge_threshold": RowField("float", False, "the rubric's threshold on judge_score"),
    "judge_scores": RowField("json", False, "the judge's 0-10 score per rubric criterion"),
    "recaption_unchanged": RowField("bool", False, "the re-captioner saw no change"),
    "edit_note": RowField("string", False, "the line a review task shows under the "
                          "instruction: the re-caption where it differs from edit_prompt"),
    "headed": RowField("bool", False, "still headed for the export: kept by the filter, not "
                       "rejected by verify or review, the session turns before it alive "
                       "(dsbuild.core.survival)"),
    "review_priority": RowField("float", False, "what a curator's verdict on the pair is "
                                "worth (higher first; dsbuild.core.survival.priority)"),
}
PARAM_TYPES: dict[str, FieldType] = {"string": "string", "int": "int", "float": "float",
                                     "bool": "bool", "json": "json"}


def fields(columns: dict[str, Param] | None = None) -> dict[str, RowField]:
    """The joined row's fields with the declared parameter columns after ``generator``."""
    out: dict[str, RowField] = {}
    for name, f in FIELDS.items():
        out[name] = f
        if name == "generator":
            for col, p in (columns or {}).items():
                if col in FIELDS:
                    raise DsbuildError(f"a generator declares the parameter column {col!r}, "
                                       "a field of the joined row; give its Param another column")
                out[col] = RowField(PARAM_TYPES[p.type], description=p.description)
    return out


def public_name(value: str | None) -> str | None:
    """A model name or path as it may appear in public: local paths become their last part."""
    if not value:
        return value
    v = str(value)
    if v.startswith(("/", "~", "./", "../")) or (len(v) > 2 and v[1] == ":") or os.sep + os.sep in v:
        return "local:" + PurePosixPath(v.replace("\\", "/").rstrip("/")).name
    return v


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _checks(rec: dict) -> str | None:
    """Every check in a line: ``add:fail(reason) near_copy:pass``."""
    out = " ".join(f"{c['name']}:" + {True: "pass", False: "fail", None: "unchecked"}[
        c.get("pass")] + (f"({c['reason']})" if c.get("reason") else "")
        for c in rec.get("checks", []))
    return out or None


def review_fields(decision: Decision | None, count: int = 0) -> dict:
    """The decision in force: verdict, reason, fix, who (comma-joined when several reviewers'
    verdicts were aggregated), how many decisions, reviewers and how far they agree (what a
    review tool refreshes after a pull)."""
    d = decision or {}
    return {"review": d.get("verdict"), "review_reason": d.get("reason"),
            "review_tool": d.get("tool"), "review_reviewer": d.get("reviewer"),
            "review_at": d.get("at"), "corrected_edit": d.get("corrected_edit"),
            "review_count": count, "review_reviewers": d.get("annotators", 1) if d else None,
            "review_agreement": d.get("agreement")}


def decided(original_edit: str, decision: Decision | None, count: int = 0, *,
            applies: bool = True) -> dict:
    """The fields of a row that the decision in force sets: :func:`review_fields`, and
    ``edit_prompt``/``corrected`` (a correction replaces the instruction where it ``applies``:
    on generated pairs, not on no-change samples, whose instruction is made to name nothing)."""
    out = review_fields(decision, count)
    fix = out["corrected_edit"] if applies else None
    out["edit_prompt"] = fix or original_edit
    out["corrected"] = bool(fix) and fix != original_edit
    return out


def _session(pair: Pair, triple: Triple) -> dict:
    """The session columns of a row (all None for a single edit); ``source_image`` is a
    placeholder the image slot ``session_source`` fills."""
    rec = pair if pair.get("session_id") else triple
    return {"session_id": rec.get("session_id") or None,
            "session_run": pair.get("session_run") if rec.get("session_id") else None,
            "turn": _int(rec.get("turn")) if rec.get("session_id") else None,
            "node_id": rec.get("node_id") if rec.get("session_id") else None,
            "parent_id": rec.get("parent_id") if rec.get("session_id") else None,
            "source_image": None}


JUDGE_COLUMNS = ("judge_score", "judge_pass", "judge_missing", "judge_model", "judge_threshold",
                 "judge_scores", "edit_prompt_recaptioned", "recaption_unchanged")


def judged(verify: Verify | None) -> dict:
    """The :data:`JUDGE_COLUMNS` of a row from verify's ``judge`` and ``recaption`` fields (all
    None where the judge or the re-captioner did not run)."""
    v = verify or {}
    j, rc = v.get("judge") or {}, v.get("recaption") or {}
    return {"judge_score": _num(j.get("score")), "judge_pass": j.get("passed"),
            "judge_missing": j.get("missing"), "judge_model": j.get("model_reported"),
            "judge_threshold": _num(j.get("threshold")),
            "judge_scores": json.dumps(j["scores"], sort_keys=True) if j.get("scores") else None,
            "edit_prompt_recaptioned": rc.get("instruction") or None,
            "recaption_unchanged": bool(rc.get("unchanged")) if rc else None}


def edit_note(row: dict) -> str:
    """The line under the instruction a review task shows (``edit_prompt``: a curator's
    correction, else the re-caption under ``export.edit_prompt=recaptioned``, else the
    generated one): the re-captioner's instruction where it differs from the one shown."""
    rc = row.get("edit_prompt_recaptioned")
    return f"re-captioned: \u201c{rc}\u201d" if rc and rc != row.get("edit_prompt") else ""


PROMPTS = ("generated", "recaptioned")  # export.edit_prompt: which instruction a row shows


def row(pair: Pair, triple: Triple, score: Score | None = None, verify: Verify | None = None,
        decision: Decision | None = None, *, columns: dict[str, Param] | None = None,
        decisions: int = 0, prompt: str = "generated") -> dict:
    """The joined row of a generated pair (every :func:`fields` name, plus ``_images``: the
    build-relative paths per image slot, ``input``, ``output``, ``mask``).

    A reviewer's ``corrected_edit`` is authoritative: it becomes ``edit_prompt`` (what the
    pair shows) and ``corrected`` is true. ``original_prompt``/``edited_prompt`` stay the
    captions the images were generated from, which on a corrected row may not describe the
    edited image; ``original_edit`` keeps the planned instruction. ``columns``: the parameter
    columns to fill (default: the pair's own generator's), ``decisions``: how many decisions
    the pair has. ``prompt`` (export.edit_prompt): ``recaptioned`` shows the re-captioner's
    instruction as ``edit_prompt`` where there is one; a curator's correction wins over both.
    """
    params = pair.get("params") or {}
    edit = triple["edit"]
    s, v = score or {}, verify or {}
    jc = judged(v)
    shown = jc["edit_prompt_recaptioned"] if prompt == "recaptioned" else None
    review = decided(shown or edit, decision, decisions)
    review["corrected"] = bool(review["corrected_edit"]) and review["corrected_edit"] != edit
    source = triple.get("source") or {}
    return {
        "original_prompt": triple["input"], "edited_prompt": triple["output"],
        "pair_id": pair["id"], "triple_id": triple["id"], "source_pair_id": pair["id"],
        "agent": triple.get("agent"), "level": triple.get("level"),
        "operation": triple.get("operation"), "no_change": bool(triple.get("no_change")),
        "original_edit": edit,
        "seed": pair.get("seed"), "model": public_name(pair.get("model")),
        "generator": generator_of(pair), **param_values(pair, columns),
        "params": json.dumps(params, sort_keys=True, default=str),
        "photo_id": triple.get("photo_id"), "license": triple.get("license"),
        "source": triple.get("photo_source"), "attribution": triple.get("attribution"),
        "reconstruction_psnr": _num(pair.get("reconstruction_psnr")),
        **_session(pair, triple),
        **{k: _num(s.get(k)) for k in SCORE_KEYS}, "filter_rank": _int(s.get("rank")),
        "recipe": triple.get("recipe"), "caption_backend": source.get("backend"),
        "caption_model": source.get("model"), "target": None, "scored": score is not None,
        "filter_keep": s.get("keep"), "filter_reason": s.get("reason"),
        "verify": v.get("verdict"), "verify_reason": v.get("reason"),
        "verify_checks": _checks(v),
        **review, "edit_prompt_generated": edit, **jc, "headed": None, "review_priority": None,
        "edit_note": edit_note({**jc, **review}),
        "_images": dict(pair["images"]),
    }


def no_change_row(sample: NoChangeSample, source: dict | None,
                  decision: Decision | None = None, *, decisions: int = 0) -> dict:
    """The joined row of an augment sample: the provenance of its source pair's row
    (``source``; None where the build no longer holds that pair) with the sample's
    instruction, its input caption on both sides, no scores, no verify verdict, no mask.
    A sample without images of its own shows its source's input image on both sides."""
    base = dict(source or {})
    edit = sample["edit"]
    images = dict(sample.get("images") or {})
    if not images and source:
        images = {"input": source["_images"]["input"], "output": source["_images"]["input"]}
    out = {name: base.get(name) for name in fields()} | {
        k: v for k, v in base.items() if k not in FIELDS}  # the source's parameter columns
    out.update({
        "pair_id": sample.get("id") or sample.get("pair_id"),
        "source_pair_id": (source or {}).get("pair_id") or sample.get("source_pair_id")
        or sample.get("pair_id"),
        "no_change": bool(sample.get("no_change", True)),
        "original_edit": edit,
        "original_prompt": sample["input"], "edited_prompt": sample["input"],
        "target": sample.get("target"), "scored": False,
        **{k: None for k in SCORE_KEYS}, "filter_rank": None, "filter_keep": None,
        "filter_reason": None, "verify": None, "verify_reason": None, "verify_checks": None,
        **decided(edit, decision, decisions, applies=False),
        **judged(None), "edit_prompt_generated": edit, "headed": None, "review_priority": None,
        "edit_note": "",
        "_images": {k: images[k] for k in ("input", "output") if k in images},
        # a sample made from a session turn is a single edit, not a turn of that session
        **{k: None for k in ("session_id", "session_run", "turn", "node_id", "parent_id",
                             "source_image")},
    })
    for k in ("triple_id", "recipe", "agent", "level", "operation", "seed"):
        if sample.get(k) is not None:
            out[k] = sample[k]
    if not source:  # the sample's own record is all there is
        if sample.get("params") is not None:
            out["params"] = json.dumps(sample["params"], sort_keys=True, default=str)
    return out
