"""The request body, read whole before the app sees it: the one place that caps its size and
the time it may take to arrive.

werkzeug enforces MAX_CONTENT_LENGTH on a chunked body (no Content-Length) by stopping at the
cap, and the form parser then parses what it got: a long chunked post was cut and accepted
with fields lost. gunicorn's gthread worker reads a body with blocking recv() calls and no
time limit, so a client announcing 1000 bytes and sending six held a thread for as long as it
kept the socket open. `BodyReader` (WSGI middleware) reads every body, whatever its framing,
up to `limit_for(environ)` + 1 bytes within `timeout` seconds, and hands the app either the
bytes it read with their exact Content-Length, or an empty body and a `Problem` that
`refuse_unread_body` answers: 413 too large, 408 too slow, 400 shorter than announced or
badly framed. Nothing downstream ever parses part of a body.

A form with file fields takes a larger body (its files' total, relay.web.forms.max_body_bytes).
Past SPOOL_BYTES a body goes to a temporary file, not memory, and reading stops at the cap:
a 30 MB upload to a 10 MB form costs the server one megabyte of memory, then a 413.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from flask import abort, request
from werkzeug.wsgi import ClosingIterator

from relay.formdefs import FormDef, default_form
from relay.logs import event
from relay.web import forms

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger("relay.web")

PROBLEM = "formrelay.body_problem"
BODY = "formrelay.body"
# Where WSGI servers put the client's socket: gunicorn, werkzeug's development server.
SOCKET_KEYS = ("gunicorn.socket", "werkzeug.socket")
READ_SIZE = 64 * 1024
SPOOL_BYTES = 1024 * 1024
_FORM_PATH = re.compile(r"^/f/([a-z0-9][a-z0-9_-]{0,39})/?$")
# The default form's cap: its fields do not depend on the settings.
DEFAULT_BODY_CAP = forms.max_body_bytes(default_form("support@example.invalid", None))


def limit_for(environ: WSGIEnvironment, forms_by_id: Mapping[str, FormDef] | None = None) -> int:
    """The most bytes a request body may carry: the default form's cap everywhere, and for
    POST /f/<id> that form's own (larger with file fields), here and nowhere else."""
    match = _FORM_PATH.match(str(environ.get("PATH_INFO", "")))
    form = (forms_by_id or {}).get(match.group(1)) if match else None
    return forms.max_body_bytes(form) if form is not None else DEFAULT_BODY_CAP


@dataclass(frozen=True)
class Problem:
    """Why the body did not reach the app: `status` is the answer, `reason` the log event."""

    status: int
    reason: str
    framing: str
    received: int
    declared: int | None
    limit: int


