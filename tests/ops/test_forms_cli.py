"""`relay forms check`: every form with its URL and embed snippet; a bad file exits 2 with
every problem named by form and key, the configured one or one given before deploying."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from relay.ops.cli import main
from tests.formfiles import three_forms


def invoke(env: dict[str, str], *args: str) -> Result:
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAY_")}
    return CliRunner().invoke(main, ["forms", "check", *args], env={**unset, **env})


@pytest.fixture
def env(
    base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    return {**base_env, "RELAY_PUBLIC_URL": "https://forms.relay.test"}


def test_each_form_with_its_url_and_snippet(env: dict[str, str], tmp_path: Path) -> None:
    result = invoke({**env, "RELAY_FORMS_FILE": str(three_forms(tmp_path))})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "default: to help@support.test; fields: name (text), email (email)" in out
    assert "  URL:     https://forms.relay.test/form\n" in out
    assert '  embed:   <script src="https://forms.relay.test/embed.js" async></script>' in out
    assert "bugs: to bugs@support.test; fields: email (email), name (text, optional)" in out
    assert "; files: up to 3, 600_000 bytes in all" in out
    assert "  URL:     https://forms.relay.test/f/bugs\n" in out
    assert (
        '  embed:   <script src="https://forms.relay.test/embed.js" data-form="sales" async>'
        "</script>"
    ) in out
    assert "  thanks:  http://shop-a.test/thanks" in out
    assert "  thanks:  https://forms.relay.test/f/careers/thanks" in out
    assert out.rstrip().endswith("forms check: 4 form(s), no problem found")


def test_a_file_is_checked_before_it_is_deployed(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "new.toml"
    bad.write_text(
        "[forms.a]\nsupport_address = 'x'\n[[forms.a.fields]]\nname = 'e'\ntype = 'mail'\n"
    )
    result = invoke(env, str(bad))
    assert result.exit_code == 2
    assert "RELAY_FORMS_FILE: forms.a.support_address: 'x' is not a valid address" in result.output
    assert "RELAY_FORMS_FILE: forms.a.fields[0].type: 'mail' is not a field type" in result.output
    assert "RELAY_FORMS_FILE: forms.a.fields[0].label: required" in result.output
    good = invoke(env, str(three_forms(tmp_path)))
    assert good.exit_code == 0
    assert "forms check: 4 form(s)" in good.output


def test_without_a_forms_file_only_the_default_form(env: dict[str, str]) -> None:
    result = invoke({k: v for k, v in env.items() if k != "RELAY_PUBLIC_URL"})
    assert result.exit_code == 0
    assert "note: RELAY_FORMS_FILE is not set" in result.output
    assert "note: RELAY_PUBLIC_URL is not set" in result.output
    assert "forms check: 1 form(s), no problem found" in result.output
