"""Alembic environment for the outbox, driven from code (relay.store.engine.alembic_config).

No alembic.ini is needed: the caller hands over an open connection in
``config.attributes["connection"]``. On PostgreSQL an advisory lock serialises concurrent
upgrades from several nodes starting at once.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from relay.store.engine import MIGRATION_LOCK_KEY
from relay.store.schema import metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `relay db upgrade`")
run_migrations_online()
