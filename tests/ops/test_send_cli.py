"""`relay send`: the whole pipeline from the command line, against the test world's DNS and MX.

The message the MX receives must carry a DKIM signature that verifies (dkimpy) against the
key published in the test DNS.
"""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from pathlib import Path

import dkim
import dns.resolver
import pytest
from click.testing import CliRunner, Result

from relay.config import load_settings
from relay.ops.cli import main
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import MX2_IP
from relay.store.outbox import Outbox
from tests.formfiles import three_forms
from tests.peers.smtp import ScriptedHandler, SMTPPeer

ARGS = [
    "send",
    "--name",
    "Ada Lovelace",
    "--email",
    "ada@visitor.test",
    "--subject",
    "Order 42",
    "--message",
    "Hello,\n.a line with a leading dot\nthanks",
]


@pytest.fixture
def env(
    base_env: dict[str, str],
    world_dns: DNSZoneServer,
    mx_server: SMTPPeer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    return {
        **base_env,
        "RELAY_DNS_NAMESERVERS": world_dns.address,
        "RELAY_SMTP_PORT": str(mx_server.port),
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'outbox.sqlite3'}",
    }


def run(env: dict[str, str], *extra: str) -> Result:
    return CliRunner().invoke(main, [*ARGS, *extra], env=env, catch_exceptions=False)


