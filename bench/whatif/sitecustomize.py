"""`bench/run --what-if tls-once`: ssl.create_default_context cached per argument set, so each
process builds a TLS client context once and every caller with the same arguments shares it.

bench/main.py puts this folder on PYTHONPATH for gunicorn and `relay worker` in that run
only; the shipped code and the default benchmark never load it. It simulated two fixes before
they existed, and both have since shipped: `HCaptchaVerifier` keeps one httpx client (one
context) per verifier (relay/web/captcha.py, 1740b82) and `tls_context` is cached per policy
and CA file (relay/mail/conversation.py, 3429d62). On code since then it changes nothing the
relay does per request or delivery; it is kept to re-measure older commits against them
(docs/performance.md, bench/results/quick-whatif-tls-once.md).
"""

import functools
import ssl

_create = ssl.create_default_context


@functools.lru_cache(maxsize=16)
def _cached(purpose=ssl.Purpose.SERVER_AUTH, *, cafile=None, capath=None, cadata=None):
    return _create(purpose, cafile=cafile, capath=capath, cadata=cadata)


ssl.create_default_context = _cached
