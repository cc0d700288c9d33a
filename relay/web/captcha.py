"""Server-side hCaptcha verification: a small client on urllib3 that fails closed.

We do not use the PyPI package `hcaptcha` (its documented usage treats a failed verification
dict as truthy, it has no timeout and it logs the secret); see docs/security.md.

A verification passes only when every check holds:

- siteverify answered 200 with a JSON object within `hcaptcha_timeout` seconds;
- `success` is the JSON value `true` (identity, not truthiness: `"true"` or `1` fail);
- `hostname` is one of the allowed host names (the form's own host, hosts of
  RELAY_PUBLIC_URL and RELAY_ALLOWED_ORIGINS);
- `sitekey`, when siteverify reports it, is ours. We also post our sitekey, so hCaptcha itself
  refuses a token solved for another key ("sitekey-secret-mismatch").

Anything else raises `CaptchaError(codes, retryable=...)`. `retryable=True` means we could not
ask (timeout, HTTP error, garbage): the visitor is told to try again, never let through.

The `Verifier` protocol is the seam for demo mode, which plugs in an offline verifier.

Why urllib3 and not httpx (which the alert webhook uses, async): one siteverify POST on a
kept-alive connection cost 600-700 µs of CPU through httpx and ~400 µs through urllib3's pool,
on a path every submission and every refused bot post takes (docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
import urllib.request
from collections.abc import Collection
from typing import Any, Protocol

import urllib3
import urllib3.exceptions

from relay.config import hcaptcha_keys
from relay.errors import CaptchaError
from relay.logs import event
from relay.settings import HCAPTCHA_TEST_SECRET, Settings

log = logging.getLogger("relay.captcha")

# Codes we add to hCaptcha's own (docs.hcaptcha.com/#siteverify-error-codes-table).
MISSING = "missing-input-response"
TIMEOUT = "siteverify-timeout"
UNREACHABLE = "siteverify-unreachable"
HTTP_ERROR = "siteverify-http-error"
BAD_RESPONSE = "siteverify-bad-response"
NOT_SUCCESS = "not-success"
HOSTNAME_MISMATCH = "hostname-mismatch"
SITEKEY_MISMATCH = "sitekey-mismatch"

MAX_TOKEN_LENGTH = 65536
# siteverify answers a few hundred bytes; a reply past this is not one.
MAX_REPLY_BYTES = 65536
# The published test keys answer for this host name instead of the page's.
TEST_KEY_HOSTNAME = "dummy-key-pass"


class Verifier(Protocol):
    """Checks one CAPTCHA token; returns None when it passes, raises CaptchaError otherwise."""

    def verify(self, token: str, *, remoteip: str | None, hostnames: Collection[str]) -> None: ...


class HCaptchaVerifier:
    """Asks hCaptcha's siteverify endpoint about one token (one short POST per submission)."""

    def __init__(self, *, secret: str, sitekey: str, verify_url: str, timeout: float) -> None:
        self._secret = secret
        self.sitekey = sitekey
        self.verify_url = verify_url
        self.timeout = timeout
        self._pool: urllib3.PoolManager | None = None
        self._pool_lock = threading.Lock()

    def _http(self) -> urllib3.PoolManager:
        """One connection pool per verifier (shared by the request threads), made at first use
        so that it is never inherited across gunicorn's fork. A client per call cost ~24 ms of
        CPU for its TLS context and a new connection."""
        if self._pool is None:
            with self._pool_lock:
                if self._pool is None:
                    self._pool = connection_pool(self.verify_url, self.timeout)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()
            self._pool = None

    @classmethod
    def from_settings(cls, settings: Settings) -> HCaptchaVerifier:
        sitekey, secret = hcaptcha_keys(settings)
        return cls(
            secret=secret,
            sitekey=sitekey,
            verify_url=settings.hcaptcha_verify_url,
            timeout=settings.hcaptcha_timeout,
        )

    def __repr__(self) -> str:  # never show the secret
        return f"HCaptchaVerifier(sitekey={self.sitekey!r}, verify_url={self.verify_url!r})"

    def verify(self, token: str, *, remoteip: str | None, hostnames: Collection[str]) -> None:
        if not token:
            raise CaptchaError([MISSING])
        if len(token) > MAX_TOKEN_LENGTH or not (token.isascii() and token.isprintable()):
            # hCaptcha's tokens are printable ASCII; anything else (a lone surrogate made
            # the form encoding raise) cannot be one, so it is not sent.
            raise CaptchaError(["invalid-input-response"])
        data = {"secret": self._secret, "response": token, "sitekey": self.sitekey}
        if remoteip:
            data["remoteip"] = remoteip
        try:
            reply = self._http().request(
                "POST",
                self.verify_url,
                body=urllib.parse.urlencode(data),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                redirect=False,
                retries=False,
                preload_content=False,
            )
            try:
                raw = reply.read(MAX_REPLY_BYTES + 1)
            except BaseException:
                reply.close()  # a connection broken mid-reply never goes back to the pool
                raise
            if len(raw) > MAX_REPLY_BYTES:
                reply.close()  # the rest is never read: the connection is not reused
            reply.release_conn()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            timeout = isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError)
            event(
                log,
                "captcha.unavailable",
                logging.WARNING,
                reason="timeout" if timeout else "error",
                error=type(exc).__name__,
            )
            raise CaptchaError([TIMEOUT if timeout else UNREACHABLE], retryable=True) from exc
        if reply.status != 200:
            event(log, "captcha.unavailable", logging.WARNING, status=reply.status)
            raise CaptchaError([HTTP_ERROR], retryable=True)
        try:
            body: Any = json.loads(raw) if len(raw) <= MAX_REPLY_BYTES else None
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            event(log, "captcha.unavailable", logging.WARNING, reason="not-json")
            raise CaptchaError([BAD_RESPONSE], retryable=True) from exc
        check_verdict(
            body, sitekey=self.sitekey, hostnames=hostnames, test_keys=self.uses_test_keys
        )

    @property
    def uses_test_keys(self) -> bool:
        return self._secret == HCAPTCHA_TEST_SECRET


