"""The shipped pair on loopback: deploy/nginx/formrelay.conf in front of gunicorn started
with deploy/gunicorn.conf.py, as an operator installs them (only addresses, certificate and
log paths are changed). 200 slow-body and 200 slow-header clients, each from its own
loopback address as a botnet's would be, are held open while /healthz and real submissions
keep answering; nginx ends them at its client_*_timeout, and gunicorn never sees them."""

from __future__ import annotations

import contextlib
import getpass
import shutil
import socket
import ssl
import statistics
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.store.outbox import Outbox
from tests.conftest import unavailable
from tests.faults.harness import (
    DEPLOY,
    Proc,
    free_port,
    http_ready,
    shipped_gunicorn_proc,
    wait_until,
)
from tests.web.conftest import queued, valid_form

pytestmark = pytest.mark.slow

HOST = "forms.example.com"
SLOW = 200  # of each kind
HELD_TIMEOUT = 15  # client_body_timeout and client_header_timeout in formrelay.conf


def render_site(site: str, replacements: dict[str, str]) -> str:
    """formrelay.conf with each `old` replaced once: a change to the shipped file that
    this rendering no longer matches fails here rather than testing something else."""
    for old, new in replacements.items():
        assert site.count(old) == 1, f"formrelay.conf no longer has exactly one {old!r}"
        site = site.replace(old, new)
    return site


