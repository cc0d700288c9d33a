"""Server-side hCaptcha verification: a small client on httpx that fails closed.

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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from typing import Any, Protocol

import httpx

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
# The published test keys answer for this host name instead of the page's.
TEST_KEY_HOSTNAME = "dummy-key-pass"


class Verifier(Protocol):
    """Checks one CAPTCHA token; returns None when it passes, raises CaptchaError otherwise."""

    def verify(self, token: str, *, remoteip: str | None, hostnames: Collection[str]) -> None: ...


class HCaptchaVerifier:
    """Asks hCaptcha's siteverify endpoint about one token (one short POST per submission)."""

    def __init__(
        self,
        *,
        secret: str,
        sitekey: str,
        verify_url: str,
        timeout: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._secret = secret
        self.sitekey = sitekey
        self.verify_url = verify_url
        self.timeout = timeout
        self._transport = transport
        self._client: httpx.Client | None = None
        self._client_lock = threading.Lock()

    def _http(self) -> httpx.Client:
        """One pooled client per verifier (httpx clients may be shared between threads),
        made at first use so that it is never inherited across gunicorn's fork. Building a
        client per call cost ~24 ms of CPU for its TLS context and a new connection."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = httpx.Client(
                        timeout=self.timeout, transport=self._transport, follow_redirects=False
                    )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

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
            # httpx's form encoding raise) cannot be one, so it is not sent.
            raise CaptchaError(["invalid-input-response"])
        data = {"secret": self._secret, "response": token, "sitekey": self.sitekey}
        if remoteip:
            data["remoteip"] = remoteip
        try:
            reply = self._http().post(self.verify_url, data=data)
        except httpx.HTTPError as exc:
            timeout = isinstance(exc, httpx.TimeoutException)
            event(
                log,
                "captcha.unavailable",
                logging.WARNING,
                reason="timeout" if timeout else "error",
                error=type(exc).__name__,
            )
            raise CaptchaError([TIMEOUT if timeout else UNREACHABLE], retryable=True) from exc
        if reply.status_code != 200:
            event(log, "captcha.unavailable", logging.WARNING, status=reply.status_code)
            raise CaptchaError([HTTP_ERROR], retryable=True)
        try:
            body: Any = reply.json()
        except ValueError as exc:
            event(log, "captcha.unavailable", logging.WARNING, reason="not-json")
            raise CaptchaError([BAD_RESPONSE], retryable=True) from exc
        check_verdict(
            body, sitekey=self.sitekey, hostnames=hostnames, test_keys=self.uses_test_keys
        )

    @property
    def uses_test_keys(self) -> bool:
        return self._secret == HCAPTCHA_TEST_SECRET


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
