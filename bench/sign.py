"""sign: the cost of one DKIM signature, ours against raw OpenSSL and pure dkimpy.

Each case signs the same ~1.5 kB message over and over for a fixed time (after a warm-up)
and reports microseconds per message: the best of five slices (the mean is kept too). The
raw case is what cannot be avoided: one RSA-2048 PKCS#1 v1.5 signature over SHA-256 through
OpenSSL (the cryptography package), the floor for any RSA DKIM signer.
"""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from bench.world import Keys
from relay.signing import Signer

SIGNED_HEADERS = [b"from", b"to", b"reply-to", b"subject", b"date", b"message-id"]


def _rate(fn: Callable[[], object], seconds: float, rounds: int = 5) -> dict[str, Any]:
    """Time per call: the best of `rounds` equal slices of `seconds` (the least disturbed by
    other processes on a shared machine), and the mean over all of them."""
    for _ in range(5):
        fn()
    slices: list[float] = []
    total_count = 0
    total_time = 0.0
    for _ in range(rounds):
        count = 0
        started = time.perf_counter()
        deadline = started + seconds / rounds
        while True:
            fn()
            count += 1
            now = time.perf_counter()
            if now >= deadline:
                break
        slices.append((now - started) / count)
        total_count += count
        total_time += now - started
    best = min(slices)
    return {
        "us_per_message": round(best * 1e6, 1),
        "per_second": round(1 / best),
        "mean_us_per_message": round(total_time / total_count * 1e6, 1),
    }


def run(keys: Keys, raw: bytes, settings: Any | None, *, seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rsa_key = serialization.load_pem_private_key(keys.rsa_pem, password=None)
    ed_key = serialization.load_pem_private_key(keys.ed_pem, password=None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert isinstance(ed_key, ed25519.Ed25519PrivateKey)
    # What a DKIM signer hands to RSA: the canonical signed headers, about this long.
    to_sign = raw.split(b"\r\n\r\n", 1)[0][:600]
    results["openssl_rsa2048_raw"] = _rate(
        lambda: rsa_key.sign(to_sign, padding.PKCS1v15(), hashes.SHA256()), seconds
    )
    results["openssl_ed25519_raw"] = _rate(lambda: ed_key.sign(to_sign), seconds)
    rsa_pem = keys.rsa_pem
    results["dkimpy_rsa2048"] = _rate(
        lambda: dkim.sign(
            raw,
            b"s1",
            b"relay.test",
            rsa_pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=SIGNED_HEADERS,
        ),
        seconds,
    )
    ed_raw_key = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    ed_b64 = base64.b64encode(ed_raw_key)
    results["dkimpy_ed25519"] = _rate(
        lambda: dkim.sign(
            raw,
            b"e1",
            b"relay.test",
            ed_b64,
            signature_algorithm=b"ed25519-sha256",
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=SIGNED_HEADERS,
        ),
        seconds,
    )
    results.update(_ours(settings, raw, seconds))
    return results


def _ours(settings: Any | None, raw: bytes, seconds: float) -> dict[str, Any]:
    """relay.signing.Signer with the RSA key only, with both keys, and native=False."""
    if settings is None:
        return {"ours": {"error": "no settings"}}
    out: dict[str, Any] = {}
    rsa_only = settings.model_copy(
        update={
            "dkim_ed25519_selector": None,
            "dkim_ed25519_key_file": None,
            "dkim_ed25519_key_pem": None,
        }
    )
    cases: dict[str, tuple[Any, dict[str, Any]]] = {
        "ours_rsa2048": (rsa_only, {}),
        "ours_rsa2048_ed25519": (settings, {}),
        "ours_rsa2048_pure_dkimpy": (rsa_only, {"native": False}),
    }
    for name, (cfg, kwargs) in cases.items():
        try:
            signer = Signer.from_settings(cfg, **kwargs)
        except TypeError as exc:  # no `native` keyword in this version of the signer
            out[name] = {"error": str(exc)}
            continue
        out[name] = _rate(lambda s=signer: s.sign(raw), seconds)
    out["whatif_ours_rsa2048_pem_parsed_once"] = _pem_parsed_once(rsa_only, raw, seconds)
    return out


def _pem_parsed_once(settings: Any, raw: bytes, seconds: float) -> dict[str, Any]:
    """A what-if, not the shipped signer: dkimpy's per-call PEM parse made free (cached), to
    size the fix proposed in docs/performance.md. dkim's module global is restored after."""
    original = dkim.parse_pem_private_key
    dkim.parse_pem_private_key = functools.lru_cache(maxsize=4)(original)
    try:
        signer = Signer.from_settings(settings)
        return _rate(lambda: signer.sign(raw), seconds)
    finally:
        dkim.parse_pem_private_key = original
