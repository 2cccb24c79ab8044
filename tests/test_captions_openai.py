"""The openai backend through the real openai SDK against a scripted local HTTP server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai_server import (
    HangingServer,
    OpenAIServer,
    Reply,
    chat,
    delay,
    error,
    free_port,
)

from dsbuild.captions.stage import run_captions
from dsbuild.core.build import Build
from dsbuild.core.config import load_recipe
from dsbuild.core.errors import DsbuildError, StageFailed

pytestmark = pytest.mark.server

COLOURS = ["red", "blue", "green", "grey", "white", "black", "yellow", "pink", "brown", "teal"]
STYLES = ["modern", "rustic", "scandinavian", "industrial", "coastal"]


def good_line(agent: str, u: int) -> dict:
    """The u-th valid, unique triple for an agent of the mini recipe."""
    c1, c2 = COLOURS[u % 10], COLOURS[(u + 3) % 10]
    style = STYLES[(u // 10) % 5]
    if agent == "chairs":
        return {"input": f"a {style} {c1} oak armchair", "edit": f"make the armchair {c2}",
                "output": f"a {style} {c2} oak armchair"}
    return {"input": f"a {style} living room with a {c1} linen sofa and no rug",
            "edit": "add a rug", "output": f"a {style} living room with a {c1} linen sofa and a rug"}


def request_of(body: dict) -> tuple[str, int]:
    """(agent, batch number) of a chat request built by dsbuild's prompt."""
    user = body["messages"][-1]["content"]
    agent = "chairs" if "chairs of every kind" in user else "living-room"
    return agent, int(re.search(r"Batch (\d+)\.", user).group(1))


BAD_CHAIR_LINES = [
    "Here are your samples:",                                          # not_json
    "42",                                                              # not_object
    json.dumps({"input": "a red chair", "edit": "make it blue"}),      # missing_field
    json.dumps({"input": "a red chair", "edit": "make it red", "output": "a red chair"}),
    json.dumps({"input": "a red chair", "edit": "the chair is blue now",
                "output": "a blue chair"}),                            # edit_not_instruction
    json.dumps({"input": "a red velvet armchair by a window in a bright room",
                "edit": "make the armchair blue",
                "output": "a red velvet armchair by a door in a bright room"}),
    json.dumps({"input": "a red velvet armchair", "edit": "remove the cushion",
                "output": "a red velvet armchair without a cushion"}),  # remove_not_in_input
    json.dumps({"input": "a red velvet armchair", "edit": "add a cushion",
                "output": "a red velvet armchair with a cushion"}),     # add_not_absent_in_input
    json.dumps({"input": "a red velvet armchair", "edit": "make the armchair blue",
                "output": "a blue velvet armchair"}),                  # copies_example
    json.dumps({"input": "a red velvet armchair", "edit": "make the armchair a blue oak stool",
                "output": "a blue oak stool"}),                        # diff_too_large
    json.dumps({"input": "a red velvet armchair with a cushion next to an oak table",
                "edit": "make the armchair blue and the table pine and the cushion green",
                "output": "a blue velvet armchair with a green cushion next to a pine table"}),
    json.dumps({"input": "a red velvet armchair with a cushion and a throw",
                "edit": "remove the cushion",
                "output": "a red velvet armchair with a cushion and no throw"}),
    json.dumps({"input": "a red velvet armchair without a cushion", "edit": "add a cushion",
                "output": "a red velvet armchair with no cushion at all"}),  # add_not_in_output
    json.dumps({"input": "a red velvet armchair without a cushion", "edit": "add a cushion",
                "operation": "remove", "output": "a red velvet armchair with a cushion"}),
    json.dumps({"input": "a red chair", "edit": "a blue chair", "output": "a blue chair"}),
    json.dumps({"input": "a very " * 40 + "red chair", "edit": "make it blue",
                "output": "a very " * 40 + "blue chair"}),              # too_long
]
EXPECTED_REJECTS = {
    "not_json": 1, "not_object": 1, "missing_field": 1, "no_change": 1,
    "edit_not_instruction": 1, "diff_unrelated_to_edit": 1, "remove_not_in_input": 1,
    "add_not_absent_in_input": 1, "copies_example": 1, "duplicate": 1, "near_duplicate": 1,
    "diff_too_large": 1, "diff_too_scattered": 1, "remove_still_in_output": 1,
    "add_not_in_output": 1, "operation_mismatch": 1, "edit_is_caption": 1, "too_long": 1,
}


