"""The operator's commands over the outbox: log, show, retry, purge, queue-check, worker --once
and db upgrade, through click's CliRunner and as real `relay` processes.

The CliRunner tests run over both stores; the process tests over PostgreSQL only (the store
code under them is the same, and each process costs an interpreter start).

The history they show is made by the real worker against the real MX peer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay.ops.cli import main
from relay.sandbox.dns import DNSZoneServer
from relay.settings import Settings
from relay.store.outbox import Outbox
from tests.peers.smtp import SMTPPeer
from tests.store.test_outbox import built

RELAY = str(Path(sys.executable).with_name("relay"))


@pytest.fixture(autouse=True)
def _restore_relay_logger() -> Iterator[None]:
    """`relay` commands point the relay logger at the CliRunner's stderr; undo that."""
    logger = logging.getLogger("relay")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate = propagate
    logger.setLevel(level)


@dataclass
class Env:
    vars: dict[str, str]
    cwd: Path
    url: str

    def runner_env(self) -> dict[str, str | None]:
        """For CliRunner: our RELAY_ variables, and no stray ones from the outer environment."""
        unset: dict[str, str | None] = {
            k: None for k in os.environ if k.startswith("RELAY_") and k not in self.vars
        }
        return {**unset, **self.vars}

    def process_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        return {**env, **self.vars}

    def invoke(self, *args: str) -> Result:
        return CliRunner().invoke(main, list(args), env=self.runner_env(), catch_exceptions=False)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [RELAY, *args],
            env=self.process_env(),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def env(
    database_url: str,
    base_env: dict[str, str],
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Env:
    monkeypatch.chdir(tmp_path)  # no stray .env
    return Env(
        {
            **base_env,
            "RELAY_DATABASE_URL": database_url,
            "RELAY_DNS_NAMESERVERS": world_dns.address,
            "RELAY_SMTP_PORT": str(mx_server.port),
            "RELAY_RETRY_INITIAL": "60",
            "RELAY_RETRY_MAX": "600",
        },
        tmp_path,
        database_url,
    )


@pytest.fixture
def settings_for(make_settings: Callable[..., Settings], env: Env) -> Settings:
    return make_settings(**env.vars)


@dataclass
class History:
    greylisted: str  # 451, then 250 after `relay retry`
    refused: str  # 550
    message_id: str


@pytest.fixture
def history(env: Env, settings_for: Settings, mx_server: SMTPPeer) -> History:
    store = Outbox(env.url)
    try:
        grey = built(settings_for, 1)
        greylisted = store.enqueue(grey)
        mx_server.handler.rcpt.append("451 4.7.1 Greylisted, please try again later")
        result = env.invoke("worker", "--once")
        assert result.exit_code == 0, result.output
        refused = store.enqueue(built(settings_for, 2))
        mx_server.handler.rcpt.append("550 5.1.1 No such mailbox here")
        result = env.invoke("worker", "--once")
        assert result.exit_code == 0, result.output
        assert store.get(greylisted).status == "deferred"
        assert store.get(refused).status == "failed"
    finally:
        store.dispose()
    return History(greylisted, refused, grey.message_id)


def test_greylisted_message_history_through_the_cli(
    env: Env, history: History, mx_server: SMTPPeer
) -> None:
    log = env.invoke("log")
    assert log.exit_code == 0, log.output
    lines = log.output.splitlines()
    assert lines[0].split()[:4] == ["ID", "AGE", "STATUS", "TRIES"]
    assert lines[1].startswith(history.refused)  # newest first
    assert "failed" in lines[1]
    assert "550 5.1.1 No such mailbox here (mx1.support.test)" in lines[1]
    assert lines[2].startswith(history.greylisted)
    assert "deferred" in lines[2]
    assert "451 4.7.1 Greylisted" in lines[2]
    assert re.search(r" in (1m|\d{1,2}s)$", lines[2])  # due 60-72 s after the attempt

    retried = env.invoke("retry", history.greylisted)
    assert retried.exit_code == 0, retried.output
    assert f"{history.greylisted} due now" in retried.output
    worker = env.invoke("worker", "--once")
    assert worker.exit_code == 0, worker.output
    assert mx_server.messages[0].message["Message-ID"] == history.message_id

    show = env.invoke("show", history.greylisted)
    assert show.exit_code == 0, show.output
    text = show.output
    assert "status:         delivered" in text
    assert f"message-id:     {history.message_id}" in text
    assert "Subject: Order 1 is late" in text
    assert "attempt 1" in text
    assert "attempt 2" in text
    assert "451 4.7.1 Greylisted, please try again later" in text
    assert "250 2.0.0 Queued" in text
    assert "mx1.support.test [127.0.0.2]" in text

    data = json.loads(env.invoke("show", history.greylisted, "--json").output)
    assert data["status"] == "delivered"
    assert [(a["outcome"], a["code"]) for a in data["attempts_detail"]] == [
        ("temporary", 451),
        ("delivered", 250),
    ]
    assert data["attempts_detail"][0]["hosts"][0]["stage"] == "rcpt"
    assert ["Message-ID", history.message_id] in data["headers"]


def test_log_filters_and_json(env: Env, history: History) -> None:
    failed = env.invoke("log", "--status", "failed", "--json")
    assert failed.exit_code == 0
    records = [json.loads(line) for line in failed.output.splitlines()]
    assert [r["id"] for r in records] == [history.refused]
    assert records[0]["last_code"] == 550
    assert records[0]["last_text"] == "No such mailbox here"
    assert records[0]["status"] == "failed"
    limited = env.invoke("log", "--limit", "1", "--since", "1h", "--json")
    assert len(limited.output.splitlines()) == 1
    bad = env.invoke("log", "--since", "soon")
    assert bad.exit_code == 2
    assert "not a duration" in bad.output


def test_retry_failed_and_queue_check(env: Env, history: History) -> None:
    check = env.invoke("queue-check", "--max-age", "3600")
    assert check.exit_code == 1
    assert history.refused in check.output
    assert "No such mailbox here" in check.output

    assert env.invoke("retry").exit_code == 2
    retried = env.invoke("retry", "--failed")
    assert retried.exit_code == 0
    assert "1 failed message(s) due now" in retried.output
    worker = env.invoke("worker", "--once")  # the MX accepts everything now
    assert worker.exit_code == 0
    check = env.invoke("queue-check", "--max-age", "3600")
    assert check.exit_code == 0, check.output
    assert check.output.startswith("ok 1 pending, 1 delivered, 0 failed")  # the greylisted one
    again = env.invoke("retry", history.refused)
    assert again.exit_code == 1
    assert "is delivered" in again.output
    unknown = env.invoke("show", "nosuchid")
    assert unknown.exit_code == 1
    assert "no message with id nosuchid" in unknown.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_queue_check_flags_old_undelivered_mail(env: Env, settings_for: Settings) -> None:
    store = Outbox(env.url)
    try:
        store.enqueue(built(settings_for))
    finally:
        store.dispose()
    fresh = env.invoke("queue-check", "--max-age", "3600")
    assert fresh.exit_code == 0
    assert fresh.output.startswith("ok 1 pending")
    time.sleep(1.1)
    old = env.invoke("queue-check", "--max-age", "1")
    assert old.exit_code == 1
    assert "1 undelivered message(s); the oldest has waited 1s (limit 1s)" in old.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_queue_check_and_workers_when_no_worker_runs(env: Env, settings_for: Settings) -> None:
    """Mail due for longer than RELAY_WORKER_DEAD_AFTER and no heartbeat: the check fails
    and says why; `relay workers` shows who ran and when."""

    from relay.store.schema import messages

    store = Outbox(env.url)
    try:
        outbox_id = store.enqueue(built(settings_for))
        with store.engine.begin() as conn:  # due for a minute already
            conn.execute(
                messages.update().values(next_attempt_at=store.clock() - timedelta(minutes=1))
            )
    finally:
        store.dispose()
    check = env.invoke("queue-check", "--max-age", "3600")
    assert check.exit_code == 1
    assert "1 message(s) due and no worker has sent a heartbeat within 15s" in check.output
    assert "no worker is registered" in check.output
    assert env.invoke("workers").output.strip() == "no worker has run within that time"

    assert env.invoke("worker", "--once").exit_code == 0
    assert env.invoke("queue-check", "--max-age", "3600").exit_code == 0
    table = env.invoke("workers")
    assert table.exit_code == 0, table.output
    header, row = table.output.splitlines()
    assert header.split() == ["ID", "STATE", "LAST", "BEAT", "HOST", "PID", "STARTED", "HOLDS"]
    assert row.split()[1:2] == ["stopped"]
    (record,) = [json.loads(line) for line in env.invoke("workers", "--json").output.splitlines()]
    assert record["state"] == "stopped"
    assert record["pid"] == os.getpid()  # CliRunner: this process
    assert record["holds"] == []
    assert record["concurrency"] == 10
    assert outbox_id not in table.output


def test_purge_keeps_the_log(env: Env, history: History) -> None:
    result = env.invoke("purge", "--older-than", "0")
    assert result.exit_code == 0, result.output
    assert "purged the bodies of 1 message(s)" in result.output  # the failed one
    show = env.invoke("show", history.refused)
    assert "body purged" in show.output
    assert "550 5.1.1 No such mailbox here" in show.output
    assert env.invoke("log", "--json").output.count("\n") == 2
    retried = env.invoke("retry", history.refused)
    assert retried.exit_code == 1
    assert "its body was purged" in retried.output


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_commands_as_real_processes(env: Env, history: History) -> None:
    log = env.run("log")
    assert log.returncode == 0, log.stderr
    assert history.greylisted in log.stdout
    assert "451 4.7.1 Greylisted" in log.stdout
    show = env.run("show", history.refused)
    assert show.returncode == 0, show.stderr
    assert "failed" in show.stdout
    assert "550 5.1.1 No such mailbox here" in show.stdout
    check = env.run("queue-check", "--max-age", "3600")
    assert check.returncode == 1
    assert history.refused in check.stderr
    retried = env.run("retry", history.refused)
    assert retried.returncode == 0, retried.stderr
    worker = env.run("worker", "--once")
    assert worker.returncode == 0, worker.stderr
    assert "delivery.delivered" in worker.stderr
    assert f"id={history.refused}" in worker.stderr
    assert "code=250" in worker.stderr
    assert env.run("log", "--status", "failed", "--json").stdout == ""


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_db_upgrade_from_several_processes_at_once(env: Env) -> None:
    procs = [
        subprocess.Popen(
            [RELAY, "db", "upgrade"],
            env=env.process_env(),
            cwd=env.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    head = Outbox(env.url).head_revision()
    assert all(f"outbox schema at revision {head}" in out for out, _err in outputs)
    again = env.invoke("db", "upgrade")
    assert again.exit_code == 0
    assert f"revision {head}" in again.output


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_unreachable_store_is_reported(env: Env) -> None:
    env.vars["RELAY_DATABASE_URL"] = (
        "postgresql+psycopg://postgres@127.0.0.1:1/nothing?connect_timeout=2"
    )
    for command in (["log"], ["queue-check", "--max-age", "60"], ["worker", "--once"]):
        result = env.invoke(*command)
        assert result.exit_code == 1, command
        assert "outbox store unavailable" in result.output


def test_log_of_one_form(env: Env, settings_for: Settings) -> None:
    store = Outbox(env.url)
    try:
        default = store.enqueue(built(settings_for, 1))
        sales = store.enqueue(built(settings_for, 2), form_id="sales")
    finally:
        store.dispose()
    table = env.invoke("log", "--form", "sales")
    assert table.exit_code == 0, table.output
    assert sales in table.output
    assert default not in table.output
    lines = env.invoke("log", "--form", "default", "--json").output.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [default]
    csv_out = env.invoke("log", "--form", "sales", "--csv").output.splitlines()
    assert len(csv_out) == 2
    assert csv_out[1].startswith(sales)
