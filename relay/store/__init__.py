"""The store layer: the durable outbox and its schema.

`schema` declares the tables and `engine` opens them (SQLite's durability settings, reconnects,
Alembic migrations, transactions). `outbox` is the API the web and the worker use (enqueue,
claim, leases, record) on top of `log`, what the operator reads and does (list, show, retry,
purge, queue check). `group_commit` shares one transaction between concurrent enqueues,
`notify` carries PostgreSQL's LISTEN/NOTIFY both ways, `retry` decides what becomes of a
message after an attempt, `workers` is the registry of delivery workers and their heartbeats
(whose leases a claim may take), `records` are the rows handed out and `views` turns them
into text.

May import: relay.config, relay.errors, relay.logs and relay.mail.attempt (the shape of an
attempt it records). Never the web or ops (tests/test_layers.py).
"""
