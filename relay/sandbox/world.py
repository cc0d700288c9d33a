"""The test world: who sends, who receives, at which loopback address, and its DNS zone.

relay.test sends from mail.relay.test (127.0.0.1); support.test's MX is mx1.support.test
(127.0.0.2), with mx2 at 127.0.0.3. The tests and the benchmark both run in this world, so a
figure in bench/results is measured against the peers the tests prove correct. Every name ends
in `.test` (RFC 2606) and every address is in 127.0.0.0/8: nothing here reaches the Internet.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relay.sandbox.captcha import TEST_SECRET
from relay.sandbox.dns import ptr_name, txt_record

FROM_DOMAIN = "relay.test"
SUPPORT_DOMAIN = "support.test"
SENDING_IP = "127.0.0.1"
MX_IP = "127.0.0.2"
MX2_IP = "127.0.0.3"
SITEKEY = "30000000-ffff-ffff-ffff-000000000003"


def public_key_b64(private_pem: bytes) -> str:
    """The `p=` of a DKIM record for a PEM private key (RSA: SubjectPublicKeyInfo DER;
    Ed25519: the raw 32 bytes, RFC 8463)."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def world_zone(rsa_pem: bytes, ed_pem: bytes | None = None) -> str:
    """A correct world: our sending domain with SPF/DKIM/DMARC/PTR, the support domain's MX."""
    lines = [
        f"{FROM_DOMAIN}. 300 IN MX 10 mail.{FROM_DOMAIN}.",
        f"mail.{FROM_DOMAIN}. 300 IN A {SENDING_IP}",
        txt_record(f"{FROM_DOMAIN}.", f"v=spf1 ip4:{SENDING_IP} -all"),
        txt_record(f"s1._domainkey.{FROM_DOMAIN}.", f"v=DKIM1; k=rsa; p={public_key_b64(rsa_pem)}"),
        txt_record(f"_dmarc.{FROM_DOMAIN}.", f"v=DMARC1; p=reject; rua=mailto:dmarc@{FROM_DOMAIN}"),
        f"{ptr_name(SENDING_IP)} 300 IN PTR mail.{FROM_DOMAIN}.",
        f"{SUPPORT_DOMAIN}. 300 IN MX 10 mx1.{SUPPORT_DOMAIN}.",
        f"mx1.{SUPPORT_DOMAIN}. 300 IN A {MX_IP}",
        f"mx2.{SUPPORT_DOMAIN}. 300 IN A {MX2_IP}",
        # Visitors' domains: the web tests' and the benchmark's form senders.
        "visitor.test. 300 IN MX 10 mx.visitor.test.",
        "mx.visitor.test. 300 IN A 127.0.0.9",
        "example.test. 300 IN A 127.0.0.10",
        "nullmx.test. 300 IN MX 0 .",
        'noaddress.test. 300 IN TXT "v=spf1 -all"',
    ]
    if ed_pem is not None:
        lines.append(
            txt_record(
                f"e1._domainkey.{FROM_DOMAIN}.", f"v=DKIM1; k=ed25519; p={public_key_b64(ed_pem)}"
            )
        )
    return "\n".join(lines) + "\n"


def relay_environment(*, dkim_key_file: Path, instance_path: Path) -> dict[str, str]:
    """The RELAY_ variables that put the relay in this world (addresses, DKIM selector s1,
    CAPTCHA keys for `SiteverifyStub`); the caller adds its peers' ports and its timeouts."""
    return {
        "RELAY_ENV": "test",
        "RELAY_SUPPORT_ADDRESS": f"help@{SUPPORT_DOMAIN}",
        "RELAY_FROM_ADDRESS": f"form@{FROM_DOMAIN}",
        "RELAY_FROM_NAME": "Example Shop",
        "RELAY_HELO_HOSTNAME": f"mail.{FROM_DOMAIN}",
        "RELAY_DKIM_SELECTOR": "s1",
        "RELAY_DKIM_PRIVATE_KEY_FILE": str(dkim_key_file),
        "RELAY_INSTANCE_PATH": str(instance_path),
        "RELAY_HCAPTCHA_SITEKEY": SITEKEY,
        "RELAY_HCAPTCHA_SECRET": TEST_SECRET,
        "RELAY_ALLOWED_ORIGINS": "http://localhost",
    }
