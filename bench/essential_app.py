"""The essential target: only the I/O that accepting a submission needs, served as the relay is.

POST /form reads the form, asks siteverify about the token (one POST on a kept-alive
connection, `success` must be the JSON value true, else 400: this is also its refusal path),
asks the bench DNS server for the visitor's domain's MX (one UDP query; NXDOMAIN refuses with
400, a timeout does not, as in the relay), builds the message with string formatting and
commits it to a table of its own in RELAY_DATABASE_URL (SQLite: WAL, synchronous=FULL, BEGIN
IMMEDIATE, as the relay's store), then answers 303 to /thanks. No validation beyond that, no
templates, no logging, no metrics, no rate limits, no relay import.

gunicorn app string: "bench.essential_app:create_app()" (one app per worker, after the fork).
The relay's req/s divided by this one's, on the same store, is what our own work costs.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import urllib.parse
import uuid
from email.utils import formatdate
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import sqlalchemy as sa
from flask import Flask, redirect, request
from sqlalchemy import event
from werkzeug.wrappers import Response

SQLITE_BUSY_TIMEOUT = 5.0  # seconds, as relay/store/engine.py
_ADDRESS = re.compile(r"^[^@\s]+@([^@\s]+\.[^@\s]+)$")
_FOLD = re.compile(r"[\r\n]+")


def nameserver(text: str) -> tuple[str, int]:
    """The first of RELAY_DNS_NAMESERVERS ("127.0.0.1:5353", "[::1]:5353" or "10.0.0.1")."""
    first = text.split(",", maxsplit=1)[0].strip()
    if first.startswith("["):
        host, _, rest = first[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if first.count(":") == 1:
        host, _, port = first.partition(":")
        return host, int(port)
    return first, 53


def make_engine(url: str) -> sa.Engine:
    """The relay's store settings (relay/store/engine.py), copied rather than imported."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_size=5, max_overflow=10, pool_recycle=1800)
    engine = sa.create_engine(
        parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False}
    )

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN IMMEDIATE comes from "begin" below
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
        finally:
            cursor.close()

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    return engine


class Siteverify:
    """One kept-alive HTTP/1.1 connection per thread to the siteverify endpoint."""

    def __init__(self, url: str, *, secret: str, sitekey: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path or "/"
        self.secret = secret
        self.sitekey = sitekey
        self.timeout = timeout
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            conn = kind(self.host, self.port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def passes(self, token: str, remoteip: str | None) -> bool:
        body = urllib.parse.urlencode(
            {
                "secret": self.secret,
                "response": token,
                "sitekey": self.sitekey,
                "remoteip": remoteip or "",
            }
        )
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            conn = self._connection()
            try:
                conn.request("POST", self.path, body, headers)
                reply = conn.getresponse()
                data = reply.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    return False
                continue
            if reply.status != 200:
                return False
            try:
                verdict = json.loads(data)
            except ValueError:
                return False
            return isinstance(verdict, dict) and verdict.get("success") is True
        return False


def create_app() -> Flask:
    env = os.environ
    siteverify = Siteverify(
        env["RELAY_HCAPTCHA_VERIFY_URL"],
        secret=env["RELAY_HCAPTCHA_SECRET"],
        sitekey=env["RELAY_HCAPTCHA_SITEKEY"],
        timeout=float(env.get("RELAY_HCAPTCHA_TIMEOUT", "5")),
    )
    dns_host, dns_port = nameserver(env.get("RELAY_DNS_NAMESERVERS", "127.0.0.1"))
    dns_timeout = float(env.get("RELAY_DNS_TIMEOUT", "5"))
    sender = env.get("RELAY_FROM_ADDRESS", "form@relay.test")
    recipient = env.get("RELAY_SUPPORT_ADDRESS", "help@support.test")
    id_domain = sender.rpartition("@")[2]
    engine = make_engine(env["RELAY_DATABASE_URL"])
    table = sa.Table(
        "essential_outbox",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    )
    table.metadata.create_all(engine, checkfirst=True)
    insert = table.insert()
    app = Flask(__name__)

    @app.post("/form")
    def form() -> Response:
        fields = request.form
        email = fields.get("email", "")
        match = _ADDRESS.match(email)
        if match is None:
            return Response("invalid email\n", 400)
        if not siteverify.passes(fields.get("h-captcha-response", ""), request.remote_addr):
            return Response("captcha failed\n", 400)
        query = dns.message.make_query(match.group(1), "MX")
        try:
            answer = dns.query.udp(query, dns_host, port=dns_port, timeout=dns_timeout)
        except dns.exception.Timeout:
            answer = None  # as the relay: DNS that cannot tell refuses nobody
        if answer is not None and answer.rcode() == dns.rcode.NXDOMAIN:
            return Response("domain does not exist\n", 400)
        name = _FOLD.sub(" ", fields.get("name", ""))
        subject = _FOLD.sub(" ", fields.get("subject", ""))
        raw = (
            f"From: {sender}\r\nTo: {recipient}\r\nReply-To: {name} <{email}>\r\n"
            f"Subject: {subject}\r\nDate: {formatdate(localtime=False)}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@{id_domain}>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            f"{fields.get('message', '')}\r\n"
        ).encode()
        with engine.begin() as conn:
            conn.execute(insert, {"raw": raw})
        return redirect("/thanks", code=303)

    return app
