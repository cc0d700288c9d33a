"""Quoted-printable bodies (RFC 2045 §6.7) that survive every hop: 7-bit, lines of at most 76
characters, and no line a hop would rewrite (so DKIM's body hash still holds at the helpdesk).
Pure: text in, text out."""

from __future__ import annotations

# RFC 2045 §6.7: encoded lines are no more than 76 characters.
_LINE = 76
# Each byte as it goes into a quoted-printable line (white space unless it ends the line).
_TOKENS = tuple(
    chr(byte) if (33 <= byte <= 126 and byte != ord("=")) or byte in b" \t" else f"={byte:02X}"
    for byte in range(256)
)
_LINE_START = {".": "=2E", "F": "=46"}


def encode(text: str) -> str:
    """Quoted-printable (RFC 2045 §6.7) with "\\n" line ends, 7-bit, lines <= 76.

    Beyond the RFC, a "." or "F" that would start a physical line is encoded, so neither
    SMTP dot-stuffing nor mbox "From " quoting by a hop can change the body (and break DKIM).
    """
    out: list[str] = []
    for line in text.encode("utf-8").split(b"\n"):
        tokens = [_TOKENS[byte] for byte in line]
        if line and line[-1] in b" \t":  # trailing white space is encoded
            tokens[-1] = f"={line[-1]:02X}"
        whole = "".join(tokens)
        if len(whole) + 2 <= _LINE - 1:  # fits even with its first character encoded
            out.append(_LINE_START.get(whole[:1], whole[:1]) + whole[1:])
            continue
        current = ""
        for token in tokens:
            if len(current) + len(token) > _LINE - 1:
                out.append(current + "=")
                current = ""
            current += _LINE_START.get(token, token) if not current else token
        out.append(current)
    return "\n".join(out) + "\n"


__all__ = ["encode"]