def connection_pool(url: str, timeout: float) -> urllib3.PoolManager:
    """A pool for `url`'s host: certificates verified (urllib3's default for https), connect
    and read bounded together by `timeout`, no retries and no redirects (fail closed); through
    the proxy that HTTPS_PROXY / HTTP_PROXY name, unless NO_PROXY exempts the host, as httpx
    did."""
    parts = urllib.parse.urlsplit(url)
    options: dict[str, Any] = {
        "timeout": urllib3.Timeout(total=timeout),
        "retries": False,
        "maxsize": 16,  # gunicorn's request threads (deploy/gunicorn.conf.py)
    }
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


def check_verdict(
    body: Any, *, sitekey: str, hostnames: Collection[str], test_keys: bool = False
) -> None:
    """Decide on a parsed siteverify answer (pure; raises CaptchaError)."""
    if not isinstance(body, dict):
        raise CaptchaError([BAD_RESPONSE], retryable=True)
    if body.get("success") is not True:
        codes = body.get("error-codes")
        if isinstance(codes, list) and codes and all(isinstance(c, str) for c in codes):
            raise CaptchaError(codes)
        raise CaptchaError([NOT_SUCCESS])
    hostname = body.get("hostname")
    allowed = {h.lower() for h in hostnames}
    if test_keys:
        allowed.add(TEST_KEY_HOSTNAME)
    if not isinstance(hostname, str) or hostname.lower().rstrip(".") not in allowed:
        raise CaptchaError([HOSTNAME_MISMATCH])
    reported = body.get("sitekey")
    if reported is not None and reported != sitekey:
        raise CaptchaError([SITEKEY_MISMATCH])
