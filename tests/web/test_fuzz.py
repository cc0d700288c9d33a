"""Property: no request body, content type or JSON shape makes POST /form answer 5xx."""

from __future__ import annotations

import json
from typing import Any

from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
