"""Re-captioning (dsbuild.llm.recaption, verify.recaption, export.edit_prompt): the reply
parse, verify's re-caption records for the pairs that passed against a real OpenAI-compatible
server on 127.0.0.1 (tests/openai_server.py: re-captions, "unchanged", garbage, a failing
endpoint and the resume after it), the marker stats and the report, and the export: which
instruction edit_prompt shows, both columns, a curator's correction over both, an unchanged
pair dropped under ``recaptioned`` only, the counts and the card's sentence."""

from __future__ import annotations

import json

import pytest
from openai_server import OpenAIServer, chat, error, free_port
from test_verify import TINY_CHANGE, SceneDetector, _instruction, scene_build

from dsbuild.core import join
from dsbuild.core.errors import StageFailed
from dsbuild.llm.recaption import SYSTEM, parse, prompt_hash, same

pytestmark = pytest.mark.usefixtures("one_torch_thread")
__all__ = ["scene_build"]  # the fixture, shared with test_verify

LOOSE = [*TINY_CHANGE, "verify.change_dir_min=-1", "verify.rest_min=0.999"]
# under LOOSE the scenes pass these four pairs (one sample each), the other eight are rejected
REPLIES = {
    "make the armchair blue": "```text\nMake the armchair dark blue.\n```",  # differs
    "add a cushion": '"Add a cushion."',  # the same instruction, quoted
    "remove the armrests": "Unchanged.",  # the re-captioner saw no change
    "replace the floor lamp with a coffee table": "The picture shows a room.\nIt has a table.",
}


def recaption_settings(url: str) -> list[str]:
    return ["verify.recaption.enabled=true", f"verify.recaption.base_url={url}",
            "verify.recaption.model=vlm", "verify.recaption.timeout=2",
            "verify.recaption.max_retries=1", "verify.recaption.retry_backoff=0",
            "verify.recaption.fail_after_errors=0", "verify.recaption.image_side=64"]


def handler(body, n):
    assert body["messages"][0]["content"] == SYSTEM
    assert [c["type"] for c in body["messages"][1]["content"]] == [
        "text", "image_url", "text", "image_url"]
    return chat(REPLIES[_instruction(body)], model="vlm-2026-01")


def _records(build) -> dict[str, dict]:
    """instruction -> the verify record of its pair that passed (one each under LOOSE)."""
    pairs, triples = join.pairs_by_id(build), join.triples_by_id(build)
    return {triples[pairs[r["pair_id"]]["triple_id"]]["edit"]: r
            for r in build.records("verify") if r["verdict"] == "pass"}


def test_the_parse_strips_wrapping_and_tells_unchanged_and_missing():
    assert parse({"content": '  "Add a rug."  '}, "add a rug") == {"instruction": "Add a rug"}
    assert parse({"content": "Add a rug."}, "Add a rug.") == {"instruction": "Add a rug."}
    assert parse({"content": "```\nmake the sofa green\n```"}) == {
        "instruction": "make the sofa green"}
    assert parse({"content": "```text\nInstruction: “paint the wall red”\n```"}) == {
        "instruction": "paint the wall red"}
    for text in ("unchanged", "UNCHANGED.", "Unchanged!", "'unchanged'", "`Unchanged`"):
        assert parse({"content": text}) == {"unchanged": True}, text
    assert parse({"content": "   "}) == {"bad": "no_reply"}
    assert parse({"content": None}) == {"bad": "no_reply"}
    assert parse({"content": "I'm sorry, I can't help with that."}) == {"bad": "refused"}
    assert parse({"content": "add a rug", "finish_reason": "content_filter"}) == {
        "bad": "refused"}
    assert parse({"content": "First line.\nSecond line."}) == {"bad": "not_an_instruction"}
    assert parse({"content": '{"instruction": "add a rug"}'}) == {"bad": "not_an_instruction"}
    assert parse({"content": " ".join(["word"] * 41)}) == {"bad": "not_an_instruction"}
    assert same("Add a rug.", "add  a rug") and not same("add a rug", "add a red rug")
    assert not same(None, "add a rug")
    assert len(prompt_hash()) >= 8 and prompt_hash() == prompt_hash()


