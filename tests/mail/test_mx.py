"""MX resolution against a real DNS server on loopback (relay.sandbox.dns).

Every case runs on both query paths (`path`): dnswire's lean one and dnspython's own
`Resolver.resolve` (make_resolver(..., lean=False)).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import dns.exception
import dns.name
import dns.resolver
import pytest

from relay.errors import DNSPermanentError, DNSTemporaryError
from relay.mail import dnswire, mx
from relay.mail.mx import (
    MXHost,
    Resolver,
    blocking_resolver,
    domain_accepts_mail,
    domain_accepts_mail_blocking,
    make_resolver,
    order_mx,
    resolve_mx,
)
from relay.sandbox.dns import DNSZoneServer
from relay.settings import Settings


@pytest.fixture(params=["lean", "plain"])
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def resolver(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, path: str
) -> Resolver:
    settings = make_settings(RELAY_DNS_NAMESERVERS=world_dns.address)
    return make_resolver(settings, lean=path == "lean")


@pytest.fixture
def fast_resolver(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, path: str
) -> Resolver:
    """A resolver that gives up after half a second, for the timeout cases."""
    settings = make_settings(RELAY_DNS_NAMESERVERS=world_dns.address, RELAY_DNS_TIMEOUT="0.5")
    return make_resolver(settings, lean=path == "lean")


async def test_each_path_is_the_one_asked_for(
    resolver: Resolver, fast_resolver: Resolver, path: str
) -> None:
    assert dnswire.applies(resolver) is (path == "lean")
    assert dnswire.applies(fast_resolver) is (path == "lean")


@pytest.mark.parametrize("lean", [True, False])
def test_make_resolver_uses_the_configured_nameserver_and_port(
    make_settings: Callable[..., Settings], world_dns: DNSZoneServer, lean: bool
) -> None:
    resolver = make_resolver(
        make_settings(RELAY_DNS_NAMESERVERS=world_dns.address, RELAY_DNS_TIMEOUT="3"), lean=lean
    )
    assert (type(resolver) is Resolver) is lean
    [nameserver] = resolver.nameservers
    assert not isinstance(nameserver, str)
    assert str(nameserver) == f"Do53:{world_dns.host}@{world_dns.port}"
    assert resolver.lifetime == 3
    assert resolver.cache is None


async def test_single_mx(resolver: Resolver, world_dns: DNSZoneServer) -> None:
    assert await resolve_mx("support.test", resolver) == [
        MXHost("mx1.support.test", 10, ("127.0.0.2",))
    ]
    assert world_dns.queried("support.test", "MX") == 1
    assert world_dns.queried("mx1.support.test", "A") == 1


async def test_preference_order_and_equal_preferences_shuffled(
    resolver: Resolver, world_dns: DNSZoneServer
) -> None:
    world_dns.add(
        "\n".join(
            [
                "spread.test. 300 IN MX 20 backup.spread.test.",
                "spread.test. 300 IN MX 10 a.spread.test.",
                "spread.test. 300 IN MX 10 b.spread.test.",
                "spread.test. 300 IN MX 10 c.spread.test.",
                "spread.test. 300 IN MX 5 first.spread.test.",
            ]
            + [
                f"{h}.spread.test. 300 IN A 127.0.1.{i}"
                for i, h in enumerate(["a", "b", "c", "first", "backup"], 1)
            ]
        )
    )
    orders = set()
    for seed in range(12):
        hosts = await resolve_mx("spread.test", resolver, rng=random.Random(seed))
        assert [h.preference for h in hosts] == [5, 10, 10, 10, 20]
        assert hosts[0].name == "first.spread.test"
        assert hosts[-1].name == "backup.spread.test"
        assert {h.name for h in hosts[1:4]} == {"a.spread.test", "b.spread.test", "c.spread.test"}
        orders.add(tuple(h.name for h in hosts))
    assert len(orders) > 1, "equal preferences must not always come out in the same order"
    again = [await resolve_mx("spread.test", resolver, rng=random.Random(3)) for _ in range(2)]
    assert again[0] == again[1]


def test_order_mx_is_pure_and_keeps_groups() -> None:
    records = [(10, "b"), (0, "z"), (10, "a"), (10, "a")]
    assert order_mx(records, random.Random(1))[0] == (0, "z")
    assert sorted(order_mx(records, random.Random(1))[1:]) == [(10, "a"), (10, "b")]
    assert order_mx([], random.Random(1)) == []


async def test_implicit_mx_from_the_domains_own_address(resolver: Resolver) -> None:
    assert await resolve_mx("example.test", resolver) == [
        MXHost("example.test", 0, ("127.0.0.10",))
    ]


async def test_ipv4_first_then_ipv6(resolver: Resolver, world_dns: DNSZoneServer) -> None:
    world_dns.add("dual.test. 300 IN AAAA ::1\ndual.test. 300 IN A 127.0.0.11")
    [host] = await resolve_mx("dual.test", resolver)
    assert host.addresses == ("127.0.0.11", "::1")


async def test_null_mx_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(DNSPermanentError) as info:
        await resolve_mx("nullmx.test", resolver)
    assert info.value.domain == "nullmx.test"
    assert not info.value.temporary
    assert "null MX" in info.value.reason


async def test_null_mx_next_to_real_mx_is_ignored(
    resolver: Resolver, world_dns: DNSZoneServer
) -> None:
    world_dns.add("mixed.test. 300 IN MX 0 .\nmixed.test. 300 IN MX 10 mx1.support.test.")
    assert [h.name for h in await resolve_mx("mixed.test", resolver)] == ["mx1.support.test"]


async def test_nxdomain_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(DNSPermanentError) as info:
        await resolve_mx("missing.test", resolver)
    assert "NXDOMAIN" in info.value.reason


async def test_no_mx_and_no_address_is_permanent(resolver: Resolver) -> None:
    with pytest.raises(DNSPermanentError):
        await resolve_mx("noaddress.test", resolver)


@pytest.mark.parametrize("name", ["", "a..b.test", "x" * 64 + ".test"])
async def test_invalid_domain_is_permanent(resolver: Resolver, name: str) -> None:
    with pytest.raises(DNSPermanentError):
        await resolve_mx(name, resolver)


async def test_servfail_is_temporary(resolver: Resolver, world_dns: DNSZoneServer) -> None:
    world_dns.fail(["support.test"])
    with pytest.raises(DNSTemporaryError) as info:
        await resolve_mx("support.test", resolver)
    assert info.value.temporary


async def test_timeout_is_temporary(fast_resolver: Resolver, world_dns: DNSZoneServer) -> None:
    world_dns.fail(["support.test"], how="timeout")
    with pytest.raises(DNSTemporaryError) as info:
        await resolve_mx("support.test", fast_resolver)
    assert "timed out" in info.value.reason


async def test_timeout_of_the_mx_address_is_temporary(
    fast_resolver: Resolver, world_dns: DNSZoneServer
) -> None:
    world_dns.fail(["mx1.support.test"], how="timeout")
    with pytest.raises(DNSTemporaryError):
        await resolve_mx("support.test", fast_resolver)


async def test_mx_without_address_is_skipped(resolver: Resolver, world_dns: DNSZoneServer) -> None:
    world_dns.add(
        "\n".join(
            [
                "partial.test. 300 IN MX 10 gone.partial.test.",
                "partial.test. 300 IN MX 20 bare.partial.test.",
                'bare.partial.test. 300 IN TXT "no address here"',
                "partial.test. 300 IN MX 30 mx1.support.test.",
            ]
        )
    )
    assert await resolve_mx("partial.test", resolver) == [
        MXHost("mx1.support.test", 30, ("127.0.0.2",))
    ]


async def test_only_nonexistent_mx_hosts_is_permanent(
    resolver: Resolver, world_dns: DNSZoneServer
) -> None:
    world_dns.add("dangling.test. 300 IN MX 10 gone.dangling.test.")
    with pytest.raises(DNSPermanentError) as info:
        await resolve_mx("dangling.test", resolver)
    assert "gone.dangling.test" in info.value.reason


async def test_mx_host_existing_without_address_is_temporary(
    resolver: Resolver, world_dns: DNSZoneServer
) -> None:
    world_dns.add(
        "bare.test. 300 IN MX 10 mail.bare.test.\n"
        'mail.bare.test. 300 IN TXT "the A record is on its way"'
    )
    with pytest.raises(DNSTemporaryError) as info:
        await resolve_mx("bare.test", resolver)
    assert "mail.bare.test" in info.value.reason


async def test_every_call_queries_again(resolver: Resolver, world_dns: DNSZoneServer) -> None:
    await resolve_mx("support.test", resolver)
    world_dns.remove("support.test", "MX")
    world_dns.add("support.test. 300 IN MX 10 mx2.support.test.")
    assert [h.name for h in await resolve_mx("support.test", resolver)] == ["mx2.support.test"]
    assert world_dns.queried("support.test", "MX") == 2


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("visitor.test", True),  # MX
        ("example.test", True),  # A only: implicit MX
        ("nullmx.test", False),
        ("missing.test", False),  # NXDOMAIN
        ("noaddress.test", False),  # exists, neither MX nor address
        ("bad..name.test", False),
    ],
)
async def test_domain_accepts_mail(resolver: Resolver, domain: str, expected: bool) -> None:
    assert await domain_accepts_mail(domain, resolver) is expected


async def test_domain_accepts_mail_with_mx_host_down_in_dns(
    resolver: Resolver, world_dns: DNSZoneServer
) -> None:
    world_dns.add("dangling.test. 300 IN MX 10 gone.dangling.test.")
    assert await domain_accepts_mail("dangling.test", resolver) is True


@pytest.mark.parametrize("how", ["servfail", "timeout"])
async def test_domain_accepts_mail_unknown(
    fast_resolver: Resolver, world_dns: DNSZoneServer, how: str
) -> None:
    world_dns.fail(["visitor.test"], how=how)
    assert await domain_accepts_mail("visitor.test", fast_resolver) is None


# --- the blocking copy for the web form --------------------------------------------------------

# (name, type) pairs that answer, answer nothing and do not exist in world_dns.
QUERIES = [
    ("support.test", "MX"),
    ("mx1.support.test", "A"),
    ("example.test", "MX"),
    ("noaddress.test", "A"),
    ("missing.test", "MX"),
]
Outcome = list[str] | tuple[str, str]


async def async_texts(resolver: Resolver, name: str, rdtype: str) -> Outcome:
    """The records as text ([] for none), or the exception's type and text."""
    try:
        answer = await resolver.resolve(name, rdtype, raise_on_no_answer=False)
    except dns.exception.DNSException as exc:
        return type(exc).__name__, str(exc)
    return [rdata.to_text() for rdata in answer]