def scripted(body: dict, n: int):
    agent, batch = request_of(body)
    if agent == "chairs" and batch == 1:
        good = [good_line("chairs", u) for u in range(3)]
        dup = json.dumps(good[0])
        near = json.dumps(dict(good[1], edit=good[1]["edit"].replace("make", "paint")))
        lines = ["```json", *map(json.dumps, good), *BAD_CHAIR_LINES, dup, near, "```"]
        return chat("\n".join(lines), prompt_tokens=100, completion_tokens=50)
    if agent == "chairs":
        return chat("\n".join(json.dumps(good_line("chairs", u)) for u in (3, 4, 5)),
                    prompt_tokens=100, completion_tokens=20)
    return chat("\n".join(json.dumps(good_line(agent, u)) for u in range(5)),
                prompt_tokens=100, completion_tokens=30)


def openai_build(root: Path, recipe: Path, base_url: str, **extra) -> Build:
    sets = {"backend": "openai", "base_url": base_url, "model": "test-model", "per_agent": 5,
            "per_request": 10, "concurrency": 2, "timeout": 0.5, "retry_backoff": 0.01,
            "max_retries": 3, "api_key_env": "DSBUILD_TEST_KEY", **extra}
    return Build.init(root, load_recipe(recipe), recipe_path=str(recipe),
                      overrides=[f"captions.{k}={'null' if v is None else v}"
                                 for k, v in sets.items()])


def test_openai_counts_reasons_retries_and_cache(tmp_path, mini_recipe, monkeypatch):
    monkeypatch.setenv("DSBUILD_TEST_KEY", "sk-test-not-a-secret")
    with OpenAIServer(handler=scripted) as srv:
        srv.queue(error(429, "slow down"), delay(2.0, chat("too late")))
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url)
        res = run_captions(b, show_progress=False)
        assert res.records == 10
        # 429 then a timeout on chairs batch 1, then success; chairs batch 2; living-room 1
        assert len(srv.chat_requests) == 5
        first = srv.chat_requests[0]
        assert first["headers"]["authorization"] == "Bearer sk-test-not-a-secret"
        assert first["body"]["model"] == "test-model"
        assert first["body"]["max_tokens"] == b.config.captions.max_tokens
        report = json.loads((b.reports_dir / "captions.json").read_text())
        assert report["rejected"] == EXPECTED_REJECTS
        assert report["kept"] == 10 and report["backend"] == "openai"
        assert report["agents"]["chairs"]["kept"] == 5
        assert report["agents"]["chairs"]["requests"] == 2
        assert report["agents"]["chairs"]["surplus"] == 1
        assert report["agents"]["living-room"]["rejected"] == {}
        assert report["requests"] == {"sent": 5, "cached": 0, "retries": 2, "failed": 0,
                                      "attempts": 1, "retry_reasons": {"429": 1, "timeout": 1}}
        assert report["usage"] == {"prompt_tokens": 300, "completion_tokens": 100,
                                   "total_tokens": 400}
        assert "sk-test" not in (b.root / "dsbuild.yaml").read_text()
        recs = list(b.records("captions"))
        assert all(r["source"] == {"backend": "openai", "model": "test-model"} for r in recs)
        assert [r["agent"] for r in recs] == ["chairs"] * 5 + ["living-room"] * 5
        ids = [r["id"] for r in recs]

        # the same run again: every answer comes from the cache, the server sees nothing
        res2 = run_captions(b, force=True, show_progress=False)
        assert res2.records == 10 and not res2.skipped
        assert len(srv.chat_requests) == 5
        report2 = json.loads((b.reports_dir / "captions.json").read_text())
        assert report2["requests"]["sent"] == 0 and report2["requests"]["cached"] == 3
        assert report2["usage_cached"]["total_tokens"] == 400
        assert [r["id"] for r in b.records("captions")] == ids


def test_openai_gives_up_cleanly_and_resumes(tmp_path, mini_recipe, monkeypatch):
    monkeypatch.delenv("DSBUILD_TEST_KEY", raising=False)  # local server: placeholder key
    with OpenAIServer(handler=scripted) as srv:
        srv.queue(*[error(503, "overloaded")] * 4)
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url, max_retries=1)
        with pytest.raises(DsbuildError, match="failed after 1 retries.*run the same command"):
            run_captions(b, show_progress=False)
        assert not b.is_complete("captions")
        assert srv.chat_requests[0]["headers"]["authorization"] == "Bearer EMPTY"
        res = run_captions(b, show_progress=False)
        assert res.records == 10 and b.is_complete("captions")


