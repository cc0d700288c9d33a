"""The web layer: the public form and its submission, embed.js, /healthz.

`app` is the application factory (every resource built per app, nothing at import time),
`views` the routes, `body` reads every request body whole (its size cap and its deadline,
whatever the framing), `forms` reads and validates untrusted input, `captcha` asks hCaptcha,
`origins` decides which pages may frame and post the form. Templates, static files and
translations live beside them.

May import: relay.config, relay.errors, relay.logs, relay.mail, relay.store and relay.accept.
Never ops (tests/test_layers.py).
"""
