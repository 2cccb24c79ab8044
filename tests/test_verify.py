"""The verify stage: target phrases, the verdict rules on rendered scenes whose truth is known,
the real tiny OWLv2 end to end through the CLI, export honouring the verdict, and the judge
against a real local OpenAI-compatible server (good, malformed, refused and slow replies)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import TRIPLES, make_build
from click.testing import CliRunner
from openai_server import OpenAIServer, chat, delay, error, free_port
from PIL import Image

from dsbuild.core import join
from dsbuild.core.build import Build
from dsbuild.core.errors import StageFailed
from dsbuild.verify.checks import Found, targets

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BG = (210, 210, 210)
# what the scene detector recognises: each phrase is one flat colour in the scenes
COLOURS = {"velvet armchair": (0, 200, 200), "cushion": (220, 20, 20), "armrests": (220, 120, 0),
           "rug": (0, 160, 0), "floor lamp": (230, 230, 0), "coffee table": (200, 0, 200),
           "linen sofa": (240, 240, 255)}
SIZE = 64
TINY_CHANGE = ["verify.clip_model=tiny", "verify.clip_pretrained=none", "verify.dino_model=tiny"]


class SceneDetector:
    """A detector for the rendered scenes, with ``verify.detector.Detector.detect``'s
    interface: a phrase is present where its colour covers at least 20 pixels (score 0.9, else
    0.01), its box is the colour's bounding box."""

    encoded = 0

    def detect(self, queries, present_min=0.2, nms_iou=0.5):
        out = {}
        for path, phrases in queries.items():
            arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
            self.encoded += 1
            res = {}
            for p in phrases:
                mask = (np.abs(arr - np.array(COLOURS.get(p, (1, 2, 3)))).max(-1) <= 8)
                if mask.sum() >= 20:
                    ys, xs = np.nonzero(mask)
                    res[p] = Found(0.9, 1, (float(xs.min()), float(ys.min()),
                                            float(xs.max() + 1), float(ys.max() + 1)))
                else:
                    res[p] = Found(0.01, 0, None)
            out[path] = res
        return out, {}


def scene(*shapes, bg=BG) -> Image.Image:
    """A 64x64 'room': a background with a floor line, and flat-coloured boxes."""
    arr = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    arr[:] = bg
    arr[44:, :] = [max(0, c - 60) for c in bg]
    for colour, (x0, y0, x1, y1) in shapes:
        arr[y0:y1, x0:x1] = colour
    return Image.fromarray(arr)


C = COLOURS
# per triple of builders.TRIPLES, per sample: (input scene, output scene, expected reason)
SCENES = [
    [(scene((C["velvet armchair"], (20, 20, 40, 44))), scene(((0, 0, 220), (20, 20, 40, 44))),
      None),
     (scene((C["velvet armchair"], (20, 20, 40, 44))),
      scene(((0, 0, 220), (20, 20, 40, 44)), bg=(60, 90, 30)), "change_spilled")],
    [(scene(), scene((C["cushion"], (24, 24, 38, 38))), None),
     (scene(), scene(((90, 90, 90), (24, 24, 38, 38))), "add_not_detected")],
    [(scene((C["armrests"], (10, 30, 24, 44))), scene(), None),
     (scene((C["armrests"], (10, 30, 24, 44))), scene((C["armrests"], (40, 30, 54, 44))),
      "remove_still_there")],
    [(scene((C["rug"], (10, 46, 50, 60))), scene((C["rug"], (10, 46, 50, 60)),
                                                 ((90, 90, 90), (30, 5, 50, 20))),
      "add_already_present"),
     (scene(), scene(), "near_copy")],
    [(scene((C["floor lamp"], (44, 10, 52, 44))), scene((C["coffee table"], (20, 34, 50, 44))),
      None),
     (scene((C["floor lamp"], (44, 10, 52, 44))), scene((C["floor lamp"], (40, 10, 48, 44))),
      "replace_new_missing")],
    [(scene(), scene(((90, 90, 90), (10, 10, 30, 30))), "change_not_detected"),
     (scene(), scene(((60, 60, 60), (30, 10, 50, 30))), "change_not_detected")],
]


