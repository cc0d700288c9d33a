"""Harness for the fault suite: real `relay` processes, gunicorn, waiting, and mail checks.

Everything here drives the system from the outside, as an operator would: subprocesses get a
RELAY_ environment (never a .env file: they run in a temporary folder), are killed by their
own pid or process group, and the evidence is read back from the outbox, the worker's log
and the MX peer's mailbox.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.policy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import dns.resolver

from tests.peers.smtp import SMTPPeer

T = TypeVar("T")

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
        last = predicate()
    return last


def subprocess_env(relay_env: Mapping[str, str]) -> dict[str, str]:
    """os.environ without any RELAY_ variable of the caller, plus `relay_env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(relay_env)
    return env


def run_relay(
    args: list[str], env: Mapping[str, str], cwd: Path, *, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run one short `relay` command to completion."""
    return subprocess.run(
        [str(BIN / "relay"), *args],
        env=subprocess_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Proc:
    """A long-running subprocess in its own session, its output in a file.

    Its own session makes `kill_group` reach gunicorn's workers as well as the master,
    without touching any process this suite did not start.
    """

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path, name: str) -> None:
        self.argv = argv
        self.env = subprocess_env(env)
        self.cwd = cwd
        self.log_path = cwd / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_output(self, needle: str, *, timeout: float = 30.0, start: int = 0) -> str:
        """Wait until `needle` appears in the output after character `start`."""

        def found() -> str:
            text = self.output()
            if needle in text[start:]:
                return text
            if not self.alive():
                raise AssertionError(
                    f"{self.argv[0]} exited ({self.popen and self.popen.returncode}) "
                    f"before printing {needle!r}:\n{text[-4000:]}"
                )
            return ""

        return wait_until(found, timeout=timeout, what=f"{needle!r} in {self.log_path.name}")

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group this Proc leads (its own session)."""
        if self.popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the group after a grace period."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_group()
        else:
            # The leader is gone; make sure nothing it forked survives.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def rss_kb(self) -> int:
        """Resident set size from /proc (kB)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")


def worker_proc(env: Mapping[str, str], cwd: Path, *args: str, name: str = "worker") -> Proc:
    return Proc([str(BIN / "relay"), "worker", *args], env, cwd, name)


def gunicorn_proc(
    env: Mapping[str, str], cwd: Path, port: int, *, workers: int = 2, threads: int = 4
) -> Proc:
    argv = [
        str(BIN / "gunicorn"),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--graceful-timeout",
        "2",
        "--log-level",
        "warning",
        "relay:create_app()",
    ]
    return Proc(argv, env, cwd, "gunicorn")


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# The README's one-line command for the web process (tests/web/test_edge.py keeps them equal).
SHIPPED_GUNICORN = 'gunicorn -c deploy/gunicorn.conf.py "relay:create_app()"'


def shipped_gunicorn_proc(
    env: Mapping[str, str], cwd: Path, port: int, *extra: str, name: str = "gunicorn"
) -> Proc:
    """gunicorn as SHIPPED_GUNICORN starts it (deploy/gunicorn.conf.py, every setting at its
    default unless `env` overrides it), bound to `port` through FORMRELAY_BIND; `extra`
    options go before the app (an access-log format, say)."""
    argv = [
        str(BIN / "gunicorn"),
        "-c",
        str(DEPLOY / "gunicorn.conf.py"),
        *extra,
        "relay:create_app()",
    ]
    return Proc(argv, {**env, "FORMRELAY_BIND": f"127.0.0.1:{port}"}, cwd, name)


def http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status < 500)
    except (urllib.error.URLError, OSError):
        return False


# --- the visitor's side --------------------------------------------------------------------------

ORIGIN = "http://localhost"


def captcha_token() -> str:
    """A fresh siteverify token that passes (the stub accepts each token once)."""
    return f"pass-{uuid.uuid4()}"


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # the JSON document, or the text of an HTML page
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def id(self) -> str | None:
        if isinstance(self.body, dict) and self.status == 202:
            return str(self.body["id"])
        return None


def encode_form(
    fields: Mapping[str, str], raw_fields: Mapping[str, bytes] | None = None, *, token: str
) -> bytes:
    """application/x-www-form-urlencoded, raw byte values percent-encoded as they are."""
    pairs: list[tuple[str, str | bytes]] = [*fields.items(), *(raw_fields or {}).items()]
    pairs.append(("h-captcha-response", token))
    return urllib.parse.urlencode(pairs).encode("ascii")


class Visitor:
    """Posts the form as a browser (HTML) or as embed.js (JSON) would, to a Flask test client
    or to a real server at `base_url`."""

    def __init__(
        self, *, client: Any = None, base_url: str | None = None, keepalive: bool = True
    ) -> None:
        assert (client is None) != (base_url is None)
        self.client = client
        self.base_url = base_url
        self.keepalive = keepalive
        self._http: Any = None

    def post(
        self,
        fields: Mapping[str, str],
        *,
        raw_fields: Mapping[str, bytes] | None = None,
        as_json: bool = True,
        json_body: bool = False,
        token: str | None = None,
        timeout: float = 30.0,
        raw_body: tuple[bytes, str] | None = None,
    ) -> Reply:
        """`raw_body`: (bytes, content type) sent as they are instead of the fields."""
        token = token or captcha_token()
        headers = {
            "Origin": ORIGIN,
            "Accept": "application/json" if as_json else "text/html",
        }
        if raw_body is not None:
            body, headers["Content-Type"] = raw_body
        elif json_body:
            body = json.dumps({**fields, "h-captcha-response": token}).encode()
            headers["Content-Type"] = "application/json"
        else:
            body = encode_form(fields, raw_fields, token=token)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if self.client is not None:
            response = self.client.post("/form", data=body, headers=headers)
            status, text = response.status_code, response.get_data(as_text=True)
        else:
            import httpx

            if self._http is None:
                limits = httpx.Limits(max_keepalive_connections=None if self.keepalive else 0)
                self._http = httpx.Client(timeout=timeout, limits=limits)
            response = self._http.post(f"{self.base_url}/form", content=body, headers=headers)
            status, text = response.status_code, response.text
        reply_headers = {k.lower(): v for k, v in response.headers.items()}
        if "json" in reply_headers.get("content-type", ""):
            return Reply(status, json.loads(text), reply_headers)
        return Reply(status, text, reply_headers)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()


# --- mail checks --------------------------------------------------------------------------------


def txt_lookup(nameserver: str, port: int) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` that asks the test DNS server, never the system resolver."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [nameserver]
    resolver.port = port

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)  # type: ignore[attr-defined]

    return lookup


