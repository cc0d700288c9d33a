"""GET /metrics on the web app, parsed with prometheus_client's own parser: the token, the
submissions by result, reason and form, and the queue gauges checked against the store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flask import Flask

from relay.store.outbox import Outbox
from relay.store.schema import STATUSES
from relay.store.workers import WorkerInfo
from tests.formfiles import SITE_A, SITE_B, three_forms
from tests.test_metrics import TOKEN, samples, value
from tests.web.conftest import token, valid_form


def test_web_metrics_need_the_token_and_match_the_store(
    make_app: Callable[..., Flask], outbox: Outbox
) -> None:
    assert make_app().test_client().get("/metrics").status_code == 404  # no token: no page
    client = make_app(RELAY_METRICS_TOKEN=TOKEN).test_client()
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer " + "x" * 24})
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"].startswith("Bearer")
    for _ in range(3):
        assert client.post("/form", data=valid_form()).status_code == 303
    assert client.post("/form", data=valid_form(email="nobody@")).status_code == 422
    assert client.post("/form", data=valid_form(website="http://spam.test")).status_code == 303
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    found = samples(response.get_data(as_text=True))
    submissions = "formrelay_submissions_total"
    assert value(found, submissions, result="accepted", reason="ok", form="default") == 3
    assert value(found, submissions, result="refused", reason="invalid", form="default") == 1
    assert value(found, submissions, result="refused", reason="honeypot", form="default") == 1
    stats = outbox.queue_stats()
    assert stats.counts == {"queued": 3}
    for status in STATUSES:
        assert value(found, "formrelay_queue_messages", status=status) == stats.counts.get(
            status, 0
        )
    assert value(found, "formrelay_queue_due_messages") == 3
    assert value(found, "formrelay_store_up") == 1


def test_web_metrics_report_the_workers_from_their_heartbeats(
    make_app: Callable[..., Flask], outbox: Outbox
) -> None:
    """Read from the registry at each scrape, so a web node reports a worker on another host
    too: live, dead (no beat within RELAY_WORKER_DEAD_AFTER) and stopped, with each one's
    last beat."""
    client = make_app(RELAY_METRICS_TOKEN=TOKEN, RELAY_WORKER_DEAD_AFTER="3").test_client()
    outbox.workers.register(WorkerInfo("live-1", "mail1", "", 10, "0.1.0", 10))
    outbox.workers.register(WorkerInfo("gone-2", "mail2", "", 20, "0.1.0", 10))
    outbox.workers.deregister("gone-2")
    found = samples(
        client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).get_data(as_text=True)
    )
    assert value(found, "formrelay_workers", state="live") == 1
    assert value(found, "formrelay_workers", state="stopped") == 1
    assert value(found, "formrelay_workers", state="dead") == 0
    assert 0 <= value(found, "formrelay_worker_last_beat_age_seconds", worker="live-1") < 3
    assert ("formrelay_worker_last_beat_age_seconds", (("worker", "gone-2"),)) not in found


def test_submissions_are_counted_per_form_and_unknown_ids_not_at_all(
    make_app: Callable[..., Flask], tmp_path: Path
) -> None:
    """The form label is a configured form's id: an unknown one is the 404 page, counted
    nowhere, so the series stay bounded by the forms file whatever ids a bot tries."""
    client = make_app(
        RELAY_METRICS_TOKEN=TOKEN, RELAY_FORMS_FILE=str(three_forms(tmp_path))
    ).test_client()
    sales = {"email": "hanako@visitor.test", "subject": "Quote"}
    origin = {"Origin": SITE_A}
    for _ in range(2):
        data = {**sales, "h-captcha-response": token()}
        assert client.post("/f/sales", json=data, headers=origin).status_code == 202
    assert client.post("/f/sales", json=sales, headers={"Origin": SITE_B}).status_code == 403
    bad = {**sales, "email": "nobody@", "h-captcha-response": token()}
    assert client.post("/f/sales", json=bad, headers=origin).status_code == 400
    big = {**sales, "subject": "x" * 400_000}
    assert client.post("/f/sales", json=big, headers=origin).status_code == 413
    assert client.post("/form", data=valid_form()).status_code == 303
    for form_id in ("nosuch", "Bad!", "x" * 60):
        assert client.post(f"/f/{form_id}", json=sales, headers=origin).status_code == 404
    found = samples(
        client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).get_data(as_text=True)
    )
    submissions = "formrelay_submissions_total"
    assert value(found, submissions, result="accepted", reason="ok", form="sales") == 2
    assert value(found, submissions, result="refused", reason="origin", form="sales") == 1
    assert value(found, submissions, result="refused", reason="invalid", form="sales") == 1
    assert value(found, submissions, result="refused", reason="too_large", form="sales") == 1
    assert value(found, submissions, result="accepted", reason="ok", form="default") == 1
    forms = {dict(labels)["form"] for name, labels in found if name == submissions}
    assert forms == {"sales", "default"}