@pytest.mark.server
def test_verify_records_recaptions_and_export_keeps_both_instructions(scene_build):
    from PIL import Image

    from dsbuild.core.decisions import add_decisions, make_decision
    from dsbuild.core.exports import load_export
    from dsbuild.export.writer import run_export
    from dsbuild.verify.stage import run_verify

    build, expected = scene_build
    with OpenAIServer(handler=handler) as srv:
        res = run_verify(build, detector=SceneDetector(), quiet=True,
                         overrides=[*LOOSE, *recaption_settings(srv.base_url)])
        assert len(srv.chat_requests) == 4  # only the pairs that passed
    recs = list(build.records("verify"))
    assert len(recs) == 12
    assert all("recaption" not in r for r in recs if r["verdict"] == "reject")
    got = _records(build)
    assert set(got) == set(REPLIES)
    ident = {"model_requested": "vlm", "model_reported": "vlm-2026-01",
             "prompt_hash": prompt_hash(), "temperature": 0.0}
    for edit, r in got.items():
        assert {k: r["recaption"][k] for k in ident} == ident
        assert r["recaption"]["raw"] == REPLIES[edit]
    rc = {e: {k: r["recaption"][k] for k in ("instruction", "unchanged", "missing")}
          for e, r in got.items()}
    assert rc == {
        "make the armchair blue": {"instruction": "Make the armchair dark blue",
                                   "unchanged": False, "missing": None},
        "add a cushion": {"instruction": "Add a cushion", "unchanged": False, "missing": None},
        "remove the armrests": {"instruction": None, "unchanged": True, "missing": None},
        "replace the floor lamp with a coffee table": {
            "instruction": None, "unchanged": False, "missing": "not_an_instruction"}}
    # re-captioning never changes a verdict
    assert {r["pair_id"]: r["reason"] for r in recs} == expected
    st = res.stats["recaption"]
    assert {k: st[k] for k in ("asked", "recaptioned", "unchanged", "missing", "differ")} == {
        "asked": 4, "recaptioned": 2, "unchanged": 1, "missing": 1, "differ": 1}
    assert st["requests"]["sent"] == 4 and st["requests"]["bad_replies"] == {
        "not_an_instruction": 1}
    rep = json.loads((build.reports_dir / "verify.json").read_text())["recaption"]
    assert rep["per_operation"] == {
        "add": {"same": 1, "differ": 0, "unchanged": 0, "missing": 0},
        "change": {"same": 0, "differ": 1, "unchanged": 0, "missing": 0},
        "remove": {"same": 0, "differ": 0, "unchanged": 1, "missing": 0},
        "replace": {"same": 0, "differ": 0, "unchanged": 0, "missing": 1}}
    assert rep["examples"] == [{"pair_id": got["make the armchair blue"]["pair_id"],
                                "generated": "make the armchair blue",
                                "recaptioned": "Make the armchair dark blue"}]
    assert rep["models_reported"] == {"vlm-2026-01": 4}
    md = (build.reports_dir / "verify.md").read_text()
    assert "## Re-captioning" in md and "| re-captioned | 2 (1 differ from the generated " \
        "instruction) |" in md and "| missing, by reason | not_an_instruction 1 |" in md
    with Image.open(build.reports_dir / "verify_recaption.png") as im:
        assert im.size[0] > 400

    def exported() -> tuple[dict[str, dict], dict, str]:
        out = build.output_dir("export")
        ds = load_export(out)
        rows = {r["original_edit"]: r for split in ds.values() for r in split}
        info = json.loads((out / "export_info.json").read_text())
        return rows, info["stats"], (out / "README.md").read_text()

    # generated (default): edit_prompt is the generated instruction, the re-caption beside it
    run_export(build)
    rows, st, card = exported()
    assert set(rows) == set(REPLIES)  # the unchanged pair stays
    assert {e: r["edit_prompt"] for e, r in rows.items()} == {e: e for e in REPLIES}
    assert {e: r["edit_prompt_generated"] for e, r in rows.items()} == {e: e for e in REPLIES}
    assert {e: r["edit_prompt_recaptioned"] for e, r in rows.items()} == {
        "make the armchair blue": "Make the armchair dark blue", "add a cushion": "Add a cushion",
        "remove the armrests": None, "replace the floor lamp with a coffee table": None}
    assert {k: st[k] for k in ("edit_prompt", "recaptioned", "recaption_differs",
                               "dropped_unchanged")} == {
        "edit_prompt": "generated", "recaptioned": 2, "recaption_differs": 1,
        "dropped_unchanged": 0}
    assert "`edit_prompt` holds the generated instruction" in card
    assert "re-captioned 2 of the 4 exported edit rows, and its instruction differs from the " \
        "generated one in 1 (50%) of them" in card
    assert "| edit_prompt_generated / edit_prompt_recaptioned |" in card

    # recaptioned: the re-caption where there is one; the unchanged pair is dropped, counted
    build.update(["export.edit_prompt=recaptioned"])
    run_export(build)
    rows, st, card = exported()
    assert set(rows) == set(REPLIES) - {"remove the armrests"}
    assert {e: r["edit_prompt"] for e, r in rows.items()} == {
        "make the armchair blue": "Make the armchair dark blue", "add a cushion": "Add a cushion",
        "replace the floor lamp with a coffee table":
            "replace the floor lamp with a coffee table"}
    assert rows["make the armchair blue"]["edit_prompt_generated"] == "make the armchair blue"
    assert not rows["make the armchair blue"]["corrected"]
    assert (st["edit_prompt"], st["recaptioned"], st["recaption_differs"],
            st["dropped_unchanged"]) == ("recaptioned", 2, 1, 1)
    assert "`edit_prompt` holds the re-captioned instruction where the pair has one" in card
    assert "1 pairs the re-captioner saw no change in were left out." in card

    # a curator's correction wins over both, and keeps an unchanged pair it corrects
    fix = {"make the armchair blue": "paint the armchair navy",
           "remove the armrests": "saw off the left armrest"}
    add_decisions(build, [make_decision(got[e]["pair_id"], "accept", tool="fiftyone",
                                        reviewer="cur", corrected_edit=f)
                          for e, f in fix.items()])
    run_export(build)
    rows, st, _ = exported()
    assert set(rows) == set(REPLIES)
    for e, f in fix.items():
        assert (rows[e]["edit_prompt"], rows[e]["corrected"]) == (f, True)
        assert rows[e]["edit_prompt_generated"] == e
    assert rows["make the armchair blue"]["edit_prompt_recaptioned"] == \
        "Make the armchair dark blue"
    assert st["dropped_unchanged"] == 0
    build.update(["export.edit_prompt=generated"])
    run_export(build)
    rows, _, _ = exported()
    assert rows["make the armchair blue"]["edit_prompt"] == "paint the armchair navy"


