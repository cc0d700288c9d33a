"""Hostile input: a fixed corpus of known attacks and hypothesis strategies around it.

Each case is a set of form fields to overlay on a valid submission. The promise under test is
the same for all of them: a clear 4xx, or an accepted message that is delivered with exactly
our header set, only to the support address, with a DKIM signature that verifies.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from hypothesis import strategies as st

EVIL = "x@evil.test"

VALID = {
    "name": "Ada Visitor",
    "email": "ada@visitor.test",
    "subject": "Order 1234 has not arrived",
    "message": "Hello,\nmy order has not arrived yet.\nThanks, Ada",
}

# Fragments that try to end a header line and start another one, or to smuggle an SMTP
# end-of-data; every one is tried in every text field.
INJECTIONS: dict[str, str] = {
    "crlf": f"hi\r\nBcc: {EVIL}",
    "lf": f"hi\nBcc: {EVIL}",
    "cr": f"hi\rBcc: {EVIL}",
    "crlf-fold": f"hi\r\n Bcc: {EVIL}",
    "crlfcrlf-body": "hi\r\n\r\nInjected body",
    "nel": f"hi\x85Bcc: {EVIL}",
    "line-separator": f"hi\u2028Bcc: {EVIL}",
    "paragraph-separator": f"hi\u2029Bcc: {EVIL}",
    "vt-ff": f"hi\x0b\x0cBcc: {EVIL}",
    "encoded-word-q": "=?utf-8?q?hi=0D=0ABcc:_x@evil.test?=",
    "encoded-word-b": "=?utf-8?b?"
    + base64.b64encode(f"hi\r\nBcc: {EVIL}".encode()).decode()
    + "?=",
    "encoded-word-latin1": "=?iso-8859-1?q?hi=0ABcc=3A_x=40evil.test?=",
    "nul": "hi\x00Bcc: x@evil.test",
    "bidi-override": "hi \u202egnp.exe\u202c done",
    "bidi-isolates": "\u2066hi\u2069 \u2067evil\u2069",
    "zero-width": "h\u200bi\u200c\u200d\ufeff there",
    "smtp-smuggle-lf": f"hi\n.\nMAIL FROM:<{EVIL}>\n",
    "smtp-smuggle-crlf": f"hi\r\n.\r\nMAIL FROM:<{EVIL}>\r\nRCPT TO:<{EVIL}>\r\n",
    "smtp-smuggle-bare-lf-dot-crlf": f"hi\n.\r\nRCPT TO:<{EVIL}>\r\n",
    "smtp-smuggle-cr-dot-cr": f"hi\r.\rRCPT TO:<{EVIL}>\r",
    "lone-dot": "line one\r\n.\r\nline three",
    "dot-first": ".\r\nstarts with a dot",
    "double-dot": "..\r\n..hidden",
    "mime-boundary": '--boundary\r\nContent-Type: text/html\r\n\r\n<script>alert("x")</script>',
    "header-lookalike": "Content-Type: text/html; charset=utf-8",
    "html": '<img src=x onerror="alert(1)"><a href="javascript:alert(1)">x</a>',
    "long-word": "A" * 1200,
    "c1-controls": "hi\x80\x9b[31m\x9c",
    "ansi-escape": "hi\x1b[2J\x1b]0;pwned\x07",
}

# Addresses that older parsers split differently from newer ones (CVE-2023-27043), lists,
# and addresses that carry a header on their back.
ADDRESSES: dict[str, str] = {
    "quoted-local-with-at": '"a@evil.test"@visitor.test',
    "display-name-address": "x@visitor.test <y@evil.test>",
    "quoted-display-name-address": '"x@visitor.test" <y@evil.test>',
    "double-at": "a@b@c",
    "double-at-test": "a@evil.test@visitor.test",
    "comma-list": "a@visitor.test, b@visitor.test",
    "semicolon-list": "a@visitor.test; b@visitor.test",
    "group-syntax": "undisclosed:a@visitor.test,b@evil.test;",
    "angle-only": "<a@visitor.test>",
    "named": "Alice <a@visitor.test>",
    "comment": "a@visitor.test (b@evil.test)",
    "crlf-bcc": f"a@visitor.test\r\nBcc: {EVIL}",
    "lf-bcc": f"a@visitor.test\nBcc: {EVIL}",
    "nul": "a@evil.test\x00@visitor.test",
    "encoded-word-local": "=?utf-8?q?a=40evil.test?=@visitor.test",
    "domain-literal": "a@[127.0.0.1]",
    "route": "@evil.test:a@visitor.test",
    "long-local": "a" * 300 + "@visitor.test",
    "utf8-local": "用户@visitor.test",
    "idn-domain": "user@例え.test",
    "utf8-and-idn": "用户@例え.test",
    "zero-width": "a\u200b@visitor.test",
    "bidi": "a\u202e@visitor.test",
    "trailing-dot": "a@visitor.test.",
    "spaces": " a @ visitor.test ",
    "null-mx-domain": "a@nullmx.test",
    "nonexistent-domain": "a@does-not-exist.test",
}

# Form fields a visitor might add hoping to choose the recipient.
RECIPIENT_FIELDS = ("to", "cc", "bcc", "recipient", "support_address", "RELAY_SUPPORT_ADDRESS")


@dataclass(frozen=True)
class Case:
    label: str
    fields: dict[str, str] = field(default_factory=dict)
    raw_fields: dict[str, bytes] = field(default_factory=dict)  # sent as raw bytes

    def form(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(base or VALID), **self.fields}


def corpus() -> list[Case]:
    cases: list[Case] = []
    for field_name in ("name", "email", "subject", "message"):
        for label, value in INJECTIONS.items():
            if field_name == "email":
                cases.append(Case(f"email-{label}", {"email": f"{value}@visitor.test"}))
                cases.append(Case(f"email-after-{label}", {"email": "ada@visitor.test" + value}))
            else:
                cases.append(Case(f"{field_name}-{label}", {field_name: value}))
    cases.extend(Case(f"address-{label}", {"email": value}) for label, value in ADDRESSES.items())
    cases.append(Case("recipient-fields", dict.fromkeys(RECIPIENT_FIELDS, EVIL)))
    cases.append(
        Case("recipient-fields-list", dict.fromkeys(("to", "cc"), f"{EVIL}, help@support.test"))
    )
    cases.append(Case("name-spoofs-address", {"name": 'Evil" <evil@evil.test>'}))
    cases.append(Case("name-is-support", {"name": "help@support.test"}))
    cases.append(Case("name-encoded-address", {"name": "=?utf-8?q?=3Cx=40evil.test=3E?="}))
    cases.append(Case("subject-5000", {"subject": "S" * 5000}))
    cases.append(Case("subject-5000-words", {"subject": "word " * 1000}))
    cases.append(Case("name-5000", {"name": "N" * 5000}))
    cases.append(Case("message-2mb", {"message": ("0123456789abcdef" * 64 + "\n") * 2000}))
    cases.append(Case("message-only-dots", {"message": ".\n.\n.\r\n.\r.\n"}))
    cases.append(Case("message-cr-only", {"message": "a\rb\rc"}))
    cases.append(Case("empty-everything", dict.fromkeys(VALID, "")))
    cases.append(Case("whitespace-only", dict.fromkeys(VALID, " \t\r\n ")))
    cases.append(Case("invalid-utf8-message", raw_fields={"message": b"hi \xff\xfe\xc3\x28 there"}))
    cases.append(Case("invalid-utf8-subject", raw_fields={"subject": b"\xed\xa0\x80 surrogate"}))
    cases.append(Case("invalid-utf8-name", raw_fields={"name": b"\xc0\xafroot"}))
    cases.append(Case("invalid-utf8-email", raw_fields={"email": b"\xff@visitor.test"}))
    cases.append(Case("overlong-utf8-newline", raw_fields={"subject": b"hi\xc0\x8aBcc: x"}))
    cases.append(Case("emoji-and-rtl", {"subject": "שלום 👋🏽 مرحبا", "name": "Zoë Ŝ 李"}))
    cases.append(Case("combining-flood", {"subject": "e" + "\u0301" * 2000}))
    return cases


# --- hypothesis strategies -------------------------------------------------------------------

# Characters that break headers, protocols or rendering, over-represented on purpose.
NASTY_CHARS = '\r\n\x00\x0b\x0c\x1b\x7f\x85\u2028\u2029\u202e\u200b\ufeff\ud7ff:<>@",;=?.'

nasty_text = st.text(
    alphabet=st.one_of(
        st.sampled_from(NASTY_CHARS),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=120,
)

fragment = st.sampled_from(sorted(INJECTIONS.values()))

hostile_text = st.one_of(
    nasty_text,
    fragment,
    st.builds(lambda a, b, c: a + b + c, nasty_text, fragment, nasty_text),
)

local_part = st.one_of(
    st.from_regex(r"[a-z0-9._+-]{1,20}", fullmatch=True),
    st.text(alphabet=st.sampled_from('a\r\n"@<>, .\x00\u200b=?'), min_size=1, max_size=12),
)
hostile_email = st.one_of(
    st.sampled_from(sorted(ADDRESSES.values())),
    st.builds(lambda local: f"{local}@visitor.test", local_part),
    st.builds(lambda a, b: a + b, st.sampled_from(["ada@visitor.test", ""]), hostile_text),
)

hostile_form = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just(VALID["name"]), hostile_text),
        "email": st.one_of(st.just(VALID["email"]), hostile_email),
        "subject": st.one_of(st.just(VALID["subject"]), hostile_text),
        "message": st.one_of(st.just(VALID["message"]), hostile_text),
    },
    optional={name: st.just(EVIL) for name in RECIPIENT_FIELDS[:3]},
)
