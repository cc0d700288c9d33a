"""New DKIM keys for `relay dkim keygen`: generated, written safely, described for DNS.

Runs before the operator has a configuration, so nothing here calls `load_settings()`: the
domain comes from the command line or from whichever RELAY_ variables already exist.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.settings import domain_of

KeyType = Literal["rsa", "ed25519"]
MIN_RSA_BITS = 2048  # RFC 8301 §3.2: signers MUST use at least 1024; receivers distrust < 2048
MAX_RSA_BITS = 4096  # RFC 8301 §3.2: verifiers need not handle more

_SELECTOR = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$", re.I)


def check_selector(selector: str) -> str | None:
    """Why `selector` cannot be a DKIM selector (DNS labels, RFC 6376 §3.1), or None."""
    if not _SELECTOR.match(selector):
        return f"{selector!r} is not a DNS label (letters, digits and hyphens, e.g. s2026)"
    return None


def check_bits(key_type: KeyType, bits: int | None) -> str | None:
    if key_type == "ed25519":
        return "--bits applies to RSA keys only" if bits is not None else None
    if bits is not None and bits < MIN_RSA_BITS:
        return f"RSA keys shorter than {MIN_RSA_BITS} bits are refused (got {bits})"
    if bits is not None and bits > MAX_RSA_BITS:
        return f"RSA keys longer than {MAX_RSA_BITS} bits may not verify everywhere (got {bits})"
    return None


def generate_private_key(key_type: KeyType, bits: int = MIN_RSA_BITS) -> bytes:
    """An unencrypted PKCS#8 PEM private key (what RELAY_DKIM_*_KEY_FILE reads)."""
    if key_type == "ed25519":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = ed25519.Ed25519PrivateKey.generate()
    else:
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, pem: bytes) -> None:
    """Create `path` with mode 0600 and write `pem`; FileExistsError if it exists.

    O_CREAT|O_EXCL: an existing key (perhaps the one published in DNS) is never replaced,
    and the file never exists with wider permissions, not even for a moment.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only narrow it; make it exact
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def domain_from_environment(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(domain, where it came from) from RELAY_DKIM_DOMAIN or RELAY_FROM_ADDRESS, if set."""
    if environ.get("RELAY_DKIM_DOMAIN"):
        return environ["RELAY_DKIM_DOMAIN"].strip().rstrip(".").lower(), "RELAY_DKIM_DOMAIN"
    address = environ.get("RELAY_FROM_ADDRESS", "")
    if "@" in address:
        return domain_of(address), "RELAY_FROM_ADDRESS"
    return None, ""


def settings_lines(
    key_type: KeyType, selector: str, path: Path, domain_var: str | None
) -> list[str]:
    """The RELAY_ variables that put the new key to use."""
    if key_type == "ed25519":
        lines = [
            f"RELAY_DKIM_ED25519_SELECTOR={selector}",
            f"RELAY_DKIM_ED25519_KEY_FILE={path}",
        ]
    else:
        lines = [f"RELAY_DKIM_SELECTOR={selector}", f"RELAY_DKIM_PRIVATE_KEY_FILE={path}"]
    if domain_var:
        lines.append(domain_var)
    return lines
