"""The test DNS server: `relay.sandbox.dns`, which `relay demo` ships, under its test name."""

from relay.sandbox.dns import DNSZoneServer, ptr_name, txt_record

__all__ = ["DNSZoneServer", "ptr_name", "txt_record"]