class BodyReader:
    """WSGI middleware: read the body (see the module docstring), then call `app`."""

    def __init__(
        self,
        app: WSGIApplication,
        *,
        timeout: float,
        limit: Callable[[WSGIEnvironment], int] = limit_for,
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.limit = limit
        self.deadlines = ReadDeadlines()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body, problem = self.read(environ)
        size = body.seek(0, io.SEEK_END)
        body.seek(0)
        environ["wsgi.input"] = environ[BODY] = body
        environ["CONTENT_LENGTH"] = str(size)
        # werkzeug ignores CONTENT_LENGTH while the request says it is chunked.
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        if problem is not None:
            environ[PROBLEM] = problem
        # A spooled body's file goes when the answer is sent (and at the latest when the
        # request ends: close_body).
        return ClosingIterator(self.app(environ, start_response), [body.close])

    def read(self, environ: WSGIEnvironment) -> tuple[IO[bytes], Problem | None]:
        framing = framing_of(environ)
        if framing == "none":
            return io.BytesIO(), None
        limit = self.limit(environ)
        declared = declared_length(environ)
        if framing == "length" and declared is None:
            return io.BytesIO(), Problem(400, "unreadable", framing, 0, None, limit)
        if declared is not None and declared > limit:
            return io.BytesIO(), Problem(413, "too_large", framing, 0, declared, limit)
        want = declared if declared is not None else limit + 1
        started = time.monotonic()
        sink = sink_for(limit)
        received: int | None = None
        # Any failure is the server's reader refusing the framing (a bad chunk size, an end
        # of file inside a chunk): the body cannot be read, whatever the cause.
        with (
            self.deadlines.watch(client_socket(environ), started + self.timeout),
            contextlib.suppress(Exception),
        ):
            received = read_up_to(environ["wsgi.input"], want, sink)
        late = time.monotonic() - started >= self.timeout
        problem: Problem | None = None
        if received is None or (declared is not None and received < declared):
            got = received or 0
            if late:
                problem = Problem(408, "timeout", framing, got, declared, limit)
            else:
                reason = "unreadable" if received is None else "incomplete"
                problem = Problem(400, reason, framing, got, declared, limit)
        elif received > limit:
            problem = Problem(413, "too_large", framing, received, declared, limit)
        if problem is not None:
            sink.close()  # a spooled file on disk goes now, not when the request ends
            return io.BytesIO(), problem
        return sink, None


def framing_of(environ: WSGIEnvironment) -> str:
    """ "chunked", "length", "none" (HTTP/1.x without either: RFC 9112 §6.3 says no body) or
    "stream" (a protocol whose server ends the body for us, such as HTTP/2)."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return "chunked"
    if environ.get("CONTENT_LENGTH", "") != "":
        return "length"
    if str(environ.get("SERVER_PROTOCOL", "HTTP/1.1")).upper().startswith("HTTP/1"):
        return "none"
    return "stream"


def declared_length(environ: WSGIEnvironment) -> int | None:
    value = str(environ.get("CONTENT_LENGTH", "")).strip()
    return int(value) if value.isascii() and value.isdigit() else None


def sink_for(limit: int) -> IO[bytes]:
    """Memory for a body that is small whatever it says; a file past SPOOL_BYTES otherwise."""
    if limit <= SPOOL_BYTES:
        return io.BytesIO()
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode="w+b")


def read_up_to(stream: Any, want: int, sink: IO[bytes]) -> int:
    """Copy at most `want` bytes into `sink`; fewer when the stream ends first."""
    got = 0
    while got < want:
        data = stream.read(min(READ_SIZE, want - got))
        if not data:
            break
        sink.write(data)
        got += len(data)
    return got


def client_socket(environ: WSGIEnvironment) -> socket.socket | None:
    """The client's socket on HTTP/1.x; HTTP/2 multiplexes many requests on one, and
    gunicorn bounds a stalled HTTP/2 stream itself (its `timeout`)."""
    if not str(environ.get("SERVER_PROTOCOL", "")).upper().startswith("HTTP/1"):
        return None
    for key in SOCKET_KEYS:
        sock = environ.get(key)
        if isinstance(sock, socket.socket):
            return sock
    return None


class ReadDeadlines:
    """Ends body reads that outlive their deadline, from one thread per process.

    The server's reader loops over blocking recv() calls inside one read(), so a client
    trickling a byte at a time outlasts any per-recv socket timeout. Shutting the socket's
    read side wakes that recv() with end-of-file; the write side stays open for the answer.
    The thread starts at the first watched read, so it never crosses gunicorn's fork."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, socket.socket]] = {}
        self._keys = itertools.count()
        self._pid = 0

    @contextlib.contextmanager
    def watch(self, sock: socket.socket | None, deadline: float) -> Iterator[None]:
        if sock is None:
            yield
            return
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(
                    target=self._run, name="formrelay-body-deadlines", daemon=True
                ).start()
            key = next(self._keys)
            self._due[key] = (deadline, sock)
            # One reader, one timeout: a new deadline is never sooner than those already
            # watched, so the thread needs waking only from its wait on an empty table.
            if len(self._due) == 1:
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._due.pop(key, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for key, (deadline, sock) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[key]
                        stop_reading(sock)
                soonest = min((deadline for deadline, _ in self._due.values()), default=None)
                self._cond.wait(None if soonest is None else max(soonest - now, 0.0))


def stop_reading(sock: socket.socket) -> None:
    """shutdown(SHUT_RD) on the plain socket: ssl.SSLSocket.shutdown would also drop the TLS
    state that the answer still needs."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RD)


def close_body(_exc: BaseException | None = None) -> None:
    """teardown_request: the body BodyReader read (a temporary file past SPOOL_BYTES) is
    closed as the request ends, whoever holds the answer."""
    body = request.environ.get(BODY)
    if body is not None:
        body.close()


def refuse_unread_body() -> None:
    """before_request: answer the problem BodyReader found (HTML or JSON, translated)."""
    problem: Problem | None = request.environ.get(PROBLEM)
    if problem is None:
        return
    event(
        log,
        f"body.{problem.reason}",
        logging.WARNING,
        framing=problem.framing,
        received=problem.received,
        declared=problem.declared,
        limit=problem.limit,
        ip=request.remote_addr,
        path=request.path,
    )
    abort(problem.status)
