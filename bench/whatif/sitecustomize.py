"""`bench/run --what-if tls-once`: measure the relay as if each process built its TLS client
contexts once instead of once per request/delivery.

Loaded through PYTHONPATH by gunicorn and `relay worker` only for that what-if run. It caches
ssl.create_default_context per argument set, which is what a fix in relay/captcha.py (one
httpx.Client, or one SSLContext, per verifier) and relay/smtp.py (tls_context cached per
policy and CA file) would do. Never used by the shipped code or the default benchmark.
"""

import functools
import ssl

_create = ssl.create_default_context


@functools.lru_cache(maxsize=16)
def _cached(purpose=ssl.Purpose.SERVER_AUTH, *, cafile=None, capath=None, cadata=None):
    return _create(purpose, cafile=cafile, capath=capath, cadata=cadata)


ssl.create_default_context = _cached
