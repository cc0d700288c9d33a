"""RELAY_FORMS_FILE: the issue's example loads; every bad key is named by form and key, all
at once, in load_settings' ConfigError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from relay import formdefs
from relay.errors import ConfigError
from relay.mail import message
from relay.settings import Settings
from tests.formfiles import SITE_A, three_forms

ISSUE_EXAMPLE = """
[forms.sales]
support_address = "sales@example.com"
from_name = "Example sales"
subject = "[Sales] {subject}"
allowed_origins = ["https://www.example.com"]
thanks_url = "https://www.example.com/thanks"
language = "en"
attachments = { max_files = 3, max_file_bytes = 5_000_000, max_total_bytes = 10_000_000 }

[[forms.sales.fields]]
name = "email"            # every form has one field of type email: the Reply-To
type = "email"
required = true
label = { en = "Your email", ja = "メールアドレス" }

[[forms.sales.fields]]
name = "plan"
type = "select"
choices = ["Starter", "Business", "Enterprise"]
label = { en = "Plan", ja = "プラン" }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "forms.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    found, listed = formdefs.load(write(tmp_path, text), test_domains=True)
    assert found is None
    return listed


SUBJECT_FIELD = """
[[forms.sales.fields]]
name = "subject"
type = "text"
required = true
label = { en = "Subject", ja = "件名" }
"""


def test_the_issue_example_loads(tmp_path: Path) -> None:
    """As printed, its subject names a field it does not show; with that field it loads."""
    assert problems(tmp_path, ISSUE_EXAMPLE) == [
        "RELAY_FORMS_FILE: forms.sales.subject: {subject} is no text field of this form"
    ]
    forms, listed = formdefs.load(write(tmp_path, ISSUE_EXAMPLE + SUBJECT_FIELD))
    assert listed == []
    assert forms is not None
    sales = forms["sales"]
    assert sales.support_address == "sales@example.com"
    assert sales.allowed_origins == ("https://www.example.com",)
    assert sales.attachments.max_file_bytes == 5_000_000
    assert sales.email_field == "email"
    assert [f.name for f in sales.fields] == ["email", "plan", "subject"]
    assert sales.fields[1].choices == ("Starter", "Business", "Enterprise")
    assert sales.fields[0].label_in("ja") == "メールアドレス"
    assert sales.subject == "[Sales] {subject}"


def test_settings_carry_three_forms_beside_the_default(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(RELAY_FORMS_FILE=str(three_forms(tmp_path)))
    assert sorted(settings.forms) == ["bugs", "careers", "sales"]
    assert settings.form("default") == settings.default_form
    assert settings.default_form.support_address == settings.support_address
    assert [f.name for f in settings.default_form.fields] == [
        "name",
        "email",
        "subject",
        "message",
    ]
    assert settings.form("nope") is None
    assert settings.forms["careers"].subject == "Form careers"
    assert settings.forms["careers"].fields[0].label == {"en": "Email", "ja": "Email"}
    assert settings.forms["sales"].thanks_url == f"{SITE_A}/thanks"


def test_default_field_limits_are_the_builders() -> None:
    limits = {f.name: f.max_length for f in formdefs.default_form("a@b.test", None).fields}
    assert limits == {
        "name": message.NAME_MAX,
        "email": message.EMAIL_MAX,
        "subject": message.SUBJECT_MAX,
        "message": message.MESSAGE_MAX,
    }


BAD = """
top = 1

[forms.default]
support_address = "x@support.test"

[forms."Bad Id"]
support_address = "x@support.test"

[forms.sales]
support_address = "not an address"
colour = "blue"
language = "fr"
subject = "[Sales] {nosuch} {plan!r}"
allowed_origins = ["https://ok.test", "https://bad.test/path"]
thanks_url = "https://elsewhere.test/thanks"
rate_limit = "lots"
attachments = { max_files = 0, max_file_bytes = 20_000_000, allowed = ["image", "zip"], x = 1 }
title = { en = "Sales", de = "Verkauf" }

[[forms.sales.fields]]
name = "email"
type = "email"
label = { en = "Email" }

[[forms.sales.fields]]
name = "plan"
type = "dropdown"
label = { en = "Plan" }

[[forms.sales.fields]]
name = "website"
type = "select"
label = { en = "Site" }

[[forms.sales.fields]]
name = "code"
type = "number"
pattern = "[0-9]+"
label = { en = "Code" }

[[forms.sales.fields]]
name = "code"
type = "text"
max_length = 0
pattern = "(["
hint = "no such key"

[[forms.sales.fields]]
name = "email2"
type = "email"
required = "yes"
label = { en = "Other email" }
"""


def test_every_bad_key_is_named_by_form_and_key(tmp_path: Path) -> None:
    listed = problems(tmp_path, BAD)
    text = "\n".join(listed)
    expected = [
        "RELAY_FORMS_FILE: top: unknown key",
        "RELAY_FORMS_FILE: forms.default: the id 'default' is the RELAY_ variables' form",
        "RELAY_FORMS_FILE: forms.Bad Id: an id is 1-40 of a-z",
        "RELAY_FORMS_FILE: forms.sales.colour: unknown key",
        "RELAY_FORMS_FILE: forms.sales.support_address: 'not an address' is not a valid",
        "RELAY_FORMS_FILE: forms.sales.language: 'fr': use one of en, ja",
        "RELAY_FORMS_FILE: forms.sales.subject: {plan} is not a field placeholder",
        "RELAY_FORMS_FILE: forms.sales.allowed_origins: 'https://bad.test/path' is not an origin",
        "RELAY_FORMS_FILE: forms.sales.thanks_url: https://elsewhere.test is neither",
        "RELAY_FORMS_FILE: forms.sales.rate_limit: 'lots' is not a limit",
        "RELAY_FORMS_FILE: forms.sales.attachments.x: unknown key",
        "RELAY_FORMS_FILE: forms.sales.attachments.max_files: must be a whole number from 1",
        "RELAY_FORMS_FILE: forms.sales.attachments.max_file_bytes: must be a whole number",
        "RELAY_FORMS_FILE: forms.sales.attachments.allowed: 'zip' cannot be allowed",
        "RELAY_FORMS_FILE: forms.sales.title.de: unknown language",
        "RELAY_FORMS_FILE: forms.sales.fields[1].type: 'dropdown' is not a field type",
        "RELAY_FORMS_FILE: forms.sales.fields[2].name: 'website' is reserved",
        "RELAY_FORMS_FILE: forms.sales.fields[2].choices: required for a select field",
        "RELAY_FORMS_FILE: forms.sales.fields[3].pattern: only text, textarea and tel",
        "RELAY_FORMS_FILE: forms.sales.fields[4].hint: unknown key",
        "RELAY_FORMS_FILE: forms.sales.fields[4].max_length: must be a whole number from 1 to 200",
        "RELAY_FORMS_FILE: forms.sales.fields[4].pattern: '([' is not a regular expression",
        "RELAY_FORMS_FILE: forms.sales.fields[4].label: required",
        "RELAY_FORMS_FILE: forms.sales.fields[5].required: must be true or false",
        "RELAY_FORMS_FILE: forms.sales.fields: the email field 'email' must be required",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in listed), f"missing: {line}\nin:\n{text}"


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("", "forms: no form"),
        ("[forms.a]\nsupport_address = 'a@support.test'\n", "forms.a.fields: required"),
        (
            "[forms.a]\nsupport_address = 'a@support.test'\n[[forms.a.fields]]\nname = 'e'\n"
            "type = 'email'\nlabel = 'E'\n",
            "forms.a.fields: the email field 'e' must be required",
        ),
        (
            "[forms.a]\n[[forms.a.fields]]\nname = 'e'\ntype = 'email'\nrequired = true\n"
            "label = 'E'\n",
            "forms.a.support_address: required",
        ),
        (
            "[forms.a]\nsupport_address = 'a@support.test'\nattachments = { max_file_bytes = "
            "9_000_000, max_total_bytes = 1_000_000 }\n[[forms.a.fields]]\nname = 'e'\n"
            "type = 'email'\nrequired = true\nlabel = 'E'\n",
            "forms.a.attachments.max_file_bytes: must not exceed max_total_bytes",
        ),
        (
            "[forms.a]\nsupport_address = 'a@support.test'\n[[forms.a.fields]]\nname = 'e'\n"
            "type = 'email'\nrequired = true\nlabel = 'E'\nchoices = ['x']\n",
            "forms.a.fields[0].choices: only select, radio and checkbox fields have choices",
        ),
        ("[forms.a\n", "not valid TOML"),
    ],
)
def test_one_problem_each(tmp_path: Path, snippet: str, expected: str) -> None:
    assert any(expected in p for p in problems(tmp_path, snippet)), problems(tmp_path, snippet)


