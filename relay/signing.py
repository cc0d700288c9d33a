"""DKIM signatures (RFC 6376, RFC 8463) with dkimpy, the RSA operation done by OpenSSL.

dkimpy builds, canonicalises, hashes and folds; only the RSA private-key operation moves to
OpenSSL (through `cryptography`), because dkimpy does it with Python integers (~10 ms per
message). PKCS#1 v1.5 is deterministic, so the signature is byte-identical to dkimpy's own.

The seam: `DomainSigner.gen_header` ends with ``sig2 = pk.sign(h.digest()).signature`` when
the algorithm is ed25519-sha256 (and with dkimpy's pure-Python RSA otherwise). `_OpenSSLDKIM`
runs an rsa-sha256 signature through that branch, with `pk` an OpenSSL-backed RSA signer;
the a= tag and the hash were fixed before, so nothing else changes. The dkimpy range is
pinned in pyproject.toml; every native Signer proves the seam at start with a probe that
dkimpy must verify, and falls back to pure dkimpy (logged) if it does not.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from relay.config import Settings, normalise_pem
from relay.errors import SigningError
from relay.logs import event

log = logging.getLogger("relay.signing")

RSA_SHA256 = b"rsa-sha256"
ED25519_SHA256 = b"ed25519-sha256"
CANONICALIZE = (b"relaxed", b"relaxed")
# Every header build_message writes (see relay.message.HEADER_SET) ...
SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
)
# ... and these once more, so that a copy added in transit breaks the signature (RFC 6376
# §8.15): a second From, Subject or Reply-To is how a signed message gets repurposed.
OVERSIGNED: tuple[str, ...] = ("from", "reply-to", "subject")
INCLUDE_HEADERS: tuple[str, ...] = SIGNED_HEADERS + OVERSIGNED

TXT_CHUNK = 255  # RFC 1035 §3.3: one character-string is at most 255 octets

_PROBE = (
    b"From: probe@probe.invalid\r\nTo: probe@probe.invalid\r\nSubject: probe\r\n"
    b"\r\nThe native RSA path must produce what dkimpy verifies.\r\n"
)


class _OpenSSLSignature:
    """What dkimpy's ed25519 branch reads: `.signature`."""

    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class _OpenSSLRSA:
    """An RSA key with the `.sign(digest)` shape of nacl's SigningKey, signing via OpenSSL."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> _OpenSSLSignature:
        signature = self._key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return _OpenSSLSignature(signature)


class _OpenSSLDKIM(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkim.DKIM whose rsa-sha256 private-key operation runs in OpenSSL (see module doc)."""

    signature_algorithm: bytes

    def __init__(self, message: bytes, *, native_key: rsa.RSAPrivateKey) -> None:
        super().__init__(message, linesep=b"\r\n")
        self._native = _OpenSSLRSA(native_key)

    def gen_header(  # noqa: PLR0917 - dkimpy's signature, called positionally
        self,
        fields: Any,
        include_headers: Any,
        canon_policy: Any,
        header_name: Any,
        pk: Any,
        standardize: bool = False,
    ) -> Any:
        if self.signature_algorithm != RSA_SHA256:
            return super().gen_header(
                fields, include_headers, canon_policy, header_name, pk, standardize
            )
        self.signature_algorithm = ED25519_SHA256
        try:
            return super().gen_header(
                fields, include_headers, canon_policy, header_name, self._native, standardize
            )
        finally:
            self.signature_algorithm = RSA_SHA256


@dataclass(frozen=True)
class _Key:
    selector: bytes
    algorithm: bytes
    dkimpy_key: bytes  # PKCS#1 PEM for RSA, base64 seed for Ed25519: what dkimpy parses
    rsa_key: rsa.RSAPrivateKey | None = None


def _load_private(pem: bytes) -> Any:
    try:
        return serialization.load_pem_private_key(normalise_pem(pem), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"not an unencrypted PEM private key: {exc}") from exc


def _rsa_key(selector: str, pem: bytes) -> _Key:
    key = _load_private(pem)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningError("the DKIM key is not an RSA key")
    # dkimpy reads PKCS#1 with LF line ends; re-serialising fixes CRLF and PKCS#8 input.
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return _Key(selector.encode("ascii"), RSA_SHA256, pkcs1, key)


def _ed25519_key(selector: str, pem: bytes) -> _Key:
    key = _load_private(pem)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError("the DKIM Ed25519 key is not an Ed25519 key")
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return _Key(selector.encode("ascii"), ED25519_SHA256, base64.b64encode(seed))


