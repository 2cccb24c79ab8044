"""The judge you can trust (dsbuild.llm.judge): the prompt and reply schema follow the rubric,
every judged pair's verify record holds a judge record (identity, raw reply, scores, weighted
score, verdict), an unusable reply is missing (counted, never 0, never a reject), weights and
thresholds decide, a failing endpoint stops the stage and a re-run resumes, and the verify
report names who judged and warns when the server reports another model. All against a real
OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai_server import OpenAIServer, chat, delay, error, free_port
from test_verify import TINY_CHANGE, SceneDetector, _instruction, judge_settings, scene_build

from dsbuild.core import join
from dsbuild.core.errors import DsbuildError, StageFailed
from dsbuild.llm.judge import parse, prompt_hash, reply_model, system_prompt
from dsbuild.llm.rubric import resolve
from dsbuild.verify.settings import JudgeSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
__all__ = ["scene_build"]  # the fixture, shared with test_verify

# the judge's system prompt before rubrics existed: cached replies and records depend on it
OLD_SYSTEM = (
    "You check image edits. You get an editing instruction, the input image and the edited "
    "image. Score each from 0 to 10: instruction = how fully the edited image carries out the "
    "instruction; preserve = how well everything the instruction does not mention stayed the "
    "same (10: nothing else changed); quality = how natural and free of artefacts the edited "
    'image is. Answer with JSON only: {"instruction": <int>, "preserve": <int>, '
    '"quality": <int>, "reason": "<one short sentence>"}'
)
LOOSE = [*TINY_CHANGE, "verify.change_dir_min=-1", "verify.rest_min=0.999"]


def _system(body: dict) -> str:
    return body["messages"][0]["content"]


def _judged(build) -> dict[str, tuple[str, dict]]:
    """pair id -> (its instruction, its verify record)."""
    pairs, triples = join.pairs_by_id(build), join.triples_by_id(build)
    return {r["pair_id"]: (triples[pairs[r["pair_id"]]["triple_id"]]["edit"], r)
            for r in build.records("verify")}


def test_the_dsbuild_prompt_is_the_old_one_and_schemas_follow_the_rubric():
    rubric = JudgeSettings().resolved()
    assert system_prompt(rubric) == OLD_SYSTEM
    assert prompt_hash(rubric) == prompt_hash(JudgeSettings(instruction_min=2).resolved())
    assert prompt_hash(rubric) != prompt_hash(resolve("pico-banana"))
    own = resolve([{"name": "colour", "description": "the new colour is the one asked for",
                    "weight": 2, "min": 5}, {"name": "sharp", "description": "it is sharp"}])
    assert system_prompt(own).split("0 to 10: ")[1] == (
        'colour = the new colour is the one asked for; sharp = it is sharp. Answer with JSON '
        'only: {"colour": <int>, "sharp": <int>, "reason": "<one short sentence>"}')
    model = reply_model(own)
    assert set(model.model_fields) == {"colour", "sharp", "reason"}
    ok = {"content": '```json\n{"colour": 7, "sharp": 3, "reason": "ok"}\n```'}
    assert parse(ok, model) == {"scores": {"colour": 7, "sharp": 3}, "reason": "ok"}
    # the dsbuild fields are not this rubric's: a criterion is missing
    assert parse({"content": '{"instruction": 9, "preserve": 9, "quality": 9}'}, model) == \
        {"bad": "missing_field"}
    assert parse({"content": '{"colour": 11, "sharp": 3}'}, model) == {"bad": "out_of_range"}
    assert parse({"content": '{"colour": -1, "sharp": 3}'}, model) == {"bad": "out_of_range"}
    assert parse({"content": "[7, 3]"}, model) == {"bad": "not_json"}
    assert parse({"content": "I cannot judge this image."}, model) == {"bad": "refused"}
    assert parse({"content": "", "finish_reason": "content_filter"}, model) == {"bad": "refused"}
    assert parse({"content": '{"refusal": "no"}'}, model) == {"bad": "refused"}


@pytest.mark.server
def test_records_hold_identity_scores_and_missing_and_the_report_warns_of_drift(scene_build):
    from dsbuild.verify.stage import run_verify

    build, expected = scene_build
    seen: dict[str, int] = {}
    good = {"instruction": 9, "preserve": 8, "quality": 7, "reason": "done"}

    def handler(body, n):
        assert _system(body) == OLD_SYSTEM
        instr = _instruction(body)
        seen[instr] = seen.get(instr, 0) + 1
        if instr.startswith("add a cushion"):
            return chat("the edit looks fine to me")  # not JSON
        if instr.startswith("remove"):
            return chat(json.dumps({"instruction": 9, "quality": 9}))  # a field missing
        if instr.startswith("replace"):
            return chat(json.dumps({"instruction": 9, "preserve": 11, "quality": 9}))
        if instr.startswith("add a rug"):
            return chat("I'm sorry, I can't help with that.")
        if instr.startswith("make the sofa") and seen[instr] == 1:
            return delay(3.0, chat(json.dumps(good)))  # slower than the timeout: retried
        if instr.startswith("make the armchair"):  # the server answers as another model
            return chat(json.dumps({**good, "preserve": 3}), model="test-model-2026-05")
        return chat(json.dumps(good))

    with OpenAIServer(handler=handler) as srv:
        res = run_verify(build, detector=SceneDetector(), quiet=True,
                         overrides=[*LOOSE, *judge_settings(srv.base_url)])
    rubric = build.config.verify.judge.resolved()
    got = _judged(build)
    assert len(got) == 12 and all("judge" in r for _, r in got.values())
    missing = {}
    for pid, (edit, r) in got.items():
        j = r["judge"]
        assert (j["model_requested"], j["rubric"], j["rubric_hash"], j["prompt_hash"],
                j["temperature"], j["threshold"]) == (
            "test-model", "dsbuild", rubric.hash, prompt_hash(rubric), 0.0, 0.0)
        check = next(c for c in r["checks"] if c["name"] == "judge")
        if j["missing"]:
            missing[edit] = j["missing"]
            # never a 0 and never a reject: no score, no verdict, the check unchecked
            assert (j["scores"], j["score"], j["passed"]) == (None, None, None)
            assert (check["pass"], check["reason"]) == (None, f"judge_bad_reply:{j['missing']}")
            assert r["reason"] == expected[pid]
        elif edit == "make the armchair blue":
            assert j["model_reported"] == "test-model-2026-05"
            assert j["scores"] == {"instruction": 9, "preserve": 3, "quality": 7}
            assert (j["passed"], j["failed"], check["reason"]) == (False, "preserve",
                                                                   "judge_preserve")
            assert j["score"] == pytest.approx((9 + 3 + 7) / 30, abs=1e-4)
            assert r["verdict"] == "reject"
        else:
            assert j["model_reported"] == "test-model"
            assert json.loads(j["raw"]) == good and j["reason"] == "done"
            assert (j["scores"], j["passed"], j["failed"]) == (
                {"instruction": 9, "preserve": 8, "quality": 7}, True, None)
            assert j["score"] == pytest.approx(0.8, abs=1e-4)
            assert check == {"name": "judge", "pass": True, "reason": None,
                             "scores": {"instruction": 9, "preserve": 8, "quality": 7,
                                        "reason": "done"}}
    assert missing == {"add a cushion": "not_json", "remove the armrests": "missing_field",
                       "replace the floor lamp with a coffee table": "out_of_range",
                       "add a rug": "refused"}
    assert got[next(p for p, (e, _) in got.items() if e == "add a rug")][1]["judge"]["raw"] \
        == "I'm sorry, I can't help with that."
    st = res.stats["judge"]
    assert st["bad_replies"] == {"missing_field": 2, "not_json": 2, "out_of_range": 2,
                                 "refused": 2}
    assert st["retry_reasons"].get("timeout", 0) >= 1 and seen["make the sofa green"] >= 2
    # the report: who judged, under which rubric, what is missing, and the drift warning
    rep = json.loads((build.reports_dir / "verify.json").read_text())["judge"]
    assert rep["model_requested"] == {"test-model": 12}
    assert rep["models_reported"] == {"test-model": 10, "test-model-2026-05": 2}
    assert (rep["rubric"], rep["rubric_hash"], rep["threshold"]) == ("dsbuild", rubric.hash, 0)
    assert rep["missing"] == {"missing_field": 2, "not_json": 2, "out_of_range": 2,
                              "refused": 2}
    assert (rep["judged"], rep["scored"], rep["passed"]) == (12, 4, 2)
    assert rep["failed"] == {"preserve": 2}
    assert rep["mean_score"] == pytest.approx((2 * 0.8 + 2 * 19 / 30) / 4, abs=1e-3)
    assert rep["criteria_means"] == {"instruction": 9, "preserve": 5.5, "quality": 7}
    # the picture's bins: the two 0.8 pairs passed, the two 0.633 pairs failed
    hist = rep["histogram"]
    assert [i for i, n in enumerate(hist["passed"]) for _ in range(n)] == [16, 16]
    assert [i for i, n in enumerate(hist["failed"]) for _ in range(n)] == [12, 12]
    from PIL import Image

    with Image.open(build.reports_dir / "verify_judge.png") as im:
        assert im.size[0] > 600 and im.size[1] > 300
    md = (build.reports_dir / "verify.md").read_text()
    warn = [ln for ln in md.splitlines() if ln.startswith("**Warning:**")]
    assert len(warn) == 2 and "test-model-2026-05" in warn[1] and "test-model" in warn[1]
    assert "## Judge" in md and f"| rubric | dsbuild ({rubric.hash}) |" in md
    assert "| missing, by reason | missing_field 2, not_json 2, out_of_range 2, refused 2 |" in md


@pytest.mark.server
def test_pico_banana_weights_and_threshold_decide(scene_build):
    """Pico-Banana's weights: a pair at weighted 0.665 is rejected judge_weighted, 0.715 passes;
    a lower threshold re-decides from the cache without asking again."""
    from dsbuild.verify.stage import run_verify

    build, expected = scene_build
    low = {"instruction": 7, "realism": 7, "preservation": 6, "technical": 6}  # 0.665
    high = {"instruction": 7, "realism": 7, "preservation": 7, "technical": 8}  # 0.715

    def handler(body, n):
        assert "realism = how realistic" in _system(body)
        assert '"preservation": <int>, "technical": <int>, "reason"' in _system(body)
        return chat(json.dumps(low if _instruction(body).startswith("make the armchair")
                               else high))

    port = free_port()
    with OpenAIServer(handler=handler, port=port) as srv:
        run_verify(build, detector=SceneDetector(), quiet=True, overrides=[
            *LOOSE, *judge_settings(srv.base_url), "verify.judge.rubric=pico-banana"])
        assert len(srv.chat_requests) == 12
    got = _judged(build)
    for pid, (edit, r) in got.items():
        j = r["judge"]
        check = next(c for c in r["checks"] if c["name"] == "judge")
        assert (j["rubric"], j["threshold"]) == ("pico-banana", 0.7)
        if edit == "make the armchair blue":
            assert j["score"] == pytest.approx(0.665, abs=1e-6)
            assert (j["passed"], j["failed"]) == (False, "weighted")
            assert (check["pass"], check["reason"], check["score"]) == (False, "judge_weighted",
                                                                         j["score"])
            assert r["reason"] == (expected[pid] or "judge_weighted")
        else:
            assert j["score"] == pytest.approx(0.715, abs=1e-6)
            assert (j["passed"], check["pass"]) == (True, True)
            assert r["reason"] == expected[pid]
    ok = next(p for p, (e, _) in got.items() if e == "make the armchair blue"
              and expected[p] is None)
    assert got[ok][1]["verdict"] == "reject"
    # threshold 0.6: the same replies (from the cache) now pass the armchair pair
    with OpenAIServer(handler=lambda b, n: error(500), port=port) as srv:
        run_verify(build, detector=SceneDetector(), quiet=True,
                   overrides=["verify.judge.threshold=0.6"])
        assert srv.chat_requests == []
    again = _judged(build)
    assert again[ok][1]["verdict"] == "pass" and again[ok][1]["judge"]["threshold"] == 0.6
    # an unknown rubric: a one-line error naming the setting
    with pytest.raises(DsbuildError) as exc:
        run_verify(build, detector=SceneDetector(), quiet=True,
                   overrides=["verify.judge.rubric=viescore"])
    assert "\n" not in str(exc.value) and "verify.judge.rubric" in str(exc.value)
    assert "pico-banana" in str(exc.value)


@pytest.mark.server
def test_own_criteria_shape_the_prompt_the_reply_and_the_reasons(scene_build):
    from dsbuild.verify.stage import run_verify

    build, expected = scene_build
    own = ('[{name: colour, description: "the new colour is the one asked for", weight: 3, '
           'min: 5}, {name: sharp, description: "the edited image is sharp"}]')

    def handler(body, n):
        assert "colour = the new colour is the one asked for; sharp = the edited image " \
            "is sharp." in _system(body)
        if _instruction(body).startswith("make the armchair"):
            return chat(json.dumps({"colour": 4, "sharp": 10}))  # under colour's minimum
        if _instruction(body).startswith("add a rug"):  # the old rubric's reply
            return chat(json.dumps({"instruction": 9, "preserve": 9, "quality": 9}))
        return chat(json.dumps({"colour": 8, "sharp": 4}))

    with OpenAIServer(handler=handler) as srv:
        run_verify(build, detector=SceneDetector(), quiet=True, overrides=[
            *LOOSE, *judge_settings(srv.base_url), f"verify.judge.rubric={own}",
            "verify.judge.threshold=0.5"])
    for pid, (edit, r) in _judged(build).items():
        j = r["judge"]
        check = next(c for c in r["checks"] if c["name"] == "judge")
        assert j["rubric"] == "custom"
        if edit == "make the armchair blue":
            assert (j["passed"], j["failed"], check["reason"]) == (False, "colour",
                                                                   "judge_colour")
            assert r["verdict"] == "reject"
            assert r["reason"] == (expected[pid] or "judge_colour")  # the detector's first
            assert j["score"] == pytest.approx((3 * 4 + 10) / 40, abs=1e-4)
        elif edit == "add a rug":
            assert (j["missing"], j["scores"]) == ("missing_field", None)
        else:
            assert j["scores"] == {"colour": 8, "sharp": 4} and j["passed"] is True
            assert j["score"] == pytest.approx(0.7, abs=1e-4)


@pytest.mark.server
def test_a_failing_endpoint_stops_the_stage_and_a_healthy_one_resumes(scene_build):
    from dsbuild.verify.stage import run_verify

    build, _ = scene_build
    port = free_port()
    with OpenAIServer(handler=lambda b, n: error(500), port=port) as srv:
        with pytest.raises(StageFailed) as exc:
            run_verify(build, detector=SceneDetector(), quiet=True, overrides=[
                *LOOSE, *judge_settings(srv.base_url), "verify.judge.max_retries=1",
                "verify.judge.fail_after_errors=0"])
        assert len(srv.chat_requests) == 12 * 2  # each pair asked, then retried once
    msg = str(exc.value)
    assert "12 judge request(s) failed after 1 retries" in msg and "again to resume" in msg
    assert not build.is_complete("verify")
    with OpenAIServer(handler=lambda b, n: chat(json.dumps(
            {"instruction": 8, "preserve": 8, "quality": 8})), port=port) as srv:
        run_verify(build, detector=SceneDetector(), quiet=True)
        assert len(srv.chat_requests) == 12  # the failed ones asked again, once each
    recs = list(build.records("verify"))
    assert build.is_complete("verify") and len(recs) == 12
    assert all(r["judge"]["passed"] is True and r["judge"]["missing"] is None for r in recs)


def test_a_rubric_on_another_scale_and_a_question_about_the_output_alone():
    from dsbuild.llm.judge import Judge
    from dsbuild.llm.settings import LLMSettings

    five = resolve([{"name": "compliance", "description": "the edit does what was asked"},
                    {"name": "integrity", "description": "no artefacts", "weight": 3}],
                   scale=(1, 5))
    assert "Score each from 1 to 5: compliance = " in system_prompt(five)
    model = reply_model(five)
    assert parse({"content": '{"compliance": 5, "integrity": 1}'}, model)["scores"] == {
        "compliance": 5, "integrity": 1}
    assert parse({"content": '{"compliance": 0, "integrity": 3}'}, model) == {
        "bad": "out_of_range"}
    # (w * (s - lo)) / ((hi - lo) * sum w): (1 * 4 + 3 * 0) / (4 * 4)
    assert five.weighted({"compliance": 5, "integrity": 1}) == pytest.approx(0.25)
    assert five.as_dict()["scale"] == [1, 5] and five.hash != resolve(
        [c.model_dump() for c in five.criteria]).hash
    assert "scale" not in resolve("dsbuild").as_dict()  # 0-10 rubrics keep their hashes
    with pytest.raises(ValueError, match="scale"):
        resolve([{"name": "a", "description": "x", "min": 7}], scale=(1, 5))
    pq = system_prompt(five, "output")
    assert pq.startswith("You check images. You get one image.") and "instruction" not in \
        pq.split(":")[0]
    assert prompt_hash(five, "output") != prompt_hash(five)
    with pytest.raises(ValueError, match="shows"):
        Judge(LLMSettings(), Path("."), five, shows="input")


def test_an_output_only_question_sends_one_image_and_no_instruction(tmp_path, monkeypatch):
    from PIL import Image

    from dsbuild.llm.judge import Judge
    from dsbuild.verify.settings import JudgeSettings

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    rubric = resolve([{"name": "naturalness", "description": "looks natural"}])
    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(png)
    with OpenAIServer(handler=lambda req, n: chat('{"naturalness": 8}', model="m-1")) as srv:
        j = Judge(JudgeSettings(model="m", base_url=srv.base_url, max_retries=0),
                  tmp_path / "cache", rubric, key="pq", shows="output")
        got = j.ask([("p1", "make it red", None, png)])
        (req,) = srv.chat_requests
    parts = req["body"]["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url"] and parts[0]["text"] == "Image:"
    assert "make it red" not in json.dumps(req["body"])
    rec = got["p1"]
    assert rec["scores"] == {"naturalness": 8} and rec["model_reported"] == "m-1"
    assert rec["prompt_hash"] == prompt_hash(rubric, "output")