def test_load_settings_lists_form_problems_with_the_others(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = write(tmp_path, BAD)
    with pytest.raises(ConfigError) as info:
        make_settings(RELAY_FORMS_FILE=str(path), RELAY_SMTP_PORT="0")
    listed = info.value.problems
    assert any(p.startswith("RELAY_SMTP_PORT:") for p in listed)
    assert any(p.startswith("RELAY_FORMS_FILE: forms.sales.fields[1].type:") for p in listed)
    with pytest.raises(ConfigError) as missing:
        make_settings(RELAY_FORMS_FILE=str(tmp_path / "missing.toml"))
    assert "cannot read it" in str(missing.value)


def test_a_support_address_may_not_be_our_from_address(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "[forms.a]\nsupport_address = 'form@relay.test'\n[[forms.a.fields]]\nname = 'e'\n"
        "type = 'email'\nrequired = true\nlabel = 'E'\n",
    )
    with pytest.raises(ConfigError) as info:
        make_settings(RELAY_FORMS_FILE=str(path))
    assert "RELAY_FORMS_FILE: forms.a.support_address: must not be RELAY_FROM_ADDRESS" in str(
        info.value
    )


def test_thanks_url_on_our_own_origin_is_fine(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "[forms.a]\nsupport_address = 'a@support.test'\nallowed_origins = []\n"
        "thanks_url = 'https://forms.relay.test/done'\n[[forms.a.fields]]\nname = 'e'\n"
        "type = 'email'\nrequired = true\nlabel = 'E'\n",
    )
    settings = make_settings(
        RELAY_FORMS_FILE=str(path), RELAY_PUBLIC_URL="https://forms.relay.test"
    )
    assert settings.forms["a"].thanks_url == "https://forms.relay.test/done"
    assert settings.forms["a"].origins(["http://x.test"]) == frozenset()


def test_subject_rendering() -> None:
    assert formdefs.subject_fields("[Bug] {summary} ({severity})") == ["summary", "severity"]
    rendered = formdefs.render_subject("[Bug] {summary} ({severity})", {"summary": "Crash"})
    assert rendered == "[Bug] Crash ()"
    with pytest.raises(ValueError, match="placeholder"):
        formdefs.subject_fields("{a.b}")


def test_the_readme_forms_file_loads(tmp_path: Path) -> None:
    """The forms file README's Embedding section shows is one the relay accepts."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("### Several forms", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    forms, listed = formdefs.load(write(tmp_path, block))
    assert listed == []
    assert forms is not None
    assert sorted(forms) == ["sales", "support"]
    assert forms["support"].file_fields[0].name == "screenshots"
    assert forms["sales"].rate_limit == "3/minute"
