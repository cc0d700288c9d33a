"""A burst of spam: N posts with bad CAPTCHA tokens at 64 clients while real visitors post.

Run on the warm server right after the accept runs (accept.measure's `after`). The spam is one
wrk (bench/wrk_post.lua with BENCH_STOP_AFTER: each of its threads stops after its share of N
answers, then we SIGINT it), every post with a fresh "fail-..." token, which the siteverify
stand-in refuses ("invalid-input-response"); the real submissions are a second wrk of a few
clients with fresh "pass-..." tokens, running from the burst's start to its end.

What the server handled is counted from gunicorn's access log (by User-Agent), not from what
wrk saw answered: a thread that stops leaves its last posts in flight, and the server still
spends its CPU on them. The CPU per refused post is the workers' CPU over the burst, less the
real submissions' share (their count x the CPU per accepted submission of the busiest accept
run that no worker recycling disturbed), divided by the bad posts handled.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import accept
from bench.util import children

SPAM_AGENT = "bench-spam"
REAL_AGENT = "bench-real"
_ACCESS = re.compile(r'"[A-Z]+ [^"]*" (\d{3}) .*"([^"]*)"\s*$')


def access_counts(log: Path) -> dict[str, Counter[str]]:
    """Statuses in gunicorn's access log (default format), by User-Agent."""
    counts: dict[str, Counter[str]] = {}
    if not log.exists():
        return counts
    for line in log.read_text(errors="replace").splitlines():
        match = _ACCESS.search(line)
        if match:
            counts.setdefault(match.group(2), Counter())[match.group(1)] += 1
    return counts


def _delta(after: Counter[str] | None, before: Counter[str] | None) -> dict[str, int]:
    diff = Counter(after or {})
    diff.subtract(before or {})
    return {status: n for status, n in sorted(diff.items()) if n}


def _finish(proc: subprocess.Popen[str], clients: int) -> dict[str, Any]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # wrk prints its summary (and done()'s line) on SIGINT
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return accept.wrk_result(stdout, stderr, clients)


def run(
    base: str,
    master_pid: int,
    *,
    access_log: Path,
    path: str,
    run_id: str,
    headers: str,
    cpu_ms_per_accepted: float | None,
    posts: int = 2000,
    clients: int = 64,
    real_clients: int = 4,
    limit: float = 300.0,
) -> dict[str, Any]:
    """The burst against the server at `base`; its figures (see the module's docstring)."""
    spam_body = accept.body_template(run_id + "s").replace(f"pass-{run_id}s-", f"fail-{run_id}s-")
    real_body = accept.body_template(run_id + "r")
    extra = f"|{headers}" if headers else ""
    threads = 2
    before = access_counts(access_log)
    workers = set(children(master_pid))
    booted = len(workers)
    with tempfile.TemporaryDirectory(prefix="burst-") as done_dir:
        spam_argv, spam_env = accept.wrk_command(
            base + path,
            clients=clients,
            seconds=limit,
            body=spam_body,
            headers=f"User-Agent:{SPAM_AGENT}{extra}",
            threads=threads,
            extra_env={"BENCH_STOP_AFTER": str(posts), "BENCH_DONE_DIR": done_dir},
        )
        real_argv, real_env = accept.wrk_command(
            base + path,
            clients=real_clients,
            seconds=limit,
            body=real_body,
            headers=f"User-Agent:{REAL_AGENT}{extra}",
            threads=1,
        )
        cpu = accept.server_cpu_seconds(master_pid)
        started = time.monotonic()
        real = subprocess.Popen(real_argv, env=real_env, stdout=subprocess.PIPE, text=True)
        spam = subprocess.Popen(spam_argv, env=spam_env, stdout=subprocess.PIPE, text=True)
        try:
            while spam.poll() is None and time.monotonic() - started < limit:
                if len(list(Path(done_dir).glob("done.*"))) >= threads:
                    break
                workers.update(children(master_pid))
                time.sleep(0.05)
            spam_seconds = time.monotonic() - started
            spam_run = _finish(spam, clients)
            real_run = _finish(real, real_clients)
        finally:
            for proc in (spam, real):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    time.sleep(0.5)  # the posts left in flight when wrk stopped
    cpu = accept.server_cpu_seconds(master_pid) - cpu
    workers.update(children(master_pid))
    after = access_counts(access_log)
    spam_statuses = _delta(after.get(SPAM_AGENT), before.get(SPAM_AGENT))
    real_statuses = _delta(after.get(REAL_AGENT), before.get(REAL_AGENT))
    handled = sum(spam_statuses.values())
    real_handled = sum(real_statuses.values())
    real_accepted = sum(n for status, n in real_statuses.items() if status.startswith("3"))
    real_share = real_handled * (cpu_ms_per_accepted or 0.0) / 1000
    return {
        "posts": handled,
        "clients": clients,
        "seconds": round(spam_seconds, 2),
        "posts_per_second": round(handled / spam_seconds, 1) if spam_seconds else None,
        "statuses": spam_statuses,
        # What wrk saw answered (its "status" error counts every 4xx: not shown).
        "wrk": {
            **{k: spam_run[k] for k in ("requests", "statuses", "p50_ms", "p99_ms")},
            "errors": {k: v for k, v in spam_run["errors"].items() if k != "status"},
        },
        "server_cpu_seconds": round(cpu, 3),
        "cpu_ms_per_accepted_used": cpu_ms_per_accepted,
        "real_cpu_seconds_subtracted": round(real_share, 3),
        "refused_cpu_ms_per_post": (
            round((cpu - real_share) / handled * 1000, 3) if handled else None
        ),
        "worker_restarts": len(workers) - booted,  # recycled after max_requests
        "real": {
            "clients": real_clients,
            "requests": real_handled,
            "accepted": real_accepted,
            "statuses": real_statuses,
            "rps": real_run["rps"],
            "p50_ms": real_run["p50_ms"],
            "p99_ms": real_run["p99_ms"],
            "errors": real_run["errors"],
        },
    }
