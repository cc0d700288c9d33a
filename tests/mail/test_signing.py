"""DKIM signing, verified by dkimpy against keys served by the test DNS server."""

from __future__ import annotations

import base64
import inspect
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dkim
import dns.exception
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from packaging.version import Version

from relay.errors import MessageError, SigningError
from relay.mail.message import Submission, build_message
from relay.mail.signing import (
    INCLUDE_HEADERS,
    Signer,
    dkim_txt_record,
    sign_override_applies,
    split_txt,
)
from relay.sandbox.dns import DNSZoneServer
from relay.sandbox.world import public_key_b64
from relay.settings import Settings

NOW = datetime(2026, 11, 28, 12, 30, 5, tzinfo=UTC)
DnsFunc = Callable[..., bytes | None]


def world_txt(server: DNSZoneServer) -> DnsFunc:
    """A dkimpy dnsfunc that asks the test DNS server, as a receiver would."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=timeout)
        except dns.exception.DNSException:
            return None
        return b"".join(b"".join(record.strings) for record in answer)

    return dnsfunc


@pytest.fixture
def dnsfunc(world_dns: DNSZoneServer) -> DnsFunc:
    return world_txt(world_dns)


@pytest.fixture
def both_keys(make_settings: Callable[..., Settings], ed25519_key_file: Path) -> Settings:
    return make_settings(
        RELAY_DKIM_ED25519_SELECTOR="e1", RELAY_DKIM_ED25519_KEY_FILE=str(ed25519_key_file)
    )


@pytest.fixture
def signer(both_keys: Settings) -> Signer:
    return Signer.from_settings(both_keys)


@pytest.fixture
def pure_signer(both_keys: Settings) -> Signer:
    return Signer.from_settings(both_keys, native=False)


def built(cfg: Settings, **overrides: str) -> bytes:
    values = {
        "name": "山田 太郎",
        "email": "taro@visitor.test",
        "subject": "配送について",
        "message": "Hello\n.\nFrom me",
    }
    values.update(overrides)
    sub = Submission(**values, metadata={"page_url": "https://shop.test/contact"})
    return build_message(sub, cfg, now=NOW).raw


def verify_all(signed: bytes, dnsfunc: DnsFunc) -> list[bool]:
    count = len(re.findall(rb"(?m)^DKIM-Signature:", signed))
    return [_verify(signed, i, dnsfunc) for i in range(count)]


def _verify(signed: bytes, idx: int, dnsfunc: DnsFunc) -> bool:
    try:
        return bool(dkim.DKIM(signed).verify(idx=idx, dnsfunc=dnsfunc))
    except dkim.DKIMException:  # e.g. ValidationError("body hash mismatch")
        return False


def tags(signed: bytes, idx: int = 0) -> dict[bytes, bytes]:
    sig = dkim.DKIM(signed)
    headers = [v for k, v in sig.headers if k.lower() == b"dkim-signature"]
    return dict(dkim.util.parse_tag_value(headers[idx]))


# --- signatures ----------------------------------------------------------------------------


def test_rsa_and_ed25519_signatures_verify(
    signer: Signer, both_keys: Settings, dnsfunc: DnsFunc
) -> None:
    raw = built(both_keys)
    signed = signer.sign(raw)
    assert signed.endswith(raw)
    assert verify_all(signed, dnsfunc) == [True, True]
    rsa_tags, ed_tags = tags(signed, 0), tags(signed, 1)
    assert (rsa_tags[b"a"], rsa_tags[b"s"], rsa_tags[b"d"]) == (b"rsa-sha256", b"s1", b"relay.test")
    assert (ed_tags[b"a"], ed_tags[b"s"]) == (b"ed25519-sha256", b"e1")
    assert rsa_tags[b"c"] == b"relaxed/relaxed"
    signed_list = [h.strip() for h in rsa_tags[b"h"].split(b":")]
    assert signed_list == [h.encode() for h in INCLUDE_HEADERS]
    for oversigned in (b"from", b"subject", b"reply-to"):
        assert signed_list.count(oversigned) == 2
    assert all(len(line) <= 998 for line in signed.split(b"\r\n"))


def test_rsa_only_without_ed25519(make_settings: Callable[..., Settings], dnsfunc: DnsFunc) -> None:
    cfg = make_settings()
    signed = Signer.from_settings(cfg).sign(built(cfg))
    assert verify_all(signed, dnsfunc) == [True]


@pytest.mark.parametrize(
    "header", [b"Subject: Pay this invoice", b"From: ceo@relay.test", b"Reply-To: x@evil.test"]
)
def test_an_added_oversigned_header_breaks_both_signatures(
    signer: Signer, both_keys: Settings, dnsfunc: DnsFunc, header: bytes
) -> None:
    signed = signer.sign(built(both_keys))
    head, body = signed.split(b"\r\n\r\n", 1)
    tampered = head + b"\r\n" + header + b"\r\n\r\n" + body
    assert verify_all(tampered, dnsfunc) == [False, False]


def test_body_change_breaks_and_refolding_is_tolerated(
    signer: Signer, both_keys: Settings, dnsfunc: DnsFunc
) -> None:
    signed = signer.sign(built(both_keys))
    assert verify_all(signed.replace(b"Hello", b"Hellx"), dnsfunc) == [False, False]
    # relaxed/relaxed: a hop that changes header whitespace keeps the signatures valid
    refolded = signed.replace(b"\r\nTo: ", b"\r\nTo:   \r\n\t")
    assert refolded != signed
    assert verify_all(refolded, dnsfunc) == [True, True]


def test_pure_dkimpy_path_verifies(
    pure_signer: Signer, both_keys: Settings, dnsfunc: DnsFunc
) -> None:
    assert pure_signer.native is False
    assert verify_all(pure_signer.sign(built(both_keys)), dnsfunc) == [True, True]


def test_crlf_and_pkcs1_pem_are_accepted(rsa_key_file: Path, dnsfunc: DnsFunc) -> None:
    pem = rsa_key_file.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    raw = b"From: a@relay.test\r\nTo: b@support.test\r\nSubject: x\r\n\r\nbody\r\n"
    for variant in (pem.replace(b"\n", b"\r\n"), pkcs1.replace(b"\n", b"\r\n"), b"\n" + pkcs1):
        signer = Signer("relay.test", "s1", variant)
        assert signer.native
        assert verify_all(signer.sign(raw), dnsfunc) == [True]


def test_unusable_keys_raise_signing_error(ed25519_key_file: Path, rsa_key_file: Path) -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for pem in (b"", b"not a key", ed25519_key_file.read_bytes(), ec_pem):
        with pytest.raises(SigningError):
            Signer("relay.test", "s1", pem)
    with pytest.raises(SigningError):
        Signer(
            "relay.test",
            "s1",
            rsa_key_file.read_bytes(),
            ed25519_selector="e1",
            ed25519_pem=rsa_key_file.read_bytes(),
        )


def test_unsignable_message_raises_signing_error(signer: Signer) -> None:
    with pytest.raises(SigningError):
        signer.sign(b"no colon in this header line\r\n\r\nbody\r\n")


# --- byte-identical to dkimpy ---------------------------------------------------------------


def timestamps(signed: bytes) -> list[bytes]:
    sig = dkim.DKIM(signed)
    count = sum(1 for k, _ in sig.headers if k.lower() == b"dkim-signature")
    return [tags(signed, i)[b"t"] for i in range(count)]


def sign_both(native: Signer, pure: Signer, raw: bytes) -> tuple[bytes, bytes]:
    """Every signature of both in the same second (t= comes from dkimpy's clock, read once
    per signature, so the RSA and the Ed25519 signature may straddle a second)."""
    for _ in range(5):
        a, b = native.sign(raw), pure.sign(raw)
        if timestamps(a) == timestamps(b):
            return a, b
    pytest.fail("the clock crossed a second boundary five times in a row")


@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    name=st.text(max_size=120),
    subject=st.text(max_size=120),
    message=st.text(max_size=2000),
)
def test_native_is_byte_identical_to_pure_dkimpy(
    signer: Signer,
    pure_signer: Signer,
    both_keys: Settings,
    dnsfunc: DnsFunc,
    name: str,
    subject: str,
    message: str,
) -> None:
    """`signer`/`pure_signer` are immutable, so sharing them between examples is safe."""
    try:
        raw = built(both_keys, name=name, subject=subject, message=message)
    except MessageError:
        return
    native, pure = sign_both(signer, pure_signer, raw)
    assert native == pure
    assert verify_all(native, dnsfunc) == [True, True]


# `both_keys` and the DNS server are read-only here, so sharing them between examples is safe.
@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    name=st.text(max_size=300),
    email=st.one_of(st.emails(), st.text(max_size=30)),
    subject=st.text(max_size=300),
    message=st.text(max_size=3000),
    metadata=st.dictionaries(st.text(max_size=30), st.text(max_size=200), max_size=3),
)
def test_any_built_message_signs_and_verifies(
    signer: Signer,
    both_keys: Settings,
    dnsfunc: DnsFunc,
    name: str,
    email: str,
    subject: str,
    message: str,
    metadata: dict[str, str],
) -> None:
    try:
        raw = build_message(
            Submission(name, email, subject, message, metadata), both_keys, now=NOW
        ).raw
    except MessageError:
        return
    assert verify_all(signer.sign(raw), dnsfunc) == [True, True]


# --- the seam into dkimpy -------------------------------------------------------------------


def test_dkimpy_seam_is_unchanged(signer: Signer) -> None:
    """Fails loudly when a dkimpy release moves what relay.signing hooks (see its docstring).

    If this fails: re-read dkim/__init__.py, adapt _OpenSSLDKIM, and move the pin in
    pyproject.toml.
    """
    from importlib.metadata import version

    assert Version("1.1.6") <= Version(version("dkimpy")) < Version("1.2")
    gen_header = inspect.getsource(dkim.DomainSigner.gen_header)
    assert "if self.signature_algorithm == b'rsa-sha256'" in gen_header
    assert "elif self.signature_algorithm == b'ed25519-sha256':" in gen_header
    assert "sigobj = pk.sign(h.digest())" in gen_header
    assert "sig2 = sigobj.signature" in gen_header
    assert "h = HashThrough(self.hasher()" in gen_header
    sign = inspect.getsource(dkim.DKIM.sign)
    assert "self.hasher = HASH_ALGORITHMS[self.signature_algorithm]" in sign
    assert "self.gen_header(sigfields, include_headers, canon_policy," in sign
    assert sign.index("(b'a', self.signature_algorithm)") < sign.index("self.gen_header(")
    assert signer.native is True
    # _OpenSSLDKIM.sign mirrors this exact dkimpy sign(); a new one needs a fresh read and a
    # new digest in relay.signing.DKIMPY_SIGN_SOURCES (until then dkimpy's sign() runs).
    assert sign_override_applies() is True


def test_native_signer_never_parses_the_pem_in_python(
    monkeypatch: pytest.MonkeyPatch, both_keys: Settings, dnsfunc: DnsFunc
) -> None:
    """The saving of _OpenSSLDKIM.sign: dkimpy's ASN.1 reader is not run per message."""
    native = Signer.from_settings(both_keys)

    def parse(*args: object) -> object:
        raise AssertionError("dkimpy parsed the PEM")

    monkeypatch.setattr(dkim, "parse_pem_private_key", parse)
    assert verify_all(native.sign(built(both_keys)), dnsfunc) == [True, True]