@pytest.mark.server
def test_a_failing_endpoint_stops_verify_and_a_rerun_resumes(scene_build):
    from dsbuild.verify.stage import run_verify

    build, _ = scene_build
    port = free_port()
    with OpenAIServer(handler=lambda b, n: error(500), port=port) as srv:
        with pytest.raises(StageFailed) as exc:
            run_verify(build, detector=SceneDetector(), quiet=True,
                       overrides=[*LOOSE, *recaption_settings(srv.base_url)])
        assert len(srv.chat_requests) == 4 * 2  # each passing pair asked, then retried once
    msg = str(exc.value)
    assert "4 re-caption request(s) failed after 1 retries" in msg and "judge" not in msg
    assert "again to resume" in msg and "\n" not in msg
    assert not build.is_complete("verify")
    with OpenAIServer(handler=handler, port=port) as srv:
        res = run_verify(build, detector=SceneDetector(), quiet=True)
        assert len(srv.chat_requests) == 4  # only the failed ones, once each
    assert build.is_complete("verify")
    assert set(_records(build)) == set(REPLIES)
    assert res.stats["recaption"]["asked"] == 4
    # replies come from the cache: a forced re-run asks nothing
    with OpenAIServer(handler=lambda b, n: error(500), port=port) as srv:
        run_verify(build, detector=SceneDetector(), quiet=True, force=True)
        assert srv.chat_requests == []
    assert _records(build)["make the armchair blue"]["recaption"]["instruction"] == \
        "Make the armchair dark blue"


def test_recaption_signs_only_when_enabled():
    from dsbuild.verify.settings import VerifySettings

    off = VerifySettings().signature_dict()
    assert "recaption" not in off
    on = VerifySettings(recaption={"enabled": True, "model": "vlm"}).signature_dict()
    assert on["recaption"]["model"] == "vlm"
    slow = VerifySettings(recaption={"enabled": True, "model": "vlm", "timeout": 99,
                                     "max_retries": 9}).signature_dict()
    assert slow == on  # transport settings never sign