def blocking_texts(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> Outcome:
    """async_texts for a blocking resolver."""
    try:
        answer = resolver.resolve(name, rdtype, raise_on_no_answer=False)
    except dns.exception.DNSException as exc:
        return type(exc).__name__, str(exc)
    return [rdata.to_text() for rdata in answer]


async def test_a_blocking_copy_answers_as_the_async_resolver(
    resolver: Resolver, world_dns: DNSZoneServer
) -> None:
    blocking = blocking_resolver(resolver)
    assert isinstance(blocking, dns.resolver.Resolver)
    assert [str(ns) for ns in blocking.nameservers] == [f"Do53:{world_dns.host}@{world_dns.port}"]
    outcomes = [await async_texts(resolver, name, rdtype) for name, rdtype in QUERIES]
    assert [blocking_texts(blocking, name, rdtype) for name, rdtype in QUERIES] == outcomes
    assert outcomes[:4] == [["10 mx1.support.test."], ["127.0.0.2"], [], []]
    assert outcomes[4][0] == "NXDOMAIN"
    for domain in ("visitor.test", "example.test", "nullmx.test", "missing.test"):
        expected = await domain_accepts_mail(domain, resolver)
        assert domain_accepts_mail_blocking(domain, blocking) is expected
    assert blocking_resolver(blocking) is blocking


async def test_a_blocking_copy_keeps_ports_search_and_limits(world_dns: DNSZoneServer) -> None:
    """The configuration is copied, not shared: the port of a nameserver given as an address,
    the search list a relative name is tried in, the timeouts."""
    resolver = Resolver(configure=False)
    resolver.port = 9  # where nothing listens: the nameserver's own port must be used
    resolver.nameserver_ports = {world_dns.host: world_dns.port}
    resolver.nameservers = [world_dns.host]
    resolver.search = [dns.name.from_text("support.test")]
    resolver.use_search_by_default = True
    resolver.cache = None
    resolver.lifetime, resolver.timeout = 1.5, 0.5
    resolver.retry_servfail = True
    blocking = blocking_resolver(resolver)
    for name in mx._CONFIGURATION:
        assert getattr(blocking, name) == getattr(resolver, name), name
    assert blocking.nameservers == resolver.nameservers
    assert await async_texts(resolver, "mx1", "A") == ["127.0.0.2"]
    assert blocking_texts(blocking, "mx1", "A") == ["127.0.0.2"]
    blocking.search.append(dns.name.from_text("elsewhere.test"))
    blocking.nameserver_ports["127.0.0.9"] = 53
    assert resolver.search == [dns.name.from_text("support.test")]
    assert resolver.nameserver_ports == {world_dns.host: world_dns.port}


def test_the_copy_covers_every_public_setting_of_a_resolver() -> None:
    """A setting dnspython adds to BaseResolver must be read and copied by blocking_resolver."""
    public = {n for n in dns.resolver.BaseResolver.__annotations__ if not n.startswith("_")}
    assert set(mx._CONFIGURATION) == public
