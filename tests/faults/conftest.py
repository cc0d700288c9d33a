"""Fixtures for the fault suite: a complete world (DNS, two MX hosts, siteverify), a migrated
outbox on SQLite or PostgreSQL, RELAY_ environments for real subprocesses, and a small tmpfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import load_settings
from relay.sandbox.captcha import SiteverifyStub
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import MX2_IP, MX_IP, SUPPORT_DOMAIN
from relay.store.outbox import Outbox
from tests.conftest import unavailable
from tests.faults.harness import (
    Proc,
    Visitor,
    gunicorn_proc,
    run_relay,
    txt_lookup,
    worker_proc,
)
from tests.peers.smtp import FaultySMTP, Received, ScriptedHandler, SMTPPeer

IDN_DOMAIN = "例え.test"
IDN_ASCII = IDN_DOMAIN.encode("idna").decode()

# Generous limits so that a suite sending hundreds of forms from one address is not throttled.
UNLIMITED = "1000000/minute"


class FaultHandler(ScriptedHandler):
    """The scripted MX plus the faults a process-kill test needs to park a worker in place.

    - `hang_mid_data`: answer 354, read 64 bytes of the data, then never read or answer again
      (the server never has the whole message; the worker waits inside DATA);
    - `accept_then_hang`: take the whole message (it counts as received), then never answer
      the final "." (the reply is lost: a retry is a duplicate);
    - `greylist_each_message`: 451 at DATA for the first sight of each Message-ID, so every
      message needs exactly two attempts even though sender and recipient never change;
    - `hold_data_command`: hold the 354 to DATA until `release_hold` (the worker waits just
      before it would send the message);
    - `hold_dot_reply`: take the whole message (it counts as received), then hold the reply
      to the final "." until `release_hold`, and answer 250;
    - `data_delay`: take the whole message, then answer 250 that many seconds later (a
      receiver that scans what it gets).
    """

    def __init__(self, *, greylist_seconds: float | None = None) -> None:
        super().__init__(greylist_seconds=greylist_seconds)
        self.hang_mid_data = 0
        self.accept_then_hang = 0
        self.hold_data_command = 0
        self.hold_dot_reply = 0
        self.data_delay = 0.0
        self.release_hold = threading.Event()
        self.greylist_each_message = False
        self.parked = threading.Event()
        self._seen_ids: set[str] = set()
        self.greylisted = 0

    def received(self, session: Session, envelope: Envelope) -> None:
        with self.lock:
            self.messages.append(
                Received(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=list(envelope.rcpt_tos),
                    data=bytes(envelope.original_content or b""),
                    peer=str(session.peer[0]) if session.peer else "",
                    helo=session.host_name,
                    tls=None,
                )
            )

    async def held(self) -> None:
        self.parked.set()
        while not self.release_hold.is_set():
            await asyncio.sleep(0.05)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = bytes(envelope.original_content or b"")
        if self.hold_dot_reply:
            self.hold_dot_reply -= 1
            self.received(session, envelope)
            await self.held()
            return "250 2.0.0 Queued after a long scan"
        if self.data_delay:
            self.received(session, envelope)
            await asyncio.sleep(self.data_delay)
            return "250 2.0.0 Queued"
        if self.greylist_each_message:
            message_id = str(message_from_bytes(data)["Message-ID"]).strip()
            with self.lock:
                first = message_id not in self._seen_ids
                self._seen_ids.add(message_id)
                if first:
                    self.greylisted += 1
            if first:
                return "451 4.7.1 Greylisted, please try again later"
        if self.accept_then_hang:
            self.accept_then_hang -= 1
            self.received(session, envelope)
            self.parked.set()
            await asyncio.sleep(3600)
        return await super().handle_DATA(server, session, envelope)


class FaultSMTP(FaultySMTP):
    async def smtp_DATA(self, arg: str) -> None:
        handler = self.event_handler
        if isinstance(handler, FaultHandler) and handler.hold_data_command:
            handler.hold_data_command -= 1
            await handler.held()
        if isinstance(handler, FaultHandler) and handler.hang_mid_data:
            handler.hang_mid_data -= 1
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader.read(64), timeout=5)
            handler.parked.set()
            await asyncio.sleep(3600)
            return
        await super().smtp_DATA(arg)


class FaultPeer(SMTPPeer):
    smtp_class = FaultSMTP


@pytest.fixture
def mx_handler() -> FaultHandler:
    return FaultHandler()


@pytest.fixture
def mx_server(mx_handler: FaultHandler) -> Iterator[SMTPPeer]:
    """mx1.support.test (127.0.0.2) with the extra faults of FaultHandler."""
    with FaultPeer(mx_handler, host=MX_IP, hostname=f"mx1.{SUPPORT_DOMAIN}") as peer:
        yield peer


@pytest.fixture
def mx2_handler() -> FaultHandler:
    return FaultHandler()


@pytest.fixture
def mx2_server(mx2_handler: FaultHandler, mx_server: SMTPPeer) -> Iterator[SMTPPeer]:
    """mx2.support.test (127.0.0.3) on the same port as mx1: one RELAY_SMTP_PORT serves both."""
    try:
        peer = FaultPeer(
            mx2_handler, host=MX2_IP, port=mx_server.port, hostname=f"mx2.{SUPPORT_DOMAIN}"
        )
        peer.start()
    except OSError as exc:
        unavailable(f"cannot bind mx2 on {MX2_IP}:{mx_server.port}: {exc}")
        raise
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def fault_dns(world_dns: DNSZoneServer) -> DNSZoneServer:
    """The world zone plus an IDN visitor domain, so IDN addresses meet a real MX record."""
    world_dns.add(f"{IDN_ASCII}. 300 IN MX 10 mx.visitor.test.\n")
    return world_dns


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where subprocesses run and log; no .env file is ever there."""
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def relay_env(
    base_env: dict[str, str],
    fault_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    siteverify: SiteverifyStub,
    database_url: str,
) -> dict[str, str]:
    """A complete RELAY_ environment for the fault world on `database_url` (both stores)."""
    return {
        **base_env,
        "RELAY_DNS_NAMESERVERS": fault_dns.address,
        "RELAY_SMTP_PORT": str(mx_server.port),
        "RELAY_DATABASE_URL": database_url,
        "RELAY_HCAPTCHA_VERIFY_URL": siteverify.url,
        "RELAY_RATE_LIMIT": UNLIMITED,
        "RELAY_RATE_LIMIT_GLOBAL": UNLIMITED,
        "RELAY_RETRY_INITIAL": "1",
        "RELAY_RETRY_MAX": "2",
        "RELAY_WORKER_LEASE": "10",
        "RELAY_WORKER_CONCURRENCY": "4",
        "RELAY_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def outbox(database_url: str) -> Iterator[Outbox]:
    """The migrated outbox the processes share; the test reads the evidence through it."""
    box = Outbox(database_url)
    box.upgrade()
    try:
        yield box
    finally:
        box.dispose()


@pytest.fixture
def make_app() -> Callable[..., Any]:
    """The real WSGI app for an environment, as gunicorn would build it (in-process)."""

    def make(env: dict[str, str], **kwargs: Any) -> Any:
        from relay import create_app

        app = create_app(load_settings(env, env_file=None), **kwargs)
        app.testing = False  # errors become 500 responses, as in production
        return app

    return make


@pytest.fixture
def visitor(make_app: Callable[..., Any], relay_env: dict[str, str], outbox: Outbox) -> Visitor:
    """A visitor posting to the real app (Flask test client) on the test's outbox."""
    return Visitor(client=make_app(relay_env, outbox=outbox).test_client())


@pytest.fixture
def dnsfunc(fault_dns: DNSZoneServer) -> Callable[..., bytes | None]:
    return txt_lookup(fault_dns.host, fault_dns.port)


def run_once(env: dict[str, str], cwd: Path, *, timeout: float = 120.0) -> str:
    """`relay worker --once`: deliver everything due, then exit; returns its log."""
    done = run_relay(["worker", "--once"], env, cwd, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes started by a test; every one is stopped (group-killed if need be) at teardown."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def start_worker(procs: list[Proc], workdir: Path) -> Callable[..., Proc]:
    def start(env: dict[str, str], *args: str, name: str = "worker") -> Proc:
        proc = worker_proc(env, workdir, *args, name=name).start()
        procs.append(proc)
        return proc

    return start


@pytest.fixture
def start_gunicorn(procs: list[Proc], workdir: Path) -> Callable[..., Proc]:
    def start(env: dict[str, str], port: int, **kwargs: Any) -> Proc:
        proc = gunicorn_proc(env, workdir, port, **kwargs).start()
        procs.append(proc)
        return proc

    return start


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted afterwards (the disk-full fault needs a real full disk)."""
    if shutil.which("mount") is None:
        unavailable("the mount command is not installed")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", "-l", str(mountpoint)], check=True, capture_output=True)
