"""Local stand-ins for the outside world, for `relay demo` and the tests: an authoritative DNS
server and a support mailbox, both on loopback. Nothing here is used in production."""
