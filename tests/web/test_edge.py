"""Hostile clients at the HTTP edge, against gunicorn as the README's one-line command starts
it (deploy/gunicorn.conf.py, defaults untouched). Requests go over raw sockets, so the framing
(Content-Length, chunked, a body longer or shorter than announced) reaches the server exactly
as a client sent it, and slow clients are really slow."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from relay.store.outbox import Outbox
from tests.faults.harness import (
    SHIPPED_GUNICORN,
    Proc,
    free_port,
    http_ready,
    shipped_gunicorn_proc,
    wait_until,
)
from tests.web.conftest import queued, valid_form

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
TEN_MB = 10 * 1024 * 1024
PIECE = 64 * 1024


@dataclass
class Server:
    port: int
    proc: Proc
    outbox: Outbox
    opened: list[socket.socket] = field(default_factory=list)

    def connect(self, timeout: float = 20.0) -> socket.socket:
        """A raw connection, hung up at the end of the test whatever happens to it."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened.append(sock)
        return sock


@pytest.fixture
def shipped(base_env: dict[str, str], web_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    """The web process as shipped; RELAY_BODY_TIMEOUT and the gunicorn settings keep their
    defaults. The operator migrates once before starting it."""
    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = Outbox(url)
    outbox.upgrade()
    env = {**base_env, **web_env, "RELAY_DATABASE_URL": url}
    port = free_port()
    server = Server(port, shipped_gunicorn_proc(env, tmp_path, port).start(), outbox)
    try:
        wait_until(
            lambda: http_ready(f"http://127.0.0.1:{port}/healthz"), timeout=30, what="gunicorn"
        )
        yield server
    finally:
        for sock in server.opened:
            hang_up(sock)
        server.proc.stop()
        outbox.dispose()


def test_the_readme_starts_gunicorn_as_these_tests_do() -> None:
    assert SHIPPED_GUNICORN in README.read_text()


# --- raw HTTP/1.1 ---------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class Reader:
    """Responses read off a raw socket, one after the other (Content-Length framed, as
    gunicorn frames a Flask answer)."""

    sock: socket.socket
    buffer: bytes = b""
    closed: bool = field(default=False)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        return True

    def response(self) -> Response | None:
        """The next response, or None when the server closed the connection instead."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._fill():
                break
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Response(int(status_line.split()[1]), headers, body)


def head(
    content_type: str, *, length: int | None = None, lang: str = "en", accept: str = "text/html"
) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        "POST /form HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: {content_type}\r\nAccept: {accept}\r\nAccept-Language: {lang}\r\n"
        f"{framing}\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def keep_sending(sock: socket.socket, pieces: Iterator[bytes]) -> threading.Thread:
    """Send in the background as a client that does not wait for an answer would; stops
    when the server stops reading (the socket's timeout) or goes away."""

    def run() -> None:
        with contextlib.suppress(OSError):
            for piece in pieces:
                sock.sendall(piece)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def form_bytes(**overrides: str) -> bytes:
    return urllib.parse.urlencode(valid_form(**overrides)).encode()


def chunked_pieces(first: bytes, filler: bytes, total: int) -> Iterator[bytes]:
    yield chunk(first)
    sent = len(first)
    while sent < total:
        yield chunk(filler)
        sent += len(filler)
    yield b"0\r\n\r\n"


def post_raw(server: Server, request: bytes, pieces: Iterator[bytes] | None = None) -> Response:
    sock = server.connect()
    try:
        sock.sendall(request)
        if pieces is not None:
            keep_sending(sock, pieces)
        reply = Reader(sock).response()
        assert reply is not None, "the server closed the connection without an answer"
        return reply
    finally:
        hang_up(sock)


def reader_closes(reply: Response) -> bool:
    return reply.headers.get("connection", "").lower() == "close"


def hang_up(sock: socket.socket) -> None:
    """Close, waking a keep_sending thread blocked in send()."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


TOO_LARGE_EN = "What you sent is too large. Please shorten your message and try again."
TOO_LARGE_JA = "送信内容が大きすぎます。"


def test_body_limit_holds_for_every_framing(shipped: Server) -> None:
    """Too large is a translated 413 however the body is framed; a chunked body past the
    cap is never parsed up to the cap and accepted (it was: a 303 with fields lost)."""
    form_type = "application/x-www-form-urlencoded"
    filler = b"x" * PIECE

    # Content-Length over the cap: refused before the body is read.
    announced = post_raw(
        shipped,
        head(form_type, length=TEN_MB),
        iter([filler] * (TEN_MB // PIECE)),
    )
    assert announced.status == 413
    assert TOO_LARGE_EN in announced.text

    # Chunked: a valid form, then "&junk=" and 10 MB.
    valid_then_junk = post_raw(
        shipped,
        head(form_type, lang="ja"),
        chunked_pieces(form_bytes(subject="Cut here") + b"&junk=", filler, TEN_MB),
    )
    assert valid_then_junk.status == 413
    assert TOO_LARGE_JA in valid_then_junk.text

    # Chunked: 10 MB of form (was a 422) and 10 MB of JSON (was a 400 "not an object").
    big_form = post_raw(shipped, head(form_type), chunked_pieces(b"message=", filler, TEN_MB))
    assert big_form.status == 413
    assert TOO_LARGE_EN in big_form.text
    big_json = post_raw(
        shipped,
        head("application/json", accept="application/json"),
        chunked_pieces(b'{"message": "', filler, TEN_MB),
    )
    assert big_json.status == 413
    assert json.loads(big_json.body) == {"errors": {"form": [TOO_LARGE_EN]}}

    assert queued(shipped.outbox) == []

    # A chunked body within the cap is read whole and accepted.
    small = form_bytes(subject="Chunked and fine")
    chunked = post_raw(
        shipped, head(form_type) + chunk(small[:100]) + chunk(small[100:]) + b"0\r\n\r\n"
    )
    assert chunked.status == 303, chunked.text
    assert [row.subject for row in queued(shipped.outbox)] == ["Chunked and fine"]


def test_a_body_is_exactly_what_was_announced(shipped: Server) -> None:
    """Shorter than announced is refused (it was parsed and accepted); longer than announced
    is the announced body and then garbage that is never a second submission."""
    form_type = "application/x-www-form-urlencoded"
    short = form_bytes(subject="Half sent")
    sock = shipped.connect()
    try:
        sock.sendall(head(form_type, length=len(short) + 500) + short)
        sock.shutdown(socket.SHUT_WR)  # the client is done: the rest will never come
        reply = Reader(sock).response()
    finally:
        sock.close()
    assert reply is not None
    assert reply.status == 400, reply.text
    assert "We could not read this request." in reply.text
    assert queued(shipped.outbox) == []

    announced = form_bytes(subject="Announced")
    extra = b"&subject=Smuggled&junk=" + b"y" * (1024 * 1024)
    sock = shipped.connect()
    try:
        sock.sendall(head(form_type, length=len(announced)))
        keep_sending(sock, iter([announced + extra]))
        reader = Reader(sock)
        first = reader.response()
        second = reader.response()
    finally:
        sock.close()
    assert first is not None
    assert first.status == 303, first.text
    # The rest is not a request: gunicorn refuses it (414: "request line too large") and
    # closes, or just closes; never a second acceptance.
    assert second is None or (400 <= second.status < 500 and reader_closes(second)), second
    assert [row.subject for row in queued(shipped.outbox)] == ["Announced"]


def test_a_lone_surrogate_in_the_captcha_token_is_a_field_error(shipped: Server) -> None:
    """Every field goes through the same text checks, the token included (it was a 500:
    httpx cannot form-encode a lone surrogate for siteverify)."""
    body = json.dumps(valid_form(**{"h-captcha-response": "\ud800"})).encode()
    reply = post_raw(
        shipped, head("application/json", length=len(body), accept="application/json") + body
    )
    assert reply.status == 400, reply.text
    assert json.loads(reply.body) == {
        "errors": {
            "h-captcha-response": ["The CAPTCHA check failed or expired. Please complete it again."]
        }
    }


# --- slow clients ---------------------------------------------------------------------------

BODY_TIMEOUT = 10.0  # RELAY_BODY_TIMEOUT's default
SLOW_BODIES = 3


def test_gunicorn_alone_ends_a_slow_body_within_30_seconds(shipped: Server) -> None:
    """Announcing 1000 bytes and sending six (and a client trickling a byte every half
    second) held a thread for as long as the client liked; the app now ends each body read
    at RELAY_BODY_TIMEOUT with a 408, and the form keeps answering meanwhile."""
    started = time.monotonic()
    slow = []
    for _ in range(SLOW_BODIES):
        sock = shipped.connect(timeout=35)
        sock.sendall(head("application/x-www-form-urlencoded", length=1000) + b"name=x")
        slow.append(sock)
    trickler = shipped.connect(timeout=35)
    trickler.sendall(head("application/x-www-form-urlencoded", length=1000))

    def trickle() -> Iterator[bytes]:
        while True:
            time.sleep(0.5)
            yield b"a"

    keep_sending(trickler, trickle())

    # Meanwhile the form answers: the slow ones hold a few of the 16 threads, not all.
    with httpx.Client(base_url=f"http://127.0.0.1:{shipped.port}", timeout=5) as http:
        assert http.get("/healthz").status_code == 200
        assert http.post("/form", json=valid_form()).status_code == 202
        assert http.get("/healthz").status_code == 200

    ended = []
    for sock in [*slow, trickler]:
        try:
            reply = Reader(sock).response()
        except TimeoutError:
            pytest.fail("a slow body was still open after 35 s")
        ended.append(time.monotonic() - started)
        assert reply is not None
        assert reply.status == 408
        assert "took too long to arrive" in reply.text
    assert max(ended) <= 30, ended
    assert min(ended) >= BODY_TIMEOUT - 1, ended
    assert len(queued(shipped.outbox)) == 1
