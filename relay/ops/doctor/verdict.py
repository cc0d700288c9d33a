"""One verdict, `Check`, and how a check's several findings become one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from relay.ops.doctor.lookup import Lookup

Status = Literal["PASS", "WARN", "FAIL"]
_RANK: dict[Status, int] = {"PASS": 0, "WARN": 1, "FAIL": 2}


@dataclass(frozen=True)
class Check:
    """One verdict: `fix` says what to change (empty on PASS); `details` is for --json."""

    name: str
    status: Status
    summary: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """One problem a check found; `combine` makes the check's verdict of them."""

    status: Status
    text: str
    fix: str = ""


def worst_status(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default="PASS")


def combine(name: str, findings: Sequence[Finding], ok: str, details: dict[str, Any]) -> Check:
    """One Check from several findings: the worst status, every problem, every distinct fix."""
    problems = [f for f in findings if f.status != "PASS"]
    if not problems:
        return Check(name, "PASS", ok, "", details)
    fixes: list[str] = []
    for f in problems:
        if f.fix and f.fix not in fixes:
            fixes.append(f.fix)
    return Check(
        name,
        worst_status(f.status for f in problems),
        "; ".join(f.text for f in problems),
        "\n".join(fixes),
        details,
    )


def lookup_failed(name: str, what: str, result: Lookup, details: dict[str, Any]) -> Check:
    """A WARN, not a FAIL: a lookup that failed for now says nothing about the record."""
    return Check(
        name,
        "WARN",
        f"could not look up {what}: {result.missing}",
        "check RELAY_DNS_NAMESERVERS (and the domain's nameservers), then run the doctor again",
        details,
    )
