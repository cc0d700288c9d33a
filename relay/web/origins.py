"""Which pages may frame and post the form.

Cross-site request forgery is refused by origin, not by a session token: the form is
anonymous and state-less, it is meant to run in a third-party iframe where session cookies
are often blocked, and every submission also needs a fresh CAPTCHA. A POST whose Origin (or
Referer when Origin is absent) is neither ours nor one of the form's allowed origins (its
own `allowed_origins`, or RELAY_ALLOWED_ORIGINS) gets a 403. See docs/security.md.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import request

from relay.formdefs import FormDef
from relay.web.state import allowed_origins, state


def origin_of(url: str) -> str | None:
    """scheme://host[:port] of a URL, lower-case, default ports dropped; None if unusable."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or (parts.scheme, port) in (("http", 80), ("https", 443)):
        return f"{parts.scheme}://{host}"
    return f"{parts.scheme}://{host}:{port}"


def own_origins() -> set[str]:
    """Our own origin as the browser sees it (request host) and RELAY_PUBLIC_URL's."""
    found = {origin_of(request.host_url), state().public_origin}
    return {o for o in found if o}


def request_origin() -> str | None:
    """The Origin header, or the origin of the Referer when Origin is absent."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin_of(origin) or "null"
    referer = request.headers.get("Referer")
    if referer:
        return origin_of(referer) or "null"
    return None


def origin_allowed(form: FormDef) -> bool:
    """Browsers send Origin on every POST; no Origin and no Referer means a non-browser
    client, which cannot be made to forge a request, unless Sec-Fetch-Site says otherwise."""
    origin = request_origin()
    if origin is None:
        return request.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")
    return origin in allowed_origins(form) or origin in own_origins()


def captcha_hostnames(form: FormDef) -> set[str]:
    """Hosts a solved CAPTCHA may come from: the form's allowed origins and our public host, which
    is RELAY_PUBLIC_URL's when set (the Host header is the client's to choose) and the
    request's host otherwise."""
    own = state().public_origin or request.host_url
    hosts = {urlsplit(o).hostname for o in [*allowed_origins(form), own]}
    return {h.lower() for h in hosts if h}
