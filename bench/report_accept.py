"""The Markdown of the accept section (with its essential targets), the spam burst and the
py-spy profiles; pure functions of the results dict, as bench/report.py."""

from __future__ import annotations

from typing import Any

from bench.figures import fmt, refused_beyond_essential

ACCEPT_TARGETS = ("bare", "essential_sqlite", "sqlite", "essential_postgres", "postgres")
# Frames every sampled stack holds: they say nothing about where the time goes.
_EVERYWHERE = ("threading.py", "concurrent/futures/thread.py", "gunicorn/")


def _counts(mapping: dict[str, Any] | None) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted((mapping or {}).items())) or "-"


def accept_markdown(results: dict[str, Any], r: dict[str, float | None]) -> list[str]:
    accept = results.get("accept") or {}
    if not accept:
        return []
    lines = [
        "",
        "## accept: POST /form under gunicorn (wrk on loopback)",
        "",
        "essential_<store> is bench/essential_app.py: siteverify, one MX query and one committed "
        "insert of a string-built message, nothing else, on the same stand-ins and store.",
        "",
        "| target | clients | req/s | p50 ms | p99 ms | CPU ms/req | vs essential | vs bare "
        "| worker restarts | statuses | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target in ACCEPT_TARGETS:
        section = accept.get(target)
        if section is None:
            continue
        if "error" in section:
            lines.append(f"| {target} | | | | | | | | | {section['error']} | |")
        for run in section.get("runs", []):
            clients = run["clients"]
            vs_essential: float | None
            vs_bare: float | None
            if target == "bare":
                vs_essential, vs_bare = None, 1.0
            elif target.startswith("essential_"):
                store = target.removeprefix("essential_")
                vs_essential = 1.0
                vs_bare = r.get(f"accept_essential_{store}_{clients}_vs_bare")
            else:
                vs_essential = r.get(f"accept_{target}_{clients}_vs_essential")
                vs_bare = r.get(f"accept_{target}_{clients}_vs_bare")
            errors = " ".join(f"{k}:{v}" for k, v in run.get("errors", {}).items()) or "-"
            lines.append(
                f"| {target} | {clients} | {fmt(run['rps'])} | {run['p50_ms']} "
                f"| {run['p99_ms']} | {fmt(run.get('server_cpu_ms_per_request'))} "
                f"| {fmt(vs_essential)} | {fmt(vs_bare)} | {fmt(run.get('worker_restarts'))} "
                f"| {_counts(run['statuses'])} | {errors} |"
            )
    lines += [
        "",
        "CPU ms/req: the gunicorn workers' CPU (user + system, recycled workers included) over "
        "the run, per request. A worker recycled after max_requests (deploy/gunicorn.conf.py: "
        "never with the one worker of memory:// limits; 2,000 + jitter before issue 18) "
        "charges its successor's boot to the run it happened in (worker restarts)"
        + (
            "; this run had recycling off (--no-recycle)."
            if (results.get("meta") or {}).get("accept_no_recycle")
            else "."
        ),
    ]
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
    return lines + burst_markdown(results)


def burst_markdown(results: dict[str, Any]) -> list[str]:
    accept = results.get("accept") or {}
    rows = [
        (target, accept[target]["burst"])
        for target in ACCEPT_TARGETS
        if isinstance(accept.get(target), dict) and "burst" in accept[target]
    ]
    if not rows:
        return []
    lines = [
        "",
        f"## spam burst: bad CAPTCHA tokens at {rows[0][1].get('clients')} clients while "
        f"{rows[0][1].get('real', {}).get('clients')} clients post real submissions",
        "",
        "| target | bad posts | statuses | posts/s | CPU ms/refused post | beyond essential "
        "| real accepted/sent | real p50 ms | real p99 ms | worker restarts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target, burst in rows:
        real = burst.get("real", {})
        beyond = (
            None if target.startswith("essential_") else refused_beyond_essential(results, target)
        )
        lines.append(
            f"| {target} | {fmt(burst.get('posts'))} | {_counts(burst.get('statuses'))} "
            f"| {fmt(burst.get('posts_per_second'))} "
            f"| {fmt(burst.get('refused_cpu_ms_per_post'))} | {fmt(beyond)} "
            f"| {real.get('accepted')}/{real.get('requests')} | {real.get('p50_ms')} "
            f"| {real.get('p99_ms')} | {fmt(burst.get('worker_restarts'))} |"
        )
    used = ", ".join(
        f"{target} {burst.get('cpu_ms_per_accepted_used')} ms "
        f"({burst.get('cpu_ms_per_accepted_from_clients')} clients)"
        for target, burst in rows
    )
    lines += [
        "",
        "Bad posts and statuses are the server's (gunicorn's access log): wrk stops each thread "
        "after its share, with its last posts still in flight. CPU per refused post = the "
        "workers' CPU over the burst, less the real submissions' share (their count x the CPU "
        "per accepted submission of the accept run, from the busiest run without a worker "
        f"restart: {used}), divided by the bad posts. Beyond essential = the relay's figure "
        "less essential_<store>'s (its refusal: read the form, one siteverify POST, 400).",
    ]
    return lines


def profile_markdown(profiles: dict[str, Any], top: int = 12) -> list[str]:
    if not profiles:
        return []
    lines = ["", "## profiles (py-spy, share of the samples whose stack holds the frame)"]
    for name, summary in profiles.items():
        lines += ["", f"### {name}: {fmt(summary.get('samples', 0))} samples", ""]
        if not summary.get("samples"):
            lines.append("no samples")
            continue
        frames = [
            (frame, share)
            for frame, share in (summary.get("inclusive_percent") or {}).items()
            if not any(mark in frame for mark in _EVERYWHERE)
        ][:top]
        leaves = list((summary.get("leaf_percent") or {}).items())[:6]
        lines += ["| frame (inclusive) | % |", "|---|---|"]
        lines += [f"| `{frame}` | {share} |" for frame, share in frames]
        lines += ["", "| leaf frame | % |", "|---|---|"]
        lines += [f"| `{frame}` | {share} |" for frame, share in leaves]
    return lines


__all__ = ["accept_markdown", "burst_markdown", "profile_markdown"]
