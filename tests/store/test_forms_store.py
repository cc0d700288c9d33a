"""The outbox keeps the form a message came from: filters by it (the log, the console, the
CSV export) over SQLite and PostgreSQL, and migration 0004 gives older rows "default"."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from alembic import command

from relay.settings import Settings
from relay.store.browse import LogFilter, walk
from relay.store.engine import alembic_config
from relay.store.outbox import Outbox
from relay.store.views import csv_lines, log_record
from tests.store.test_outbox import FakeClock, built


@pytest.fixture
def store(database_url: str) -> Iterator[Outbox]:
    outbox = Outbox(database_url, clock=FakeClock())
    yield outbox
    outbox.dispose()


def test_the_log_filters_by_form(store: Outbox, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    default = store.enqueue(built(settings, 1))
    sales = [store.enqueue(built(settings, n), form_id="sales") for n in (2, 3)]
    bugs = store.enqueue(built(settings, 4), form_id="bugs")
    alert = store.enqueue(built(settings, 5), purpose="alert", form_id=None)

    assert {r.id for r in store.list_messages(form="sales")} == set(sales)
    assert [r.id for r in store.list_messages(form="default")] == [default]
    assert {r.id: r.form_id for r in store.list_messages()} == {
        default: "default",
        sales[0]: "sales",
        sales[1]: "sales",
        bugs: "bugs",
        alert: None,
    }
    assert [r.id for r in store.browse(LogFilter(form="bugs")).rows] == [bugs]
    assert {r.id for r in walk(store.browse, LogFilter(form="sales"), batch=1)} == set(sales)
    assert store.browse(LogFilter(form="nosuch")).rows == []
    row = store.get(bugs)
    assert log_record(row, row.created_at)["form_id"] == "bugs"
    header, line = list(csv_lines([row]))
    assert header.rstrip().endswith(",form_id")
    assert line.rstrip().endswith(",bugs")


def test_migration_0004_gives_older_messages_the_default_form(
    database_url: str, make_settings: Callable[..., Settings]
) -> None:
    old = Outbox(database_url, auto_migrate=False)
    try:
        old.upgrade("0003")
        with old.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO messages (id, message_id, body, size, recipient, envelope_from,"
                    " subject, meta, status, attempts, created_at, possible_duplicate, purpose)"
                    " VALUES ('old1', '<a@b>', :body, 1, 'help@support.test', 'f@relay.test',"
                    " 's', '{}', 'queued', 0, :now, false, 'form')"
                ),
                {"body": b"x", "now": FakeClock()()},
            )
        old.upgrade()
        assert old.current_revision() == "0004"
        assert old.get("old1").form_id == "default"
        indexes = {ix["name"] for ix in sa.inspect(old.engine).get_indexes("messages")}
        assert "ix_messages_form_created" in indexes
        with old.engine.begin() as conn:  # and back down
            command.downgrade(alembic_config(conn), "0003")
        columns = {c["name"] for c in sa.inspect(old.engine).get_columns("messages")}
        assert "form_id" not in columns
    finally:
        old.dispose()
