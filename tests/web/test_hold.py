"""Held for review: the rules file (read and checked by relay.config, every problem named),
what each rule matches, and a matching submission through the real form: stored as held,
never claimed, the visitor answered exactly as for any other submission."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from relay.errors import ConfigError
from relay.holdrules import HoldRules, held_by, load
from relay.settings import Settings
from relay.store.outbox import Outbox
from tests.web.conftest import queued, valid_form

RULES = """
blocked_addresses = ["Seo@Spam.test"]
blocked_domains = ["junk.test"]
max_links = 2
[words]
subject = ["casino", "free money"]
[patterns]
message = ['(?i)\\bseo\\s+services?\\b']
[scripts]
blocked = ["Cyrillic"]
"""


def rules_file(tmp_path: Path, text: str = RULES) -> Path:
    path = tmp_path / "hold.toml"
    path.write_text(text, encoding="utf-8")
    return path


def fields(**overrides: str) -> dict[str, str]:
    data = {
        "name": "Hanako",
        "email": "hanako@visitor.test",
        "subject": "Order 1234",
        "message": "Hello, where is my order? https://shop.test/orders/1234",
    }
    return {**data, **overrides}


@pytest.fixture
def rules(tmp_path: Path) -> HoldRules:
    found, problems = load(rules_file(tmp_path))
    assert problems == []
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        ({}, None),
        ({"email": "seo@spam.test"}, "blocked_addresses: seo@spam.test"),
        ({"email": "a@mail.junk.test"}, "blocked_domains: junk.test"),
        ({"email": "a@notjunk.test"}, None),
        ({"subject": "CASINO bonus"}, "words.subject: casino"),
        ({"subject": "casinos"}, None),  # whole words only
        ({"subject": "Free  money"}, None),
        ({"subject": "free money now"}, "words.subject: free money"),
        ({"message": "We offer SEO services"}, r"patterns.message: (?i)\bseo\s+services?\b"),
        ({"message": "see http://a.test www.b.test https://c.test"}, "max_links: 3 > 2"),
        ({"name": "Иван"}, "scripts.blocked: Cyrillic in name"),
        ({"message": "注文がまだ届きません"}, None),
    ],
)
def test_what_each_rule_holds(
    rules: HoldRules, overrides: dict[str, str], rule: str | None
) -> None:
    assert held_by(rules, fields(**overrides)) == rule


def test_allowed_scripts_hold_every_other(tmp_path: Path) -> None:
    found, _ = load(rules_file(tmp_path, '[scripts]\nallowed = ["Latin", "Han", "Hiragana"]\n'))
    assert found is not None
    assert held_by(found, fields(message="注文がまだ届きません")) is None
    assert held_by(found, fields(subject="주문")) == "scripts.allowed: Hangul in subject"


def test_every_problem_in_the_file_is_named(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    bad = rules_file(
        tmp_path,
        'max_link = 3\nmax_links = -1\nblocked_domains = "x.test"\n'
        '[words]\nbody = ["x"]\n[patterns]\nmessage = ["(unclosed"]\n'
        '[scripts]\nblocked = ["Klingon"]\nmode = "x"\n',
    )
    with pytest.raises(ConfigError) as caught:
        make_settings(RELAY_HOLD_RULES_FILE=str(bad))
    text = str(caught.value)
    for expected in (
        "unknown key 'max_link'",
        "max_links must be a whole number",
        "blocked_domains must be a list",
        "[words] 'body' is no field",
        "'(unclosed' is not a regex",
        "unknown Klingon",
        "[scripts] unknown key 'mode'",
    ):
        assert f"RELAY_HOLD_RULES_FILE: {bad}: " in text
        assert expected in text, expected
    with pytest.raises(ConfigError, match="not valid TOML"):
        make_settings(RELAY_HOLD_RULES_FILE=str(rules_file(tmp_path, "x = [")))
    with pytest.raises(ConfigError, match="cannot read it"):
        make_settings(RELAY_HOLD_RULES_FILE=str(tmp_path / "missing.toml"))


def test_a_matching_submission_is_held_and_answered_as_any(
    make_app: Callable[..., Flask], outbox: Outbox, tmp_path: Path
) -> None:
    app = make_app(RELAY_HOLD_RULES_FILE=str(rules_file(tmp_path)))
    client = app.test_client()
    normal = client.post("/form", data=valid_form())
    spam = client.post("/form", data=valid_form(subject="Casino night"))
    assert (spam.status_code, spam.headers["Location"]) == (
        normal.status_code,
        normal.headers["Location"],
    )
    as_json = client.post("/form", json=valid_form(subject="casino"))
    assert as_json.status_code == 202
    assert as_json.get_json()["status"] == "queued"  # bots learn nothing
    rows = {row.subject: row for row in queued(outbox)}
    assert rows["Order 1234"].status == "queued"
    assert rows["Casino night"].status == "held"
    assert rows["Casino night"].held_by == "words.subject: casino"
    assert [c.id for c in outbox.claim("w1", 10, 60)] == [rows["Order 1234"].id]
