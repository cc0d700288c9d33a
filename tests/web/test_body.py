"""relay.web.body on its own: what reaches the app for each framing, and the read deadline
against a client that trickles (a real socket pair; the reader loops over recv() as
gunicorn's does). Through gunicorn itself: tests/web/test_edge.py."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from relay.web.body import PROBLEM, BodyReader, Problem


class LoopingReader:
    """read(n) as gunicorn's body does it: recv() until n bytes or end of file."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            piece = self.sock.recv(size - len(data))
            if not piece:
                break
            data += piece
        return data


def through(environ: dict[str, Any], *, timeout: float = 5.0, limit: int = 100) -> Any:
    """Run `environ` through a BodyReader; (the body the app read, the Problem or None)."""
    seen: dict[str, Any] = {}

    def app(env: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen["body"] = env["wsgi.input"].read()
        seen["length"] = env["CONTENT_LENGTH"]
        seen["chunked"] = "HTTP_TRANSFER_ENCODING" in env
        seen["problem"] = env.get(PROBLEM)
        return [b""]

    BodyReader(app, timeout=timeout, limit=lambda _env: limit)(environ, None)  # type: ignore[arg-type]
    assert seen["length"] == str(len(seen["body"]))
    assert not seen["chunked"]
    return seen["body"], seen["problem"]


def environ(body: bytes, **extra: Any) -> dict[str, Any]:
    return {"SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": io.BytesIO(body), **extra}


def test_a_body_within_the_limit_reaches_the_app_whole() -> None:
    assert through(environ(b"a=1", CONTENT_LENGTH="3")) == (b"a=1", None)
    # Chunked (the server has taken the chunks apart): read to its end, given a length.
    assert through(environ(b"a=1", HTTP_TRANSFER_ENCODING="chunked")) == (b"a=1", None)


def test_the_limit_is_one_seam_for_every_framing() -> None:
    body, problem = through(environ(b"x" * 101, CONTENT_LENGTH="101"))
    assert (body, problem.status, problem.reason, problem.received) == (b"", 413, "too_large", 0)
    body, problem = through(environ(b"x" * 500, HTTP_TRANSFER_ENCODING="chunked"))
    assert (body, problem.status, problem.framing) == (b"", 413, "chunked")
    assert problem.received == 101  # it stops reading one byte past the limit
    assert through(environ(b"x" * 100, HTTP_TRANSFER_ENCODING="chunked"))[1] is None


def test_shorter_than_announced_is_never_parsed() -> None:
    body, problem = through(environ(b"a=1", CONTENT_LENGTH="50"))
    assert body == b""
    assert (problem.status, problem.reason, problem.received, problem.declared) == (
        400,
        "incomplete",
        3,
        50,
    )


def test_no_framing_on_http_1_means_no_body() -> None:
    """RFC 9112 §6.3: gunicorn would otherwise read such a body until the client closes."""
    assert through(environ(b"never read")) == (b"", None)


def test_a_reader_that_fails_is_a_400() -> None:
    class Broken:
        def read(self, size: int) -> bytes:
            raise OSError("invalid chunk size")

    body, problem = through(
        environ(b"", HTTP_TRANSFER_ENCODING="chunked") | {"wsgi.input": Broken()}
    )
    assert (body, problem.status, problem.reason) == (b"", 400, "unreadable")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    for sock in (server, client):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def test_a_trickling_client_is_cut_at_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """One byte every 50 ms never leaves recv() idle long enough for a per-read timeout;
    the deadline ends the read anyway, and the answer can still be written."""
    server, client = pair
    stop = threading.Event()

    def trickle() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                client.sendall(b"a")
                time.sleep(0.05)

    threading.Thread(target=trickle, daemon=True).start()
    started = time.monotonic()
    try:
        body, problem = through(
            environ(b"", CONTENT_LENGTH="1000")
            | {"wsgi.input": LoopingReader(server), "gunicorn.socket": server},
            timeout=0.5,
            limit=10_000,
        )
    finally:
        stop.set()
    elapsed = time.monotonic() - started
    assert isinstance(problem, Problem)
    assert (body, problem.status, problem.reason) == (b"", 408, "timeout")
    assert 0 < problem.received < 1000
    assert 0.5 <= elapsed < 1.5, elapsed
    server.sendall(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert client.recv(100).startswith(b"HTTP/1.1 408")