def dns_txt(world_dns: DNSZoneServer):  # type: ignore[no-untyped-def]
    """A dkimpy dnsfunc that asks the test DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [world_dns.host]
    resolver.port = world_dns.port
    resolver.lifetime = 2

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    return lookup


def test_send_now_delivers_a_message_whose_dkim_signature_verifies(
    env: dict[str, str], mx_server: SMTPPeer, world_dns: DNSZoneServer
) -> None:
    result = run(env, "--now")
    assert result.exit_code == 0, result.output
    assert "mx1.support.test [127.0.0.2]" in result.output
    assert "dot: 250 2.0.0 Queued" in result.output
    assert "delivered: 250 2.0.0 Queued (mx1.support.test)" in result.output
    [received] = mx_server.messages
    assert received.rcpt_tos == ["help@support.test"]
    assert received.mail_from == "form@relay.test"
    assert received.helo == "mail.relay.test"
    assert received.data.startswith(b"DKIM-Signature:")
    assert dkim.verify(received.data, dnsfunc=dns_txt(world_dns))
    parsed = received.message
    assert parsed["Reply-To"] == "ada@visitor.test"
    assert parsed["Subject"] == "Order 42"
    assert "..a line" not in received.data.decode()  # dot-stuffing undone by the server
    assert world_dns.queried("s1._domainkey.relay.test", "TXT") >= 1


def test_japanese_name_subject_and_body_arrive_readable(
    env: dict[str, str], mx_server: SMTPPeer, world_dns: DNSZoneServer
) -> None:
    name, subject = "山田 花子", "注文番号 42 について"
    body = "こんにちは。\n商品がまだ届いていません。\nよろしくお願いします。"
    args = ["send", "--name", name, "--email", "hanako@visitor.test"]
    args += ["--subject", subject, "--message", body, "--now"]
    result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    [received] = mx_server.messages
    assert max(received.data) < 128, "the message on the wire is 7-bit"
    assert dkim.verify(received.data, dnsfunc=dns_txt(world_dns))
    parsed = BytesParser(policy=policy.default).parsebytes(received.data)
    assert parsed["Subject"] == subject
    assert parsed["From"].addresses[0].display_name == f"{name} via Example Shop"
    assert parsed["From"].addresses[0].addr_spec == "form@relay.test"
    text = parsed.get_content()
    assert all(line in text.splitlines() for line in body.splitlines())
    assert name in text


def test_send_now_prints_every_host_and_fails_on_a_permanent_reply(
    env: dict[str, str], mx_server: SMTPPeer, world_dns: DNSZoneServer
) -> None:
    world_dns.add("support.test. 300 IN MX 20 mx2.support.test.")
    handler2 = ScriptedHandler()
    handler2.rcpt.append("550 5.1.1 No such user")
    mx_server.handler.greeting.append("421 4.3.2 Busy")
    with SMTPPeer(handler2, host=MX2_IP, port=mx_server.port, hostname="mx2.support.test"):
        result = run(env, "--now")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any("mx1.support.test" in line and "greeting: 421 4.3.2 Busy" in line for line in lines)
    assert any(
        "mx2.support.test" in line and "rcpt: 550 5.1.1 No such user" in line for line in lines
    )
    assert "permanent: 550 5.1.1 No such user (mx2.support.test)" in result.output
    assert mx_server.messages == handler2.messages == []


def test_send_now_temporary_failure_exits_1(env: dict[str, str], mx_server: SMTPPeer) -> None:
    mx_server.handler.rcpt.append("451 4.7.1 Greylisted")
    result = run(env, "--now")
    assert result.exit_code == 1
    assert "temporary: 451 4.7.1 Greylisted (mx1.support.test)" in result.output


def test_send_without_now_queues_in_the_outbox(env: dict[str, str], mx_server: SMTPPeer) -> None:
    result = run(env)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("queued ")
    outbox_id = result.output.split()[1]
    store = Outbox.from_settings(load_settings(env, env_file=None))
    try:
        row = store.get(outbox_id)
    finally:
        store.dispose()
    assert row.status == "queued"
    assert row.recipient == "help@support.test"
    assert mx_server.handler.connections == 0, "queueing must not deliver"


def test_send_refuses_an_unusable_visitor_address(env: dict[str, str]) -> None:
    args = list(ARGS)
    args[args.index("ada@visitor.test")] = "ada@visitor.test\r\nBcc: x@evil.test"
    result = CliRunner().invoke(main, [*args, "--now"], env=env)
    assert result.exit_code == 1
    assert "relay send:" in result.output


# --- another form of RELAY_FORMS_FILE: --form ID and --field NAME=VALUE ------------------------


@pytest.fixture
def forms_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return {**env, "RELAY_FORMS_FILE": str(three_forms(tmp_path))}


def send(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, ["send", *args], env=env, catch_exceptions=False)


def test_send_now_as_another_form_goes_to_its_own_support_address(
    forms_env: dict[str, str], mx_server: SMTPPeer, world_dns: DNSZoneServer
) -> None:
    result = send(
        forms_env,
        *("--form", "sales", "--email", "ada@visitor.test", "--subject", "Order 42"),
        *("--field", "plan=Business", "--now"),
    )
    assert result.exit_code == 0, result.output
    assert "to sales@support.test" in result.output
    [received] = mx_server.messages
    assert received.rcpt_tos == ["sales@support.test"]
    assert dkim.verify(received.data, dnsfunc=dns_txt(world_dns))
    parsed = BytesParser(policy=policy.default).parsebytes(received.data)
    assert parsed["Subject"] == "[Sales] Order 42"
    assert parsed["Reply-To"] == "ada@visitor.test"
    text = parsed.get_content()
    assert "Plan" in text
    assert "Business" in text


def test_send_as_another_form_queues_with_its_id(
    forms_env: dict[str, str], mx_server: SMTPPeer
) -> None:
    """Every field by --field (a checkbox group once per choice), the file field left empty;
    the outbox row carries the form, and `relay log --form` finds it."""
    result = send(
        forms_env,
        *("--form", "bugs", "--email", "ada@visitor.test", "--name", "Ada"),
        *("--field", "summary=The form hangs", "--field", "severity=high"),
        *("--field", "areas=web", "--field", "areas=mail", "--field", "agree=yes"),
        *("--field", "details=Line one\nline two"),
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("queued ")
    assert "(form bugs, to bugs@support.test)" in result.output
    outbox_id = result.output.split()[1]
    store = Outbox.from_settings(load_settings(forms_env, env_file=None))
    try:
        row = store.get(outbox_id)
    finally:
        store.dispose()
    assert row.status == "queued"
    assert row.recipient == "bugs@support.test"
    assert row.form_id == "bugs"
    assert row.subject == "[Bug] The form hangs (high)"
    runner = CliRunner()
    bugs = runner.invoke(main, ["log", "--form", "bugs"], env=forms_env)
    assert bugs.exit_code == 0, bugs.output
    assert outbox_id in bugs.output
    assert outbox_id not in runner.invoke(main, ["log", "--form", "sales"], env=forms_env).output
    assert mx_server.handler.connections == 0


def test_an_unknown_form_is_a_usage_error_naming_the_forms(forms_env: dict[str, str]) -> None:
    result = send(forms_env, "--form", "nosuch", "--email", "ada@visitor.test")
    assert result.exit_code == 2
    assert "no form 'nosuch'; the forms are: default, sales, bugs, careers" in result.output


def test_invalid_values_come_back_field_by_field(
    forms_env: dict[str, str], mx_server: SMTPPeer
) -> None:
    """The web form's own checks and words, one "field: message" per line."""
    result = send(
        forms_env,
        *("--form", "bugs", "--email", "ada@visitor.test", "--field", "summary=Hangs"),
        *("--field", "severity=urgent", "--field", "phone=call me"),
        *("--field", "agree=yes", "--field", "details=x"),
    )
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert "relay send: severity: Please choose one of the options." in lines
    assert "relay send: phone: Please enter a phone number, like +81 3 1234 5678." in lines
    one = send(forms_env, "--form", "sales", "--email", "ada@visitor.test", "--subject", "Hi")
    assert one.exit_code == 0, one.output  # plan is optional
    bad = send(forms_env, "--form", "sales", "--email", "nobody@", "--subject", "Hi")
    assert bad.exit_code == 1
    assert bad.output.splitlines() == [
        "relay send: email: Please enter a valid email address, like name@example.com."
    ]
    assert mx_server.handler.connections == 0