def test_changed_dkimpy_sign_runs_dkimpys_own_and_stays_identical(
    monkeypatch: pytest.MonkeyPatch,
    signer: Signer,
    pure_signer: Signer,
    both_keys: Settings,
    dnsfunc: DnsFunc,
) -> None:
    """A dkimpy whose sign() is not the mirrored text: its own sign() (with the PEM parse)
    runs, the RSA operation still in OpenSSL, and the output does not change."""
    monkeypatch.setattr("relay.mail.signing.DKIMPY_SIGN_SOURCES", frozenset())
    sign_override_applies.cache_clear()
    raw = built(both_keys)

    def python_rsa(*args: object) -> bytes:
        raise AssertionError("dkimpy's pure-Python RSA was called")

    try:
        assert sign_override_applies() is False
        with monkeypatch.context() as patched:
            patched.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", python_rsa)
            native = signer.sign(raw)
        pure = pure_signer.sign(raw)
        if timestamps(native) != timestamps(pure):  # a second boundary in between: once more
            with monkeypatch.context() as patched:
                patched.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", python_rsa)
                native = signer.sign(raw)
    finally:
        sign_override_applies.cache_clear()
    assert native == pure
    assert verify_all(native, dnsfunc) == [True, True]


def test_native_signer_never_runs_dkimpys_python_rsa(
    monkeypatch: pytest.MonkeyPatch, both_keys: Settings, dnsfunc: DnsFunc
) -> None:
    native, pure = Signer.from_settings(both_keys), Signer.from_settings(both_keys, native=False)

    def python_rsa(*args: object) -> bytes:
        raise AssertionError("dkimpy's pure-Python RSA was called")

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", python_rsa)
    raw = built(both_keys)
    assert verify_all(native.sign(raw), dnsfunc) == [True, True]
    with pytest.raises(AssertionError, match="pure-Python RSA"):
        pure.sign(raw)