def header_names(raw: bytes) -> list[str]:
    """The header field names of `raw`, in order, as a strict parser sees them."""
    msg = message_from_bytes(raw, policy=email.policy.compat32)
    return [name for name, _ in msg.items()]


def parse(raw: bytes) -> Message:
    return message_from_bytes(raw, policy=email.policy.default)


def lowered(items: Any) -> list[str]:
    return [str(item).lower() for item in items]


def assert_our_message(
    data: bytes,
    rcpt_tos: list[str],
    *,
    support: str,
    header_set: tuple[str, ...],
    dnsfunc: Callable[..., bytes | None],
) -> Message:
    """The promises for every delivered message, whatever the visitor typed."""
    import dkim

    assert [r.lower() for r in rcpt_tos] == [support.lower()], rcpt_tos
    assert data.isascii(), "the delivered message is not 7-bit"
    lines = data.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines), "bare CR or LF"
    assert max(len(line) for line in lines) <= 998
    names = header_names(data)
    signatures = [n for n in names if n.lower() == "dkim-signature"]
    assert signatures, "no DKIM-Signature"
    assert names[: len(signatures)] == signatures, names
    assert names[len(signatures) :] == list(header_set), names
    assert dkim.verify(data, dnsfunc=dnsfunc), "DKIM signature does not verify"
    msg = parse(data)
    assert not msg.defects, msg.defects
    for name in header_set:
        header = msg[name]
        assert not getattr(header, "defects", ()), (name, header.defects)
        # Decoded once, as a mail client shows it: still one line (no encoded-word smuggling).
        assert not set(str(header)) & set("\r\n\x00\x85\u2028\u2029"), (name, str(header))
    assert [a.addr_spec.lower() for a in msg["To"].addresses] == [support.lower()]
    reply_to = [a.addr_spec for a in msg["Reply-To"].addresses]
    assert len(reply_to) == 1, reply_to
    assert not reply_to[0].lower().endswith("@evil.test"), reply_to
    for name in ("Cc", "Bcc", "Resent-To", "Resent-Cc", "Resent-Bcc"):
        assert msg[name] is None
    return msg


def message_id_of(data: bytes) -> str:
    value = message_from_bytes(data, policy=email.policy.compat32)["Message-ID"]
    return str(value).strip()


def copies(peer: SMTPPeer, message_id: str) -> int:
    """How many copies of one message the MX peer accepted."""
    return sum(1 for r in peer.messages if message_id_of(r.data) == message_id)


# --- outbox evidence ---------------------------------------------------------------------------

FINAL = ("delivered", "failed")


def wait_status(
    outbox: Any,
    ids: list[str],
    statuses: tuple[str, ...] = FINAL,
    *,
    timeout: float = 60.0,
    proc: Proc | None = None,
) -> dict[str, Any]:
    """Wait until every id is in one of `statuses`; returns {id: MessageRow}."""
    rows: dict[str, Any] = {}
    wanted = set(ids)

    def done() -> bool:
        if proc is not None and not proc.alive():
            raise AssertionError(f"the worker exited:\n{proc.output()[-4000:]}")
        if len(wanted) > 20:  # one query for all, not one per message
            for row in outbox.list_messages(limit=1_000_000):
                if row.id in wanted and row.status in statuses:
                    rows[row.id] = row
        else:
            for outbox_id in wanted - set(rows):
                row = outbox.get(outbox_id)
                if row.status in statuses:
                    rows[outbox_id] = row
        return len(rows) == len(wanted)

    try:
        wait_until(
            done,
            timeout=timeout,
            interval=0.2 if len(wanted) <= 20 else 1.0,
            what=f"{len(ids)} message(s) {statuses}",
        )
    except AssertionError:
        pending = Counter(outbox.get(i).status for i in wanted - set(rows))
        log = proc.output()[-4000:] if proc is not None else ""
        raise AssertionError(f"still pending: {dict(pending)}\n{log}") from None
    return rows


def attempt_summary(outbox: Any, outbox_id: str) -> list[tuple[str, int | None, str | None]]:
    """[(outcome, code, mx_host)] of every attempt of a message, in order."""
    return [(a.outcome, a.code, a.mx_host) for a in outbox.show(outbox_id).attempts]
