"""Production shape: `gunicorn -w 2 "relay:create_app()"` configured only by RELAY_ variables,
two worker processes accepting submissions into one PostgreSQL outbox, rate limits shared
through Redis."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.store.outbox import Outbox
from tests.web.conftest import valid_form

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

SUBMISSIONS = 16
METRICS_TOKEN = "gunicorn-metrics-token-0123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def gunicorn(
    base_env: dict[str, str],
    web_env: dict[str, str],
    postgres_url: str,
    redis_url: str,
    tmp_path: Path,
) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    # The operator migrates once (`relay db upgrade`) before starting the web workers.
    migrator = Outbox(postgres_url)
    migrator.upgrade()
    migrator.dispose()
    port = free_port()
    access_log = tmp_path / "access.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        **base_env,
        **web_env,
        "RELAY_DATABASE_URL": postgres_url,
        "RELAY_RATE_LIMIT_STORAGE": redis_url,
        "RELAY_RATE_LIMIT": f"{SUBMISSIONS}/minute",
        "RELAY_METRICS_TOKEN": METRICS_TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    (tmp_path / "metrics").mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-w",
            "2",
            # As deploy/gunicorn.conf.py runs it: threaded workers.
            "-k",
            "gthread",
            "--threads",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "--access-logfile",
            str(access_log),
            "--access-logformat",
            "%(p)s %(m)s %(U)s %(s)s",
            "--graceful-timeout",
            "5",
            "relay:create_app()",
        ],
        cwd=tmp_path,  # no stray .env
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"gunicorn exited with {proc.returncode}:\n{output}")
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("gunicorn did not become healthy in 30 s")
            time.sleep(0.2)
        yield base, proc, access_log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_two_workers_accept_into_one_postgres_outbox(
    gunicorn: tuple[str, subprocess.Popen[str], Path], postgres_url: str
) -> None:
    base, _proc, access_log = gunicorn

    def submit(n: int) -> httpx.Response:
        return httpx.post(
            base + "/form",
            json=valid_form(subject=f"Submission {n}"),
            headers={"Origin": "http://partner.test"},
            timeout=20,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(submit, range(SUBMISSIONS)))
    assert [r.status_code for r in responses] == [202] * SUBMISSIONS
    ids = {r.json()["id"] for r in responses}

    outbox = Outbox(postgres_url)
    try:
        rows = outbox.list_messages(limit=100)
    finally:
        outbox.dispose()
    assert {row.id for row in rows} == ids
    assert sorted(row.subject for row in rows) == sorted(
        f"Submission {n}" for n in range(SUBMISSIONS)
    )

    # The per-IP limit lives in Redis, so it holds across both worker processes.
    limited = submit(SUBMISSIONS)
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0

    deadline = time.monotonic() + 5
    while True:
        lines = access_log.read_text().splitlines()
        posts = [line.split() for line in lines if " POST /form " in line]
        if len(posts) >= SUBMISSIONS + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    accepted_by = {pid for pid, _m, _u, status in posts if status == "202"}
    assert len(accepted_by) == 2, f"expected both workers to accept, got {accepted_by}"

    # Multiprocess mode: whichever process answers /metrics counts both processes' accepts.
    for _ in range(4):
        scraped = httpx.get(
            base + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10
        )
        assert scraped.status_code == 200
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scraped.text)
            for s in family.samples
        }
        accepted = (("reason", "ok"), ("result", "accepted"))
        limited = (("reason", "rate_limited"), ("result", "refused"))
        assert found[("formrelay_submissions_total", accepted)] == SUBMISSIONS
        assert found[("formrelay_submissions_total", limited)] == 1
        assert found[("formrelay_queue_messages", (("status", "queued"),))] == SUBMISSIONS
