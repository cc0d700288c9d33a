"""Store faults: the database unreachable when a visitor submits, a full disk under the SQLite
file, and PostgreSQL killing the worker's connections while it delivers.

Promises: a submission is answered 503 (Retry-After, typed values kept in the HTML form)
unless its message is committed; nothing is half-written; once the store is back, the next
submission is accepted; a worker whose connections are cut recovers and loses nothing.
"""

from __future__ import annotations

import errno
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from markupsafe import escape

from relay.store.outbox import Outbox
from tests.conftest import POSTGRES_ADMIN_URL, unavailable
from tests.faults.corpus import VALID
from tests.faults.harness import Proc, Visitor, message_id_of, wait_status, wait_until
from tests.peers.smtp import SMTPPeer

pytestmark = pytest.mark.faults

TYPED = {
    "name": "Zoë <Visitor> & Co",
    "email": "zoe@visitor.test",
    "subject": 'Invoice #77 "urgent" & <late>',
    "message": "Line one\nLine <two> & three",
}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    "store_url",
    [
        "postgresql+psycopg://postgres@127.0.0.1:1/unreachable?connect_timeout=2",
        "sqlite:////proc/formrelay-no-such-dir/outbox.sqlite3",
    ],
    ids=["postgres-refused", "sqlite-unopenable"],
)
def test_unreachable_store_answers_503_and_keeps_the_input(
    store_url: str, make_app: Callable[..., Any], relay_env: dict[str, str]
) -> None:
    env = {**relay_env, "RELAY_DATABASE_URL": store_url}
    visitor = Visitor(client=make_app(env).test_client())

    as_json = visitor.post(TYPED)
    assert as_json.status == 503
    assert as_json.body["errors"]["form"]
    assert int(as_json.headers["retry-after"]) > 0

    page = visitor.post(TYPED, as_json=False)
    assert page.status == 503
    assert isinstance(page.body, str)
    for value in TYPED.values():
        # Each typed value is back in the form, escaped as Jinja escapes it.
        assert str(escape(value)) in page.body, value

    health = visitor.client.get("/healthz")
    assert health.status_code == 503


def fill(directory: Path) -> Path:
    """Write a file until the filesystem says ENOSPC."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with pytest.raises(OSError) as full, filler.open("wb") as out:  # noqa: PT012
        while True:
            out.write(chunk)
            out.flush()
    assert full.value.errno == errno.ENOSPC
    return filler


def sqlite_pragma(path: Path, pragma: str) -> Any:
    """Run one PRAGMA on a plain sqlite3 connection (outside the outbox's BEGIN IMMEDIATE)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        return conn.execute(f"PRAGMA {pragma}").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def tiny_outbox(small_tmpfs: Path) -> Iterator[Outbox]:
    box = Outbox(f"sqlite:///{small_tmpfs / 'outbox.sqlite3'}")
    box.upgrade()
    try:
        yield box
    finally:
        box.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_full_disk_answers_503_writes_nothing_and_recovers(
    small_tmpfs: Path,
    tiny_outbox: Outbox,
    make_app: Callable[..., Any],
    relay_env: dict[str, str],
    start_worker: Callable[..., Proc],
    mx_server: SMTPPeer,
) -> None:
    """The web refuses with 503 and keeps the form; a `relay worker` started on the full
    disk cannot even register: it backs off (1 s, 2 s, 4 s ...) and, once space is back,
    delivers everything without a restart."""
    env = {**relay_env, "RELAY_DATABASE_URL": tiny_outbox.url}
    db = small_tmpfs / "outbox.sqlite3"
    visitor = Visitor(client=make_app(env).test_client())
    before = visitor.post(VALID)
    assert before.status == 202

    # Empty the WAL so that any new commit needs new blocks, then take every free block.
    assert sqlite_pragma(db, "wal_checkpoint(TRUNCATE)") == 0  # 0: not busy
    filler = fill(small_tmpfs)
    big = {**TYPED, "message": "x" * 15000}
    for _ in range(3):
        reply = visitor.post(big)
        assert reply.status == 503, reply
        assert "retry-after" in reply.headers
    page = visitor.post(big, as_json=False)
    assert page.status == 503
    assert str(escape(TYPED["subject"])) in page.body

    worker = start_worker(env)
    worker.wait_output("retry_in=2.0", timeout=30)  # the second refusal, twice as late
    log = worker.output()
    assert log.count("worker.store_unavailable") >= 2
    assert "full" in log
    assert "retry_in=1.0" in log
    assert worker.alive()
    assert mx_server.messages == []

    filler.unlink()
    assert sqlite_pragma(db, "integrity_check") == "ok"
    rows = tiny_outbox.list_messages(limit=100)
    assert [r.id for r in rows] == [before.id]
    wait_status(tiny_outbox, [before.id], ("delivered",), timeout=30, proc=worker)

    after = visitor.post(big)
    assert after.status == 202, after
    assert {r.id for r in tiny_outbox.list_messages(limit=100)} == {before.id, after.id}
    wait_status(tiny_outbox, [after.id], ("delivered",), timeout=30, proc=worker)
    assert len(mx_server.messages) == 2
    assert "worker.registered" in worker.output()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_worker_survives_postgres_killing_its_connections(
    visitor: Visitor,
    outbox: Outbox,
    start_worker: Callable[..., Proc],
    relay_env: dict[str, str],
    database_url: str,
    mx_server: SMTPPeer,
) -> None:
    """pg_terminate_backend on every connection of the worker, over and over, while it claims,
    delivers and records: a real server-side kill, without restarting the shared server."""
    import psycopg

    app_name = "relay-fault-worker"
    sep = "&" if "?" in database_url else "?"
    env = {**relay_env, "RELAY_DATABASE_URL": f"{database_url}{sep}application_name={app_name}"}
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable: {exc}")
        raise
    killed = 0
    stop = threading.Event()

    def terminate() -> int:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (app_name,),
        ).fetchall()
        return sum(1 for (ok,) in rows if ok)

    def keep_killing() -> None:
        nonlocal killed
        while not stop.wait(0.05):
            killed += terminate()

    ids: list[str] = []
    worker = start_worker(env)
    killer = threading.Thread(target=keep_killing, daemon=True)
    with admin:
        wait_until(lambda: terminate() > 0, timeout=20, what="the worker's first connection")
        killed += 1
        killer.start()
        try:
            for n in range(30):
                reply = visitor.post({**VALID, "subject": f"pg kill {n}"})
                assert reply.status == 202
                assert reply.id is not None
                ids.append(reply.id)
            wait_until(lambda: len(mx_server.messages) >= 10, timeout=60, what="deliveries")
        finally:
            stop.set()
            killer.join(5)

    rows = wait_status(outbox, ids, timeout=90, proc=worker)
    assert worker.alive(), "the worker died instead of recovering"
    assert killed >= 2
    assert {r.status for r in rows.values()} == {"delivered"}
    at_mx = [message_id_of(r.data) for r in mx_server.messages]
    for row in rows.values():
        count = at_mx.count(row.message_id)
        assert count >= 1, row.id
        if count > 1:  # a duplicate only where the outbox says one is possible
            assert row.possible_duplicate, row.id