def test_broken_seam_falls_back_to_pure_dkimpy(
    monkeypatch: pytest.MonkeyPatch,
    both_keys: Settings,
    dnsfunc: DnsFunc,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dkimpy whose gen_header no longer calls pk.sign(digest): sign slowly, never wrongly."""
    original = dkim.DomainSigner.gen_header

    def changed(self: dkim.DomainSigner, fields, include, canon, name, pk, standardize=False):  # type: ignore[no-untyped-def]
        if self.signature_algorithm == b"ed25519-sha256" and not hasattr(pk, "verify_key"):
            pk = None  # a dkimpy that signs ed25519 some other way
        return original(self, fields, include, canon, name, pk, standardize)

    monkeypatch.setattr(dkim.DomainSigner, "gen_header", changed)
    with caplog.at_level(logging.WARNING, logger="relay.signing"):
        signer = Signer.from_settings(both_keys)
    assert signer.native is False
    assert any("signing.native_unavailable" in r.getMessage() for r in caplog.records)
    assert verify_all(signer.sign(built(both_keys)), dnsfunc) == [True, True]


# --- DNS records ----------------------------------------------------------------------------


def test_txt_records_for_rsa_and_ed25519(rsa_key_file: Path, ed25519_key_file: Path) -> None:
    rsa_pem, ed_pem = rsa_key_file.read_bytes(), ed25519_key_file.read_bytes()
    assert dkim_txt_record(rsa_pem) == f"v=DKIM1; k=rsa; p={public_key_b64(rsa_pem)}"
    assert dkim_txt_record(rsa_pem, "rsa") == dkim_txt_record(rsa_pem)
    ed = dkim_txt_record(ed_pem)
    assert ed == f"v=DKIM1; k=ed25519; p={public_key_b64(ed_pem)}"
    assert len(base64.b64decode(ed.rpartition("p=")[2])) == 32
    public = serialization.load_pem_private_key(rsa_pem, password=None).public_key()
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert dkim_txt_record(public_pem) == dkim_txt_record(rsa_pem)
    assert dkim_txt_record(rsa_pem.replace(b"\n", b"\r\n")) == dkim_txt_record(rsa_pem)
    with pytest.raises(SigningError):
        dkim_txt_record(ed_pem, key_type="rsa")
    with pytest.raises(SigningError):
        dkim_txt_record(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")


def test_published_record_is_what_the_world_serves(rsa_key_file: Path, dnsfunc: DnsFunc) -> None:
    assert dnsfunc(b"s1._domainkey.relay.test.") == dkim_txt_record(
        rsa_key_file.read_bytes()
    ).encode("ascii")


def test_split_txt() -> None:
    record = "v=DKIM1; k=rsa; p=" + "A" * 392
    parts = split_txt(record)
    assert len(parts) == 2
    assert all(len(part) <= 255 for part in parts)
    assert "".join(parts) == record
    assert split_txt("short") == ["short"]
    assert split_txt("") == [""]
    assert split_txt("x" * 510) == ["x" * 255, "x" * 255]
