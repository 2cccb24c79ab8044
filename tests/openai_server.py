"""A real OpenAI-compatible HTTP server on 127.0.0.1 that tests script.

It speaks the parts of the API the openai SDK calls (``POST /v1/chat/completions``,
``GET /v1/models``) over real HTTP, so backends are tested through the real SDK. A test
decides every reply::

    with OpenAIServer(handler=lambda req, n: chat("...")) as srv:
        srv.queue(error(429), delay(2.0, chat("late")))   # served first, in order
        client = openai.OpenAI(base_url=srv.base_url, api_key="x")

``handler(request_json, n)`` gets the parsed request body and the 0-based number of the
chat request; queued replies are used first. ``srv.requests`` records every request
(method, path, lower-cased headers, body) and ``srv.max_in_flight`` the most chat requests
open at once, for assertions. Reusable by any stage that talks to an LLM.

``POST /v1/images/edits`` (multipart, as the SDK's ``images.edit`` sends it) is answered by
``image_handler(request, n)`` (default: the uploaded image, inverted, as many as the form's
``n`` asks) after the replies
queued with ``queue_images``; its request holds the form fields, ``image`` (the uploaded
bytes) and ``image_sha256``. ``edited(png)``, ``b64_image(...)`` and ``garbage()`` build its
replies; ``srv.edit_requests`` are the requests it got. ``port`` picks the
port (default: a free one), so a test can bring a healthy server up where a dead or hanging
one was; ``free_port()`` and ``HangingServer`` (accepts connections, never answers) are those.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """One scripted HTTP reply: status, JSON body (or raw text), optional delay before it."""

    status: int = 200
    body: dict | str = field(default_factory=dict)
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def chat(content: str, *, model: str = "test-model", prompt_tokens: int = 10,
         completion_tokens: int | None = None, finish_reason: str = "stop") -> Reply:
    """A successful chat completion whose message text is ``content``."""
    ct = completion_tokens if completion_tokens is not None else max(1, len(content.split()))
    return Reply(200, {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": ct,
                  "total_tokens": prompt_tokens + ct},
    })


def error(status: int, message: str = "scripted error", headers: dict | None = None) -> Reply:
    """An API error reply in OpenAI's error shape (429, 500, 401 ...)."""
    return Reply(status, {"error": {"message": message, "type": "test_error", "code": status}},
                 headers=headers or {})


def delay(seconds: float, reply: Reply) -> Reply:
    """``reply`` sent only after ``seconds`` (longer than the client timeout = a timeout)."""
    return Reply(reply.status, reply.body, seconds, reply.headers)


def b64_image(data: list[str | None], usage: dict | None = None) -> Reply:
    """An images response whose images are these base64 strings (None: an item with no
    image); ``usage`` as gpt-image-1 reports it (input/output/total tokens)."""
    body: dict = {"created": int(time.time()),
                  "data": [{"b64_json": d} if d is not None else {} for d in data]}
    if usage is not None:
        body["usage"] = usage
    return Reply(200, body)


def edited(png: bytes, size: tuple[int, int] | None = None, mode: str = "RGB",
           usage: dict | None = None, n: int = 1) -> Reply:
    """The uploaded PNG inverted (resized to ``size``, converted to ``mode``), as b64_json;
    ``n`` images (the request's ``n``), the i-th with ``i`` added to every channel (mod 256),
    so each of one request's images is told apart."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(png)) as im:
        out = ImageOps.invert(im.convert("RGB"))
    if size is not None:
        out = out.resize(size)
    data = []
    for i in range(n):
        buf = io.BytesIO()
        out.point(lambda v, i=i: (v + i) % 256).convert(mode).save(buf, format="PNG")
        data.append(base64.b64encode(buf.getvalue()).decode())
    return b64_image(data, usage)


def images_asked(req: dict) -> int:
    """The ``n`` of an images-edit request (a form field; 1 when not sent)."""
    return int(req.get("n") or 1)


def garbage() -> Reply:
    """A well-formed images response whose image is not an image."""
    return b64_image([base64.b64encode(b"this is not a picture").decode()])


def parse_multipart(content_type: str, raw: bytes) -> dict:
    """The fields of a multipart/form-data body; a file field's bytes under its name."""
    from email.parser import BytesParser
    from email.policy import default

    msg = BytesParser(policy=default).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    out: dict = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        out[name] = data if part.get_filename() else data.decode()
    return out


