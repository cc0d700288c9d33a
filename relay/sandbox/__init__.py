"""Local stand-ins for the outside world, for `relay demo`, the tests and the benchmark: an
authoritative DNS server, a support mailbox, hCaptcha's siteverify and the test world (its
domains, loopback addresses and zone). Nothing here is used in production.

It imports only relay.config, relay.errors, relay.logs and itself (never tests/), so the demo
and the benchmark run from a checkout or an install without the test suite."""
