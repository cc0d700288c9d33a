"""Deliverability checks: what a receiver will think of our mail, asked of DNS before it does.

`run_checks(settings, resolver=..., ip=...)` returns one `Check` per concern (PTR, HELO, SPF,
each DKIM selector, DMARC, alignment, the support address, hCaptcha keys, the database), each
PASS, WARN or FAIL with the fix spelled out: when a record is wrong the fix quotes the record
to publish instead, built by `relay.ops.dnsrecords` so `relay dns-records` and the doctor
agree. The worker runs the checks once at start and logs every non-PASS (`startup_checks`).

One room per concern:
- `verdict`: `Check` and how a check's findings combine into one verdict.
- `lookup`: DNS through the given resolver (RELAY_DNS_NAMESERVERS), also for pyspf and
  dkimpy, which are synchronous and query from a worker thread through `SyncDNS` (pyspf via
  `spf_lookups`, which patches `spf.DNSLookup` only while an evaluation needs it), and the
  lookups `relay dns-records` shares (DMARC in force, the sending IP detected by route).
- `domains`: the organisational domain and DMARC alignment.
- `sending`: the sending IP check, its PTR and our HELO name.
- `auth`: SPF, DKIM (our keys against the published ones, a probe signed and verified),
  DMARC and alignment.
- `support`: every support address's MX and the helpdesk-native warning (the default
  form's and each of RELAY_FORMS_FILE's), the hCaptcha keys.
- `store`: the outbox store answers and is migrated.

Part of ops, so it may import every layer (config, mail, store); nothing imports it but ops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from relay.logs import event
from relay.mail.mx import Resolver, make_resolver
from relay.ops.doctor.auth import (
    check_alignment,
    check_dkim,
    check_dmarc,
    check_spf,
    dkim_keys,
    sign_probe,
)
from relay.ops.doctor.domains import aligned, organisational_domain
from relay.ops.doctor.lookup import SyncDNS
from relay.ops.doctor.sending import check_helo, check_ptr, check_sending_ip, generic_ptr_reasons
from relay.ops.doctor.store import check_database
from relay.ops.doctor.support import (
    check_hcaptcha,
    check_support_helpdesk,
    check_support_mx,
    form_support_checks,
    helpdesk_of,
)
from relay.ops.doctor.verdict import Check, Status, worst_status
from relay.settings import Settings

__all__ = [
    "Check",
    "Status",
    "aligned",
    "auth_checks",
    "auth_verdicts",
    "dkim_checks",
    "generic_ptr_reasons",
    "helpdesk_of",
    "log_checks",
    "organisational_domain",
    "run_checks",
    "startup_checks",
    "worst",
]


def worst(checks: Iterable[Check]) -> Status:
    return worst_status(c.status for c in checks)


def log_checks(logger: logging.Logger, checks: Iterable[Check]) -> None:
    """One warning per non-PASS check, as the worker does at start."""
    for check in checks:
        if check.status != "PASS":
            event(
                logger,
                "doctor.check",
                logging.WARNING,
                check=check.name,
                status=check.status,
                summary=check.summary,
                fix=check.fix or None,
            )


async def run_checks(
    settings: Settings,
    *,
    resolver: Resolver,
    ip: str | None = None,
    database: bool = True,
) -> list[Check]:
    """Every check, in a stable order. `ip` None: detected (see `lookup.detect_sending_ip`).
    `database=False` leaves the store check out (a caller that has just migrated it)."""
    sync_dns = _sync_dns(settings, resolver)
    sending, ip = await check_sending_ip(settings, resolver, ip)
    signed, sign_error = await _probe(settings)

    async def no_check() -> Check | None:
        return None

    core, (dmarc_check, dmarc_tags), support, forms, store = await asyncio.gather(
        asyncio.gather(
            check_ptr(settings, resolver, ip),
            check_helo(settings, resolver, ip),
            check_spf(settings, resolver, ip, sync_dns),
            *(
                check_dkim(
                    settings, resolver, key, sync_dns=sync_dns, signed=signed, sign_error=sign_error
                )
                for key in dkim_keys(settings)
            ),
        ),
        check_dmarc(settings, resolver),
        check_support_mx(settings, resolver),
        form_support_checks(settings, resolver),
        asyncio.to_thread(check_database, settings) if database else no_check(),
    )
    checks = [
        sending,
        *core,
        dmarc_check,
        check_alignment(settings, dmarc_tags),
        support,
        check_support_helpdesk(settings),
        *forms,
        check_hcaptcha(settings),
    ]
    if store is not None:
        checks.append(store)
    return checks


def _sync_dns(settings: Settings, resolver: Resolver) -> SyncDNS:
    loop = asyncio.get_running_loop()
    return SyncDNS(resolver, loop, timeout=settings.dns_timeout * 3 + 5)


async def _probe(settings: Settings) -> tuple[bytes | None, str]:
    """The DKIM probe signed by our signer, or why it could not be."""
    try:
        return await asyncio.to_thread(sign_probe, settings), ""
    except Exception as exc:  # any signer failure is reported, not raised
        return None, f"{type(exc).__name__}: {exc}"


async def dkim_checks(settings: Settings, *, resolver: Resolver) -> list[Check]:
    """One check per DKIM key: the worker's daily "is the key in DNS still ours" alert."""
    sync_dns = _sync_dns(settings, resolver)
    signed, sign_error = await _probe(settings)
    return list(
        await asyncio.gather(
            *(
                check_dkim(
                    settings, resolver, key, sync_dns=sync_dns, signed=signed, sign_error=sign_error
                )
                for key in dkim_keys(settings)
            )
        )
    )


async def auth_checks(
    settings: Settings, *, resolver: Resolver, ip: str | None = None
) -> list[Check]:
    """SPF, DKIM, DMARC and alignment alone: what the console shows beside a message."""
    sync_dns = _sync_dns(settings, resolver)
    _sending, ip = await check_sending_ip(settings, resolver, ip)
    spf, dkims, (dmarc, tags) = await asyncio.gather(
        check_spf(settings, resolver, ip, sync_dns),
        dkim_checks(settings, resolver=resolver),
        check_dmarc(settings, resolver),
    )
    return [spf, *dkims, dmarc, check_alignment(settings, tags)]


def auth_verdicts(settings: Settings) -> list[Check]:
    """`auth_checks` from synchronous code (the console's request thread): the composition
    root (relay.create_app) hands this to the web app."""
    return asyncio.run(auth_checks(settings, resolver=make_resolver(settings)))


async def startup_checks(settings: Settings, resolver: Any) -> None:
    """The checks a long-running worker logs at start (every non-PASS, on relay.worker's
    log): delivery does not wait for them (relay.worker.service.run_worker runs them beside it)."""
    checks = await run_checks(settings, resolver=resolver, database=False)
    log_checks(logging.getLogger("relay.worker"), checks)