Handler = Callable[[dict, int], Reply]


class OpenAIServer:
    """A threaded HTTP server on 127.0.0.1 (free port) serving scripted OpenAI replies."""

    def __init__(self, handler: Handler | None = None, models: tuple[str, ...] = ("test-model",),
                 port: int = 0, image_handler: Handler | None = None):
        self.handler = handler or (lambda req, n: chat(""))
        self.image_handler = image_handler or (
            lambda req, n: edited(req["image"], n=images_asked(req)))
        self._image_queue: list[Reply] = []
        self._image_count = 0
        self.port = port
        self.models = models
        self.requests: list[dict] = []
        self._queue: list[Reply] = []
        self._lock = threading.Lock()
        self._chat_count = 0
        self.in_flight = 0
        self.max_in_flight = 0  # most chat requests open at once (checks client concurrency)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    def queue(self, *replies: Reply) -> None:
        """Replies served (in order) to the next chat requests, before the handler."""
        with self._lock:
            self._queue.extend(replies)

    def queue_images(self, *replies: Reply) -> None:
        """Replies served (in order) to the next image edit requests, before image_handler."""
        with self._lock:
            self._image_queue.extend(replies)

    @property
    def edit_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/images/edits")]

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    def start(self) -> OpenAIServer:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, reply: Reply) -> None:
                if reply.delay:
                    time.sleep(reply.delay)
                data = (reply.body if isinstance(reply.body, str)
                        else json.dumps(reply.body)).encode()
                try:
                    self.send_response(reply.status)
                    if "Content-Type" not in reply.headers:
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is what the test wanted

            def do_GET(self):
                server._record(self, None)
                if self.path.rstrip("/").endswith("/models"):
                    self._send(Reply(200, {"object": "list", "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "test"}
                        for m in server.models]}))
                else:
                    self._send(error(404, f"no route {self.path}"))

            def _edit(self, raw: bytes) -> None:
                try:
                    form = parse_multipart(self.headers.get("Content-Type", ""), raw)
                except (ValueError, UnicodeDecodeError):
                    form = {}
                if not isinstance(form.get("image"), bytes) or "prompt" not in form:
                    server._record(self, form)
                    self._send(error(400, "expected multipart with image and prompt"))
                    return
                form["image_sha256"] = hashlib.sha256(form["image"]).hexdigest()
                server._record(self, form)
                self._send(server._next_image_reply(form))

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if len(raw) < length:
                    return  # the client went away mid-request (a killed run)
                if self.path.rstrip("/").endswith("/images/edits"):
                    self._edit(raw)
                    return
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send(error(400, "body is not JSON"))
                    return
                server._record(self, body)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(error(404, f"no route {self.path}"))
                    return
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._send(server._next_reply(body))
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals
    def _record(self, h: BaseHTTPRequestHandler, body: dict | None) -> None:
        with self._lock:
            self.requests.append({"method": h.command, "path": h.path,
                                  "headers": {k.lower(): v for k, v in h.headers.items()},
                                  "body": body})

    def _next_image_reply(self, form: dict) -> Reply:
        with self._lock:
            n = self._image_count
            self._image_count += 1
            if self._image_queue:
                return self._image_queue.pop(0)
        return self.image_handler(form, n)

    def _next_reply(self, body: dict) -> Reply:
        with self._lock:
            n = self._chat_count
            self._chat_count += 1
            if self._queue:
                return self._queue.pop(0)
        return self.handler(body, n)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (a dead endpoint until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HangingServer:
    """Listens on 127.0.0.1 and never answers: the kernel accepts the connections, nobody
    reads them, so every request runs into the client's timeout."""

    def __init__(self, port: int = 0):
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> HangingServer:
        return self

    def __exit__(self, *exc) -> None:
        self._sock.close()
