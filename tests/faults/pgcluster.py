"""A PostgreSQL server of the test's own: initdb in a temporary folder, its own port and
socket, started, restarted and removed by the test.

The chaos soak restarts PostgreSQL under load. The machine's server is shared by every test
(and every other suite) running at the same time, so a restart there would break them; this
is the same server binary restarted for real, with nobody else on it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import unavailable
from tests.faults.harness import free_port


def _bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


class PrivatePostgres:
    def __init__(self) -> None:
        bindir = _bindir()
        if bindir is None:
            unavailable("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
            raise AssertionError  # unreachable: unavailable() skips or fails
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp_path: the server runs as `postgres`, which cannot enter it.
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        self.user: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no postgres user to run a server")
                raise AssertionError from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        done = subprocess.run(
            [*self.user, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"{argv[0]} failed: {done.stdout}{done.stderr}{self._tail()}")

    def _tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def _pg_ctl(self, *args: str) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args)

    def start(self) -> PrivatePostgres:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self._pg_ctl("-w", "-o", self.options, "start")
        return self

    def restart(self, *, down: float = 0.0) -> float:
        """Stop with `-m fast` (as `systemctl restart postgresql` does: every connection is
        closed), stay down `down` seconds, start again. Returns the seconds it was away."""
        started = time.monotonic()
        self._pg_ctl("-w", "-m", "fast", "stop")
        time.sleep(down)
        self._pg_ctl("-w", "-o", self.options, "start")
        return time.monotonic() - started

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("-w", "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
