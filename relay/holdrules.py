"""Hold rules: the operator's own spam filter (RELAY_HOLD_RULES_FILE, TOML).

A submission a rule matches is stored as `held`: not sent, and the visitor sees the normal
success, so a bot learns nothing; the operator releases or discards it in the console. The
rules are read and checked once, at start, by relay.config (every problem named, like the
other settings); matching is a pure function of the submitted fields.

    blocked_addresses = ["seo@spam.example"]      # the visitor's address, any case
    blocked_domains = ["spam.example"]            # that domain and its subdomains
    max_links = 3                                 # more links than this in the message
    [words]                                       # whole words, any case, per field
    subject = ["casino"]
    [patterns]                                    # regular expressions (Python re), per field
    message = ['(?i)\\bseo\\s+services?\\b']
    [scripts]                                     # writing systems of the letters
    blocked = ["Cyrillic"]                        # any letter of these holds
    allowed = ["Latin", "Han", "Hiragana", "Katakana"]  # any letter of another holds
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIELDS = ("name", "email", "subject", "message")
SCRIPT_FIELDS = ("name", "subject", "message")
SCRIPTS = (
    "Latin",
    "Greek",
    "Cyrillic",
    "Armenian",
    "Hebrew",
    "Arabic",
    "Devanagari",
    "Bengali",
    "Tamil",
    "Thai",
    "Georgian",
    "Hangul",
    "Ethiopic",
    "Hiragana",
    "Katakana",
    "Han",
)
_KEYS = {"blocked_addresses", "blocked_domains", "max_links", "words", "patterns", "scripts"}
_LINK = re.compile(r"(?i)\b(?:https?://|www\.)")


@dataclass(frozen=True)
class HoldRules:
    blocked_addresses: frozenset[str] = frozenset()
    blocked_domains: tuple[str, ...] = ()
    max_links: int | None = None
    words: Mapping[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)
    patterns: Mapping[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)
    blocked_scripts: frozenset[str] = frozenset()
    allowed_scripts: frozenset[str] = frozenset()


def script_of(char: str) -> str | None:
    """The writing system of a letter (from its Unicode name), None for a non-letter."""
    if not char.isalpha():
        return None
    name = unicodedata.name(char, "")
    if "CJK" in name or "IDEOGRAPH" in name:
        return "Han"
    words = set(name.replace("-", " ").split())
    for script in SCRIPTS:
        if script.upper() in words:
            return script
    return "Other"


def held_by(rules: HoldRules, data: Mapping[str, str]) -> str | None:
    """The first rule `data` (the submitted fields) matches, as "rule: what", or None."""
    email = data.get("email", "").strip().lower()
    domain = email.rpartition("@")[2]
    if email in rules.blocked_addresses:
        return f"blocked_addresses: {email}"
    for blocked in rules.blocked_domains:
        if domain == blocked or domain.endswith("." + blocked):
            return f"blocked_domains: {blocked}"
    for kind, table in (("words", rules.words), ("patterns", rules.patterns)):
        for name, patterns in table.items():
            text = data.get(name, "")
            for pattern in patterns:
                if pattern.search(text):
                    what = pattern.pattern if kind == "patterns" else _word(pattern)
                    return f"{kind}.{name}: {what}"
    if rules.max_links is not None:
        links = len(_LINK.findall(data.get("message", "")))
        if links > rules.max_links:
            return f"max_links: {links} > {rules.max_links}"
    return _scripts(rules, data)


def _word(pattern: re.Pattern[str]) -> str:
    return pattern.pattern.removeprefix(r"(?<!\w)").removesuffix(r"(?!\w)").replace("\\", "")


def _scripts(rules: HoldRules, data: Mapping[str, str]) -> str | None:
    if not rules.blocked_scripts and not rules.allowed_scripts:
        return None
    for name in SCRIPT_FIELDS:
        for char in data.get(name, ""):
            script = script_of(char)
            if script is None:
                continue
            if script in rules.blocked_scripts:
                return f"scripts.blocked: {script} in {name}"
            if rules.allowed_scripts and script not in rules.allowed_scripts:
                return f"scripts.allowed: {script} in {name}"
    return None


# --- reading the file -------------------------------------------------------------------------


def load(path: Path, var: str = "RELAY_HOLD_RULES_FILE") -> tuple[HoldRules | None, list[str]]:
    """The rules in `path`, or None and every problem found, each naming `var` and the key."""
    where = f"{var}: {path}"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return None, [f"{where}: cannot read it: {exc.strerror or exc}"]
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return None, [f"{where}: not valid TOML ({exc})"]
    problems = [f"{where}: unknown key {key!r}" for key in sorted(set(document) - _KEYS)]
    rules = HoldRules(
        blocked_addresses=frozenset(
            a.strip().lower() for a in _strings(document, "blocked_addresses", where, problems)
        ),
        blocked_domains=tuple(
            d.strip().lower().strip(".")
            for d in _strings(document, "blocked_domains", where, problems)
        ),
        max_links=_max_links(document.get("max_links"), where, problems),
        words=_per_field(document, "words", where, problems, _word_pattern),
        patterns=_per_field(document, "patterns", where, problems, _regex),
        blocked_scripts=_script_set(document, "blocked", where, problems),
        allowed_scripts=_script_set(document, "allowed", where, problems),
    )
    return (None, problems) if problems else (rules, [])


def _strings(table: Mapping[str, Any], key: str, where: str, problems: list[str]) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(f"{where}: {key} must be a list of non-empty strings")
        return []
    return list(value)


def _max_links(value: Any, where: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"{where}: max_links must be a whole number, 0 or more")
        return None
    return value


def _word_pattern(word: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE)


def _regex(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _per_field(
    document: Mapping[str, Any], key: str, where: str, problems: list[str], make: Any
) -> dict[str, tuple[re.Pattern[str], ...]]:
    table = document.get(key, {})
    if not isinstance(table, dict):
        problems.append(f"{where}: [{key}] must be a table of field = [strings]")
        return {}
    found: dict[str, tuple[re.Pattern[str], ...]] = {}
    for name in table:
        if name not in FIELDS:
            problems.append(f"{where}: [{key}] {name!r} is no field (use {', '.join(FIELDS)})")
            continue
        compiled = []
        for text in _strings(table, name, f"{where}: [{key}]", problems):
            try:
                compiled.append(make(text))
            except re.error as exc:
                problems.append(f"{where}: [{key}] {name}: {text!r} is not a regex ({exc})")
        found[name] = tuple(compiled)
    return found


def _script_set(
    document: Mapping[str, Any], key: str, where: str, problems: list[str]
) -> frozenset[str]:
    table = document.get("scripts", {})
    if not isinstance(table, dict):
        if key == "blocked":
            problems.append(f"{where}: [scripts] must be a table")
        return frozenset()
    if key == "blocked":
        problems.extend(
            f"{where}: [scripts] unknown key {k!r}"
            for k in sorted(set(table) - {"blocked", "allowed"})
        )
    names = _strings(table, key, f"{where}: [scripts]", problems)
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        problems.append(
            f"{where}: [scripts] {key}: unknown {', '.join(unknown)} (known: {', '.join(SCRIPTS)})"
        )
    return frozenset(n for n in names if n in SCRIPTS)
