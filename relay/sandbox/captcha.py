"""A local stand-in for hCaptcha's siteverify HTTP API (POST form: secret, response, remoteip,
sitekey), answering as https://docs.hcaptcha.com/#verify-the-user-response-server-side does.
Used by the tests (fixture `siteverify`) and by the benchmark (bench/peers.py serves
`SiteverifyStub.verdict` on its own loop); `relay demo` verifies offline and needs none.

The token chooses the behaviour, so one server serves every case:

    pass-*         success, hostname = self.hostname, sitekey = the one posted
    fail-*         success false, "invalid-input-response"
    host-*         success, but for another hostname (evil.test)
    sitekey-*      success, but for another sitekey
    slow-*         answers after `slow_seconds` (a timeout for a short client)
    error-*        HTTP 500
    garbage-*      200 with a body that is not JSON
    truthy-*       success: "true" as a string, which must not count as success

Each token is accepted once; the second use answers "already-seen-response", as hCaptcha does.
A wrong secret answers "invalid-input-secret".
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TEST_SECRET = "0x" + "1" * 40


class _Server(ThreadingHTTPServer):
    """socketserver's listen backlog is 5: with a dozen gunicorn threads verifying at once
    and this thread short of the GIL, the kernel dropped SYNs and the relay timed out
    connecting (a load test failed on CI with "could not check the CAPTCHA"). hCaptcha's
    own front end never refuses a connection that way."""

    request_queue_size = 128


class SiteverifyStub:
    def __init__(
        self, *, secret: str = TEST_SECRET, hostname: str = "localhost", slow_seconds: float = 3.0
    ) -> None:
        self.secret = secret
        self.hostname = hostname
        self.slow_seconds = slow_seconds
        self.requests: list[dict[str, str]] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.socket.getsockname()[:2]
        return f"http://{host}:{port}/siteverify"

    def verdict(self, form: dict[str, str]) -> tuple[int, Any]:
        token = form.get("response", "")
        with self._lock:
            self.requests.append(form)
            reused = token in self._seen
            self._seen.add(token)
        if form.get("secret") != self.secret:
            return 200, {"success": False, "error-codes": ["invalid-input-secret"]}
        if not token:
            return 200, {"success": False, "error-codes": ["missing-input-response"]}
        if reused:
            return 200, {"success": False, "error-codes": ["already-seen-response"]}
        kind = token.split("-", 1)[0]
        ok = {
            "success": True,
            "challenge_ts": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
            "hostname": self.hostname,
            "sitekey": form.get("sitekey", ""),
        }
        if kind == "pass":
            return 200, ok
        if kind == "host":
            return 200, {**ok, "hostname": "evil.test"}
        if kind == "sitekey":
            return 200, {**ok, "sitekey": "20000000-ffff-ffff-ffff-000000000002"}
        if kind == "slow":
            time.sleep(self.slow_seconds)
            return 200, ok
        if kind == "error":
            return 500, "internal error"
        if kind == "garbage":
            return 200, "<html>not json</html>"
        if kind == "truthy":
            return 200, {**ok, "success": "true"}
        return 200, {"success": False, "error-codes": ["invalid-input-response"]}

    def start(self) -> SiteverifyStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                form = {k: v[0] for k, v in urllib.parse.parse_qs(body).items()}
                status, payload = stub.verdict(form)
                data = (json.dumps(payload) if not isinstance(payload, str) else payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client gave up (timeout case)
                    self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> SiteverifyStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
