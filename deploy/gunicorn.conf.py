"""Gunicorn settings for the formrelay web process (read with `gunicorn -c`).

The web process only validates, checks the CAPTCHA and commits to the outbox; delivery is the
worker's job, so requests are short and a few threaded workers are enough. Every value can be
overridden from the environment without editing this file.

Slow clients are nginx's job (deploy/nginx/formrelay.conf buffers every request and times
out slow headers and bodies; measured in docs/security.md). Without it the app still ends
every body read after RELAY_BODY_TIMEOUT, and gthread parks a connection that sends nothing
for 5 s, but a client sending its headers slowly holds a thread: never face the internet
with gunicorn alone.
"""

import multiprocessing
import os

bind = os.environ.get("FORMRELAY_BIND", "127.0.0.1:8000")
# memory:// rate limits (the default) count in each process, so the app refuses them with
# more than one worker (RELAY_WEB_PROCESSES below); with redis:// every worker shares one
# count. On 2 cores the bench (bench/run --only accept) put 2 x 8, 3 x 4 and 4 x 4 within its
# run-to-run noise of each other; each worker costs ~95 MB.
_shared_limits = not os.environ.get("RELAY_RATE_LIMIT_STORAGE", "memory://").startswith(
    "memory://"
)
_default_workers = min(4, multiprocessing.cpu_count() * 2) if _shared_limits else 1
workers = int(os.environ.get("FORMRELAY_WEB_WORKERS", _default_workers))
# 16 request threads in all by default, however many processes share them.
threads = int(os.environ.get("FORMRELAY_WEB_THREADS", max(4, 16 // workers)))
worker_class = "gthread"
# siteverify is bounded by RELAY_HCAPTCHA_TIMEOUT (5 s) and the visitor-domain check by
# RELAY_DNS_TIMEOUT; 30 s leaves a wide margin without letting a stuck worker live forever.
timeout = 30
graceful_timeout = 20
keepalive = 5
# Recycling a worker after max_requests guards against slow leaks at the price of a gap: the
# worker finishes its requests and exits, and only then does the master fork its successor
# (about half a second before it serves again). With several workers the others serve
# meanwhile; with the one of memory:// limits every visitor waits, and in bench/run a spam
# burst of 2,000 posts met a recycle every time (real submissions' p99 2.8-3.2 s with it,
# 0.7-0.9 s without). So only several workers are recycled by default; FORMRELAY_MAX_REQUESTS
# sets it either way (0: never).
max_requests = int(os.environ.get("FORMRELAY_MAX_REQUESTS", 2000 if workers > 1 else 0))
max_requests_jitter = 200
# Bodies are capped by nginx (client_max_body_size) and by the app; these stop header abuse.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# Proxy headers are interpreted by the app (RELAY_TRUSTED_PROXIES); gunicorn only trusts
# X-Forwarded-Proto for wsgi.url_scheme from the local nginx.
forwarded_allow_ips = os.environ.get("FORMRELAY_FORWARDED_ALLOW_IPS", "127.0.0.1")
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("FORMRELAY_GUNICORN_LOGLEVEL", "info")
# Load the app in each worker, not the master: the outbox engine must not cross a fork.
preload_app = False
proc_name = "formrelay-web"

# The relay's modules, though, are imported here, once, in the master: a worker forked at start
# or after max_requests then begins with them in memory and only builds its app (about 0.1 s
# instead of 1.5 s of imports, which with one worker is time in which no request is served, and
# CPU the spam burst of bench/run paid at every recycle). Importing relay starts nothing (no
# thread, socket or engine; tests/test_deploy.py keeps it so). The price: a HUP re-forks
# workers from these modules, so new code needs a restart, not a reload.
import relay.web.app  # noqa: E402,F401 - imported for the forked workers


# Prometheus (GET /metrics, RELAY_METRICS_TOKEN): with several worker processes each writes its
# values to files in PROMETHEUS_MULTIPROC_DIR (the systemd unit sets it to its RuntimeDirectory)
# and /metrics adds them up. Files of an earlier run would count twice: cleared at start.
def on_starting(server):
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.remove(os.path.join(path, name))


def child_exit(server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
# The app refuses memory:// rate limits when more than one process would keep its own count,
# so it must know the count: exported for the master (`--check-config` loads the app there),
# then again in each worker from the master's own number, which includes `-w` on the command
# line and TTIN/TTOU.
os.environ["RELAY_WEB_PROCESSES"] = str(workers)


def post_fork(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    os.environ["RELAY_WEB_PROCESSES"] = str(server.num_workers)
