"""`relay dkim keygen`: a safe key file, a record that DNS accepts and that verifies our
signatures, and no configuration needed to run it."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.resolver
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.mail.signing import Signer, dkim_txt_record
from relay.ops import keygen
from relay.ops.cli import main
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import FROM_DOMAIN

MESSAGE = (
    b"From: form@relay.test\r\nTo: help@support.test\r\nSubject: hello\r\n"
    b"Date: Sat, 28 Nov 2026 12:00:00 +0000\r\nMessage-ID: <k@relay.test>\r\n\r\nHi.\r\n"
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory and no RELAY_ variables: a new operator's shell."""
    for key in list(os.environ):
        if key.startswith("RELAY_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def keygen_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["dkim", "keygen", *args], env=env)


def printed_zone_line(output: str, selector: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"{selector}._domainkey.")]
    assert len(lines) == 1, output
    return lines[0]


def txt_strings(zone_line: str) -> list[str]:
    return re.findall(r'"((?:[^"\\]|\\.)*)"', zone_line)


def txt_via(server: DNSZoneServer) -> Callable[[bytes, float], bytes | None]:
    """dkimpy's dnsfunc, answered by the loopback DNS server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    resolver.cache = None

    def get_txt(name: bytes, timeout: float = 5) -> bytes | None:
        answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        return b"".join(next(iter(answer)).strings)

    return get_txt


def test_rsa_key_is_written_0600_and_its_printed_record_verifies(
    workdir: Path, dns_server: DNSZoneServer
) -> None:
    out = workdir / "keys" / "s2026.pem"
    out.parent.mkdir()
    result = keygen_cli("--selector", "s2026", "--domain", FROM_DOMAIN, "--out", str(out))
    assert result.exit_code == 0, result.output

    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    pem = out.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048

    line = printed_zone_line(result.output, "s2026")
    assert line.startswith(f"s2026._domainkey.{FROM_DOMAIN}. 3600 IN TXT ")
    strings = txt_strings(line)
    assert len(strings) > 1  # a 2048-bit key needs two strings
    assert all(len(s) <= 255 for s in strings)
    assert "".join(strings) == dkim_txt_record(pem)
    assert "RELAY_DKIM_SELECTOR=s2026" in result.output
    assert f"RELAY_DKIM_PRIVATE_KEY_FILE={out}" in result.output
    assert f"RELAY_DKIM_DOMAIN={FROM_DOMAIN}" in result.output

    # Publish exactly what was printed; a signature by our Signer verifies against it.
    dns_server.add(line + "\n")
    signed = Signer(FROM_DOMAIN, "s2026", pem).sign(MESSAGE)
    assert dkim.verify(signed, dnsfunc=txt_via(dns_server))


def test_ed25519_key_and_its_settings(
    workdir: Path, dns_server: DNSZoneServer, rsa_key_file: Path
) -> None:
    result = keygen_cli("--selector", "e2026", "--type", "ed25519", "--domain", FROM_DOMAIN)
    assert result.exit_code == 0, result.output
    out = workdir / "dkim-e2026.pem"  # the default name, in the working directory
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    pem = out.read_bytes()
    assert isinstance(serialization.load_pem_private_key(pem, None), ed25519.Ed25519PrivateKey)
    line = printed_zone_line(result.output, "e2026")
    assert "k=ed25519" in line
    assert "RELAY_DKIM_ED25519_SELECTOR=e2026" in result.output
    assert f"RELAY_DKIM_ED25519_KEY_FILE={out}" in result.output

    dns_server.add(line + "\n")
    signer = Signer(
        FROM_DOMAIN,
        "s1",
        rsa_key_file.read_bytes(),
        ed25519_selector="e2026",
        ed25519_pem=pem,
    )
    signed = signer.sign(MESSAGE)
    assert dkim.DKIM(signed).verify(idx=1, dnsfunc=txt_via(dns_server))


def test_refuses_to_overwrite_an_existing_key(workdir: Path) -> None:
    out = workdir / "dkim.pem"
    out.write_bytes(b"the key published in DNS\n")
    result = keygen_cli("--selector", "s1", "--domain", FROM_DOMAIN, "--out", str(out))
    assert result.exit_code == 1
    assert "refusing to overwrite" in result.output
    assert out.read_bytes() == b"the key published in DNS\n"


def test_refuses_a_symlink_in_place_of_the_key(workdir: Path) -> None:
    target = workdir / "elsewhere"
    (workdir / "dkim.pem").symlink_to(target)
    result = keygen_cli("--selector", "s1", "--domain", FROM_DOMAIN, "--out", "dkim.pem")
    assert result.exit_code == 1
    assert not target.exists()


@pytest.mark.parametrize("bits", ["1024", "2047"])
def test_refuses_short_rsa_keys(workdir: Path, bits: str) -> None:
    result = keygen_cli("--selector", "s1", "--domain", FROM_DOMAIN, "--bits", bits)
    assert result.exit_code == 2
    assert "refused" in result.output
    assert not (workdir / "dkim-s1.pem").exists()


def test_bits_is_for_rsa_only(workdir: Path) -> None:
    result = keygen_cli("--selector", "e1", "--type", "ed25519", "--bits", "4096")
    assert result.exit_code == 2
    assert "RSA keys only" in result.output


def test_rejects_a_selector_that_is_not_a_dns_label(workdir: Path) -> None:
    result = keygen_cli("--selector", "my selector", "--domain", FROM_DOMAIN)
    assert result.exit_code == 2
    assert "not a DNS label" in result.output
    assert list(workdir.iterdir()) == []


def test_works_without_any_configuration(workdir: Path) -> None:
    result = keygen_cli("--selector", "s1")
    assert result.exit_code == 0, result.output
    assert "s1._domainkey.<your-domain>." in result.output
    assert "--domain" in result.output
    assert (workdir / "dkim-s1.pem").exists()


def test_domain_from_the_environment(workdir: Path) -> None:
    result = keygen_cli("--selector", "s1", env={"RELAY_FROM_ADDRESS": "form@shop.test"})
    assert result.exit_code == 0, result.output
    assert printed_zone_line(result.output, "s1").startswith("s1._domainkey.shop.test. ")
    assert "RELAY_DKIM_DOMAIN" not in result.output  # From's domain is the default already

    result = keygen_cli(
        "--selector",
        "s2",
        env={"RELAY_FROM_ADDRESS": "form@shop.test", "RELAY_DKIM_DOMAIN": "keys.shop.test"},
    )
    assert result.exit_code == 0, result.output
    assert printed_zone_line(result.output, "s2").startswith("s2._domainkey.keys.shop.test. ")
    assert "RELAY_DKIM_DOMAIN=keys.shop.test" in result.output


def test_domain_from_a_dotenv_file(workdir: Path) -> None:
    (workdir / ".env").write_text("RELAY_FROM_ADDRESS=form@dotenv.test\n")
    result = keygen_cli("--selector", "s1")
    assert result.exit_code == 0, result.output
    assert printed_zone_line(result.output, "s1").startswith("s1._domainkey.dotenv.test. ")


def test_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        keygen.write_private_key(tmp_path / "k.pem", b"pem")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        keygen.write_private_key(tmp_path / "k.pem", b"other")
    assert (tmp_path / "k.pem").read_bytes() == b"pem"


def test_generated_keys_load_in_the_configuration(tmp_path: Path, base_env: dict[str, str]) -> None:
    from relay.config import load_settings

    rsa_path, ed_path = tmp_path / "r.pem", tmp_path / "e.pem"
    keygen.write_private_key(rsa_path, keygen.generate_private_key("rsa", 3072))
    keygen.write_private_key(ed_path, keygen.generate_private_key("ed25519"))
    settings = load_settings(
        {
            **base_env,
            "RELAY_DKIM_PRIVATE_KEY_FILE": str(rsa_path),
            "RELAY_DKIM_ED25519_SELECTOR": "e1",
            "RELAY_DKIM_ED25519_KEY_FILE": str(ed_path),
        },
        env_file=None,
    )
    assert settings.warnings == []  # mode 0600: no "readable by others" warning
    signed = Signer.from_settings(settings).sign(MESSAGE)
    assert signed.count(b"DKIM-Signature:") == 2
