"""The console's commands: `relay log --csv`, `relay log --status held`, `relay release`,
`relay admin hash-password`, through click's CliRunner over a real SQLite outbox."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from relay.ops.cli import main
from relay.settings import Settings
from relay.store.outbox import Outbox
from tests.store.test_outbox import built


@pytest.fixture
def env(
    base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)
    return {**base_env, "RELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'o.sqlite3'}"}


def invoke(env: dict[str, str], *args: str, stdin: str | None = None) -> Result:
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAY_")}
    return CliRunner().invoke(main, list(args), env={**unset, **env}, input=stdin)


@pytest.fixture
def store(env: dict[str, str]) -> Outbox:
    return Outbox(env["RELAY_DATABASE_URL"])


def test_log_csv_exports_every_message_safely(
    env: dict[str, str], store: Outbox, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    ids = [store.enqueue(built(settings, n)) for n in range(60)]
    formula = built(settings, 99)
    tricky = store.enqueue(
        type(formula)(
            formula.message_id,
            formula.raw,
            formula.recipient,
            formula.envelope_from,
            '=HYPERLINK("http://evil.test","x"), "quoted"',
            formula.reply_to,
        )
    )
    result = invoke(env, "log", "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 61  # no --limit: every message, not the table's 50
    assert {r["id"] for r in rows} == {*ids, tricky}
    by_id = {r["id"]: r for r in rows}
    assert by_id[tricky]["subject"] == '\'=HYPERLINK("http://evil.test","x"), "quoted"'
    assert by_id[ids[0]]["visitor"] == "ada@visitor.test"
    assert by_id[ids[0]]["status"] == "queued"
    limited = invoke(env, "log", "--csv", "--limit", "5", "--status", "queued")
    assert len(list(csv.DictReader(io.StringIO(limited.output)))) == 5
    assert invoke(env, "log", "--csv", "--json").exit_code == 2


def test_release_a_held_message(
    env: dict[str, str], store: Outbox, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    held = store.enqueue(built(settings, 1), held_by="words.subject: order")
    queued = store.enqueue(built(settings, 2))
    listing = invoke(env, "log", "--status", "held")
    assert held in listing.output
    assert queued not in listing.output
    shown = invoke(env, "show", held)
    assert "held by:        words.subject: order" in shown.output
    assert invoke(env, "release", held).output.strip() == f"{held} released: queued for delivery"
    again = invoke(env, "release", held)
    assert again.exit_code == 1
    assert "is queued, not held" in again.output
    assert store.get(held).status == "queued"
    assert invoke(env, "release", "nosuchmessage").exit_code == 1


def test_hash_password_from_a_pipe() -> None:
    result = CliRunner().invoke(main, ["admin", "hash-password"], input="correct horse battery\n")
    assert result.exit_code == 0, result.output
    hashed = result.output.strip()
    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "correct horse battery")
    short = CliRunner().invoke(main, ["admin", "hash-password"], input="short\n")
    assert short.exit_code == 2
