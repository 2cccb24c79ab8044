"""The images-edit API generator through the real openai SDK against a local OpenAI-compatible
server on 127.0.0.1 (multipart ``/v1/images/edits``): good images, garbage, 429 with
Retry-After and 500s, the request cache across a re-run and a kill, the dead-endpoint
fail-fast, and ``dsbuild run --offline`` to an export whose rows name their generator."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import TRIPLES, triple_record
from openai_server import (
    OpenAIServer,
    b64_image,
    edited,
    error,
    free_port,
    garbage,
    images_asked,
)
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dsbuild.core.build import Build  # noqa: E402
from dsbuild.core.config import load_recipe  # noqa: E402
from dsbuild.core.errors import StageFailed  # noqa: E402
from dsbuild.generate.generators.api.settings import ApiSettings  # noqa: E402
from dsbuild.generate.settings import GenerateSettings  # noqa: E402
from dsbuild.generate.stage import run_generate  # noqa: E402
from dsbuild.llm.client import RequestCache  # noqa: E402
from dsbuild.llm.images import ImageEditClient  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("one_torch_thread")]

KEY_ENV, SECRET = "DSBUILD_TEST_IMAGES_KEY", "sk-images-test-secret-42"
SIZE = 32
USAGE = {"input_tokens": 50, "output_tokens": 100, "total_tokens": 150}
# 5 triples (two share an input caption, so their sources), 2 pairs each: 10 edit requests
EXTRA = [("chairs", "object", "change", "a red velvet armchair", "make it green",
          "a green velvet armchair")]


def settings(base_url: str, *extra: str) -> list[str]:
    return ["generate.generator=api", "generate.model=tiny", "generate.steps=2",
            f"generate.height={SIZE}", f"generate.width={SIZE}", "generate.per_triple=2",
            "generate.batch_size=2", f"generate.api.base_url={base_url}",
            "generate.api.model=test-image-model", f"generate.api.api_key_env={KEY_ENV}",
            "generate.api.concurrency=2", "generate.api.retry_backoff=0.01",
            "generate.api.max_retries=3", "generate.api.timeout=5",
            "generate.api.price_per_image=0.04", *extra]


def make(root: Path, recipe: Path, base_url: str, *extra: str) -> Build:
    b = Build.init(root, load_recipe(recipe), recipe_path=str(recipe),
                   overrides=settings(base_url, *extra))
    tr = [triple_record(b.recipe.name, *t) for t in TRIPLES[:4] + EXTRA]
    b.run_stage("captions", 0, 1, lambda w: [w.write(t) for t in tr] and None, report=False)
    return b


def good(req: dict, n: int):
    return edited(req["image"], usage=USAGE, n=images_asked(req))


def png_b64(size: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*")
                     if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".md", ".partial"))


def test_good_rows_written_garbage_counted_retries_and_cache(tmp_path, mini_recipe,
                                                             monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with OpenAIServer(image_handler=good) as srv:
        srv.queue_images(error(429, headers={"Retry-After": "0"}), error(500), garbage(),
                         b64_image([png_b64(SIZE * 2)]))  # the wrong size
        b = make(tmp_path / "b", mini_recipe, srv.base_url)
        res = run_generate(b)
        assert b.is_complete("generate")
        sent = len(srv.edit_requests)
        assert sent == 12  # 10 edits, 2 of them asked again after a 429 and a 500
        pairs = list(b.records("generate"))
        assert len(pairs) == res.records == 8  # garbage and the wrong size skipped
        st = res.stats
        assert st["requests"]["retries"] == 2
        assert st["requests"]["retry_reasons"] == {"429": 1, "500": 1}
        assert st["requests"]["failed"] == 0
        assert st["bad_images"] == {"not_an_image": 1, "wrong_size": 1}
        assert st["images"] == {"requested": 10, "billed": 10, "cached": 0, "cost": 0.4,
                                "cost_saved_by_cache": 0.0}
        assert st["requests"]["usage"]["total_tokens"] == 8 * 150
        report = json.loads((b.reports_dir / "generate.json").read_text())
        assert report["images"]["billed"] == 10 and report["requests"]["sent"] == 12
        assert report["bad_images"] == st["bad_images"]

        # every request: multipart with the source PNG the pair holds, the instruction, the
        # model and size, the key from the environment
        uploaded = {(r["body"]["image_sha256"], r["body"]["prompt"]): r["body"]
                    for r in srv.edit_requests}
        for p in pairs:
            assert p["generator"] == "api" and p["model"] == "test-image-model"
            assert p["params"]["model"] == "test-image-model"
            assert p["params"]["size"] == f"{SIZE}x{SIZE}"
            triple = next(t for t in b.records("captions") if t["id"] == p["triple_id"])
            body = uploaded[(sha(b.root / p["images"]["input"]), triple["edit"])]
            assert body["model"] == "test-image-model" and body["size"] == f"{SIZE}x{SIZE}"
            with Image.open(b.root / p["images"]["output"]) as out, \
                    Image.open(b.root / p["images"]["input"]) as src:
                assert out.size == (SIZE, SIZE) and out.mode == "RGB"
                inverted = 255 - int(src.convert("RGB").getpixel((0, 0))[0])
                assert out.getpixel((0, 0))[0] == inverted  # what the server sent
        assert {r["headers"]["authorization"] for r in srv.edit_requests} == \
            {f"Bearer {SECRET}"}
        assert SECRET not in all_text(b.root)  # never in dsbuild.yaml, records or reports

        # a re-run pays nothing twice: every reply (garbage included) from the cache
        again = run_generate(b, force=True)
        assert len(srv.edit_requests) == sent
        assert again.records == 8 and again.stats["images"]["cached"] == 10
        assert again.stats["images"]["billed"] == 0 and again.stats["requests"]["sent"] == 0
        assert again.stats["bad_images"] == st["bad_images"]
        assert [p["id"] for p in b.records("generate")] == [p["id"] for p in pairs]


def test_n_images_per_request_each_checked_alone(tmp_path, mini_recipe, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    spoilt = TRIPLES[0][4]  # its 2-image request returns a wrong-size second image

    def handler(req: dict, n: int):
        reply = good(req, n)
        if req["prompt"] == spoilt and images_asked(req) == 2:
            reply.body["data"][1] = {"b64_json": png_b64(SIZE * 2)}
        return reply

    with OpenAIServer(image_handler=handler) as srv:
        # 3 variants per source asked 2 at a time: requests of 2 and 1 images per triple
        b = make(tmp_path / "b", mini_recipe, srv.base_url, "generate.per_triple=3",
                 "generate.api.variants=3", "generate.api.n=2")
        res = run_generate(b)
        assert b.is_complete("generate")
        asked = sorted(r["body"].get("n", "1") for r in srv.edit_requests)
        assert asked == ["1"] * 5 + ["2"] * 5  # 15 edits in 10 requests; n=1 is not sent
        st = res.stats
        assert st["images"]["requested"] == st["images"]["billed"] == 15
        assert st["bad_images"] == {"wrong_size": 1}  # the other image of its reply is kept
        pairs = list(b.records("generate"))
        assert len(pairs) == res.records == 14
        for p in pairs:
            prm = p["params"]
            assert (prm["n"], prm["n_index"]) == ((2, prm["variant"]) if prm["variant"] < 2
                                                  else (1, 0))
            with Image.open(b.root / p["images"]["output"]) as out, \
                    Image.open(b.root / p["images"]["input"]) as src:
                want = (255 - src.convert("RGB").getpixel((0, 0))[0] + prm["n_index"]) % 256
                assert out.getpixel((0, 0))[0] == want  # its own image of the reply

        again = run_generate(b, force=True)  # the same requests: all from the cache
        assert len(srv.edit_requests) == 10 and again.stats["requests"]["sent"] == 0
        assert again.stats["images"]["cached"] == 15 and again.records == 14
        assert [p["id"] for p in b.records("generate")] == [p["id"] for p in pairs]

    one = GenerateSettings.model_validate({"generator": "api", "api": {"n": 1}})
    two = GenerateSettings.model_validate({"generator": "api", "api": {"n": 2}})
    assert "n" not in one.signature_dict()["api"]  # n=1 builds sign as before n existed
    assert one.signature_dict() != two.signature_dict()


def test_client_waits_at_least_retry_after(tmp_path):
    events = []
    with OpenAIServer(image_handler=good) as srv:
        s = ApiSettings(base_url=srv.base_url, model="m", retry_backoff=0.01, max_backoff=5)
        srv.queue_images(error(429, headers={"Retry-After": "0.3"}))
        client = ImageEditClient(s, RequestCache(tmp_path / "c"), section="generate.api",
                                 params={"size": "32x32"}, on_retry=events.append)
        png = base64.b64decode(png_b64(SIZE))

        async def go():
            async with client:
                return await client.edit(png, "make it blue")

        reply = asyncio.run(go())
    assert [(e.reason, e.attempt) for e in events] == [("429", 1)]
    assert events[0].wait >= 0.3  # the server's Retry-After, not the 0.01 s backoff
    assert reply["images"] and client.stats.sent == 2


def test_requests_that_fail_every_retry_stop_the_stage_then_resume(tmp_path, mini_recipe,
                                                                  monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    with OpenAIServer(image_handler=good) as srv:
        srv.queue_images(error(503), error(503))
        b = make(tmp_path / "b", mini_recipe, srv.base_url, "generate.api.max_retries=1",
                 "generate.api.concurrency=1")  # both 503s meet the same request
        with pytest.raises(StageFailed, match=r"generate\.api: 1 image edit request") as e:
            run_generate(b)
        assert "\n" not in str(e.value)
        assert not b.is_complete("generate")
        assert len(srv.edit_requests) == 11
        res = run_generate(Build.open(b.root))  # asks only for the missing pair
        assert res.records == 10 and len(srv.edit_requests) == 12
        assert res.stats["images"]["cached"] == 0  # the 9 written pairs were skipped


def test_kill_and_resume_pays_nothing_twice(tmp_path, mini_recipe, monkeypatch):
    with OpenAIServer(image_handler=good) as srv:
        b = make(tmp_path / "b", mini_recipe, srv.base_url)
        partial = b.root / "pairs" / "r00000.jsonl.partial"
        paused = tmp_path / "paused.json"  # the writer stops at its 3rd of 10 pairs
        env = dict(os.environ, OMP_NUM_THREADS="1", DSBUILD_NO_PROGRESS="1",
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]), **{KEY_ENV: SECRET},
                   DSBUILD_PAUSE_AT=f"pairs/r00000.jsonl:3:{paused}")
        proc = subprocess.Popen([sys.executable, "-m", "dsbuild", "generate", str(b.root)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not paused.exists():
            time.sleep(0.05)  # waits for the event (the pause file), races nothing
        assert paused.exists(), proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert partial.read_text().count("\n") == 3
        before = len(srv.edit_requests)
        assert before >= 3  # pair 3's whole chunk was asked for before pair 3 was written
        monkeypatch.setenv(KEY_ENV, SECRET)
        res = run_generate(Build.open(b.root))
        assert res.records == 10
        assert len(srv.edit_requests) == 10  # each edit asked exactly once over both runs
        # what was paid before the kill but not written comes from the cache
        assert res.stats["images"]["cached"] == before - 3
        assert res.stats["images"]["billed"] == 10 - before
        shas = [r["body"]["image_sha256"] + r["body"]["prompt"] for r in srv.edit_requests]
        assert len(set(shas)) == 10


def test_dead_endpoint_fails_fast_in_one_line(tmp_path, mini_recipe, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    b = make(tmp_path / "b", mini_recipe, dead, "generate.api.fail_after_errors=3",
             "generate.api.fail_after_s=0", "generate.api.max_retries=50")
    with pytest.raises(StageFailed) as e:
        run_generate(b)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("generate.api: the endpoint ")
    assert dead in msg and "failed 3 attempts in a row" in msg
    assert not b.is_complete("generate")


def test_transport_knobs_do_not_change_the_signature_and_no_key_is_saved():
    a = GenerateSettings.model_validate({"generator": "api", "api": {"base_url": "http://x"}})
    b = GenerateSettings.model_validate({"generator": "api", "api": {
        "base_url": "http://x", "concurrency": 32, "price_per_image": 1.0}})
    c = GenerateSettings.model_validate({"generator": "api", "api": {
        "base_url": "http://x", "quality": "high"}})
    assert a.signature_dict() == b.signature_dict() != c.signature_dict()
    dumped = a.model_dump(mode="json")["api"]
    assert dumped["api_key_env"] == "OPENAI_API_KEY" and "api_key" not in dumped


def dsbuild(*args, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSBUILD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("DSBUILD_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "dsbuild", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_run_offline_to_an_export_whose_rows_name_the_api(tmp_path, mini_recipe):
    import pyarrow.parquet as pq

    b = tmp_path / "b"
    with OpenAIServer(image_handler=good) as srv:
        r = dsbuild("run", b, "--recipe", mini_recipe, "--offline", "--per-agent", "1",
                    "--set", "generate.generator=api",
                    "--set", f"generate.api.base_url={srv.base_url}")
        assert r.returncode == 0, r.stdout + r.stderr
        assert srv.edit_requests
    pairs = [json.loads(line) for f in sorted((b / "pairs").glob("r*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()]
    assert pairs and {p["generator"] for p in pairs} == {"api"}
    rows = [row for f in sorted((b / "export" / "data").glob("*.parquet"))
            for row in pq.read_table(f).to_pylist()]
    edits = [row for row in rows if not row["no_change"]]
    assert edits
    for row in edits:
        assert row["generator"] == "api" and row["api_model"] == "gpt-image-1"
        assert row["source_model"] == "tiny" and "p2p_mode" not in row
    assert "api_model" in (b / "export" / "README.md").read_text()
