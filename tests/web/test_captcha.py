"""The hCaptcha client against the siteverify stand-in: only `success is True` from our own
host name and sitekey passes; anything else fails closed."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from relay.errors import CaptchaError
from relay.sandbox.captcha import TEST_SECRET, SiteverifyStub
from relay.sandbox.world import SITEKEY
from relay.web.captcha import HCaptchaVerifier, check_verdict
from tests.web.conftest import token

HOSTS = {"localhost"}


@pytest.fixture
def verifier(siteverify: SiteverifyStub) -> HCaptchaVerifier:
    return HCaptchaVerifier(
        secret=TEST_SECRET, sitekey=SITEKEY, verify_url=siteverify.url, timeout=0.5
    )


def test_pass_token_passes_and_posts_every_field(
    verifier: HCaptchaVerifier, siteverify: SiteverifyStub
) -> None:
    verifier.verify(token("pass"), remoteip="203.0.113.7", hostnames=HOSTS)
    sent = siteverify.requests[-1]
    assert sent["secret"] == TEST_SECRET
    assert sent["sitekey"] == SITEKEY
    assert sent["remoteip"] == "203.0.113.7"
    assert sent["response"].startswith("pass-")


@pytest.mark.parametrize(
    ("kind", "code", "retryable"),
    [
        ("fail", "invalid-input-response", False),
        ("host", "hostname-mismatch", False),
        ("sitekey", "sitekey-mismatch", False),
        ("truthy", "not-success", False),
        ("slow", "siteverify-timeout", True),
        ("error", "siteverify-http-error", True),
        ("garbage", "siteverify-bad-response", True),
    ],
)
def test_failures_are_rejected(
    verifier: HCaptchaVerifier, kind: str, code: str, retryable: bool
) -> None:
    with pytest.raises(CaptchaError) as info:
        verifier.verify(token(kind), remoteip=None, hostnames=HOSTS)
    assert info.value.codes == [code]
    assert info.value.retryable is retryable


def test_reused_token_is_rejected(verifier: HCaptchaVerifier) -> None:
    once = token("pass")
    verifier.verify(once, remoteip=None, hostnames=HOSTS)
    with pytest.raises(CaptchaError) as info:
        verifier.verify(once, remoteip=None, hostnames=HOSTS)
    assert info.value.codes == ["already-seen-response"]


def test_empty_token_is_not_sent(verifier: HCaptchaVerifier, siteverify: SiteverifyStub) -> None:
    with pytest.raises(CaptchaError) as info:
        verifier.verify("", remoteip=None, hostnames=HOSTS)
    assert info.value.codes == ["missing-input-response"]
    assert siteverify.requests == []


def test_wrong_secret_is_rejected(siteverify: SiteverifyStub) -> None:
    wrong = HCaptchaVerifier(
        secret="0x" + "2" * 40, sitekey=SITEKEY, verify_url=siteverify.url, timeout=0.5
    )
    with pytest.raises(CaptchaError) as info:
        wrong.verify(token("pass"), remoteip=None, hostnames=HOSTS)
    assert info.value.codes == ["invalid-input-secret"]


def test_unreachable_siteverify_fails_closed() -> None:
    dead = HCaptchaVerifier(
        secret=TEST_SECRET, sitekey=SITEKEY, verify_url="http://127.0.0.1:1/siteverify", timeout=0.5
    )
    with pytest.raises(CaptchaError) as info:
        dead.verify(token("pass"), remoteip=None, hostnames=HOSTS)
    assert info.value.retryable is True


class _Endpoint(BaseHTTPRequestHandler):
    """Answers every POST with the server's `reply` bytes and counts the connections."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body: bytes = self.server.reply  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    server.connections = 0  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _verifier_for(server: ThreadingHTTPServer) -> HCaptchaVerifier:
    host, port = server.server_address[:2]
    url = f"http://{host!s}:{port}/siteverify"
    return HCaptchaVerifier(secret=TEST_SECRET, sitekey=SITEKEY, verify_url=url, timeout=2)


def test_one_kept_alive_connection_serves_every_check(endpoint: ThreadingHTTPServer) -> None:
    endpoint.reply = json.dumps(  # type: ignore[attr-defined]
        {"success": True, "hostname": "localhost"}
    ).encode()
    verifier = _verifier_for(endpoint)
    for _ in range(5):
        verifier.verify(token("pass"), remoteip="192.0.2.1", hostnames=HOSTS)
    assert endpoint.connections == 1  # type: ignore[attr-defined]
    verifier.close()


def test_an_oversized_reply_fails_closed(endpoint: ThreadingHTTPServer) -> None:
    """A reply far past any siteverify answer is not read on, not parsed, not trusted."""
    padding = "x" * 200_000
    endpoint.reply = json.dumps(  # type: ignore[attr-defined]
        {"success": True, "hostname": "localhost", "padding": padding}
    ).encode()
    verifier = _verifier_for(endpoint)
    with pytest.raises(CaptchaError) as info:
        verifier.verify(token("pass"), remoteip=None, hostnames=HOSTS)
    assert info.value.retryable is True
    verifier.close()


def test_hostname_must_be_allowed(verifier: HCaptchaVerifier) -> None:
    with pytest.raises(CaptchaError) as info:
        verifier.verify(token("pass"), remoteip=None, hostnames={"forms.shop.test"})
    assert info.value.codes == ["hostname-mismatch"]


@pytest.mark.parametrize(
    "body",
    [
        {"success": 1, "hostname": "localhost"},
        {"success": "true", "hostname": "localhost"},
        {"success": [True], "hostname": "localhost"},
        {"success": True},
        {"success": True, "hostname": None},
        {"success": True, "hostname": "localhost", "sitekey": "other"},
        [],
        "success",
        None,
    ],
)
def test_verdicts_that_are_not_a_clear_yes(body: object) -> None:
    with pytest.raises(CaptchaError):
        check_verdict(body, sitekey=SITEKEY, hostnames=HOSTS)


def test_a_clear_yes_without_sitekey_field_passes() -> None:
    check_verdict({"success": True, "hostname": "LOCALHOST"}, sitekey=SITEKEY, hostnames=HOSTS)


def test_the_secret_is_never_logged_or_shown(
    verifier: HCaptchaVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for kind in ("slow", "error", "garbage", "fail"):
        with pytest.raises(CaptchaError) as info:
            verifier.verify(token(kind), remoteip=None, hostnames=HOSTS)
        assert TEST_SECRET not in str(info.value)
    assert TEST_SECRET not in caplog.text
    assert TEST_SECRET not in repr(verifier)
