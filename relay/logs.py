"""Structured log lines: one named event per line, fields as key=value.

`event(log, "delivery.deferred", code=451, mx="mx1.example.test")` writes
`delivery.deferred code=451 mx=mx1.example.test`, which people read and log collectors
(Loki, Vector, fluent-bit's logfmt parser) split without a custom pattern.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@<>+")


def _value(value: Any) -> str:
    text = str(value)
    if text and all(ch in _SAFE for ch in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = escaped.replace("\r", "\\r").replace("\n", "\\n")
    return f'"{escaped}"'


def format_event(name: str, **fields: Any) -> str:
    parts = [name]
    parts.extend(f"{key}={_value(val)}" for key, val in fields.items() if val is not None)
    return " ".join(parts)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one named event; None-valued fields are left out."""
    logger.log(level, format_event(name, **fields))


def configure(level: str = "INFO") -> None:
    """Plain lines on stderr with a UTC timestamp; called by the CLI, never at import time.

    The logger still propagates: the root logger has no handler unless an embedding program
    (gunicorn, pytest's caplog) adds one, and then it should see our events too."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger("relay")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
