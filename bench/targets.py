"""The accept section: every target under gunicorn, then the spam burst on each warm server.

Targets, in this order: bare (bench/bare_app.py, a Flask endpoint that does nothing), then for
each store essential_<store> (bench/essential_app.py: only the I/O an accepted submission
needs, on the same stand-ins and the same kind of store) and <store> (the relay). The relay's
figures divided by the essential target's of the same store are what our own work costs;
divided by bare's, what everything but Flask costs.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import accept, burst, pipeline, profile
from bench.stores import database
from relay.store.outbox import Outbox

APPS = {
    "bare": "bench.bare_app:app",
    "essential": "bench.essential_app:create_app()",
    "relay": "relay:create_app()",
}
PATH = "/form"
HEADERS = "Origin:http://localhost"


def targets(stores: list[str]) -> list[str]:
    return ["bare", *(name for store in stores for name in (f"essential_{store}", store))]


def kind_of(target: str) -> tuple[str, str]:
    """(bare | essential | relay, store)."""
    if target == "bare":
        return "bare", "sqlite"
    if target.startswith("essential_"):
        return "essential", target.removeprefix("essential_")
    return "relay", target


class Rows:
    """What a target committed: the relay's outbox counts, or the essential table's rows."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.outbox: Outbox | None = None
        self.engine: sa.Engine | None = None
        if kind == "relay":
            self.outbox = Outbox(url)
            self.outbox.upgrade()
        elif kind == "essential":
            self.engine = sa.create_engine(url)

    def counts(self) -> dict[str, int]:
        if self.outbox is not None:
            return dict(self.outbox.counts())
        assert self.engine is not None
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM essential_outbox")).scalar_one()
        return {"rows": int(rows)}

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.dispose()
        if self.engine is not None:
            self.engine.dispose()


def accept_section(
    args: argparse.Namespace,
    work: Path,
    env_for: Callable[..., dict[str, str]],
    run_id: str,
    profiles: dict[str, Any],
    peers_pid: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problem = accept.available()
    for target in targets(args.store_list):
        if problem:
            out[target] = {"error": problem}
            continue
        log(f"accept: {target}, clients {args.clients}, {args.seconds:g} s each")
        try:
            folder = work / f"accept-{target}"
            out[target] = _target(args, target, folder, env_for, run_id, profiles, peers_pid, log)
        except Exception as exc:
            out[target] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _target(
    args: argparse.Namespace,
    target: str,
    folder: Path,
    env_for: Callable[..., dict[str, str]],
    run_id: str,
    profiles: dict[str, Any],
    peers_pid: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    kind, store = kind_of(target)
    spy = folder / "profile.txt" if args.profile and kind != "bare" else None
    with database(store, folder) as url:
        rows = Rows(kind, url) if kind != "bare" else None
        peers_cpu = pipeline.cpu_seconds(peers_pid)
        # The stand-ins' CPU and the rows of the accept runs, taken before the burst.
        before_burst: dict[str, Any] = {}

        def spam(base: str, master_pid: int, results: dict[str, Any]) -> dict[str, Any]:
            assert rows is not None
            before_burst["peers_cpu"] = pipeline.cpu_seconds(peers_pid)
            before_burst["rows"] = sum(rows.counts().values())
            # The accepted submissions' CPU: the busiest run that no worker recycling disturbed.
            calm = [r for r in results["runs"] if not r.get("worker_restarts")] or results["runs"]
            fastest: dict[str, Any] = max(calm, key=lambda r: r["clients"], default={})
            log(f"burst: {target}, {args.burst} bad posts at 64 clients + 4 real clients")
            spies = contextlib.ExitStack()
            if spy is not None:
                burst_spy = spy.with_name("profile-burst.txt")
                spies.enter_context(
                    profile.record(master_pid, burst_spy, subprocesses=True, rate=100)
                )
            with spies:
                figures = burst.run(
                    base,
                    master_pid,
                    access_log=folder / "gunicorn.access",
                    path=PATH,
                    run_id=f"{run_id}{target}",
                    headers=HEADERS,
                    cpu_ms_per_accepted=fastest.get("server_cpu_ms_per_request"),
                    posts=args.burst,
                    real_clients=4,
                )
            figures["cpu_ms_per_accepted_from_clients"] = fastest.get("clients")
            if spy is not None:
                profiles[f"gunicorn {target} burst"] = profile.summarise([burst_spy], top=40)
            figures["peers_cpu_ms_per_post"] = round(
                (pipeline.cpu_seconds(peers_pid) - before_burst["peers_cpu"])
                / max(1, figures["posts"] + figures["real"]["requests"])
                * 1000,
                2,
            )
            return figures

        try:
            result = accept.measure(
                APPS[kind],
                env_for(url, folder),
                folder / "gunicorn.log",
                path=PATH,
                concurrencies=args.clients,
                seconds=args.seconds,
                run=f"{run_id}{target}",
                headers=HEADERS,
                profile_to=spy,
                warm_up_limit=10.0 if args.quick else 30.0,
                after=spam if rows is not None and args.burst > 0 else None,
                gunicorn_args=["--max-requests", "0"] if args.no_recycle else None,
            )
            if spy is not None:
                profiles[f"gunicorn {target}"] = profile.summarise([spy], top=40)
            if rows is not None:
                result["outbox"] = rows.counts()
                accepted = before_burst.get("rows", sum(result["outbox"].values()))
                # The Python stand-ins share the 2 cores with the server under test.
                result["peers_cpu_ms_per_accepted"] = round(
                    (before_burst.get("peers_cpu", pipeline.cpu_seconds(peers_pid)) - peers_cpu)
                    / max(1, accepted)
                    * 1000,
                    2,
                )
        finally:
            if rows is not None:
                rows.close()
    return result
