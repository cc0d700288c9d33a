"""The store layer: the durable outbox and its schema.

`schema` declares the tables, `engine` opens them (SQLite pragmas, reconnects, Alembic),
`outbox` is the API the web, the worker and the operator use (enqueue, claim, leases,
record), `group_commit` shares one transaction between concurrent enqueues, `notify` carries
PostgreSQL's LISTEN/NOTIFY both ways, `retry` decides what becomes of a message after an
attempt, `records` are the rows handed out, and `views` turns them into text for the log.

May import: relay.config, relay.errors, relay.logs and relay.mail.attempt (the shape of an
attempt it records). Never the web or ops (tests/test_layers.py).
"""
