"""accept: POST /form throughput and latency under gunicorn, as deployed.

The server is gunicorn with deploy/gunicorn.conf.py (gthread workers), the load generator is
`wrk` (C, a separate process, bounded by time) driving bench/wrk_post.lua, which POSTs a
unique form per request. The targets (bench/targets.py): bench/bare_app.py (a Flask endpoint
that does nothing), and per store bench/essential_app.py (only the necessary I/O) and the
relay, with SQLite or a fresh PostgreSQL database.
Every submission carries a fresh "pass-..." token for the siteverify stand-in, and the
visitor's domain is checked against the bench DNS server, so the whole accept path runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import pipeline, profile
from bench.util import (
    ROOT,
    PeakRSS,
    children,
    free_port,
    port_open,
    running,
    venv_tool,
    wait_until,
)
from bench.world import form_fields

WRK = shutil.which("wrk")
LUA = Path(__file__).with_name("wrk_post.lua")
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"


def available() -> str | None:
    return None if WRK else "wrk is missing (apt-get install wrk)"


def body_template(run: str) -> str:
    fields = form_fields(0, run)
    fields["name"] = "Visitor {i}"
    fields["email"] = "visitor{i}@visitor.test"
    fields["subject"] = "Order {i} has not arrived"
    fields["h-captcha-response"] = f"pass-{run}-{{i}}"
    return urllib.parse.urlencode(fields).replace("%7Bi%7D", "{i}")


@contextmanager
def gunicorn(
    app: str, env: dict[str, str], log: Path, extra: list[str] | None = None
) -> Iterator[tuple[str, Any]]:
    """gunicorn serving `app` (`extra` arguments override the conf file); yields (base URL,
    master process)."""
    port = free_port()
    env = {**env, "FORMRELAY_BIND": f"127.0.0.1:{port}", "FORMRELAY_GUNICORN_LOGLEVEL": "warning"}
    argv = [venv_tool("gunicorn")]
    if GUNICORN_CONF.exists():
        argv += ["--config", str(GUNICORN_CONF)]
    else:
        argv += [
            "--bind",
            env["FORMRELAY_BIND"],
            "--workers",
            "4",
            "--threads",
            "4",
            "--worker-class",
            "gthread",
        ]
    argv += [*(extra or []), "--access-logfile", str(log.with_suffix(".access")), app]
    with running(argv, env=env, log=log, cwd=ROOT) as proc:
        if not wait_until(lambda: port_open("127.0.0.1", port), 30):
            raise RuntimeError(f"gunicorn {app} did not listen; see {log}")
        yield f"http://127.0.0.1:{port}", proc


def wrk_command(
    url: str,
    *,
    clients: int,
    seconds: float,
    body: str,
    headers: str = "",
    threads: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of one wrk run of bench/wrk_post.lua."""
    assert WRK is not None
    threads = threads or min(2, clients)
    env = {
        **os.environ,
        "BENCH_BODY": body,
        "BENCH_PATH": urllib.parse.urlsplit(url).path,
        "BENCH_HEADERS": headers,
        "BENCH_THREADS": str(threads),
        **(extra_env or {}),
    }
    argv = [
        WRK,
        "-t",
        str(threads),
        "-c",
        str(clients),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    return argv, env


def wrk_result(stdout: str, stderr: str, clients: int) -> dict[str, Any]:
    """The figures of wrk_post.lua's BENCHJSON line."""
    for line in stdout.splitlines():
        if line.startswith("BENCHJSON "):
            data = json.loads(line[len("BENCHJSON ") :])
            seconds_run = data["duration_us"] / 1e6
            return {
                "clients": clients,
                "requests": data["requests"],
                "rps": round(data["requests"] / seconds_run, 1),
                "p50_ms": round(data["p50_us"] / 1000, 2),
                "p99_ms": round(data["p99_us"] / 1000, 2),
                "statuses": data["statuses"],
                "errors": {k: v for k, v in data["errors"].items() if v},
            }
    raise RuntimeError(f"wrk printed no result: {stdout}{stderr}")


def wrk(url: str, *, clients: int, seconds: float, body: str, headers: str = "") -> dict[str, Any]:
    argv, env = wrk_command(url, clients=clients, seconds=seconds, body=body, headers=headers)
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    return wrk_result(out.stdout, out.stderr, clients)


def warm_up(url: str, body: str, headers: str, limit: float = 30.0) -> int:
    """Until every worker has booted (imports, app, store) requests stall for seconds: post
    in 2-second rounds until the rate stops climbing. Returns the rounds it took."""
    deadline = time.monotonic() + limit
    previous = 0.0
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        run = wrk(
            url, clients=4, seconds=2, body=body.replace("{i}", f"{rounds}{{i}}"), headers=headers
        )
        if run["requests"] and not run["errors"] and run["rps"] <= previous * 1.2:
            break
        previous = run["rps"]
    return rounds


class Sampler:
    """Samples the VmHWM of gunicorn's workers every 0.25 s (workers are recycled)."""

    def __init__(self, master_pid: int) -> None:
        self.master_pid = master_pid
        self.peak = PeakRSS()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.peak.sample(children(self.master_pid))

    def workers_seen(self) -> set[int]:
        """Every worker pid seen so far, the live ones included."""
        self.peak.sample(children(self.master_pid))
        return set(self.peak.peak_kb)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak.sample(children(self.master_pid))
        self._stop.set()
        self._thread.join()


def server_cpu_seconds(master_pid: int) -> float:
    """CPU time of gunicorn's workers: the live ones, plus those the master has reaped
    (recycled after max_requests), which /proc counts in the master's cutime and cstime."""
    try:
        fields = Path(f"/proc/{master_pid}/stat").read_text().rpartition(")")[2].split()
        reaped = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        reaped = 0.0
    return reaped + sum(pipeline.cpu_seconds(pid) for pid in children(master_pid))


def measure(
    app: str,
    env: dict[str, str],
    log: Path,
    *,
    path: str,
    concurrencies: list[int],
    seconds: float,
    run: str,
    headers: str = "",
    profile_to: Path | None = None,
    warm_up_limit: float = 30.0,
    after: Callable[[str, int, dict[str, Any]], dict[str, Any]] | None = None,
    gunicorn_args: list[str] | None = None,
) -> dict[str, Any]:
    """Warm up, then one wrk run per concurrency; plus the workers' peak RSS. `after(base
    URL, master pid, results so far)` runs next on the same warm server (the spam burst);
    its dict goes to results["burst"].

    With `profile_to`, py-spy samples the master and its workers (--subprocesses) during the
    runs: gunicorn may recycle a worker after max_requests (FORMRELAY_MAX_REQUESTS), so a
    py-spy attached to the worker of the moment lost every later one (and with it the whole
    profile, when the recycling came right after the warm-up)."""
    body = body_template(run)
    results: dict[str, Any] = {"runs": []}
    with gunicorn(app, env, log, gunicorn_args) as (base, proc), Sampler(proc.pid) as sampler:
        results["warm_up_rounds"] = warm_up(
            base + path, body.replace("{i}", "9{i}"), headers, limit=warm_up_limit
        )
        spies = contextlib.ExitStack()
        if profile_to is not None:
            spies.enter_context(profile.record(proc.pid, profile_to, subprocesses=True, rate=100))
        for number, clients in enumerate(concurrencies, start=1):
            time.sleep(0.5)
            seen = sampler.workers_seen()
            cpu = server_cpu_seconds(proc.pid)
            run = wrk(
                base + path,
                clients=clients,
                seconds=seconds,
                body=body.replace("{i}", f"{number}{{i}}"),
                headers=headers,
            )
            # CPU per request does not depend on what else loads the machine, unlike req/s.
            run["server_cpu_ms_per_request"] = round(
                (server_cpu_seconds(proc.pid) - cpu) / max(1, run["requests"]) * 1000, 3
            )
            # A worker recycled after max_requests charges its successor's boot (its app and
            # store; the master imported the modules) to the run it happened in.
            run["worker_restarts"] = len(sampler.workers_seen() - seen)
            results["runs"].append(run)
        spies.close()
        if after is not None:
            time.sleep(0.5)
            results["burst"] = after(base, proc.pid, results)
    results["worker_peak_rss_mb"] = sampler.peak.max_mb
    return results
