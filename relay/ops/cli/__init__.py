"""The `relay` command: a thin operator's layer over the modules that own each concern, one
module per group of commands (send, outbox, deliverability, alerts, setup; common holds what
they share).

Configuration is loaded once per command through `load_settings()`; a bad configuration exits
2 with every problem listed by variable name.
"""

from __future__ import annotations

import click

from relay.ops.cli import alerts, deliverability, outbox, send, setup


@click.group()
@click.version_option(package_name="formrelay")
def main() -> None:
    """formrelay: a safe web-form-to-support email relay."""


for command in (
    send.send,
    outbox.worker,
    outbox.log_command,
    outbox.show,
    outbox.retry,
    outbox.release_command,
    outbox.purge,
    outbox.queue_check,
    outbox.workers_command,
    outbox.db,
    deliverability.doctor_command,
    deliverability.dns_records,
    deliverability.dkim,
    alerts.alerts,
    setup.forms_group,
    setup.admin,
    setup.demo,
):
    main.add_command(command)
