"""end to end and drain: messages from the outbox to the MX, the relay against Postfix.

end to end: 8 producer threads commit N prebuilt messages through Outbox.enqueue while a
`relay worker` process signs each one, looks up support.test's MX in the bench DNS and
delivers it to the sink; the clock runs from the first enqueue to the last message at the
sink. drain: N messages are committed first (the helpdesk was unreachable), then the worker
starts; the clock runs from the worker's start to the last message at the sink.

Postfix gets the same N messages over SMTP (smtp-source, 8 sessions), and for the drain they
wait in its deferred queue (defer_transports = smtp) until the flush.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench import postfix, profile
from bench.sink import Sink, message_of_dump
from bench.util import ROOT, PeakRSS, running, venv_tool, wait_until

PRODUCERS = 8


def produce(outbox: Any, built: Sequence[Any], producers: int = PRODUCERS) -> float:
    """Enqueue every message from `producers` threads; returns when the last commit ends."""
    errors: list[BaseException] = []

    def work(chunk: Sequence[Any]) -> None:
        try:
            for item in chunk:
                outbox.enqueue(item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(built[i::producers],)) for i in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.monotonic()


@contextlib.contextmanager
def _workers(env: dict[str, str], log: Path, processes: int) -> Iterator[list[Any]]:
    """`processes` independent `relay worker` processes on the same store, as an operator
    runs several (formrelay-worker@N): each claims its own batch (SKIP LOCKED / BEGIN
    IMMEDIATE)."""
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                running(
                    [venv_tool("relay"), "worker"],
                    env=env,
                    log=log if i == 0 else log.with_suffix(f".{i}.log"),
                    cwd=ROOT,
                )
            )
            for i in range(processes)
        ]
        yield procs


def _cpu(procs: Sequence[Any]) -> float:
    return sum(cpu_seconds(proc.pid) for proc in procs)


def _processes_note(env: dict[str, str]) -> str:
    count = int(env.get("BENCH_WORKER_PROCESSES", "1"))
    return f"; {count} worker processes" if count > 1 else ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _to(env: dict[str, str], sink: Sink) -> dict[str, str]:
    return {**env, "RELAY_SMTP_PORT": str(sink.port)}


def _wait_started(log: Path, procs: Sequence[Any]) -> None:
    for i, proc in enumerate(procs):
        own = log if i == 0 else log.with_suffix(f".{i}.log")
        if not wait_until(lambda own=own: "worker.started" in own.read_text(errors="replace"), 30):
            raise RuntimeError(f"relay worker did not start (exit {proc.poll()}); see {own}")


class _Fleet:
    """The run's `relay worker` processes: their peak RSS, sampled every 0.25 s until
    `finish()`, and their CPU time since the fleet was made (for e2e, after the workers
    started: their imports are not in the per-message figure, as they are not on its clock)."""

    def __init__(self, procs: list[Any]) -> None:
        self.procs = procs
        self.pids = [proc.pid for proc in procs]
        self._cpu_at_start = _cpu(procs)
        self.peak = PeakRSS()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            self.peak.sample(self.pids)

    def finish(self) -> float:
        """Stop sampling; the processes' CPU seconds since the fleet was made."""
        self._stop.set()
        self.peak.sample(self.pids)
        return _cpu(self.procs) - self._cpu_at_start


@contextlib.contextmanager
def _fleet(
    env: dict[str, str], log: Path, *, wait: bool, profile_to: Path | None
) -> Iterator[_Fleet]:
    """BENCH_WORKER_PROCESSES workers (1), py-spy on the first with `profile_to`."""
    with contextlib.ExitStack() as stack:
        procs = stack.enter_context(_workers(env, log, int(env.get("BENCH_WORKER_PROCESSES", "1"))))
        if wait:
            _wait_started(log, procs)
        if profile_to is not None:
            stack.enter_context(profile.record(procs[0].pid, profile_to))
        yield _Fleet(procs)