def test_openai_retries_replies_that_are_not_chat_completions(tmp_path, mini_recipe):
    """A proxy's HTML page or a JSON body without choices is retried, never cached or fatal."""
    with OpenAIServer(handler=scripted) as srv:
        srv.queue(Reply(200, "<html>502 bad gateway</html>"), Reply(200, {"detail": "busy"}))
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url)
        assert run_captions(b, show_progress=False).records == 10
        report = json.loads((b.reports_dir / "captions.json").read_text())
        assert report["requests"]["retry_reasons"] == {"bad_response": 2}
        assert report["requests"]["failed"] == 0 and len(srv.chat_requests) == 5
        assert report["kept"] == 10


def test_an_html_reply_is_named_as_an_html_page_with_the_setting_to_fix(tmp_path):
    """A proxy's or login page's HTML (served as text/html) is said to be one, with its title
    and the base_url to fix, not "a JSON reply that is not a chat completion"."""
    import asyncio

    from dsbuild.llm.client import ChatClient, RequestCache
    from dsbuild.llm.settings import LLMSettings

    page = ("<!DOCTYPE html>\n<html><head><title>Sign in - Corp Proxy</title></head>"
            "<body>log in</body></html>")

    async def ask(client):
        async with client:
            return await client.complete([{"role": "user", "content": "hi"}], 0)

    html = Reply(200, page, headers={"Content-Type": "text/html; charset=utf-8"})
    with OpenAIServer(handler=lambda body, n: html) as srv:
        settings = LLMSettings(base_url=srv.base_url, model="test-model", max_retries=1,
                               retry_backoff=0, fail_after_errors=0)
        client = ChatClient(settings, RequestCache(tmp_path / "c"), section="captions")
        assert asyncio.run(ask(client)) is None and len(srv.chat_requests) == 2
        url = srv.base_url
    err = client.stats.as_dict()["errors"][-1]
    assert "an HTML page ('Sign in - Corp Proxy') instead of a chat completion from " \
           f"{url}; set captions.base_url" in err
    assert not list((tmp_path / "c").rglob("*.json"))  # never cached


def test_openai_auth_error_is_clear(tmp_path, mini_recipe):
    with OpenAIServer(handler=lambda body, n: error(401, "bad key")) as srv:
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url)
        with pytest.raises(DsbuildError, match="DSBUILD_TEST_KEY"):
            run_captions(b, show_progress=False)
    b2 = openai_build(tmp_path / "b2", mini_recipe, "null")
    with pytest.raises(DsbuildError, match="needs an API key in the environment variable"):
        run_captions(b2, show_progress=False)


def test_openai_concurrency_limit(tmp_path, mini_recipe):
    def one_line(body, n):
        agent, batch = request_of(body)
        return delay(0.2, chat(json.dumps(good_line(agent, batch))))

    with OpenAIServer(handler=one_line) as srv:
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url, per_request=1, per_agent=6,
                         concurrency=3)
        assert run_captions(b, show_progress=False).records == 12
        assert len(srv.chat_requests) == 12
        assert srv.max_in_flight == 3


def mixed(body: dict, n: int):
    """Per (agent, batch), always the same reply: one or two fresh valid lines among bad ones
    (not JSON, not an object, a field missing, no change) and, last, a duplicate of the batch
    before's first line, so agents take several rounds and some bad lines come after an agent
    is full. Slow enough for a run to be killed half way."""
    agent, b = request_of(body)
    goods = [good_line(agent, 2 * (b - 1))] + ([good_line(agent, 2 * b - 1)] if b % 3 else [])
    g = goods[0]
    lines = ["Sure, here you go:" if b % 2 else "42", json.dumps(g),
             json.dumps({"input": g["input"], "edit": g["edit"]}) if b % 2 else
             json.dumps({"input": g["input"], "edit": g["edit"], "output": g["input"]}),
             *map(json.dumps, goods[1:])]
    if b > 1:
        lines.append(json.dumps(good_line(agent, 2 * (b - 2))))
    return delay(0.1, chat("\n".join(lines)))


def bad_lines_served(srv: OpenAIServer) -> int:
    """Bad lines in the distinct replies the server sent (``mixed`` is the same per batch)."""
    batches = {request_of(r["body"]) for r in srv.chat_requests}
    return sum(3 if b > 1 else 2 for _, b in batches)


