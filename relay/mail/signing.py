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

`DKIM.sign()` also parses the PKCS#1 PEM with dkimpy's pure-Python ASN.1 reader on every call
(half the cost of the RSA operation), only to hand the result to the branch we bypass.
`_OpenSSLDKIM.sign` is dkimpy's `sign()` for rsa-sha256 without that parse, statement for
statement; it is used only while dkimpy's own `sign()` is the text it mirrors (a digest of its
source, checked once), and dkimpy's `sign()` runs otherwise.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from relay.config import normalise_pem
from relay.errors import SigningError
from relay.logs import event
from relay.settings import Settings

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
_INCLUDE_BYTES = tuple(h.encode("ascii") for h in INCLUDE_HEADERS)

TXT_CHUNK = 255  # RFC 1035 §3.3: one character-string is at most 255 octets

_PROBE = (
    b"From: probe@probe.invalid\r\nTo: probe@probe.invalid\r\nSubject: probe\r\n"
    b"\r\nThe native RSA path must produce what dkimpy verifies.\r\n"
)


_PKCS1V15 = padding.PKCS1v15()
_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())


class _OpenSSLSignature:
    """What dkimpy's ed25519 branch reads: `.signature`."""

    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class _OpenSSLRSA:
    """An RSA key with the `.sign(digest)` shape of nacl's SigningKey, signing via OpenSSL."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key

    def sign(self, digest: bytes) -> _OpenSSLSignature:
        signature = self._key.sign(digest, _PKCS1V15, _PREHASHED_SHA256)
        return _OpenSSLSignature(signature)


# sha256 of inspect.getsource(dkim.DKIM.sign) in the dkimpy releases _OpenSSLDKIM.sign mirrors.
DKIMPY_SIGN_SOURCES = frozenset(
    {"427b6d31fef46a0404217d03c54c04f13a86735bb1f39c5b1f1b310ed3ef0f8b"}
)


@functools.cache
def sign_override_applies() -> bool:
    """Whether dkimpy's `DKIM.sign` is still the code `_OpenSSLDKIM.sign` mirrors."""
    try:
        source = inspect.getsource(dkim.DKIM.sign)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(source.encode("utf-8")).hexdigest() in DKIMPY_SIGN_SOURCES


class _OpenSSLDKIM(dkim.DKIM):  # type: ignore[misc]  # dkimpy has no type hints
    """dkim.DKIM whose rsa-sha256 private-key operation runs in OpenSSL (see module doc)."""

    signature_algorithm: bytes

    def __init__(self, message: bytes, *, native_key: rsa.RSAPrivateKey) -> None:
        super().__init__(message, linesep=b"\r\n")
        self._native = _OpenSSLRSA(native_key)

    def sign(  # noqa: PLR0917 - dkimpy's signature
        self,
        selector: bytes,
        domain: bytes,
        privkey: bytes,
        signature_algorithm: bytes | None = None,
        identity: bytes | None = None,
        canonicalize: tuple[bytes, bytes] = (b"relaxed", b"simple"),
        include_headers: Any = None,
        length: bool = False,
    ) -> bytes:
        """dkimpy 1.1's `DKIM.sign` for rsa-sha256, minus `parse_pem_private_key(privkey)`."""
        algorithm = signature_algorithm or self.signature_algorithm
        if algorithm != RSA_SHA256 or not sign_override_applies():
            result: bytes = super().sign(
                selector,
                domain,
                privkey,
                signature_algorithm,
                identity,
                canonicalize,
                include_headers,
                length,
            )
            return result
        self.signature_algorithm = algorithm
        if identity is not None and not identity.endswith(domain):
            raise dkim.ParameterError("identity must end with domain")
        canon_policy = dkim.CanonicalizationPolicy.from_c_value(b"/".join(canonicalize))
        if include_headers is None:
            include_headers = self.default_sign_headers()
        include_headers = tuple(
            (x.encode("utf-8") if isinstance(x, str) else x).lower() for x in include_headers
        )
        self.include_headers = include_headers
        if self.tlsrpt:
            length = False
        if b"from" not in include_headers:
            raise dkim.ParameterError("The From header field MUST be signed")
        for x in set(include_headers).intersection(self.should_not_sign):
            raise dkim.ParameterError(f"The {x!r} header field SHOULD NOT be signed")
        body = canon_policy.canonicalize_body(self.body)
        self.hasher = dkim.HASH_ALGORITHMS[self.signature_algorithm]
        bodyhash = base64.b64encode(self.hasher(body).digest())
        sigfields = [
            x
            for x in [
                (b"v", b"1"),
                (b"a", self.signature_algorithm),
                (b"c", canon_policy.to_c_value()),
                (b"d", domain),
                (b"i", identity or b"@" + domain),
                length and (b"l", str(len(body)).encode("ascii")),
                (b"q", b"dns/txt"),
                (b"s", selector),
                (b"t", str(int(time.time())).encode("ascii")),
                (b"h", b" : ".join(include_headers)),
                (b"bh", bodyhash),
                (b"b", b"0" * 60),  # dkimpy: forces b= onto its own line before folding
            ]
            if x
        ]
        res: bytes = self.gen_header(
            sigfields, include_headers, canon_policy, b"DKIM-Signature", None
        )
        self.domain = domain
        self.selector = selector
        self.signature_fields = dict(sigfields)
        return b"DKIM-Signature: " + res

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

    def _dkim(self, raw: bytes, *, native: bool) -> Any:
        """One parsed message for every signature: `sign()` leaves the message untouched."""
        rsa_key = self.keys[0].rsa_key
        if native and rsa_key is not None:
            return _OpenSSLDKIM(raw, native_key=rsa_key)
        return dkim.DKIM(raw, linesep=b"\r\n")

    def _signatures(self, raw: bytes, *, native: bool) -> list[bytes]:
        key = self.keys[0]
        try:
            parsed = self._dkim(raw, native=native)
            headers = []
            for key in self.keys:
                header: bytes = parsed.sign(
                    key.selector,
                    self.domain,
                    key.dkimpy_key,
                    signature_algorithm=key.algorithm,
                    canonicalize=CANONICALIZE,
                    include_headers=_INCLUDE_BYTES,
                )
                headers.append(header)
        except (dkim.DKIMException, ValueError) as exc:
            raise SigningError(f"DKIM signing failed ({key.algorithm.decode()}): {exc}") from exc
        return headers

    def sign(self, raw: bytes) -> bytes:
        """The DKIM-Signature header(s), RSA first, followed by `raw` unchanged."""
        return b"".join(self._signatures(raw, native=self.native)) + raw

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
            signed = self._signatures(_PROBE, native=True)[0] + _PROBE
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
