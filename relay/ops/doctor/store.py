"""The database check: the doctor reads the outbox store and never migrates it."""

from __future__ import annotations

from typing import Any

from relay.errors import StoreUnavailable
from relay.ops.doctor.verdict import Check
from relay.settings import Settings


def check_database(settings: Settings) -> Check:
    """The outbox store answers and its schema is at the newest migration. Blocking.

    Auto-migration is off: the doctor reports, `relay db upgrade` changes.
    """
    from relay.store.engine import sqlite_path  # noqa: PLC0415 - SQLAlchemy only when checked
    from relay.store.outbox import Outbox  # noqa: PLC0415

    safe_url = _safe_url(settings.sqlalchemy_url)
    details: dict[str, Any] = {"url": safe_url}
    sqlite_file = sqlite_path(settings.sqlalchemy_url)
    if sqlite_file is not None and not sqlite_file.exists():
        return Check(
            "database",
            "FAIL",
            f"the outbox store {sqlite_file} does not exist yet",
            "run `relay db upgrade` (the worker also creates it when it starts)",
            details,
        )
    outbox = Outbox(settings.sqlalchemy_url, auto_migrate=False)
    try:
        current = outbox.current_revision()
        head = outbox.head_revision()
        details.update(revision=current, head=head)
        if current != head:
            state = "has no schema" if current is None else f"is at revision {current}"
            return Check(
                "database",
                "FAIL",
                f"the outbox store {safe_url} {state}; the newest is {head}",
                "run `relay db upgrade`",
                details,
            )
        outbox.ping()
    except StoreUnavailable as exc:
        return Check(
            "database",
            "FAIL",
            f"the outbox store {safe_url} is unreachable: {exc}",
            "check RELAY_DATABASE_URL and that the database server is running",
            details,
        )
    finally:
        outbox.dispose()
    return Check("database", "PASS", f"{safe_url} reachable, schema at {head}", "", details)


def _safe_url(url: str) -> str:
    from sqlalchemy import make_url  # noqa: PLC0415

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is not echoed: it may hold a password
        return "(unparsable RELAY_DATABASE_URL)"
