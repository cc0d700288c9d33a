"""The mail layer: a submission becomes a signed message that reaches the support address.

`message` builds one safe RFC 5322 message (its body quoted-printable by `qp`), `signing`
signs it with DKIM, `mx` resolves where mail for a domain goes (its queries on `dnswire`'s
lean path where that mirrors the installed dnspython exactly), `smtp` makes one delivery
attempt (with `sessions` keeping idle SMTP sessions for the next message) and `attempt` is
what an attempt yields as data, shared with the store and the worker; `send` is
sign-then-deliver for one message.

May import: relay.config, relay.errors, relay.logs. Never the store, the web or ops: mail
knows nothing of where a message is kept or who asked for it (tests/test_layers.py).
"""