@dataclass
class Edge:
    """nginx on https://127.0.0.1:{port} in front of gunicorn on 127.0.0.1:{upstream}."""

    port: int
    upstream: int
    context: ssl.SSLContext
    gunicorn: Proc
    outbox: Outbox
    access_log: Path

    def connect(self, source: str = "127.0.0.1", timeout: float = 30.0) -> ssl.SSLSocket:
        raw = socket.create_connection(
            ("127.0.0.1", self.port), timeout=timeout, source_address=(source, 0)
        )
        return self.context.wrap_socket(raw, server_hostname=HOST)

    def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> int:
        """One request on its own connection; the status nginx answered."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        with self.connect(timeout=10) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            reply = b""
            while b"\r\n" not in reply:
                data = sock.recv(4096)
                if not data:
                    break
                reply += data
        return int(reply.split(b" ", 2)[1])


@pytest.fixture
def edge(base_env: dict[str, str], web_env: dict[str, str], tmp_path: Path) -> Iterator[Edge]:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        unavailable("nginx is not installed (apt-get install nginx-light)")
        raise AssertionError  # unreachable
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(HOST)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)

    upstream, http_port, https_port = free_port(), free_port(), free_port()
    logs = tmp_path / "logs"
    logs.mkdir()
    site = render_site(
        (DEPLOY / "nginx" / "formrelay.conf").read_text(),
        {
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream};",
            "listen 80;": f"listen 127.0.0.1:{http_port};",
            "listen [::]:80;": "",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{https_port} ssl http2;",
            "listen [::]:443 ssl http2;": "",
            f"/etc/letsencrypt/live/{HOST}/fullchain.pem": str(cert_path),
            f"/etc/letsencrypt/live/{HOST}/privkey.pem": str(key_path),
            "/var/log/nginx/formrelay.access.log": str(logs / "access.log"),
            "/var/log/nginx/formrelay.error.log": str(logs / "error.log"),
        },
    )
    (tmp_path / "site.conf").write_text(site)
    temp_paths = "\n".join(
        f"  {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # The main file as Debian ships it where it matters here: one worker per core, 768
    # connections each. The user is ours, so the workers can use the temporary paths.
    (tmp_path / "nginx.conf").write_text(
        f"user {getpass.getuser()};\n"
        "worker_processes auto;\n"
        f"pid {tmp_path / 'nginx.pid'};\n"
        f"error_log {logs / 'main-error.log'};\n"
        "events { worker_connections 768; }\n"
        "http {\n"
        f"{temp_paths}\n"
        f"  access_log {logs / 'main-access.log'};\n"
        f"  include {tmp_path / 'site.conf'};\n"
        "}\n"
    )

    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    outbox = Outbox(url)
    outbox.upgrade()
    env = {
        **base_env,
        **web_env,
        "RELAY_DATABASE_URL": url,
        "RELAY_TRUSTED_PROXIES": "1",  # behind the nginx site, as the README says
    }
    gunicorn = shipped_gunicorn_proc(
        env, tmp_path, upstream, "--access-logformat", "access %(m)s %(U)s %(s)s"
    ).start()
    server = Proc(
        [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        {},
        tmp_path,
        "nginx",
    ).start()
    try:
        wait_until(
            lambda: http_ready(f"http://127.0.0.1:{upstream}/healthz"), timeout=30, what="gunicorn"
        )
        up = Edge(https_port, upstream, context, gunicorn, outbox, logs / "access.log")
        wait_until(lambda: nginx_answers(up), timeout=15, what="nginx")
        yield up
    finally:
        server.stop()
        gunicorn.stop()
        outbox.dispose()


def nginx_answers(edge: Edge) -> bool:
    with contextlib.suppress(OSError):
        return edge.request("GET", "/healthz") == 200
    return False


def source(n: int) -> str:
    """A loopback address of its own for slow client n (127.1.0.1, 127.1.0.2, ...)."""
    return f"127.1.{n // 250}.{n % 250 + 1}"


FORM_HEAD = (
    f"POST /form HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
)


def open_slow(edge: Edge, n: int) -> tuple[ssl.SSLSocket, float]:
    """Slow client n: even ones announce 1000 bytes of body and send six, odd ones send
    half their headers; then both wait. Returns the socket and when it last sent."""
    sock = edge.connect(source(n), timeout=HELD_TIMEOUT + 10)
    if n % 2 == 0:
        sock.sendall((FORM_HEAD + "Content-Length: 1000\r\n\r\nname=x").encode())
    else:
        sock.sendall(FORM_HEAD.encode())
    return sock, time.monotonic()


def ended_after(sock: ssl.SSLSocket, since: float) -> float:
    """Seconds from `since` until nginx answered or closed (whichever it does)."""
    with contextlib.suppress(OSError):
        sock.recv(4096)
    ended = time.monotonic() - since
    sock.close()
    return ended


def test_nginx_holds_400_slow_clients_while_the_form_answers(edge: Edge) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        slow = list(pool.map(lambda n: open_slow(edge, n), range(2 * SLOW)))
    opened = time.monotonic()

    health, submissions = [], []
    for n in range(5):
        started = time.monotonic()
        assert edge.request("GET", "/healthz") == 200
        health.append(time.monotonic() - started)
        body = urllib.parse.urlencode(valid_form(subject=f"Real {n}"))
        started = time.monotonic()
        status = edge.request(
            "POST",
            "/form",
            body.encode(),
            Content_Type="application/x-www-form-urlencoded",
            Origin=f"https://{HOST}",
        )
        assert status == 303
        submissions.append(time.monotonic() - started)
    probing = time.monotonic() - opened
    # Every slow client was still being held while the form answered.
    assert probing < HELD_TIMEOUT - 2, probing
    assert max(health) < 2, health
    assert max(submissions) < 5, submissions
    assert sorted(row.subject for row in queued(edge.outbox)) == [f"Real {n}" for n in range(5)]

    with ThreadPoolExecutor(max_workers=64) as pool:
        ended = list(pool.map(lambda pair: ended_after(*pair), slow))
    assert min(ended) >= HELD_TIMEOUT - 1, min(ended)
    assert max(ended) <= HELD_TIMEOUT + 5, max(ended)
    bodies, headers = ended[0::2], ended[1::2]
    # nginx buffers whole requests (proxy_request_buffering): none of them reached gunicorn.
    posts = [
        line for line in edge.gunicorn.output().splitlines() if line == "access POST /form 303"
    ]
    assert len(posts) == 5, edge.gunicorn.output()[-2000:]
    print(
        f"\nslow clients held: {2 * SLOW}; /healthz max {max(health) * 1000:.0f} ms, "
        f"submissions median {statistics.median(submissions) * 1000:.0f} ms, "
        f"slow bodies ended after {min(bodies):.1f}-{max(bodies):.1f} s, "
        f"slow headers after {min(headers):.1f}-{max(headers):.1f} s"
    )
