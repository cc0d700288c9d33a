"""`bench/run [--quick]`: runs the sections, prints JSON and Markdown, writes bench/results/.

Sections: sign, accept, e2e, drain (memory figures come from accept and e2e). Everything runs
against peers on loopback: the bench DNS server and siteverify stand-in (bench/peers.py),
smtp-sink as the MX, a private Postfix + OpenDKIM as the reference. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dkim

from bench import pipeline, postfix, profile, report, sign, targets, world
from bench.stores import database
from bench.util import ROOT
from relay.config import load_settings
from relay.sandbox.world import FROM_DOMAIN, public_key_b64
from relay.store.outbox import Outbox

SECTIONS = ("sign", "accept", "e2e", "drain")
WORK_PARENT = Path("/var/lib/formrelay-bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="formrelay benchmarks: accept, end to end, drain, sign, memory "
        "(loopback only; needs root, wrk, postfix, opendkim, PostgreSQL on 127.0.0.1:5432).",
    )
    parser.add_argument("--quick", action="store_true", help="small N, short runs (< 3 min)")
    parser.add_argument("-n", "--messages", type=int, help="messages for e2e/drain (2000)")
    parser.add_argument("--seconds", type=float, help="seconds per accept run (10; quick 3)")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma list of sections ({','.join(SECTIONS)})"
    )
    parser.add_argument(
        "--stores", default="sqlite,postgres", help="stores for accept and e2e (sqlite,postgres)"
    )
    parser.add_argument("--concurrency", default="1,8,32", help="accept clients (1,8,32)")
    parser.add_argument(
        "--burst",
        type=int,
        default=2000,
        help="bad-CAPTCHA posts per target in accept's spam burst, at 64 clients beside 4 "
        "real ones (2000; 0: no burst)",
    )
    parser.add_argument(
        "--worker-concurrency", type=int, help="RELAY_WORKER_CONCURRENCY for e2e/drain (10)"
    )
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=1,
        help="relay worker processes for e2e/drain, on the same store (1)",
    )
    parser.add_argument(
        "--no-recycle",
        action="store_true",
        help="accept: gunicorn --max-requests 0 for every target (already the deployed "
        "default with one worker; this also covers a FORMRELAY_MAX_REQUESTS in the environment)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-save", action="store_true", help="print only; write no results")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the relay processes; summary in results"
    )
    parser.add_argument(
        "--what-if",
        choices=["tls-once"],
        help="measure a proposed fix without the code: tls-once = TLS contexts built once "
        "per process (bench/whatif/sitecustomize.py); results go to whatif-*.json",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, dumps)")
    args = parser.parse_args(argv)
    args.messages = args.messages or (300 if args.quick else 2000)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.sections = [s for s in args.only.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    args.store_list = [s for s in args.stores.split(",") if s]
    args.clients = [int(c) for c in args.concurrency.split(",") if c]
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def dkim_verifier(keys: world.Keys) -> Callable[[bytes], bool]:
    """dkimpy verification with the bench keys as the DNS answers."""
    records = {
        f"s1._domainkey.{FROM_DOMAIN}.": f"v=DKIM1; k=rsa; p={public_key_b64(keys.rsa_pem)}",
        f"e1._domainkey.{FROM_DOMAIN}.": f"v=DKIM1; k=ed25519; p={public_key_b64(keys.ed_pem)}",
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip(".") + ".", "").encode()

    def verify(message: bytes) -> bool:
        return bool(dkim.verify(message, dnsfunc=dnsfunc))

    return verify


def tool_versions() -> dict[str, str]:
    versions: dict[str, str] = {"python": platform.python_version()}
    with contextlib.suppress(Exception):
        versions["postfix"] = subprocess.run(
            ["postconf", "-h", "mail_version"], capture_output=True, text=True, check=False
        ).stdout.strip()
    with contextlib.suppress(Exception):
        out = subprocess.run(["opendkim", "-V"], capture_output=True, text=True, check=False)
        versions["opendkim"] = (out.stdout or out.stderr).splitlines()[0]
    with contextlib.suppress(Exception):
        out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
        versions["wrk"] = (out.stdout or out.stderr).splitlines()[0]
    return versions


def commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "relay"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    # Others edit relay/ in the same tree: say when the measured code is not the commit.
    return (out.stdout.strip() or "?") + ("+uncommitted relay/ changes" if dirty else "")


def run(args: argparse.Namespace) -> dict[str, Any]:
    WORK_PARENT.mkdir(mode=0o755, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK_PARENT))
    work.chmod(0o755)  # Postfix's and smtp-sink's unprivileged users walk through it
    log(f"work folder {work}")
    results: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    keys = world.make_keys(work / "keys")
    zone = work / "zone.txt"
    zone.write_text(world.zone_text(keys))
    verify = dkim_verifier(keys)
    run_id = uuid.uuid4().hex[:8]
    reference = postfix.available()
    try:
        with world.peers(zone, port53=reference is None) as peers:

            def env_for(url: str, folder: Path, **extra: str) -> dict[str, str]:
                if args.what_if:
                    extra["PYTHONPATH"] = str(ROOT / "bench" / "whatif")
                if args.worker_concurrency:
                    extra["RELAY_WORKER_CONCURRENCY"] = str(args.worker_concurrency)
                if args.worker_processes > 1:
                    extra["BENCH_WORKER_PROCESSES"] = str(args.worker_processes)
                return pipeline.environ(
                    world.relay_env(
                        keys,
                        dns=peers.dns,
                        siteverify=peers.siteverify,
                        smtp_port=25,
                        database_url=url,
                        instance=folder,
                        base={},
                    )
                    | extra
                )

            base_settings = load_settings(
                {
                    **env_for("sqlite://", work / "x"),
                    "RELAY_SMTP_PORT": "25",
                    "RELAY_DKIM_ED25519_SELECTOR": "e1",
                    "RELAY_DKIM_ED25519_KEY_FILE": str(keys.ed_file),
                },
                env_file=None,
            )
            raw = world.build_messages(1, base_settings)[0].raw
            results["meta"] = {"message_bytes": len(raw)}

            if "sign" in args.sections:
                log("sign")
                results["sign"] = sign.run(
                    keys, raw, base_settings, seconds=1.0 if args.quick else 3.0
                )

            if "accept" in args.sections:
                results["accept"] = targets.accept_section(
                    args, work, env_for, run_id, profiles, peers.proc.pid, log
                )

            if "e2e" in args.sections or "drain" in args.sections:
                built = world.build_messages(args.messages, base_settings)
                for section in ("e2e", "drain"):
                    if section in args.sections:
                        results[section] = delivery_section(
                            args, section, work, built, keys, env_for, verify, profiles
                        )
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["memory"] = memory(results)
    if profiles:
        results["profile"] = profiles
    return results


def delivery_section(
    args: argparse.Namespace,
    section: str,
    work: Path,
    built: list[Any],
    keys: world.Keys,
    env_for: Callable[..., dict[str, str]],
    verify: Callable[[bytes], bool],
    profiles: dict[str, Any],
) -> dict[str, Any]:
    """e2e or drain: the relay on each store (SQLite only with --quick), then Postfix with
    OpenDKIM and (e2e only) without."""
    rows: dict[str, Any] = {}
    timeout = max(120.0, len(built) / 5)
    for store in args.store_list[: 1 if args.quick else None]:
        name = "relay" if store == "sqlite" else f"relay_{store}"
        log(f"{section}: relay ({store}), {len(built)} messages")
        folder = work / f"{section}-{store}"
        spy = work / f"profile-{section}-{store}.txt" if args.profile else None
        fn = pipeline.relay_e2e if section == "e2e" else pipeline.relay_drain
        try:
            with database(store, folder) as url:

                def make_outbox(url: str = url) -> Outbox:
                    outbox = Outbox(url)
                    outbox.upgrade()
                    return outbox

                rows[name] = fn(
                    make_outbox,
                    built,
                    env_for(url, folder),
                    folder,
                    verify,
                    timeout=timeout,
                    profile_to=spy,
                )
            if spy is not None:
                profiles[f"worker {section} {store}"] = profile.summarise([spy])
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
    problem = postfix.available()
    raw = built[0].raw
    for name, key_pem in (("postfix_opendkim", keys.rsa_pem), ("postfix", None)):
        if section == "drain" and key_pem is None:
            continue
        if problem is not None:
            rows[name] = {"error": problem}
            continue
        log(f"{section}: {name}, {len(built)} messages")
        try:
            rows[name] = pipeline.postfix_run(
                work / f"{section}-{name}",
                raw,
                len(built),
                key_pem,
                verify,
                drain=section == "drain",
                timeout=timeout,
            )
        except Exception as exc:
            rows[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return rows


def memory(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target, section in (results.get("accept") or {}).items():
        if isinstance(section, dict) and section.get("worker_peak_rss_mb"):
            out[f"gunicorn worker ({target})"] = section["worker_peak_rss_mb"]
    for section in ("e2e", "drain"):
        for name, row in (results.get(section) or {}).items():
            if row.get("worker_peak_rss_mb"):
                out[f"relay worker ({section}, {name})"] = row["worker_peak_rss_mb"]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("warning: not root; smtp-sink, Postfix and the port-53 DNS need root")
    started = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = run(args)
    results["meta"] = {
        **results.get("meta", {}),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "what_if": args.what_if,
        "n": args.messages,
        "worker_processes": args.worker_processes,
        "accept_seconds": args.seconds,
        "accept_no_recycle": args.no_recycle,
        "burst_posts": args.burst,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "commit": commit(),
        "tools": tool_versions(),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    results["ratios"] = report.ratios(results)
    results["goals"] = report.goals(results)
    text = report.markdown(results)
    print(json.dumps(results, indent=2, default=str))
    print()
    print(text)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = ("quick" if args.quick else "full") + (
            f"-whatif-{args.what_if}" if args.what_if else ""
        )
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / f"{stem}.md").write_text(text)
        log(f"wrote {args.out}/{stem}.json and {stem}.md")
    return 0
