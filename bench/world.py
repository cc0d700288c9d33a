"""The benchmark's world: DKIM keys, the DNS zone, the relay's environment, sample messages.

It is the test suite's world (relay.sandbox.world: relay.test sends, support.test's MX is
mx1.support.test = 127.0.0.2), so every figure is measured against the same loopback peers
the tests use. Nothing here reaches a non-loopback address.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bench.util import ROOT, python, stop_process
from relay.mail.message import BuiltMessage, Submission, build_message
from relay.sandbox.world import MX_IP, relay_environment, world_zone
from relay.settings import Settings

# Where the reference's resolver finds the zone on port 53: a loopback address of its own per
# run (all of 127.0.0.0/8 is local on Linux), so two runs never collide.
PORT53_HOST = f"127.53.{secrets.randbelow(254) + 1}.{secrets.randbelow(254) + 1}"
MESSAGE_SIZE = 1500


@dataclass(frozen=True)
class Keys:
    rsa_file: Path
    ed_file: Path

    @property
    def rsa_pem(self) -> bytes:
        return self.rsa_file.read_bytes()

    @property
    def ed_pem(self) -> bytes:
        return self.ed_file.read_bytes()


def make_keys(directory: Path) -> Keys:
    directory.mkdir(parents=True, exist_ok=True)
    pems = {
        "dkim-rsa.pem": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "dkim-ed25519.pem": ed25519.Ed25519PrivateKey.generate(),
    }
    for name, key in pems.items():
        path = directory / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
    return Keys(directory / "dkim-rsa.pem", directory / "dkim-ed25519.pem")


def zone_text(keys: Keys) -> str:
    return world_zone(keys.rsa_pem, keys.ed_pem)


def relay_env(
    keys: Keys,
    *,
    dns: str,
    siteverify: str,
    smtp_port: int,
    database_url: str,
    instance: Path,
    base: dict[str, str],
) -> dict[str, str]:
    """A complete RELAY_ environment for gunicorn and `relay worker` in the bench world."""
    return {
        **base,
        **relay_environment(dkim_key_file=keys.rsa_file, instance_path=instance),
        "RELAY_DNS_NAMESERVERS": dns,
        "RELAY_DNS_TIMEOUT": "5",
        "RELAY_SMTP_PORT": str(smtp_port),
        "RELAY_SMTP_TLS": "may",
        "RELAY_DATABASE_URL": database_url,
        "RELAY_SECRET_KEY": "bench-secret-key-" + "x" * 32,
        "RELAY_HCAPTCHA_VERIFY_URL": siteverify,
        # The bench is one client sending thousands of posts a minute.
        "RELAY_RATE_LIMIT": "10000000/minute",
        "RELAY_RATE_LIMIT_GLOBAL": "10000000/minute",
        "RELAY_RATE_LIMIT_STORAGE": "memory://",
        "RELAY_LOG_LEVEL": "INFO",  # as deployed: one line per delivery
        "RELAY_RETRY_INITIAL": "5",
        "RELAY_RETRY_MAX": "30",
    }


def form_fields(index: int, run: str) -> dict[str, str]:
    return {
        "name": f"Visitor {index}",
        "email": f"visitor{index}@visitor.test",
        "subject": f"Order {index} has not arrived",
        "message": _body_text(index, 900),
        "h-captcha-response": f"pass-{run}-{index}",
    }


def _body_text(index: int, size: int) -> str:
    sentence = (
        f"Hello, this is visitor {index}. My order has not arrived yet and the tracking page "
        "shows no update since last week. Could you please look into it? "
    )
    text = (sentence * (size // len(sentence) + 1))[:size]
    return "\n".join(text[i : i + 72] for i in range(0, len(text), 72))


def submission(index: int, text: str) -> Submission:
    fields = form_fields(index, "msg")
    return Submission(
        name=fields["name"],
        email=fields["email"],
        subject=fields["subject"],
        message=text,
        metadata={"page": "https://www.relay.test/contact", "client_ip": "192.0.2.7"},
    )


def fit_body(settings: Settings) -> str:
    """Message text whose built message comes out at about MESSAGE_SIZE bytes."""
    size = 1000
    for _ in range(4):
        raw = build_message(submission(0, _body_text(0, size)), settings).raw
        size = max(100, size + MESSAGE_SIZE - len(raw))
    return _body_text(0, size)


def build_messages(n: int, settings: Settings) -> list[BuiltMessage]:
    """N distinct messages (own Message-ID, visitor, subject) of about MESSAGE_SIZE bytes."""
    text = fit_body(settings)
    return [build_message(submission(index, text), settings) for index in range(n)]


@dataclass
class Peers:
    dns: str
    siteverify: str
    proc: subprocess.Popen[str]


@contextlib.contextmanager
def peers(zone_file: Path, *, port53: bool = False) -> Iterator[Peers]:
    """The DNS server and siteverify stub in their own process (see bench/peers.py)."""
    argv = [python(), "-m", "bench.peers", str(zone_file)]
    if port53:
        argv += ["--dns-port53", PORT53_HOST]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("bench.peers did not start (see stderr above)")
        info = json.loads(line)
        yield Peers(info["dns"], info["siteverify"], proc)
    finally:
        stop_process(proc)  # type: ignore[arg-type]


__all__ = ["MX_IP", "Keys", "Peers", "build_messages", "make_keys", "peers", "relay_env"]
