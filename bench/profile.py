"""`--profile`: py-spy samples the relay's processes while a section runs.

The raw collapsed stacks are kept in the work folder (`--keep`) and summarised into the
results: for every frame in relay/ (and the library frames it spends its time in), the share
of samples whose stack contains it. Sampling is from outside the process, so the figures
measured in the same run are only slightly lower than without it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.util import venv_tool

PY_SPY = venv_tool("py-spy")


def available() -> str | None:
    return None if shutil.which(PY_SPY) else "py-spy is missing (pip install py-spy)"


@contextlib.contextmanager
def record(
    pid: int,
    out: Path,
    *,
    idle: bool = False,
    seconds: float | None = None,
    rate: int = 250,
    subprocesses: bool = False,
) -> Iterator[Path]:
    """Sample `pid` (all its threads) at 250 Hz into `out` (collapsed stacks) until it
    exits, or until the block ends when `subprocesses` (then its children too, those started
    later included: gunicorn's recycled workers), or for `seconds`."""
    argv = [
        PY_SPY,
        "record",
        "-p",
        str(pid),
        "-r",
        str(rate),
        "-f",
        "raw",
        "-o",
        str(out),
        "--nonblocking",
        "--threads",
    ]
    if idle:
        argv.append("--idle")
    if subprocesses:
        argv.append("--subprocesses")
    if seconds is not None:
        argv += ["-d", str(max(1, round(seconds)))]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield out
    finally:
        if subprocesses and seconds is None:
            proc.send_signal(2)  # py-spy writes what it has on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15 + (seconds or 0))  # py-spy stops by itself at the end
        if proc.poll() is None:
            proc.send_signal(2)
            proc.wait(15)


INTERESTING = (
    "relay/",
    "bench/",
    "http/client.py",
    "urllib3/",
    "sqlalchemy/engine/base.py",
    "do_commit",
    "do_execute",
    "ssl.py",
    "httpx/",
    "dns/",
    "aiosmtplib/",
    "dkim/",
    "email/",
    "asyncio/",
    "psycopg",
    "threading.py",
    "cryptography",
)


def summarise(paths: list[Path], *, top: int = 25) -> dict[str, Any]:
    """Share of samples whose stack holds each frame (inclusive), and the top leaf frames."""
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            # --subprocesses puts "process PID:"COMMAND LINE"" frames first: not code.
            frames = [f for f in stack.split(";") if not f.startswith("process ")]
            if not frames:
                continue
            total += count
            leaves[frames[-1]] += count
            for frame in set(frames):
                if any(mark in frame for mark in INTERESTING):
                    inclusive[frame] += count
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "inclusive_percent": {
            frame: round(100 * n / total, 1) for frame, n in inclusive.most_common(top)
        },
        "leaf_percent": {frame: round(100 * n / total, 1) for frame, n in leaves.most_common(12)},
    }
