"""Where the mail goes and what guards the form: every support address, the default form's
and each of RELAY_FORMS_FILE's (its domain accepts mail; it is not a helpdesk's native
address), and the hCaptcha keys. Receiver checklist rows 5 and 7."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.config import hcaptcha_test_keys
from relay.mail.mx import Resolver
from relay.ops.doctor.lookup import addresses_of, lookup
from relay.ops.doctor.verdict import Check, Finding, Status, combine, lookup_failed
from relay.settings import Settings, domain_of

# Helpdesks' own inbound domains (receiver checklist row 7: send to an address of your own
# domain that forwards to the helpdesk, not to the helpdesk's native address). A support
# address in one of these domains, or a subdomain of one, gets a WARN.
HELPDESK_NATIVE_DOMAINS: dict[str, str] = {
    "zendesk.com": "Zendesk",
    "freshdesk.com": "Freshdesk",
    "freshservice.com": "Freshservice",
    "helpscoutapp.com": "Help Scout",
    "desk.com": "Desk.com",
    "zohodesk.com": "Zoho Desk",
    "zohodesk.eu": "Zoho Desk",
    "zohodesk.in": "Zoho Desk",
    "zohodesk.com.au": "Zoho Desk",
    "kayako.com": "Kayako",
    "gorgias.io": "Gorgias",
    "intercom-mail.com": "Intercom",
    "happyfox.com": "HappyFox",
    "groovehq.com": "Groove",
}


def helpdesk_of(domain: str) -> str | None:
    """The helpdesk whose native inbound domain `domain` is, if any."""
    domain = domain.rstrip(".").lower()
    for suffix, product in HELPDESK_NATIVE_DOMAINS.items():
        if domain == suffix or domain.endswith("." + suffix):
            return product
    return None


# --- the support address --------------------------------------------------------------------


def _where(form_id: str | None) -> tuple[str, str]:
    """(the check's name suffix, the setting to change) for the default form or one of
    RELAY_FORMS_FILE's."""
    if form_id is None:
        return "", "RELAY_SUPPORT_ADDRESS"
    return f":{form_id}", f"forms.{form_id}.support_address in RELAY_FORMS_FILE"


async def form_support_checks(settings: Settings, resolver: Resolver) -> list[Check]:
    """support-mx and support-helpdesk for each form of RELAY_FORMS_FILE."""
    found: list[Check] = []
    for form in settings.forms.values():
        found.append(await check_support_mx(settings, resolver, form.support_address, form.id))
        found.append(check_support_helpdesk(settings, form.support_address, form.id))
    return found


async def check_support_mx(
    settings: Settings,
    resolver: Resolver,
    address: str | None = None,
    form_id: str | None = None,
) -> Check:
    """The support address's domain must accept mail: usable MX (or A), no null MX.
    `address` and `form_id`: a form's own (default: RELAY_SUPPORT_ADDRESS)."""
    address = address or settings.support_address
    suffix, setting = _where(form_id)
    name = "support-mx" + suffix
    domain = domain_of(address)
    details: dict[str, Any] = {"domain": domain, "address": address}
    fix = (
        f"set {setting} to an address that receives mail, or have {domain}'s "
        "owner publish MX records for it"
    )
    result = await lookup(resolver, domain, "MX")
    if result.temporary:
        return lookup_failed(name, f"MX of {domain}", result, details)
    if result.nxdomain:
        return Check(name, "FAIL", f"{domain} does not exist (NXDOMAIN)", fix, details)
    mx = sorted(
        (r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in result.records
    )
    details["mx"] = [f"{p} {n or '.'}" for p, n in mx]
    real = [n for _, n in mx if n not in ("", ".")]
    if mx and not real:
        return Check(
            name,
            "FAIL",
            f"{domain} publishes a null MX (RFC 7505): it accepts no mail, every message to "
            f"{address} would bounce",
            fix,
            details,
        )
    if not mx:
        return await _implicit_mx(resolver, domain, fix, details, name)
    return await _usable_mx(resolver, domain, len(mx), real, fix=fix, details=details, name=name)


async def _implicit_mx(
    resolver: Resolver, domain: str, fix: str, details: dict[str, Any], name: str
) -> Check:
    """No MX: senders fall back to the domain's own address record (RFC 5321 §5.1)."""
    found, found_lookup = await addresses_of(resolver, domain)
    if found:
        return Check(
            name,
            "PASS",
            f"{domain} has no MX; mail goes to its address record ({', '.join(found)})",
            "",
            details,
        )
    return Check(
        name,
        "WARN" if found_lookup.temporary else "FAIL",
        f"{domain} has neither MX nor A/AAAA records",
        fix,
        details,
    )


async def _usable_mx(
    resolver: Resolver,
    domain: str,
    published: int,
    real: list[str],
    *,
    fix: str,
    details: dict[str, Any],
    name: str = "support-mx",
) -> Check:
    """At least one of the `real` MX hosts (of `published` MX records) must have an address."""
    looked = await asyncio.gather(*(addresses_of(resolver, n) for n in real))
    usable = [f"{n} ({', '.join(a)})" for n, (a, _) in zip(real, looked, strict=True) if a]
    details["usable"] = usable
    if not usable:
        return Check(
            name,
            "FAIL",
            f"no MX host of {domain} has an address ({', '.join(real)})",
            fix,
            details,
        )
    findings: list[Finding] = []
    if len(real) < published:
        findings.append(Finding("WARN", f"{domain} mixes a null MX with real ones", fix))
    return combine(name, findings, f"{domain} accepts mail: MX {', '.join(usable)}", details)


def check_support_helpdesk(
    settings: Settings, address: str | None = None, form_id: str | None = None
) -> Check:
    """Receiver checklist row 7: send to your own address that forwards to the helpdesk."""
    address = address or settings.support_address
    suffix, setting = _where(form_id)
    name = "support-helpdesk" + suffix
    product = helpdesk_of(domain_of(address))
    details: dict[str, Any] = {"address": address, "helpdesk": product}
    if product is None:
        return Check(
            name,
            "PASS",
            f"{address} is not a helpdesk's native address",
            "",
            details,
        )
    return Check(
        name,
        "WARN",
        f"{address} is {product}'s native address: {product} advises sending to an address "
        "of your own domain that forwards to it (fewer duplicates, no risk of the native "
        "address being suspended)",
        f"create e.g. support@{settings.from_domain} forwarding to {address}, add it to "
        f"{product} as a support address, and set "
        + (f"{setting}=" if form_id is None else f"{setting} to ")
        + f"support@{settings.from_domain}",
        details,
    )


# --- hCaptcha -------------------------------------------------------------------------------


def check_hcaptcha(settings: Settings) -> Check:
    """Receiver checklist row 5: a real CAPTCHA, not the published always-pass test keys."""
    test_keys = hcaptcha_test_keys(settings)
    fix = (
        "create a site at dashboard.hcaptcha.com and set RELAY_HCAPTCHA_SITEKEY and "
        "RELAY_HCAPTCHA_SECRET to its keys"
    )
    status: Status = "WARN" if settings.is_development else "FAIL"
    if not settings.hcaptcha_sitekey or settings.hcaptcha_secret is None:
        return Check("hcaptcha", status, "no hCaptcha keys: the form is not protected", fix)
    if test_keys:
        where = f" (allowed only because RELAY_ENV={settings.env})" if status == "WARN" else ""
        return Check(
            "hcaptcha",
            status,
            f"{' and '.join(test_keys)} hold hCaptcha's published test keys, which accept "
            f"every token{where}",
            fix,
            {"test_keys": test_keys},
        )
    return Check("hcaptcha", "PASS", "hCaptcha keys set (not the published test keys)")
