"""Files sent with a message: multipart/mixed, one base64 part each (pure: no I/O).

A file name comes from the visitor, so it is made harmless before use: only its last path
part is kept, control, bidi and zero-width characters are removed, and it is cut to
FILENAME_MAX characters (its extension kept). It goes on the wire as RFC 2231 parameters
(`filename*=utf-8''...`, split into `filename*0*`, `filename*1*`... when long) unless it is
plain ASCII: non-ASCII names survive every hop, and no name can carry a quote, a CR/LF or an
RFC 2047 encoded word into a header. `verify_parts` parses the finished message back and
insists on exactly the parts, headers, names, types and bytes we meant.
"""

from __future__ import annotations

import base64
import email.policy
import quopri
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesParser
from urllib.parse import quote

from relay.errors import HeaderInjectionError, MessageError

FILENAME_MAX = 100
_B64_LINE = 76
_PARAM_CHUNK = 54
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()+-]*$")
_MIME_TYPE = re.compile(r"^[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*$")
_DROP = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
TEXT_HEADERS = ("Content-Type", "Content-Transfer-Encoding")
FILE_HEADERS = ("Content-Type", "Content-Disposition", "Content-Transfer-Encoding")
TEXT_TYPE = 'text/plain; charset="utf-8"'
CHARSET_PREFIX = "utf-8''"


@dataclass(frozen=True)
class Attachment:
    """A file to send: its (already safe) name, its MIME type decided from its bytes, and
    the bytes themselves."""

    filename: str
    content_type: str
    data: bytes


def safe_filename(raw: str, fallback: str = "attachment") -> str:
    """The visitor's file name, made harmless: last path part, no control, bidi or
    zero-width character, no leading dots, at most FILENAME_MAX characters."""
    name = unicodedata.normalize("NFC", raw).replace("\\", "/").rsplit("/", 1)[-1]
    name = _DROP.sub("", name)
    name = " ".join(name.split()).strip(" .")
    if len(name) > FILENAME_MAX:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot and stem else ""
        name = name[: FILENAME_MAX - len(ext) - (1 if ext else 0)].rstrip(" .")
        name = f"{name}.{ext}" if ext else name
    return name or fallback


def boundary() -> str:
    """A boundary no part can contain: "=_" never occurs in base64 or quoted-printable."""
    return f"=_formrelay_{secrets.token_hex(16)}"


def filename_params(name: str) -> str:
    """The Content-Disposition value: a quoted ASCII name, or RFC 2231 UTF-8 parameters,
    continued over lines of at most 78 characters."""
    if _PLAIN_NAME.match(name) and len(name) <= _PARAM_CHUNK:
        return f'attachment; filename="{name}"'
    encoded = quote(name.encode("utf-8"), safe="")
    if len(encoded) <= _PARAM_CHUNK:
        return f"attachment;\r\n filename*={CHARSET_PREFIX}{encoded}"
    chunks: list[str] = []
    rest = encoded
    while rest:
        cut = min(_PARAM_CHUNK, len(rest))
        while cut < len(rest) and "%" in rest[max(0, cut - 2) : cut]:
            cut -= 1  # never split a %XX escape
        chunks.append(rest[:cut])
        rest = rest[cut:]
    params = [
        f"filename*{n}*={'' if n else CHARSET_PREFIX}{chunk}" for n, chunk in enumerate(chunks)
    ]
    return "attachment;\r\n " + ";\r\n ".join(params)


def _base64_lines(data: bytes) -> str:
    text = base64.b64encode(data).decode("ascii")
    return "\r\n".join(text[i : i + _B64_LINE] for i in range(0, len(text), _B64_LINE))


def multipart_body(text_qp: str, files: Sequence[Attachment], mark: str) -> bytes:
    """The body of a multipart/mixed message: the text part (already quoted-printable, "\\n"
    line ends) and one base64 part per file, CRLF line ends, 7-bit."""
    out = [
        f"--{mark}\r\nContent-Type: {TEXT_TYPE}\r\nContent-Transfer-Encoding: quoted-printable"
        # The CRLF before a boundary belongs to it (RFC 2046 §5.1.1): one more keeps the
        # text's own last line end.
        f"\r\n\r\n{text_qp.replace(chr(10), chr(13) + chr(10))}\r\n"
    ]
    for item in files:
        if not _MIME_TYPE.match(item.content_type):
            raise MessageError(f"not a MIME type: {item.content_type!r}")
        if item.filename != safe_filename(item.filename):
            raise MessageError(f"file name not made safe: {item.filename!r}")
        out.append(
            f"--{mark}\r\nContent-Type: {item.content_type}\r\n"
            f"Content-Disposition: {filename_params(item.filename)}\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n{_base64_lines(item.data)}\r\n"
        )
    out.append(f"--{mark}--\r\n")
    return "".join(out).encode("ascii")


def _names(part: Message) -> list[str]:
    return [name for name, _ in part.raw_items()]


def verify_parts(raw: bytes, mark: str, text: str, files: Sequence[Attachment]) -> None:
    """Parse the whole message back: exactly the text part and one part per file, each with
    exactly its headers, type, name and bytes, and no defect anywhere; or an error."""
    parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
    if parsed.get_content_type() != "multipart/mixed" or parsed.get_boundary() != mark:
        raise HeaderInjectionError(["Content-Type: multipart/mixed"], [str(parsed["Content-Type"])])
    parts = list(parsed.iter_parts())
    if len(parts) != 1 + len(files) or parsed.defects or (parsed.preamble or "").strip():
        raise MessageError("the message does not parse back into the parts written")
    first = parts[0]
    if _names(first) != list(TEXT_HEADERS) or first.get_content_type() != "text/plain":
        raise HeaderInjectionError(list(TEXT_HEADERS), _names(first))
    payload = first.get_payload()
    content = quopri.decodestring(str(payload).encode("ascii")).decode("utf-8", "replace")
    if content.replace("\r\n", "\n") != text + "\n" or first.defects:
        raise MessageError("the text part does not decode back to what was written")
    for part, item in zip(parts[1:], files, strict=True):
        if _names(part) != list(FILE_HEADERS):
            raise HeaderInjectionError(list(FILE_HEADERS), _names(part))
        got = (part.get_content_type(), part.get_content_disposition(), part.get_filename())
        if got != (item.content_type, "attachment", item.filename) or part.defects:
            raise HeaderInjectionError(
                [f"{item.content_type} attachment {item.filename!r}"], [repr(got)]
            )
        if part.get_payload(decode=True) != item.data:
            raise MessageError(f"the file {item.filename!r} does not decode back to its bytes")
