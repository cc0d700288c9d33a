"""sign: the cost of one DKIM signature, ours against raw OpenSSL and pure dkimpy.

Each case signs the same ~1.5 kB message over and over. The cases take turns in short
slices (round robin, several rounds), so a burst of load from other processes hits them all
alike, and each reports its best slice in microseconds per message (the mean is kept too).
The raw case is what cannot be avoided: one RSA-2048 PKCS#1 v1.5 signature over SHA-256
through OpenSSL (the cryptography package), the floor for any RSA DKIM signer.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from bench.world import Keys
from relay.mail.signing import Signer
from relay.settings import Settings

SIGNED_HEADERS = [b"from", b"to", b"reply-to", b"subject", b"date", b"message-id"]
ROUNDS = 5


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


Case = tuple[Callable[[], object], Callable[[], contextlib.AbstractContextManager[None]]]


def cases(keys: Keys, raw: bytes, settings: Settings) -> dict[str, Case]:
    rsa_key = serialization.load_pem_private_key(keys.rsa_pem, password=None)
    ed_key = serialization.load_pem_private_key(keys.ed_pem, password=None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)
    # What a DKIM signer hands to RSA: the canonical signed headers, about this long.
    to_sign = raw.split(b"\r\n\r\n", 1)[0][:600]
    ed_b64 = base64.b64encode(
        ed_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    rsa_only = settings.model_copy(
        update={
            "dkim_ed25519_selector": None,
            "dkim_ed25519_key_file": None,
            "dkim_ed25519_key_pem": None,
        }
    )
    ours = Signer.from_settings(rsa_only)
    both = Signer.from_settings(settings)
    pure = Signer.from_settings(rsa_only, native=False)

    def dkimpy(selector: bytes, key: bytes, algorithm: bytes) -> object:
        return dkim.sign(
            raw,
            selector,
            b"relay.test",
            key,
            signature_algorithm=algorithm,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=SIGNED_HEADERS,
        )

    return {
        "openssl_rsa2048_raw": (
            lambda: rsa_key.sign(to_sign, padding.PKCS1v15(), hashes.SHA256()),
            _nothing,
        ),
        "openssl_ed25519_raw": (lambda: ed_key.sign(to_sign), _nothing),
        "dkimpy_rsa2048": (lambda: dkimpy(b"s1", keys.rsa_pem, b"rsa-sha256"), _nothing),
        "dkimpy_ed25519": (lambda: dkimpy(b"e1", ed_b64, b"ed25519-sha256"), _nothing),
        "ours_rsa2048": (lambda: ours.sign(raw), _nothing),
        "ours_rsa2048_ed25519": (lambda: both.sign(raw), _nothing),
        "ours_rsa2048_pure_dkimpy": (lambda: pure.sign(raw), _nothing),
    }


def run(keys: Keys, raw: bytes, settings: Settings, *, seconds: float) -> dict[str, Any]:
    """`seconds` per case in all, split into ROUNDS slices taken in turn."""
    table = cases(keys, raw, settings)
    slices: dict[str, list[tuple[int, float]]] = {name: [] for name in table}
    for fn, context in table.values():
        with context():
            fn()  # warm-up: first-call caches, key loading
    for _ in range(ROUNDS):
        for name, (fn, context) in table.items():
            with context():
                count = 0
                started = time.perf_counter()
                deadline = started + seconds / ROUNDS
                while True:
                    fn()
                    count += 1
                    now = time.perf_counter()
                    if now >= deadline:
                        break
            slices[name].append((count, now - started))
    results: dict[str, Any] = {}
    for name, taken in slices.items():
        best = min(elapsed / count for count, elapsed in taken)
        total_count = sum(count for count, _ in taken)
        total_time = sum(elapsed for _, elapsed in taken)
        results[name] = {
            "us_per_message": round(best * 1e6, 1),
            "per_second": round(1 / best),
            "mean_us_per_message": round(total_time / total_count * 1e6, 1),
        }
    return results
