"""Property: no request body, content type or JSON shape makes POST /form answer 5xx."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from relay.sandbox.captcha import SiteverifyStub

FIELDS = ["name", "email", "subject", "message", "website", "h-captcha-response", "to", "bcc"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
content_types = st.sampled_from(
    [
        "application/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=zz",
        "text/plain",
        "application/octet-stream",
        "application/json; charset=latin-1",
    ]
)

fuzz = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@fuzz
@given(body=st.binary(max_size=600), content_type=content_types)
def test_random_bytes_never_5xx(client: FlaskClient, body: bytes, content_type: str) -> None:
    response = client.post("/form", data=body, content_type=content_type)
    assert 400 <= response.status_code < 500


@fuzz
@given(payload=objects | json_values)
def test_random_json_never_5xx(client: FlaskClient, payload: Any) -> None:
    response = client.post("/form", data=json.dumps(payload), content_type="application/json")
    assert 400 <= response.status_code < 500 or response.status_code == 202


@fuzz
@given(data=st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=60), max_size=8))
def test_random_form_fields_never_5xx(client: FlaskClient, data: dict[str, str]) -> None:
    response = client.post("/form", data=data)
    assert response.status_code in (303, 403, 422)


# --- every field, hostile text and bytes, three encodings ------------------------------------

VALID = {
    "name": "Hanako Yamada",
    "email": "hanako@visitor.test",
    "subject": "Order 1234",
    "message": "Hello,\nmy order has not arrived.\n",
    "website": "",
}
UNKNOWN = ["to", "cc", "bcc", "recipient", "from", "", "h-captcha-response[]"]
# Lone surrogates (only JSON's \ud800 escapes can carry them), controls, separators, bidi
# overrides, the replacement character, and any other code point.
hostile_text = st.text(
    st.characters(categories=["Cs"])
    | st.sampled_from("\x00\r\n\t\x7f\x85\u2028\u202e\ufffd\U0010ffff")
    | st.characters(),
    max_size=30,
)
hostile = hostile_text | st.binary(max_size=30)


def field_value(name: str) -> st.SearchStrategy[str | bytes]:
    """Mostly the valid value, so that the other fields (the token last) are reached."""
    if name == "h-captcha-response":
        valid: st.SearchStrategy[str | bytes] = st.builds(
            lambda n: f"pass-fuzz-{n}", st.integers(0, 10**12)
        )
    else:
        valid = st.just(VALID[name])
    return valid | hostile


submissions = st.fixed_dictionaries(
    {},
    optional={
        **{name: field_value(name) for name in [*VALID, "h-captcha-response"]},
        **dict.fromkeys(UNKNOWN, hostile),
    },
) | st.dictionaries(hostile_text, hostile, max_size=4)


def as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


def encode(fields: dict[str, str | bytes], kind: str) -> tuple[bytes, str]:
    """The body as a client could send it: bytes that are not text go in raw (multipart,
    inside a JSON string) or percent-encoded (a form)."""
    if kind == "form":
        body = "&".join(
            urllib.parse.quote_from_bytes(as_bytes(k))
            + "="
            + urllib.parse.quote_from_bytes(as_bytes(v))
            for k, v in fields.items()
        )
        return body.encode(), "application/x-www-form-urlencoded"
    if kind == "json":
        members = [
            json.dumps(k).encode()
            + b":"
            + (json.dumps(v).encode() if isinstance(v, str) else b'"' + v + b'"')
            for k, v in fields.items()
        ]
        return b"{" + b",".join(members) + b"}", "application/json"
    boundary = b"fuzz-7d1c0b"
    parts = [
        b"--"
        + boundary
        + b'\r\nContent-Disposition: form-data; name="'
        + as_bytes(k)
        + b'"\r\n\r\n'
        + as_bytes(v)
        + b"\r\n"
        for k, v in fields.items()
    ]
    body = b"".join(parts) + b"--" + boundary + b"--\r\n"
    return body, f"multipart/form-data; boundary={boundary.decode()}"


@pytest.fixture
def unlimited(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(
        RELAY_RATE_LIMIT="1000000/minute", RELAY_RATE_LIMIT_GLOBAL="1000000/minute"
    ).test_client()


@pytest.mark.parametrize("kind", ["form", "json", "multipart"])
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=submissions)
@example(fields={**VALID, "h-captcha-response": "\ud800"})  # was a 500 (issue 14)
@example(fields={**VALID, "h-captcha-response": b"\xed\xa0\x80"})
def test_hostile_text_in_any_field_never_5xx(
    unlimited: FlaskClient,
    siteverify: SiteverifyStub,
    kind: str,
    fields: dict[str, str | bytes],
) -> None:
    """Every field the request carries, the CAPTCHA token included, goes through the same
    text checks before any use: a refusal is a 4xx with field errors, never a 5xx, and
    siteverify only ever hears about a token that is printable ASCII."""
    body, content_type = encode(fields, kind)
    response = unlimited.post(
        "/form", data=body, content_type=content_type, headers={"Accept": "application/json"}
    )
    assert response.status_code in (202, 400, 413), (response.status_code, response.data[:300])
    if response.status_code == 400:
        assert response.get_json()["errors"]
    assert all(r["response"].isascii() and r["response"].isprintable() for r in siteverify.requests)
