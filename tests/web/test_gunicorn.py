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
from tests.faults.harness import Proc, http_ready, shipped_gunicorn_proc, wait_until
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
        accepted = (("form", "default"), ("reason", "ok"), ("result", "accepted"))
        limited = (("form", "default"), ("reason", "rate_limited"), ("result", "refused"))
        assert found[("formrelay_submissions_total", accepted)] == SUBMISSIONS
        assert found[("formrelay_submissions_total", limited)] == 1
        assert found[("formrelay_queue_messages", (("status", "queued"),))] == SUBMISSIONS


# --- the documented rate limit in every shipped configuration --------------------------------

POSTS = 25
LIMIT = 5  # RELAY_RATE_LIMIT's default, "5/minute;30/hour"


def shipped_env(
    base_env: dict[str, str], web_env: dict[str, str], tmp_path: Path, **extra: str
) -> dict[str, str]:
    """The web environment at the documented rate limit, on a migrated SQLite outbox."""
    url = f"sqlite:///{tmp_path / 'outbox.sqlite3'}"
    migrator = Outbox(url)
    migrator.upgrade()
    migrator.dispose()
    env = {**base_env, **web_env, "RELAY_DATABASE_URL": url, **extra}
    del env["RELAY_RATE_LIMIT"]
    return env


@pytest.mark.parametrize("storage", ["memory-as-shipped", "redis-4-workers"])
def test_the_documented_limit_holds_through_gunicorn(
    request: pytest.FixtureRequest,
    base_env: dict[str, str],
    web_env: dict[str, str],
    tmp_path: Path,
    storage: str,
) -> None:
    """25 posts from one client in a minute get exactly 5 through, whether the limits are
    memory:// (deploy/gunicorn.conf.py then runs one worker; it ran four, and 20 of 25 got
    through) or shared in Redis by four workers."""
    if storage == "memory-as-shipped":
        env = shipped_env(base_env, web_env, tmp_path)
    else:
        redis_url = request.getfixturevalue("redis_url")
        env = shipped_env(
            base_env,
            web_env,
            tmp_path,
            RELAY_RATE_LIMIT_STORAGE=redis_url,
            FORMRELAY_WEB_WORKERS="4",
        )
    port = free_port()
    proc = shipped_gunicorn_proc(
        env, tmp_path, port, "--access-logformat", "access %(p)s %(m)s %(U)s %(s)s"
    ).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ready(f"{base}/healthz"), timeout=60, what="gunicorn")
        # A fresh connection per request, so that every worker takes some.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=base, timeout=20, limits=limits) as http:
            if storage != "memory-as-shipped":
                # Until several workers have booted the first one takes every connection.
                def warm() -> bool:
                    with ThreadPoolExecutor(max_workers=8) as pool:
                        list(pool.map(lambda _: http.get("/healthz"), range(16)))
                    return len({pid for pid, _path, _status in logged(proc)}) >= 3

                wait_until(warm, timeout=60, what="three workers answering")

            def submit(n: int) -> int:
                return http.post("/form", json=valid_form(subject=f"Post {n}")).status_code

            with ThreadPoolExecutor(max_workers=8) as pool:
                statuses = list(pool.map(submit, range(POSTS)))
        assert statuses.count(202) == LIMIT, statuses
        assert statuses.count(429) == POSTS - LIMIT, statuses
        wait_until(lambda: len(posted_to(proc)) == POSTS, timeout=10, what="the access log")
        served_by = set(posted_to(proc))
        if storage == "memory-as-shipped":
            assert len(served_by) == 1, served_by
        else:
            assert len(served_by) >= 2, served_by
    finally:
        proc.stop()


def logged(proc: Proc) -> list[tuple[str, str, str]]:
    """(worker pid, "METHOD /path", status) of every request in the access log."""
    lines = [line.split() for line in proc.output().splitlines() if line.startswith("access ")]
    return [(pid, f"{method} {path}", status) for _a, pid, method, path, status in lines]


def posted_to(proc: Proc) -> list[str]:
    """The worker pid of every POST /form so far."""
    return [pid for pid, path, _status in logged(proc) if path == "POST /form"]


def test_memory_limits_with_several_workers_are_refused_at_start(
    base_env: dict[str, str], web_env: dict[str, str], tmp_path: Path
) -> None:
    env = shipped_env(base_env, web_env, tmp_path, FORMRELAY_WEB_WORKERS="4")
    proc = shipped_gunicorn_proc(env, tmp_path, free_port()).start()
    try:
        assert proc.popen is not None
        returncode = proc.popen.wait(timeout=60)
    finally:
        proc.stop()
    assert returncode != 0
    assert "RELAY_RATE_LIMIT_STORAGE: memory:// counts in each process" in proc.output()
    assert "RELAY_WEB_PROCESSES=4" in proc.output()
