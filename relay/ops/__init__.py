"""The operator's layer: the `relay` command and what only an operator runs.

`cli` is the command line, `doctor` checks what a receiver will think of our mail,
`dnsrecords` prints the records to publish, `keygen` makes DKIM keys and `demo` runs the
whole pipeline in a sandbox.

May import every other layer; nothing imports ops (tests/test_layers.py).
"""
