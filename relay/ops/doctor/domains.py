"""Domain names as DMARC reads them: the organisational domain and identifier alignment."""

from __future__ import annotations

# Second-level labels under which ccTLDs register names (example.co.uk): enough to find the
# organisational domain without shipping the public-suffix list.
_SECOND_LEVEL = frozenset(
    {"ac", "co", "com", "edu", "go", "gob", "gov", "ltd", "mil", "ne", "net", "nom", "or", "org"}
)


def organisational_domain(name: str) -> str:
    """The registered domain of `name` (mail.example.co.uk -> example.co.uk), by heuristic."""
    labels = name.rstrip(".").lower().split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def aligned(a: str, b: str, *, strict: bool = False) -> bool:
    """DMARC identifier alignment (RFC 7489 §3.1): strict is equality, relaxed the same
    organisational domain."""
    a, b = a.rstrip(".").lower(), b.rstrip(".").lower()
    if strict:
        return a == b
    return organisational_domain(a) == organisational_domain(b)
