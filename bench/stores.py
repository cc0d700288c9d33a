"""The stores a section runs on: a SQLite file in the section's folder, or a fresh PostgreSQL
database (on RELAY_TEST_POSTGRES_URL's server) dropped afterwards."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

POSTGRES_ADMIN_URL = os.environ.get(
    "RELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards."""
    admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    name = "relay_bench_" + uuid.uuid4().hex[:10]
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace(
            "postgresql://", "postgresql+psycopg://"
        )
        try:
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def database(store: str, folder: Path) -> Iterator[str]:
    folder.mkdir(parents=True, exist_ok=True)
    if store == "sqlite":
        yield f"sqlite:///{folder / 'relay.sqlite3'}"
    else:
        with postgres_database() as url:
            yield url
