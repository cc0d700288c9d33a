"""Pure functions from the results dict to the goals and the Markdown report."""

from __future__ import annotations

from typing import Any

from bench.figures import fmt as _fmt
from bench.figures import get as _get
from bench.figures import ratio, refused_beyond_essential
from bench.figures import run_at as _run_at
from bench.report_accept import accept_markdown, profile_markdown

# (key, text, target, comparison, unit)
GOALS = (
    (
        "accept",
        "accept at 32 clients >= 0.7 x essential (req/s), SQLite and PostgreSQL",
        0.7,
        ">=",
        " x",
    ),
    ("cpu", "web CPU per accepted submission <= 3 ms (32 clients, worst store)", 3.0, "<=", " ms"),
    (
        "refused",
        "refused (bad CAPTCHA) post <= 1 ms of our own CPU beyond the essential refusal",
        1.0,
        "<=",
        " ms",
    ),
    ("burst", "real submissions during a spam burst: p99 < 1 s", 1000.0, "<", " ms"),
    ("e2e", "end to end >= 2.0 x Postfix+OpenDKIM (messages/s)", 2.0, ">=", " x"),
    ("sign", "our RSA-2048 signing <= 1.5 x raw OpenSSL (time per message)", 1.5, "<=", " x"),
)
STORES = ("sqlite", "postgres")
CLIENTS = (1, 8, 32)


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Every ratio the report prints, computed from the raw figures."""
    out: dict[str, float | None] = {}
    accept = results.get("accept") or {}
    bare = accept.get("bare")
    for store in STORES:
        essential = accept.get(f"essential_{store}")
        for clients in CLIENTS:
            ours, base = _run_at(accept.get(store), clients), _run_at(bare, clients)
            floor = _run_at(essential, clients)
            out[f"accept_{store}_{clients}_vs_bare"] = ratio(
                ours and ours["rps"], base and base["rps"]
            )
            out[f"accept_{store}_{clients}_vs_essential"] = ratio(
                ours and ours["rps"], floor and floor["rps"]
            )
            out[f"accept_essential_{store}_{clients}_vs_bare"] = ratio(
                floor and floor["rps"], base and base["rps"]
            )
    relay = _get(results, "e2e", "relay", "messages_per_second")
    reference = _get(results, "e2e", "postfix_opendkim", "messages_per_second")
    out["e2e_relay_vs_postfix_opendkim"] = ratio(relay, reference)
    out["e2e_relay_vs_postfix_unsigned"] = ratio(
        relay, _get(results, "e2e", "postfix", "messages_per_second")
    )
    out["e2e_postfix_opendkim_vs_unsigned"] = ratio(
        reference, _get(results, "e2e", "postfix", "messages_per_second")
    )
    out["drain_relay_vs_postfix_opendkim"] = ratio(
        _get(results, "drain", "relay", "messages_per_second"),
        _get(results, "drain", "postfix_opendkim", "messages_per_second"),
    )
    raw = _get(results, "sign", "openssl_rsa2048_raw", "us_per_message")
    for case in (
        "ours_rsa2048",
        "ours_rsa2048_ed25519",
        "ours_rsa2048_pure_dkimpy",
        "dkimpy_rsa2048",
    ):
        out[f"sign_{case}_vs_openssl"] = ratio(_get(results, "sign", case, "us_per_message"), raw)
    return out


def _worst(values: list[Any], worst: Any) -> Any:
    present = [v for v in values if v is not None]
    return worst(present) if present else None


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    r = ratios(results)
    accept = results.get("accept") or {}
    actual = {
        "accept": _worst([r.get(f"accept_{s}_32_vs_essential") for s in STORES], min),
        "cpu": _worst(
            [(_run_at(accept.get(s), 32) or {}).get("server_cpu_ms_per_request") for s in STORES],
            max,
        ),
        "refused": _worst([refused_beyond_essential(results, s) for s in STORES], max),
        "burst": _worst(
            [_get(results, "accept", s, "burst", "real", "p99_ms") for s in STORES], max
        ),
        "e2e": r["e2e_relay_vs_postfix_opendkim"],
        "sign": r["sign_ours_rsa2048_vs_openssl"],
    }
    compare = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b,
    }
    out = []
    for key, text, target, op, unit in GOALS:
        value = actual[key]
        met = None if value is None else compare[op](value, target)
        out.append({"goal": text, "target": target, "actual": value, "unit": unit, "met": met})
    return out


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    r = ratios(results)
    lines = [
        f"# formrelay benchmark ({'quick' if meta.get('quick') else 'full'})"
        + (f" — what-if {meta['what_if']}, not the shipped code" if meta.get("what_if") else ""),
        "",
        f"{meta.get('date', '')} · {meta.get('cpus', '?')} CPUs · commit "
        f"{meta.get('commit', '?')} · N = {meta.get('n', '?')} messages of "
        f"{meta.get('message_bytes', '?')} bytes",
        "",
        "## Goals",
        "",
        "| goal | target | actual | verdict |",
        "|---|---|---|---|",
    ]
    for goal in goals(results):
        lines.append(
            f"| {goal['goal']} | {_fmt(goal['target'])}{goal['unit']} "
            f"| {_fmt(goal['actual'])}{goal['unit'] if goal['actual'] is not None else ''} "
            f"| {_verdict(goal['met'])} |"
        )
    lines += accept_markdown(results, r)
    for section, title in (
        ("e2e", "end to end: accept while delivering"),
        ("drain", "drain: N already queued"),
    ):
        data = results.get(section) or {}
        if not data:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| sender | messages | seconds | messages/s | notes |",
            "|---|---|---|---|---|",
        ]
        for name, row in data.items():
            if "error" in row:
                lines.append(f"| {name} | | | | {row['error']} |")
                continue
            lines.append(
                f"| {name} | {row.get('messages')} | {_fmt(row.get('seconds'))} "
                f"| {_fmt(row.get('messages_per_second'))} | {row.get('notes', '')} |"
            )
    sign = results.get("sign") or {}
    if sign:
        raw = _get(results, "sign", "openssl_rsa2048_raw", "us_per_message")
        lines += [
            "",
            "## sign: one DKIM signature of a 1.5 kB message",
            "",
            "| signer | µs/message | messages/s | vs raw OpenSSL RSA |",
            "|---|---|---|---|",
        ]
        for name, row in sign.items():
            if "error" in row:
                lines.append(f"| {name} | | | {row['error']} |")
                continue
            lines.append(
                f"| {name} | {_fmt(row['us_per_message'])} | {_fmt(row['per_second'])} "
                f"| {_fmt(ratio(row['us_per_message'], raw))} |"
            )
    memory = results.get("memory") or {}
    if memory:
        lines += ["", "## memory: peak RSS (VmHWM)", "", "| process | MB |", "|---|---|"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in memory.items()]
    lines += profile_markdown(results.get("profile") or {})
    lines += ["", "## ratios", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in r.items() if value is not None]
    return "\n".join(lines) + "\n"