@pytest.fixture
def scene_build(mini_build):
    """builders' six triples, two pairs each, all kept by the filter, images replaced by the
    scenes above; returns (build, {pair_id: expected reason})."""
    recs = make_build(mini_build, samples=2, keep_every=1)
    expected = {}
    for i, pair in enumerate(recs["pairs"]):
        a, b, why = SCENES[i // 2][i % 2]
        a.save(mini_build.root / pair["images"]["input"])
        b.save(mini_build.root / pair["images"]["output"])
        expected[pair["id"]] = why
    assert len(list(join.scored_pairs(mini_build, kept_only=True))) == len(expected) == 12
    return mini_build, expected


def test_targets_are_the_phrases_the_captions_change():
    got = [targets({}, {"operation": op, "input": i, "edit": e, "output": o}).as_dict()
           for _, _, op, i, e, o in TRIPLES]
    assert [(g["old"], g["new"], g["thing"]) for g in got] == [
        (["red velvet armchair"], ["blue velvet armchair"], "velvet armchair"),
        ([], ["cushion"], None), (["armrests"], [], None), ([], ["rug"], None),
        (["floor lamp"], ["coffee table"], None),
        (["white linen sofa"], ["green linen sofa"], "linen sofa")]
    assert {g["source"] for g in got} == {"captions"}
    # no caption difference: generate's blend words, then the instruction
    t = targets({"params": {"blend_words": [[], ["wall", "clock"]]}},
                {"operation": "add", "input": "a room", "edit": "add a clock",
                 "output": "a room"})
    assert (t.new, t.source) == (["wall clock"], "blend_words")
    t = targets({}, {"operation": "remove", "input": "a room", "edit": "remove the old mirror",
                     "output": "a room"})
    assert (t.old, t.source) == (["old mirror"], "instruction")


def test_verdicts_on_scenes_with_known_truth_and_export_drops_rejects(scene_build):
    from dsbuild.export.writer import run_export
    from dsbuild.verify.stage import run_verify

    build, expected = scene_build
    det = SceneDetector()
    res = run_verify(build, detector=det, quiet=True, overrides=[
        *TINY_CHANGE, "verify.change_dir_min=-1", "verify.rest_min=0.999"])
    recs = {r["pair_id"]: r for r in build.records("verify")}
    assert {pid: r["reason"] for pid, r in recs.items()} == expected
    assert all(r["verdict"] == ("pass" if expected[p] is None else "reject")
               for p, r in recs.items())
    # each check carries what was measured
    change = next(c for r in recs.values() if r["reason"] == "change_spilled"
                  for c in r["checks"] if c["name"] == "change")
    assert change["rest"] < 0.999 and change["box"] == [20.0, 20.0, 40.0, 44.0]
    ok_change = next(c for p, r in recs.items() if expected[p] is None
                     and r["operation"] == "change" for c in r["checks"] if c["name"] == "change")
    assert ok_change["rest"] == pytest.approx(1.0, abs=1e-4)
    assert res.stats["passed"] == 4 and res.stats["reasons"]["change_not_detected"] == 2
    # each input image content once: the two change_not_detected inputs are the same scene
    assert det.encoded == 24
    rep = json.loads((build.reports_dir / "verify.json").read_text())
    assert rep["per_operation"]["add"] == {"pairs": 4, "passed": 1, "pass_rate": 0.25,
                                           "reasons": {"add_not_detected": 1,
                                                       "add_already_present": 1,
                                                       "near_copy": 1}}
    assert set(rep["per_agent"]) == {"chairs", "living-room"}
    assert rep["contact_sheet_pairs"] == 8
    assert Image.open(build.reports_dir / "verify_rejects.png").size[1] > 7 * 128
    # review shows the verdict: FiftyOne fields, Label Studio task data
    from dsbuild.review.fiftyone import collect_rows
    from dsbuild.review.labelstudio import select_pairs, task_data

    fo_rows = {r["pair_id"]: r["fields"] for r in collect_rows(build)[0]}
    assert {p: fo_rows[p]["verify_reason"] for p in expected} == expected
    assert "near_copy:fail(near_copy)" in fo_rows[next(
        p for p, why in expected.items() if why == "near_copy")]["verify_checks"]
    tasks = [task_data(r, {"input": "i", "output": "o"})
             for r in select_pairs(build, queue="all")]  # the queue holds no reject
    assert {t["pair_id"]: t["verify_reason"] for t in tasks} == expected
    queue = {r["pair_id"] for r in select_pairs(build)}
    assert queue and not queue & {p for p, why in expected.items() if why}
    # export drops what verify rejected, and says so
    run_export(build)
    info = json.loads((build.output_dir("export") / "export_info.json").read_text())
    assert info["stats"]["rejected_by_verify"] == 8 and info["stats"]["verify"] == "applied"
    from dsbuild.core.exports import load_export

    ds = load_export(build.output_dir("export"))
    exported = {r for split in ds.values() for r in split["pair_id"]}
    assert exported == {p for p, why in expected.items() if why is None}


def test_tiny_owlv2_through_the_cli_is_the_real_model(mini_build):
    """The real tiny OWLv2 end to end: `dsbuild verify BUILD`, one record per kept pair, report
    and contact sheet; a second run skips; its scores equal model(**processor(...))'s."""
    import torch
    from transformers import Owlv2Processor

    from dsbuild.cli import cli
    from dsbuild.models.owl import tiny_owlv2
    from dsbuild.verify.detector import Detector

    recs = make_build(mini_build, samples=2)
    kept = [s["pair_id"] for s in recs["scores"] if s["keep"]]
    args = ["verify", str(mini_build.root), "--set", "verify.detector=tiny",
            *[x for o in TINY_CHANGE for x in ("--set", o)]]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "passed" in r.output and "verify_rejects.png" in r.output
    build = Build.open(mini_build.root)  # the CLI saved the --set overrides
    out = list(build.records("verify"))
    assert sorted(x["pair_id"] for x in out) == sorted(kept)
    assert all({c["name"] for c in x["checks"]} >= {"near_copy"} and x["verdict"] in
               ("pass", "reject") for x in out)
    for f in ("verify.json", "verify.md", "verify_rejects.png"):
        assert (build.reports_dir / f).exists()
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "skipped" in again.output.lower(), again.output
    # the detector's scores are the model's own
    det = Detector.load("tiny", "cpu", "fp32", quiet=True, workers=0)
    path = mini_build.root / recs["pairs"][0]["images"]["input"]
    found, _ = det.detect({path: ["cushion", "floor lamp"]})
    m, ip, tok = tiny_owlv2()
    proc = Owlv2Processor(image_processor=ip, tokenizer=tok)
    inp = proc(text=[["cushion", "floor lamp"]], images=[Image.open(path).convert("RGB")],
               return_tensors="pt", padding="max_length", max_length=32, truncation=True)
    with torch.inference_mode():
        best = m.eval()(**inp).logits.sigmoid()[0].max(0).values
    assert found[path]["cushion"].score == pytest.approx(float(best[0]), abs=1e-5)
    assert found[path]["floor lamp"].score == pytest.approx(float(best[1]), abs=1e-5)


def test_a_worker_process_loads_verifys_models_once(mini_build, monkeypatch):
    """Executors run shard after shard in one process: verify's detector, CLIP and DINO load
    once (``dsbuild.models.keep_loaded``), and reusing them changes no score."""
    from dsbuild import models
    from dsbuild.verify.stage import run_verify

    make_build(mini_build, samples=2)
    tiny = ["verify.detector=tiny", *TINY_CHANGE, "verify.change_dir_min=-1"]
    monkeypatch.setattr(models, "_LOADED", {})
    calls = {"detector": 0, "encoders": 0}
    real = models.keep_loaded

    def counting(kind, key, load):
        def counted():
            calls[kind.removeprefix("verify-")] += 1
            return load()
        return real(kind, key, counted)

    monkeypatch.setattr(models, "keep_loaded", counting)
    shards = [run_verify(mini_build, r, 2, overrides=tiny, quiet=True, report=False)
              for r in (0, 1)]
    held = models._LOADED["verify-detector"][1], models._LOADED["verify-encoders"][1]
    assert calls == {"detector": 1, "encoders": 1}  # the second shard reused both
    assert sum(r.stats["images_detected"] for r in shards) > 0
    reused = {r["pair_id"]: r for r in mini_build.records("verify")}
    # a fresh process (nothing held) gives the very same records
    monkeypatch.setattr(models, "_LOADED", {})
    run_verify(mini_build, force=True, quiet=True, report=False)
    assert {r["pair_id"]: r for r in mini_build.records("verify")} == reused
    assert calls == {"detector": 2, "encoders": 2}
    assert models._LOADED["verify-detector"][1] is not held[0]


def _instruction(body: dict) -> str:
    return body["messages"][1]["content"][0]["text"].split("\n")[0].removeprefix("Instruction: ")


GOOD = json.dumps({"instruction": 9, "preserve": 8, "quality": 9, "reason": "done"})


def judge_handler():
    seen: dict[str, int] = {}

    def handler(body, n):
        instr = _instruction(body)
        seen[instr] = seen.get(instr, 0) + 1
        assert body["messages"][1]["content"][1]["image_url"]["url"].startswith(
            "data:image/png;base64,")
        if instr.startswith("add a cushion"):
            return chat("```json\n" + json.dumps({"instruction": 2, "preserve": 9,
                                                  "quality": 9}) + "\n```")
        if instr.startswith("remove"):
            return chat("I'm sorry, I can't help with that.")
        if instr.startswith("add a rug"):
            return chat("the edit looks fine to me")
        if instr.startswith("replace"):
            return chat(json.dumps({"instruction": 14, "preserve": 8, "quality": 9}))
        if instr.startswith("make the sofa") and seen[instr] == 1:
            return delay(3.0, chat(GOOD))  # slower than the timeout: retried
        return chat(GOOD)

    return handler


def judge_settings(url: str) -> list[str]:
    return ["verify.judge.enabled=true", f"verify.judge.base_url={url}",
            "verify.judge.model=test-model", "verify.judge.timeout=1",
            "verify.judge.max_retries=2", "verify.judge.retry_backoff=0",
            "verify.judge.concurrency=3", "verify.judge.image_side=64"]


@pytest.mark.server
def test_judge_good_malformed_refused_slow_cached(scene_build):
    from dsbuild.verify.stage import run_verify

    build, expected = scene_build
    port = free_port()
    with OpenAIServer(handler=judge_handler(), port=port) as srv:
        res = run_verify(build, detector=SceneDetector(), quiet=True, overrides=[
            *TINY_CHANGE, "verify.change_dir_min=-1", "verify.rest_min=0.999",
            *judge_settings(srv.base_url)])
        sent = len(srv.chat_requests)
        assert srv.max_in_flight <= 3
    recs = {r["pair_id"]: r for r in build.records("verify")}
    judge = {p: next(c for c in r["checks"] if c["name"] == "judge") for p, r in recs.items()}
    by_instr: dict[str, set] = {}
    pairs = join.pairs_by_id(build)
    triples = join.triples_by_id(build)
    for p, c in judge.items():
        edit = triples[pairs[p]["triple_id"]]["edit"]
        by_instr.setdefault(edit, set()).add((c["pass"], c["reason"]))
    assert by_instr["make the armchair blue"] == {(True, None)}
    assert by_instr["make the sofa green"] == {(True, None)}  # slow once, then answered
    assert by_instr["add a cushion"] == {(False, "judge_instruction")}
    assert by_instr["remove the armrests"] == {(None, "judge_bad_reply:refused")}
    assert by_instr["add a rug"] == {(None, "judge_bad_reply:not_json")}
    assert by_instr["replace the floor lamp with a coffee table"] == \
        {(None, "judge_bad_reply:out_of_range")}
    # the cushion pair that passed the detector is now rejected by the judge; bad replies
    # never reject
    cushion_ok = next(p for p, why in expected.items() if why is None
                      and triples[pairs[p]["triple_id"]]["edit"] == "add a cushion")
    assert recs[cushion_ok]["reason"] == "judge_instruction"
    st = res.stats["judge"]
    assert st["bad_replies"] == {"not_json": 2, "out_of_range": 2, "refused": 2}
    assert st["retry_reasons"].get("timeout", 0) >= 1 and sent == 12 + st["retries"]
    # a forced re-run is answered from the build's cache
    with OpenAIServer(handler=lambda b, n: error(500), port=port) as srv:
        run_verify(build, detector=SceneDetector(), quiet=True, force=True)
        assert srv.chat_requests == []


@pytest.mark.server
def test_a_judge_that_scores_nothing_fails_the_stage_unless_optional(scene_build):
    """A judge that answers only nonsense: exit 1 with the count and the report, no marker
    (it used to pass with every pair unchecked); verify.judge.optional=true accepts the same
    records without asking again."""
    from dsbuild.verify.stage import run_verify

    build, _ = scene_build
    port = free_port()
    with OpenAIServer(handler=lambda b, n: chat("what a lovely room"), port=port) as srv:
        with pytest.raises(StageFailed) as exc:
            run_verify(build, detector=SceneDetector(), quiet=True, overrides=[
                *TINY_CHANGE, *judge_settings(srv.base_url)])
        assert len(srv.chat_requests) == 12
    msg = str(exc.value)
    assert "\n" not in msg and "scored none of the 12 pairs it was asked about" in msg
    assert "bad_reply:not_json=12" in msg and str(build.reports_dir / "verify.md") in msg
    assert "verify.judge.optional=true" in msg
    assert not build.is_complete("verify") and not build.marker_dir("verify").exists()
    assert "| judge-rubric | " in (md := (build.reports_dir / "verify.md").read_text())
    assert "| 12 pairs (all) | 0 | 0 | 12 | 0 |" in md
    sig = build.signature("verify")
    with OpenAIServer(handler=lambda b, n: error(500), port=port) as srv:
        res = run_verify(build, detector=SceneDetector(), quiet=True,
                         overrides=["verify.judge.optional=true"])
        assert srv.chat_requests == []  # the written records resume: nothing asked again
    assert build.signature("verify") == sig and build.is_complete("verify")
    assert res.records == 12 and res.stats["judge_scored"] == 0


@pytest.mark.server
def test_judge_failures_stop_without_marker_and_resume(scene_build):
    from dsbuild.verify.stage import run_verify

    build, _ = scene_build
    port = free_port()  # the same endpoint comes back healthy on the same port
    with OpenAIServer(handler=lambda b, n: error(503) if _instruction(b).startswith("add a rug")
                      else chat(GOOD), port=port) as srv:
        with pytest.raises(StageFailed, match="judge request"):
            run_verify(build, detector=SceneDetector(), quiet=True, overrides=[
                *TINY_CHANGE, *judge_settings(srv.base_url), "verify.judge.max_retries=0",
                "verify.judge.fail_after_errors=0"])
    assert not build.is_complete("verify")
    partial = build.output_dir("verify") / "r00000.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 10  # every pair but the two rug pairs
    with OpenAIServer(handler=lambda b, n: chat(GOOD), port=port) as srv:
        run_verify(build, detector=SceneDetector(), quiet=True)
        assert len(srv.chat_requests) == 2  # only what was missing
    assert build.is_complete("verify") and len(list(build.records("verify"))) == 12
