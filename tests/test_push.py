"""`dsbuild push` against a local Hub stand-in on 127.0.0.1 that records the API calls.

The server speaks the Hub's HTTP API as huggingface_hub uses it (create repo, branch,
preupload, NDJSON commit); it answers 401/403 in the error modes, and a closed port stands
for an unreachable Hub. The CLI runs in a subprocess so HF_ENDPOINT / HF_HUB_OFFLINE apply.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from builders import make_build

pytest.importorskip("huggingface_hub")
pytest.importorskip("datasets")

FAKE_TOKEN = "hf_" + "T" * 34


class FakeHub:
    """Records requests; ``mode`` is ok | 401 | 403."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode
        self.calls: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        self.uploaded: dict[str, bytes] = {}
        self.metadata: dict | None = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                return raw

            def do_GET(self):
                hub.calls.append(("GET", self.path))
                self._send(404, {"error": "not here"})

            def do_POST(self):
                body = self._body()
                hub.calls.append(("POST", self.path))
                hub.auth.append(self.headers.get("Authorization"))
                if hub.mode == "401":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if self.path.startswith("/api/repos/create"):
                    name = json.loads(body)
                    repo = f"{name.get('organization') or 'me'}/{name['name']}"
                    return self._send(200, {"url": f"{hub.url}/datasets/{repo}", "name": repo})
                if "preupload" in parts:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if self.path.startswith("/api/validate-yaml"):
                    text = json.loads(body)["content"]
                    try:
                        hub.metadata = yaml.safe_load(text.split("---")[1])
                    except (yaml.YAMLError, IndexError) as exc:
                        return self._send(400, {"errors": [{"message": str(exc)}]})
                    return self._send(200, {"warnings": []})
                if "branch" in parts:
                    return self._send(200, {})
                if "commit" in parts:
                    if hub.mode == "403":
                        return self._send(403, {"error": "You don't have the rights to create "
                                                         "a commit in this repo"})
                    repo = "/".join(parts[2:4])
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            v = item["value"]
                            hub.uploaded[v["path"]] = base64.b64decode(v["content"])
                    return self._send(200, {"commitUrl": f"{hub.url}/datasets/{repo}/commit/{'a' * 40}",
                                            "commitOid": "a" * 40, "pullRequestUrl": None})
                return self._send(404, {"error": f"unknown route {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def push(build, *args, endpoint: str, token: str | None = FAKE_TOKEN, home=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
    env.update({"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "DSBUILD_NO_PROGRESS": "1",
                "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1",
                "HF_HOME": str(home or build.root.parent / "hf-home")})
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "dsbuild", "push", str(build.root), *args],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One small build, exported once in-process; pushes find the export up to date."""
    from conftest import MINI_RECIPE

    from dsbuild.core.build import Build
    from dsbuild.core.config import load_recipe
    from dsbuild.export.writer import export_build

    root = tmp_path_factory.mktemp("push")
    (root / "mini.yaml").write_text(MINI_RECIPE)
    build = Build.init(root / "build", load_recipe(root / "mini.yaml"),
                       overrides=["export.grid_pairs=2"])
    make_build(build, samples=2, keep_every=1)
    export_build(build)
    return build


@pytest.mark.server
def test_push_uploads_public_files_only(exported):
    with FakeHub() as hub:
        r = push(exported, "me/interiors", "--private", "--revision", "v1", endpoint=hub.url)
    assert r.returncode == 0, (r.stderr, hub.calls)
    assert "pushed" in r.stdout and "revision v1" in r.stdout
    routes = [p for _, p in hub.calls]
    assert routes[0].startswith("/api/repos/create")
    assert any(p.startswith("/api/datasets/me/interiors/branch/v1") for p in routes)
    assert any(p.startswith("/api/datasets/me/interiors/commit/v1") for p in routes)
    assert all(a == f"Bearer {FAKE_TOKEN}" for a in hub.auth)
    assert hub.metadata["task_categories"] == ["image-to-image"]
    names = set(hub.uploaded)
    assert "README.md" in names and "grid.png" in names
    assert any(n.startswith("data/train-") and n.endswith(".parquet") for n in names)
    assert names <= {"README.md", "grid.png", "export_info.json"} | {
        n for n in names if n.startswith("data/") and n.endswith(".parquet")}
    root = str(exported.root.resolve()).encode()
    for name, data in hub.uploaded.items():
        assert FAKE_TOKEN.encode() not in data, name
        if not name.endswith((".png", ".parquet")):
            assert root not in data and b"/tmp/" not in data, name


def test_push_without_token_says_how_to_fix(exported, tmp_path):
    r = push(exported, "me/x", endpoint="http://127.0.0.1:9", token=None, home=tmp_path / "h")
    assert r.returncode == 2
    assert "no Hugging Face token" in r.stderr and "HF_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.server
def test_push_rejected_token(exported):
    with FakeHub("401") as hub:
        r = push(exported, "me/x", endpoint=hub.url)
    assert r.returncode == 2, r.stderr
    assert "rejected the token (401" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.server
def test_push_repo_not_writable(exported):
    with FakeHub("403") as hub:
        r = push(exported, "someone-else/x", endpoint=hub.url)
    assert r.returncode == 2, r.stderr
    assert "may not write to dataset 'someone-else/x' (403" in r.stderr


def test_push_unreachable_hub(exported):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    r = push(exported, "me/x", endpoint=f"http://127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in r.stderr


def test_push_refuses_bad_repo_id_and_offline(exported, monkeypatch):
    from dsbuild.core.errors import DsbuildError
    from dsbuild.export.push import push_export

    with pytest.raises(DsbuildError, match="namespace/name"):
        push_export(exported, "just-a-name", token=FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DsbuildError, match="HF_HUB_OFFLINE"):
        push_export(exported, "me/x", token=FAKE_TOKEN)


def test_check_public_catches_secrets_and_paths(exported, tmp_path, monkeypatch):
    import shutil

    from dsbuild.core.errors import DsbuildError
    from dsbuild.export.card import check_public

    folder = tmp_path / "copy"
    shutil.copytree(exported.root / "export", folder)
    check_public(folder, exported)
    monkeypatch.setenv("HF_TOKEN", "secret-value-123456")
    (folder / "notes.md").write_text("token secret-value-123456")
    with pytest.raises(DsbuildError, match="notes.md contains a secret"):
        check_public(folder, exported)
    (folder / "notes.md").write_text(f"images in {exported.root.resolve()}")
    with pytest.raises(DsbuildError, match="notes.md contains the local path"):
        check_public(folder, exported)