class Signer:
    """Signs with the RSA key, and also with an Ed25519 key when one is configured.

    `native=False` keeps dkimpy's own pure-Python RSA: the reference the tests compare with.
    """

    def __init__(
        self,
        domain: str,
        selector: str,
        rsa_pem: bytes,
        *,
        ed25519_selector: str | None = None,
        ed25519_pem: bytes | None = None,
        native: bool = True,
    ) -> None:
        self.domain = domain.lower().encode("ascii")
        self.keys = [_rsa_key(selector, rsa_pem)]
        if ed25519_selector and ed25519_pem:
            self.keys.append(_ed25519_key(ed25519_selector, ed25519_pem))
        self.native = native and self._native_works()

    @classmethod
    def from_settings(cls, settings: Settings, *, native: bool = True) -> Signer:
        return cls(
            settings.signing_domain,
            settings.dkim_selector,
            settings.dkim_key_pem,
            ed25519_selector=settings.dkim_ed25519_selector,
            ed25519_pem=settings.dkim_ed25519_key_pem,
            native=native,
        )

    def _dkim(self, raw: bytes, key: _Key, *, native: bool) -> Any:
        if native and key.rsa_key is not None:
            return _OpenSSLDKIM(raw, native_key=key.rsa_key)
        return dkim.DKIM(raw, linesep=b"\r\n")

    def _signature(self, raw: bytes, key: _Key, *, native: bool) -> bytes:
        try:
            header: bytes = self._dkim(raw, key, native=native).sign(
                key.selector,
                self.domain,
                key.dkimpy_key,
                signature_algorithm=key.algorithm,
                canonicalize=CANONICALIZE,
                include_headers=[h.encode("ascii") for h in INCLUDE_HEADERS],
            )
        except (dkim.DKIMException, ValueError) as exc:
            raise SigningError(f"DKIM signing failed ({key.algorithm.decode()}): {exc}") from exc
        return header

    def sign(self, raw: bytes) -> bytes:
        """The DKIM-Signature header(s), RSA first, followed by `raw` unchanged."""
        headers = [self._signature(raw, key, native=self.native) for key in self.keys]
        return b"".join(headers) + raw

    def _native_works(self) -> bool:
        """Sign a probe through the seam and let dkimpy verify it against our public key."""
        key = self.keys[0]
        assert key.rsa_key is not None
        record = dkim_txt_record(
            key.rsa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).encode("ascii")

        def own_key(name: bytes, timeout: int = 5) -> bytes:
            return record

        reason = "probe signature did not verify"
        try:
            signed = self._signature(_PROBE, key, native=True) + _PROBE
            if dkim.verify(signed, dnsfunc=own_key):
                return True
        except (SigningError, dkim.DKIMException, AttributeError, TypeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        event(
            log,
            "signing.native_unavailable",
            logging.WARNING,
            dkimpy=getattr(dkim, "__version__", "?"),
            reason=reason,
        )
        return False


def dkim_txt_record(public_key_pem_or_private: bytes, key_type: str | None = None) -> str:
    """The DKIM key record for a PEM key (private or public): "v=DKIM1; k=rsa; p=..."

    RSA publishes the SubjectPublicKeyInfo (RFC 6376 §3.6.1), Ed25519 the raw 32-byte public
    key (RFC 8463 §4). `key_type` ("rsa"/"ed25519"), when given, must match the key.
    """
    pem = normalise_pem(public_key_pem_or_private)
    if b"PRIVATE KEY" in pem:
        public = _load_private(pem).public_key()
    else:
        try:
            public = serialization.load_pem_public_key(pem)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise SigningError(f"not a PEM key: {exc}") from exc
    if isinstance(public, rsa.RSAPublicKey):
        kind = "rsa"
        data = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif isinstance(public, ed25519.Ed25519PublicKey):
        kind = "ed25519"
        data = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raise SigningError("DKIM keys are RSA or Ed25519")
    if key_type is not None and key_type.lower() != kind:
        raise SigningError(f"expected a {key_type} key, got {kind}")
    return f"v=DKIM1; k={kind}; p={base64.b64encode(data).decode('ascii')}"


def split_txt(value: str) -> list[str]:
    """Cut a TXT value into character-strings of at most 255 characters (RFC 1035 §3.3)."""
    return [value[i : i + TXT_CHUNK] for i in range(0, len(value), TXT_CHUNK)] or [""]
