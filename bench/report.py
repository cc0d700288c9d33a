"""Pure functions from the results dict to the goals and the Markdown report."""

from __future__ import annotations

from typing import Any

GOALS = (
    ("accept", "accept at 32 clients >= 0.5 x bare Flask (req/s)", 0.5, ">="),
    ("e2e", "end to end >= 2.0 x Postfix+OpenDKIM (messages/s)", 2.0, ">="),
    ("sign", "our RSA-2048 signing <= 1.5 x raw OpenSSL (time per message)", 1.5, "<="),
)


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _run_at(section: dict[str, Any] | None, clients: int) -> dict[str, Any] | None:
    for run in (section or {}).get("runs", []):
        if run.get("clients") == clients:
            return dict(run)
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Every ratio the report prints, computed from the raw figures."""
    out: dict[str, float | None] = {}
    accept = results.get("accept") or {}
    bare = accept.get("bare")
    for store in ("sqlite", "postgres"):
        for clients in (1, 8, 32):
            ours, base = _run_at(accept.get(store), clients), _run_at(bare, clients)
            out[f"accept_{store}_{clients}_vs_bare"] = ratio(
                ours and ours["rps"], base and base["rps"]
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


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    r = ratios(results)
    actual = {
        "accept": min(
            (
                v
                for k, v in r.items()
                if k in ("accept_sqlite_32_vs_bare", "accept_postgres_32_vs_bare") and v is not None
            ),
            default=None,
        ),
        "e2e": r["e2e_relay_vs_postfix_opendkim"],
        "sign": r["sign_ours_rsa2048_vs_openssl"],
    }
    out = []
    for key, text, target, op in GOALS:
        value = actual[key]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"goal": text, "target": target, "actual": value, "met": met})
    return out


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}{unit}"
    if isinstance(value, float):
        return f"{value:,.3g}{unit}" if abs(value) < 10 else f"{value:,.0f}{unit}"
    return f"{value}{unit}"


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
            f"| {goal['goal']} | {goal['target']} | {_fmt(goal['actual'])} x "
            f"| {_verdict(goal['met'])} |"
        )
    accept = results.get("accept") or {}
    if accept:
        lines += [
            "",
            "## accept: POST /form under gunicorn (wrk on loopback)",
            "",
            "| target | clients | req/s | p50 ms | p99 ms | vs bare | statuses | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for target in ("bare", "sqlite", "postgres"):
            section = accept.get(target) or {}
            if "error" in section:
                lines.append(f"| {target} | | | | | | {section['error']} | |")
            for run in section.get("runs", []):
                vs = r.get(f"accept_{target}_{run['clients']}_vs_bare") if target != "bare" else 1.0
                statuses = " ".join(f"{k}:{v}" for k, v in sorted(run["statuses"].items()))
                errors = " ".join(f"{k}:{v}" for k, v in run.get("errors", {}).items()) or "-"
                lines.append(
                    f"| {target} | {run['clients']} | {_fmt(run['rps'])} | {run['p50_ms']} "
                    f"| {run['p99_ms']} | {_fmt(vs)} | {statuses} | {errors} |"
                )
        stand_ins = {
            target: section["peers_cpu_ms_per_accepted"]
            for target, section in accept.items()
            if isinstance(section, dict) and "peers_cpu_ms_per_accepted" in section
        }
        if stand_ins:
            lines += [
                "",
                "CPU of the siteverify and DNS stand-ins per accepted submission: "
                + ", ".join(f"{t} {v} ms" for t, v in stand_ins.items())
                + ".",
            ]
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
    lines += ["", "## ratios", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in r.items() if value is not None]
    return "\n".join(lines) + "\n"
