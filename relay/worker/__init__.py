"""The worker layer, between the store and mail: what runs in the background.

`delivery` is the claim-sign-deliver loop (`Worker`), `leases` its registration, heartbeats
and leases (the recovery of a dead worker's mail), `outcomes` the group commit of ended
attempts, `service` the `relay worker` process (signals, alerts, metrics) and the delivery
of alert mail when no worker runs.

May import: relay.config, relay.errors, relay.logs, relay.metrics, relay.mail, relay.store
and relay.alerts. Never the web or ops (tests/test_layers.py).
"""
