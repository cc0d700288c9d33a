"""Fixtures for the web tests: the app wired to real loopback peers (world DNS, the siteverify
stand-in) and a real SQLite outbox."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from relay import create_app
from relay.sandbox.captcha import SiteverifyStub
from relay.sandbox.dns import DNSZoneServer
from relay.settings import Settings
from relay.store.outbox import Outbox

PARTNER = "http://partner.test"
EVIL = "http://evil.test"


@pytest.fixture
def web_env(world_dns: DNSZoneServer, siteverify: SiteverifyStub) -> dict[str, str]:
    return {
        "RELAY_DNS_NAMESERVERS": world_dns.address,
        "RELAY_DNS_TIMEOUT": "1",
        "RELAY_HCAPTCHA_VERIFY_URL": siteverify.url,
        "RELAY_HCAPTCHA_TIMEOUT": "1",
        "RELAY_ALLOWED_ORIGINS": f"http://localhost,{PARTNER}",
        "RELAY_RATE_LIMIT": "100/minute",
    }


@pytest.fixture
def web_settings(make_settings: Callable[..., Settings], web_env: dict[str, str]) -> Settings:
    return make_settings(**web_env)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(f"sqlite:///{tmp_path / 'outbox.sqlite3'}")
    yield box
    box.dispose()


@pytest.fixture
def make_app(
    make_settings: Callable[..., Settings], web_env: dict[str, str], outbox: Outbox
) -> Callable[..., Flask]:
    """make_app(RELAY_RATE_LIMIT="1/minute", outbox=...) -> a Flask app on the test peers."""

    def make(*, outbox_: Any = None, **overrides: str) -> Flask:
        settings = make_settings(**{**web_env, **overrides})
        app = create_app(settings, outbox=outbox_ if outbox_ is not None else outbox)
        app.testing = True
        return app

    return make


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


_counter = iter(range(10**9))


def token(kind: str = "pass") -> str:
    """A fresh siteverify token (each is accepted once)."""
    return f"{kind}-{next(_counter)}"


def valid_form(**overrides: str) -> dict[str, str]:
    data = {
        "name": "Hanako Yamada",
        "email": "hanako@visitor.test",
        "subject": "Order 1234",
        "message": "Hello,\nmy order has not arrived.\n",
        "h-captcha-response": token(),
    }
    data.update(overrides)
    return data


def queued(outbox: Outbox) -> list[Any]:
    return list(outbox.list_messages())


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))
