"""The deployment kit is checked by the tools that will read it: systemd, nginx, YAML."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relay import formdefs
from relay.settings import Settings, documented_variables
from relay.web import body, forms
from tests.conftest import unavailable

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = [
    "formrelay-web.service",
    "formrelay-worker.service",
    "formrelay-alerts.service",
    "formrelay-alerts.timer",
    "formrelay-alert@.service",
]
INSTALL_BIN = "/opt/formrelay/venv/bin/"


def _unit(name: str) -> dict[str, list[str]]:
    """Section -> ["Key=value", ...] of one unit file."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = []
        else:
            sections[current].append(line)
    return sections


def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` needs the ExecStart binaries to exist: the units are copied
    with the install prefix pointed at stand-in executables in tmp_path."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        unavailable("systemd-analyze is not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for binary in ("gunicorn", "relay"):
        (bindir / binary).write_text("#!/bin/sh\nexit 0\n")
        (bindir / binary).chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    names = []
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        # A template is verified as the instance OnFailure= makes of it.
        instance = name.replace("@.", "@formrelay-worker.service.")
        (units / instance).write_text(text.replace(INSTALL_BIN, f"{bindir}/"))
        names.append(instance)
    result = subprocess.run(
        [str(tool), "verify", *(str(units / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # verify only warns (exit 0) about unknown keys and bad values: any output is a defect.
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("name", ["formrelay-web.service", "formrelay-worker.service"])
def test_systemd_units_are_sandboxed(name: str) -> None:
    service = _unit(name)["Service"]
    for line in (
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "DynamicUser=yes",
        "StateDirectory=formrelay",
        "EnvironmentFile=/etc/formrelay/env",
        "Restart=on-failure",
    ):
        assert line in service, f"{name}: missing {line}"
    assert any(line.startswith("ExecStart=" + INSTALL_BIN) for line in service)


def _seconds(value: str) -> int:
    match = re.fullmatch(r"(\d+)s?", value.strip())
    assert match, f"{value!r}: give the timeout in seconds"
    return int(match.group(1))


def test_worker_stop_timeouts_match_the_workers_own() -> None:
    """systemd and compose kill the worker this long after SIGTERM: the worker's
    RELAY_WORKER_STOP_TIMEOUT for the deliveries in flight, plus time to hand back the rest,
    QUIT and deregister, and not so much more that a stuck stop holds a redeploy up."""
    stop_timeout = Settings.model_fields["worker_stop_timeout"].default
    service = _unit("formrelay-worker.service")["Service"]
    assert "KillSignal=SIGTERM" in service
    assert not any("RELAY_WORKER_STOP_TIMEOUT" in line for line in service)
    systemd = _seconds(next(line for line in service if line.startswith("TimeoutStopSec="))[15:])
    worker = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["worker"]
    assert worker["stop_signal"] == "SIGTERM"
    assert "RELAY_WORKER_STOP_TIMEOUT" not in worker.get("environment", {})
    compose = _seconds(worker["stop_grace_period"])
    assert systemd == compose
    assert stop_timeout + 10 <= systemd <= stop_timeout + 30


def test_alerts_timer_runs_the_check_every_20_seconds() -> None:
    """Fast enough that "no worker is delivering" reaches a person within a minute of mail
    being due for RELAY_WORKER_DEAD_AFTER (15 s)."""
    service = _unit("formrelay-alerts.service")["Service"]
    assert f"ExecStart={INSTALL_BIN}relay alerts check" in service
    assert "OnUnitActiveSec=20s" in _unit("formrelay-alerts.timer")["Timer"]
    alert = _unit("formrelay-alert@.service")["Service"]
    assert f"ExecStart={INSTALL_BIN}relay alerts unit-failed %i" in alert


@pytest.mark.parametrize(
    "name", ["formrelay-web.service", "formrelay-worker.service", "formrelay-alerts.service"]
)
def test_every_unit_alerts_when_it_fails(name: str) -> None:
    assert "OnFailure=formrelay-alert@%n.service" in _unit(name)["Unit"]
    text = (DEPLOY / "systemd" / name).read_text()
    assert "# OnFailure" not in text


def test_prometheus_config_and_rules_name_real_metrics() -> None:
    """The sample scrape config and alert rules parse, and every formrelay_ series they use
    is one relay's /metrics exposes."""
    from prometheus_client.parser import text_string_to_metric_families

    from relay.metrics import Metrics, exposition
    from relay.store.metrics import _families, _worker_families

    metrics = Metrics()
    metrics.submission("accepted", "ok", "default")
    metrics.attempts.labels("delivered", "2xx").inc()
    metrics.latency.observe(1)
    metrics.heartbeat()
    body, _type = exposition(metrics)
    store_families = [*_families().values(), *_worker_families().values()]
    names = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples} | {
        family.name for family in store_families
    }
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert {job["job_name"] for job in scrape["scrape_configs"]} == {
        "formrelay-web",
        "formrelay-worker",
    }
    for job in scrape["scrape_configs"]:
        assert job["authorization"]["type"] == "Bearer"
    rules = yaml.safe_load((DEPLOY / "prometheus" / "formrelay-alerts.yml").read_text())
    used = set()
    for rule in rules["groups"][0]["rules"]:
        used |= set(re.findall(r"formrelay_[a-z_]+", rule["expr"]))
    assert used
    assert used <= names, used - names


def test_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    """The site is included from a minimal main config in a temporary prefix, with a trustme
    certificate in place of the Let's Encrypt paths."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        unavailable("nginx is not installed")
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("forms.example.com")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    logs = tmp_path / "logs"
    logs.mkdir()
    site = (DEPLOY / "nginx" / "formrelay.conf").read_text()
    site = site.replace("/etc/letsencrypt/live/forms.example.com/fullchain.pem", str(cert_path))
    site = site.replace("/etc/letsencrypt/live/forms.example.com/privkey.pem", str(key_path))
    site = site.replace("/var/log/nginx/", f"{logs}/")
    (tmp_path / "site.conf").write_text(site)
    temp_paths = "\n".join(
        f"  {kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\n"
        f"error_log {logs / 'error.log'};\n"
        "events {}\n"
        "http {\n"
        f"{temp_paths}\n"
        f"  access_log {logs / 'access.log'};\n"
        f"  include {tmp_path / 'site.conf'};\n"
        "}\n"
    )
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_site_sets_the_headers_the_app_trusts() -> None:
    """RELAY_TRUSTED_PROXIES=1: nginx must overwrite X-Forwarded-For with the peer address."""
    site = (DEPLOY / "nginx" / "formrelay.conf").read_text()
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in site
    assert "$proxy_add_x_forwarded_for" not in site
    # A client's own X-Forwarded-User (RELAY_ADMIN_TRUSTED_HEADER) never reaches the app.
    for conf in (site, (DEPLOY / "nginx" / "compose.conf").read_text()):
        assert conf.count("proxy_set_header X-Forwarded-For") == conf.count(
            'proxy_set_header X-Forwarded-User "";'
        )
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in site
    cap = re.search(r"client_max_body_size (\d+)k;", site)
    assert cap is not None
    # nginx must not refuse what the app accepts: the app answers oversize posts itself.
    assert int(cap.group(1)) * 1024 > body.DEFAULT_BODY_CAP
    # The forms of RELAY_FORMS_FILE: the largest a form may be (every field a textarea,
    # the most attachments).
    forms_cap = re.search(r"location \^~ /f/ \{\n\s+client_max_body_size (\d+)m;", site)
    assert forms_cap is not None
    largest = formdefs.FormDef(
        "largest",
        "a@b.test",
        (
            *tuple(
                formdefs.FieldDef(f"f{n}", "textarea", max_length=formdefs.TYPE_MAX["textarea"])
                for n in range(formdefs.MAX_FIELDS - 1)
            ),
            formdefs.FieldDef("files", "file"),
        ),
        attachments=formdefs.Attachments(20, formdefs.MAX_TOTAL_CAP, formdefs.MAX_TOTAL_CAP),
    )
    assert int(forms_cap.group(1)) * 1024 * 1024 > forms.max_body_bytes(largest)


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"web", "worker", "postgres", "redis"} <= set(services)
    for name, service in services.items():
        image = service.get("image", "")
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: image without a tag"
        depends = service.get("depends_on", [])
        for dependency in depends:
            assert dependency in services, f"{name} depends on unknown {dependency}"
    assert services["web"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["worker"]["command"] == ["relay", "worker"]
    assert services["alerts"]["command"] == ["relay", "alerts", "check", "--every", "20"]
    known = set(documented_variables()) | {"PROMETHEUS_MULTIPROC_DIR"}
    for name in ("web", "worker", "migrate", "alerts"):
        environment = services[name]["environment"]
        assert environment["RELAY_ENV"] == "production"
        assert environment["RELAY_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert environment["RELAY_RATE_LIMIT_STORAGE"].startswith("redis://redis:")
        unknown = set(environment) - known
        assert not unknown, f"{name}: unknown variables {unknown}"
    for secret in compose["secrets"].values():
        assert not Path(secret["file"]).is_absolute()


def test_dockerfile_runs_as_non_root() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert all(lines[i].startswith("FROM python:3.11-slim") for i in stages)
    final = lines[stages[-1] :]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage never switches user"
    assert users[-1] not in ("root", "0")
    assert not any(re.search(r"apt-get install|build-essential|gcc", line) for line in final)
    assert any("pip install" in line and "--no-cache-dir" in line for line in final)
    assert final[-1].startswith("CMD ")


def test_relayctl_runs_relay_as_the_services_do() -> None:
    """The operator's wrapper must use the worker unit's user, state, environment and key."""
    script = DEPLOY / "relayctl"
    syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    service = _unit("formrelay-worker.service")["Service"]
    for key in ("User", "StateDirectory", "EnvironmentFile", "LoadCredential", "DynamicUser"):
        line = next(line for line in service if line.startswith(key + "="))
        assert f"--property={line}" in text, f"relayctl differs from the unit on {key}"
    assert f"{INSTALL_BIN}relay" in text


def test_the_package_carries_every_file_the_app_reads() -> None:
    """`pip install .` (the Dockerfile, the systemd venv) installs only the relay package:
    templates, static files, translations and migrations must live inside relay/ and be
    listed in package-data, or an installed (not editable) relay cannot render its form."""
    import fnmatch
    import tomllib

    from relay.web import app as web

    package = DEPLOY.parent / "relay"
    for folder in (web.TEMPLATES, web.STATIC, web.TRANSLATIONS):
        assert folder.resolve().is_relative_to(package), f"{folder} is outside the package"
    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["relay"]
    for path in package.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".py":
            continue
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, p) for p in patterns), (
            f"relay/{relative} is not in [tool.setuptools.package-data]"
        )


@pytest.mark.parametrize(
    ("storage", "workers", "loads"),
    [
        ("memory://", None, True),  # one worker by default with per-process limits
        ("redis://127.0.0.1:6379/15", "2", True),
        ("memory://", "2", False),  # two counts of the one limit: refused, by name
    ],
)
def test_gunicorn_config_loads_the_app(
    base_env: dict[str, str], tmp_path: Path, storage: str, workers: str | None, loads: bool
) -> None:
    """`gunicorn --check-config` with deploy/gunicorn.conf.py imports relay:create_app()
    under the environment the systemd unit gives it; the file tells the app how many
    workers it runs (RELAY_WEB_PROCESSES), so memory:// limits with several are refused."""
    gunicorn = Path(sys.executable).with_name("gunicorn")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "FORMRELAY_"))}
    env.update(base_env)
    env["RELAY_RATE_LIMIT_STORAGE"] = storage
    if workers is not None:
        env["FORMRELAY_WEB_WORKERS"] = workers
    result = subprocess.run(
        [
            str(gunicorn),
            "--check-config",
            "--config",
            str(DEPLOY / "gunicorn.conf.py"),
            "relay:create_app()",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    output = result.stdout + result.stderr
    if loads:
        assert result.returncode == 0, output
    else:
        assert result.returncode != 0, output
        assert "RELAY_RATE_LIMIT_STORAGE: memory:// counts in each process" in output


def test_importing_the_web_app_starts_nothing() -> None:
    """deploy/gunicorn.conf.py imports relay.web.app in the master so that forked workers
    start warm; that is only safe while importing starts no thread and opens no file or
    socket (a worker would inherit them)."""
    script = (
        "import os, threading\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        "import relay.web.app\n"
        "after = set(os.listdir('/proc/self/fd'))\n"
        "print(threading.active_count(), sorted(after - before))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    assert result.stdout.split(None, 1) == ["1", "[]\n"], result.stdout + result.stderr


def test_the_gunicorn_config_imports_the_relay_in_the_master() -> None:
    text = (DEPLOY / "gunicorn.conf.py").read_text()
    assert re.search(r"^import relay\.web\.app\b", text, re.MULTILINE)
    assert re.search(r"^preload_app = False$", text, re.MULTILINE)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 0),
        ({"RELAY_RATE_LIMIT_STORAGE": "redis://127.0.0.1:6379"}, 2000),
        ({"FORMRELAY_MAX_REQUESTS": "500"}, 500),
    ],
)
def test_only_several_workers_are_recycled_by_default(
    env: dict[str, str], expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recycling the one worker of memory:// limits leaves nobody serving for a moment."""
    for name in ("RELAY_RATE_LIMIT_STORAGE", "FORMRELAY_MAX_REQUESTS", "FORMRELAY_WEB_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RELAY_WEB_PROCESSES", "1")  # the file sets it; undone after the test
    namespace: dict[str, object] = {}
    path = DEPLOY / "gunicorn.conf.py"
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert namespace["max_requests"] == expected