def test_a_file_field_cannot_be_set_from_the_command_line(
    forms_env: dict[str, str], tmp_path: Path
) -> None:
    args = ["--form", "bugs", "--email", "ada@visitor.test", "--field", "summary=x"]
    result = send(forms_env, *args, "--field", "files=shot.png")
    assert result.exit_code == 2
    assert "'files' is a file field: relay send cannot attach files" in result.output
    required = tmp_path / "required.toml"
    required.write_text(
        '[forms.cv]\nsupport_address = "jobs@support.test"\n'
        '[[forms.cv.fields]]\nname = "email"\ntype = "email"\nrequired = true\nlabel = "Email"\n'
        '[[forms.cv.fields]]\nname = "cv"\ntype = "file"\nrequired = true\nlabel = "CV"\n'
    )
    env = {**forms_env, "RELAY_FORMS_FILE": str(required)}
    needs = send(env, "--form", "cv", "--email", "ada@visitor.test")
    assert needs.exit_code == 2
    assert "form 'cv' requires a file in 'cv', which relay send cannot attach" in needs.output


def test_only_the_forms_own_fields_once_each(forms_env: dict[str, str]) -> None:
    careers = send(forms_env, "--form", "careers", "--email", "a@visitor.test", "--subject", "x")
    assert careers.exit_code == 2
    assert "form 'careers' has no field 'subject' (its fields: email, message)" in careers.output
    twice = send(
        forms_env, "--form", "sales", "--field", "plan=Starter", "--field", "plan=Business"
    )
    assert twice.exit_code == 2
    assert "'plan' is given twice" in twice.output
    shape = send(forms_env, "--form", "sales", "--field", "plan")
    assert shape.exit_code == 2
    assert "'plan' is not NAME=VALUE" in shape.output


def test_the_default_form_still_needs_its_four_options(forms_env: dict[str, str]) -> None:
    missing = send(forms_env, "--email", "ada@visitor.test", "--subject", "s", "--message", "m")
    assert missing.exit_code == 2
    assert "Missing option '--name'" in missing.output
    extra = CliRunner().invoke(main, [*ARGS, "--field", "plan=Starter"], env=forms_env)
    assert extra.exit_code == 2
    assert "form 'default' has no field 'plan'" in extra.output