def test_sigkill_half_way_then_resume_equals_a_clean_run(tmp_path, mini_recipe):
    """Kill a real `dsbuild captions` process half way through mixed good and bad replies: the
    re-run writes the same records in the same order as an uninterrupted run, with the same
    rounds (max_rounds is exactly what the clean run needs), the same counts per agent (every
    bad line rejected with its reason, also after an agent is full) and the requests of both
    attempts added up; nothing is asked twice."""
    opts = {"per_agent": None, "per_request": 4, "concurrency": 2, "max_rounds": 4}
    with OpenAIServer(handler=mixed) as srv:
        ref = openai_build(tmp_path / "ref", mini_recipe, srv.base_url, **opts)
        run_captions(ref, show_progress=False)
        want = list(ref.records("captions"))
        ref_report = json.loads((ref.reports_dir / "captions.json").read_text())
        assert len(want) == 24 and ref_report["short"] == {}
        assert ref_report["rejected_total"] == bad_lines_served(srv)
        assert ref_report["rejected"]["duplicate"] >= 1
        assert ref_report["agents"]["chairs"]["requests"] == 7  # 3 + 2 + 1 + 1 in 4 rounds
        ref_sent = len(srv.chat_requests)

        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url, **opts)
        cmd = [sys.executable, "-m", "dsbuild", "captions", str(b.root)]
        env = dict(os.environ, DSBUILD_NO_PROGRESS="1")
        env.pop("DSBUILD_TEST_KEY", None)
        partial = b.root / "triples" / "r00000.jsonl.partial"
        attempts = partial.with_name(partial.name + ".stats.json")
        repo = Path(__file__).resolve().parents[1]
        paused = tmp_path / "paused.json"  # the writer stops after its 9th of 24, until killed
        proc = subprocess.Popen(cmd, env=dict(env, DSBUILD_PAUSE_AT=f"triples/r00000.jsonl:9:"
                                              f"{paused}"), cwd=repo, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and not paused.exists():
            time.sleep(0.02)
        assert paused.exists(), proc.stdout.read().decode()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = partial.read_text().count("\n")
        assert killed_at == 9
        assert not b.is_complete("captions")
        first = json.loads(attempts.read_text())["attempts"]
        assert len(first) == 1 and first[0]["requests"]["sent"] >= 2
        sent_before = len(srv.chat_requests) - ref_sent

        out = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "kept 24 of 24" in out.stdout
        shard = b.root / "triples" / "r00000.jsonl"
        raw = shard.read_text()
        assert raw.endswith("\n")
        assert [json.loads(line) for line in raw.splitlines()] == want  # same ids, same order
        report = json.loads((b.reports_dir / "captions.json").read_text())
        assert report["agents"] == ref_report["agents"]  # kept, rejected, surplus, requests
        assert report["rejected"] == ref_report["rejected"]
        assert report["rejected_examples"] == ref_report["rejected_examples"]
        # nothing is paid twice: what was answered before the kill came from the cache (at
        # most the requests in flight at the kill are asked again), and the report adds up
        # both attempts' requests (less at most those in flight, begun after the last save)
        sent_b = len(srv.chat_requests) - ref_sent
        assert ref_sent <= sent_b <= ref_sent + opts["concurrency"]
        req = report["requests"]
        assert req["attempts"] == 2
        assert sent_b - opts["concurrency"] <= req["sent"] <= sent_b
        assert req["cached"] >= sent_before - opts["concurrency"]
        assert not partial.exists() and not attempts.exists()


def rooms_refused(body: dict, n: int):
    """Chairs as ``scripted``; for living rooms the model only chats (every line rejected)."""
    agent, _ = request_of(body)
    return scripted(body, n) if agent == "chairs" else chat("I cannot help with rooms.")


def test_empty_or_short_output_fails_without_a_marker(tmp_path, mini_recipe, capsys):
    """Every line garbage: exit 1, no completion marker, stderr says why. Half the target with
    captions.min_share above a half: the same; lowering min_share (not in the signature)
    accepts the partial shard from the cache without asking the server again."""
    from dsbuild.cli import main

    with OpenAIServer(handler=lambda body, n: chat("Sure! Here you go:\n- a chair\n- a sofa")
                      ) as srv:
        b = openai_build(tmp_path / "b", mini_recipe, srv.base_url, max_rounds=2)
        with pytest.raises(SystemExit) as exc:
            main(["captions", str(b.root)])
        assert exc.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("error: captions rank 0 kept 0 of 10 triples"), err
        assert "not_json=12" in err and "'Sure! Here you go:'" in err and "nothing lost" in err
        assert "Traceback" not in err
        assert not b.is_complete("captions") and not any((b.root / ".done").rglob("r*"))
        assert not (b.root / "triples" / "r00000.jsonl").exists()

    with OpenAIServer(handler=rooms_refused) as srv:
        b = openai_build(tmp_path / "b2", mini_recipe, srv.base_url, max_rounds=2,
                         min_share=0.6)
        with pytest.raises(StageFailed, match=r"kept 5 of 10 triples, under captions.min_share"
                                              r"=0.6 .*not_json="):
            run_captions(b, show_progress=False)
        assert not b.is_complete("captions")
        asked = len(srv.chat_requests)
        res = run_captions(b, overrides=["captions.min_share=0.5"], show_progress=False)
        assert res.records == 5 and b.is_complete("captions")
        assert len(srv.chat_requests) == asked  # the same replies, from the cache
        assert res.stats["requests"]["attempts"] == 2
        assert res.stats["agents"]["living-room"]["rejected"] == {"not_json": 2}


FAIL_FAST = {"max_retries": 100, "retry_backoff": 0.05, "max_backoff": 0.2, "timeout": 0.3,
             "fail_after_errors": 3, "fail_after_s": 1.0}


@pytest.mark.parametrize("kind", ["dead", "hanging"])
def test_dead_or_hanging_endpoint_fails_fast_then_resumes(tmp_path, mini_recipe, capsys,
                                                          monkeypatch, kind):
    """Nothing listening, or a server that accepts and never answers: with 100 retries per
    request the stage still stops after ~1 s of failures in a row (fail_after_*), naming the
    endpoint and the last error; each retry shows on the bar. The same command against a
    healthy server on that port then completes."""
    monkeypatch.setenv("DSBUILD_NO_PROGRESS", "0")  # the bar shows the retries (stderr is no tty)
    port = free_port()
    hang = HangingServer(port) if kind == "hanging" else None
    url = f"http://127.0.0.1:{port}/v1"
    b = openai_build(tmp_path / "b", mini_recipe, url, **FAIL_FAST)
    t0 = time.perf_counter()
    try:
        with pytest.raises(StageFailed) as exc:
            run_captions(b)
    finally:
        if hang is not None:
            hang.__exit__()
    took = time.perf_counter() - t0
    msg = str(exc.value)
    assert exc.value.exit_code == 1
    assert 1.0 <= took < 8, took
    assert f"the endpoint {url} failed" in msg and "nothing lost; run the same command again" in msg
    last = "no reply within 0.3 s" if kind == "hanging" else "connection failed: "
    assert f"(last error: {last}" in msg
    err = capsys.readouterr().err
    reason = "timeout" if kind == "hanging" else "connection"
    assert re.search(rf"retries=\d+, last={reason}", err), err[-500:]
    assert not b.is_complete("captions")

    with OpenAIServer(handler=scripted, port=port):
        res = run_captions(b, show_progress=False)
    assert res.records == 10 and b.is_complete("captions")
    assert res.stats["requests"]["attempts"] == 2
    # the failures before the stop were retried (the one that stopped it was not)
    assert res.stats["requests"]["retry_reasons"][reason] >= FAIL_FAST["fail_after_errors"] - 1


def test_client_waits_retry_after_and_reports_each_retry(tmp_path):
    """The shared client: a 429's Retry-After is honoured, each retry reaches ``on_retry``
    (reason, attempt, wait), and a callback that raises stops the request (fail-fast hook)."""
    import asyncio

    from dsbuild.llm.client import ChatClient, RequestCache
    from dsbuild.llm.settings import LLMSettings

    async def ask(client):
        async with client:
            t0 = time.perf_counter()
            reply = await client.complete([{"role": "user", "content": "hi"}], 0)
            return reply, time.perf_counter() - t0

    events = []
    with OpenAIServer(handler=lambda body, n: chat("ok")) as srv:
        settings = LLMSettings(base_url=srv.base_url, model="test-model", timeout=5,
                               retry_backoff=0.01, max_backoff=5)
        srv.queue(error(429, headers={"Retry-After": "0.4"}), Reply(200, {"detail": "busy"}))
        client = ChatClient(settings, RequestCache(tmp_path / "c"), section="test",
                            on_retry=events.append)
        reply, took = asyncio.run(ask(client))
        assert reply["content"] == "ok" and len(srv.chat_requests) == 3
        assert [(e.reason, e.attempt) for e in events] == [("429", 1), ("bad_response", 2)]
        assert 0.4 <= events[0].wait <= 0.44 and took >= 0.4
        assert 0.02 <= events[1].wait <= 0.022  # retry_backoff * 2^(2-1), + up to 10% jitter
        assert client.stats.as_dict()["retry_reasons"] == {"429": 1, "bad_response": 1}

        def give_up(event):
            raise DsbuildError(f"stopped on {event.reason}")

        srv.queue(error(503))
        client = ChatClient(settings, None, section="test", on_retry=give_up)
        with pytest.raises(DsbuildError, match="stopped on 503"):
            asyncio.run(ask(client))
        assert len(srv.chat_requests) == 4
