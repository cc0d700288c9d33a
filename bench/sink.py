"""Postfix's smtp-sink standing as the support domain's MX (mx1.support.test = 127.0.0.2).

smtp-sink is C and accepts far faster than either sender under test, so it never is the
bottleneck. With `-c` it prints `sess=.. quit=.. mesg=N` after each final "."; a reader
thread stamps the moment each count is reached, which is when the message is at the sink.
Each message is also dumped (`-d`), so a sample can be checked for a valid DKIM signature.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from bench.util import free_port, port_open, stop_process, wait_until

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
_MESG = re.compile(rb"mesg=(\d+)")


class Sink:
    def __init__(self, directory: Path, host: str = "127.0.0.2", port: int | None = None) -> None:
        self.directory = directory
        self.host = host
        self.port = port or free_port(host)
        self.count = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._changed = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        dump = self.directory / "dump"
        dump.mkdir(parents=True, exist_ok=True)
        shutil.chown(dump, user="postfix")
        self._proc = subprocess.Popen(
            [
                SMTP_SINK,
                "-u",
                "postfix",
                "-c",
                "-h",
                "mx1.support.test",
                "-d",
                f"{dump}/m.",
                f"{self.host}:{self.port}",
                "256",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not wait_until(lambda: port_open(self.host, self.port), 5):
            raise RuntimeError(f"smtp-sink did not listen on {self.host}:{self.port}")
        return self

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        buffer = b""
        while chunk := self._proc.stdout.read1(4096):  # type: ignore[attr-defined]
            now = time.monotonic()
            buffer += chunk
            *records, buffer = re.split(rb"[\r\n]", buffer)
            counts = [int(m.group(1)) for r in records if (m := _MESG.search(r))]
            if counts and max(counts) > self.count:
                with self._changed:
                    if self.first_at is None:
                        self.first_at = now
                    self.count = max(counts)
                    self.last_at = now
                    self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until `count` messages have arrived; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.count < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.5))
        return True

    def dumps(self) -> list[Path]:
        return sorted((self.directory / "dump").glob("m.*"))

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def message_of_dump(path: Path) -> bytes:
    """The message as the client sent it, without smtp-sink's X-* and Received lines."""
    lines = path.read_bytes().split(b"\n")
    index = 0
    while index < len(lines) and lines[index].startswith(b"X-"):
        index += 1
    if (
        index < len(lines)
        and lines[index].startswith(b"Received: ")
        and "smtp-sink" in (b"\n".join(lines[index : index + 3]).decode(errors="replace"))
    ):
        index += 3
    body = lines[index:]
    while body and body[-1] == b"":
        body.pop()
    return b"\r\n".join(body) + b"\r\n"