def relay_e2e(
    make_outbox: Callable[[], Any],
    built: Sequence[Any],
    env: dict[str, str],
    work: Path,
    verify: Callable[[bytes], bool],
    *,
    timeout: float,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    outbox = make_outbox()
    n = len(built)
    log = work / "worker-e2e.log"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(Sink(work / "sink-e2e"))
        fleet = stack.enter_context(_fleet(_to(env, sink), log, wait=True, profile_to=profile_to))
        started = time.monotonic()
        accepted_at = produce(outbox, built)
        done = sink.wait_for(n, timeout)
        cpu = fleet.finish()
        row = _row(n, started, sink, done)
        row["accept_messages_per_second"] = round(n / (accepted_at - started), 1)
        row["worker_peak_rss_mb"] = fleet.peak.max_mb
        row["worker_cpu_ms_per_message"] = round(cpu / n * 1000, 2)
        row["dkim_valid"] = _check(sink, verify)
        row["notes"] = (
            f"worker CPU {row['worker_cpu_ms_per_message']} ms/message; "
            f"accept {row['accept_messages_per_second']}/s; concurrency "
            f"{env.get('RELAY_WORKER_CONCURRENCY', '10 (default)')}; DKIM "
            f"{'valid' if row['dkim_valid'] else 'NOT valid'}{_processes_note(env)}"
        )
    row["outbox"] = outbox.counts()
    outbox.dispose()
    return row


def relay_drain(
    make_outbox: Callable[[], Any],
    built: Sequence[Any],
    env: dict[str, str],
    work: Path,
    verify: Callable[[bytes], bool],
    *,
    timeout: float,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    outbox = make_outbox()
    n = len(built)
    produce(outbox, built)
    log = work / "worker-drain.log"
    with Sink(work / "sink-drain") as sink:
        started = time.monotonic()
        with _fleet(_to(env, sink), log, wait=False, profile_to=profile_to) as fleet:
            done = sink.wait_for(n, timeout)
            cpu = fleet.finish()
        row = _row(n, started, sink, done)
        row["worker_peak_rss_mb"] = fleet.peak.max_mb
        row["worker_cpu_ms_per_message"] = round(cpu / n * 1000, 2)
        row["dkim_valid"] = _check(sink, verify)
        if sink.first_at is not None and sink.last_at is not None and sink.last_at > sink.first_at:
            row["after_first_delivery_per_second"] = round(
                (n - 1) / (sink.last_at - sink.first_at), 1
            )
        row["notes"] = (
            f"worker CPU {row['worker_cpu_ms_per_message']} ms/message; "
            f"clock starts at process start (imports included); "
            f"{row.get('after_first_delivery_per_second')}/s after the first delivery"
            f"{_processes_note(env)}"
        )
    row["outbox"] = outbox.counts()
    outbox.dispose()
    return row


def postfix_run(
    work: Path,
    raw: bytes,
    n: int,
    key_pem: bytes | None,
    verify: Callable[[bytes], bool],
    *,
    drain: bool,
    timeout: float,
) -> dict[str, Any]:
    """N messages through a private Postfix (+ OpenDKIM when key_pem) to the sink."""
    work.mkdir(parents=True, exist_ok=True)
    message = postfix.message_file(raw, work / "message.txt")
    with (
        Sink(work / "sink") as sink,
        postfix.instance(work / "postfix", sink_port=sink.port, key_pem=key_pem, defer=drain) as pf,
    ):
        if drain:
            postfix.inject(pf.port, message, n, PRODUCERS)
            if not wait_until(lambda: pf.deferred() >= n, timeout):
                raise RuntimeError(f"only {pf.deferred()} of {n} messages reached the queue")
            started = time.monotonic()
            pf.release()
        else:
            started = time.monotonic()
            postfix.inject(pf.port, message, n, PRODUCERS)
        done = sink.wait_for(n, timeout)
        row = _row(n, started, sink, done)
        row["dkim_valid"] = _check(sink, verify) if key_pem else None
        row["notes"] = (
            "DKIM " + ("valid" if row["dkim_valid"] else "NOT valid") if key_pem else "unsigned"
        ) + (
            "; smtp-source, 8 sessions"
            if not drain
            else "; clock starts at the flush; OpenDKIM signed at receipt, before the clock"
            if key_pem
            else "; clock starts at the flush"
        )
    return row


def _row(n: int, started: float, sink: Sink, done: bool) -> dict[str, Any]:
    end = sink.last_at if sink.last_at is not None else time.monotonic()
    seconds = end - started
    row: dict[str, Any] = {
        "messages": sink.count,
        "seconds": round(seconds, 2),
        "messages_per_second": round(sink.count / seconds, 1) if done and seconds > 0 else None,
    }
    if not done:
        row["error"] = f"timed out: {sink.count} of {n} messages at the sink"
    return row


def _check(sink: Sink, verify: Callable[[bytes], bool]) -> bool:
    dumps = sink.dumps()
    if not dumps:
        return False
    sample = [dumps[0], dumps[len(dumps) // 2], dumps[-1]]
    return all(verify(message_of_dump(path)) for path in sample)


def environ(extra: dict[str, str]) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return {**keep, **extra}


__all__ = ["postfix_run", "relay_drain", "relay_e2e", "subprocess"]
