"""The reference: a private Postfix instance, with or without OpenDKIM, relaying to the sink.

Everything lives in one temp folder: its own config_directory (main.cf, master.cf with every
service unchrooted), queue_directory, data_directory and maillog_file; smtpd listens on
127.0.0.1:<free port>; it is started with `postfix -c DIR start` (no postmulti).

Postfix must do its OWN MX lookup, as the relay does (a transport_maps relay would not count).
Postfix resolves through glibc, which reads /etc/resolv.conf and cannot name a port, so the
instance is started inside a private mount namespace (`unshare --mount`) in which a
resolv.conf naming 127.53.x.y (picked per run) is bind-mounted over /etc/resolv.conf; bench.peers
answers for the test zone there on port 53. The machine's own /etc/resolv.conf is never touched, and
every process of the instance inherits the namespace. The MX (the sink) listens on a free
port, which Postfix's smtp client uses through smtp_tcp_port.

OpenDKIM runs as a milter on 127.0.0.1:<free port>, signing relay.test mail with the same
RSA-2048 key (selector s1) that the relay signs with, relaxed/relaxed.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.util import free_port, port_open, running, wait_until
from bench.world import PORT53_HOST

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
proxywrite unix - - n -  1 proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def available() -> str | None:
    """None when Postfix, OpenDKIM and unshare are usable; else why not."""
    for tool in (POSTFIX, OPENDKIM, SMTP_SOURCE, shutil.which("unshare")):
        if not tool or not Path(tool).exists():
            return f"{tool or 'unshare'} is missing (apt-get install postfix opendkim util-linux)"
    return None


def main_cf(
    base: Path, *, listen_port: int, sink_port: int, milter: str | None, defer: bool = False
) -> str:
    lines = [
        "compatibility_level = 3.6",
        f"queue_directory = {base}/spool",
        f"data_directory = {base}/data",
        f"maillog_file = {base}/maillog",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        "myhostname = mail.relay.test",
        "mydomain = relay.test",
        "myorigin = $mydomain",
        "mydestination =",
        "local_recipient_maps =",
        "alias_maps =",
        "alias_database =",
        "relay_domains =",
        "mynetworks = 127.0.0.0/8",
        "inet_interfaces = 127.0.0.1",
        "inet_protocols = ipv4",
        "smtpd_relay_restrictions = permit_mynetworks, reject",
        "smtp_host_lookup = dns",
        f"smtp_tcp_port = {sink_port}",
        "smtp_tls_security_level = none",
        "smtpd_tls_security_level = none",
        "smtputf8_enable = no",
        "biff = no",
        f"# smtpd: 127.0.0.1:{listen_port}",
    ]
    if defer:
        lines.append("defer_transports = smtp")
    if milter:
        lines += [
            f"smtpd_milters = inet:{milter}",
            "non_smtpd_milters = $smtpd_milters",
            "milter_default_action = tempfail",
        ]
    return "\n".join(lines) + "\n"


def opendkim_conf(base: Path, key_file: Path, milter_port: int) -> str:
    return "\n".join(
        [
            "Syslog no",
            "Mode s",
            "Domain relay.test",
            "Selector s1",
            f"KeyFile {key_file}",
            f"Socket inet:{milter_port}@127.0.0.1",
            "Canonicalization relaxed/relaxed",
            "SignatureAlgorithm rsa-sha256",
            "InternalHosts 127.0.0.1",
            "UserID postfix",
            f"PidFile {base}/opendkim.pid",
            "",
        ]
    )


@dataclass(frozen=True)
class Instance:
    port: int
    base: Path

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    @property
    def maillog(self) -> Path:
        return self.base / "maillog"

    def deferred(self) -> int:
        return sum(1 for path in (self.base / "spool" / "deferred").rglob("*") if path.is_file())

    def release(self) -> None:
        """Lift defer_transports and flush: the deferred queue goes out now."""
        for argv in (
            [POSTCONF, "-c", str(self.etc), "-e", "defer_transports ="],
            [POSTFIX, "-c", str(self.etc), "reload"],
            [POSTFIX, "-c", str(self.etc), "flush"],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def instance(
    base: Path, *, sink_port: int, key_pem: bytes | None, defer: bool = False
) -> Iterator[Instance]:
    """A running private Postfix (+ OpenDKIM when key_pem). With `defer`, mail waits in the
    deferred queue until Instance.release()."""
    base.mkdir(parents=True, exist_ok=True)
    etc = base / "etc"
    etc.mkdir(exist_ok=True)
    (base / "spool").mkdir(mode=0o755, exist_ok=True)
    (base / "data").mkdir(mode=0o700, exist_ok=True)
    shutil.chown(base / "data", user="postfix")
    listen_port = free_port()
    milter: str | None = None
    with contextlib.ExitStack() as stack:
        if key_pem is not None:
            key_file = base / "opendkim.key"
            key_file.write_bytes(key_pem)
            shutil.chown(key_file, user="postfix")
            key_file.chmod(0o600)
            milter_port = free_port()
            conf = base / "opendkim.conf"
            conf.write_text(opendkim_conf(base, key_file, milter_port))
            stack.enter_context(
                running([OPENDKIM, "-f", "-x", str(conf)], log=base / "opendkim.log")
            )
            if not wait_until(lambda: port_open("127.0.0.1", milter_port), 10):
                raise RuntimeError(f"opendkim did not listen; see {base}/opendkim.log")
            milter = f"127.0.0.1:{milter_port}"
        (etc / "main.cf").write_text(
            main_cf(base, listen_port=listen_port, sink_port=sink_port, milter=milter, defer=defer)
        )
        (etc / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{listen_port}"))
        resolv = base / "resolv.conf"
        resolv.write_text(f"nameserver {PORT53_HOST}\noptions timeout:2 attempts:2\n")
        script = f"mount --bind {resolv} /etc/resolv.conf && exec {POSTFIX} -c {etc} start"
        start = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if start.returncode != 0:
            raise RuntimeError(f"postfix start failed: {start.stdout}{start.stderr}")
        pid_file = base / "spool" / "pid" / "master.pid"
        master_pid = 0
        try:
            if not wait_until(lambda: port_open("127.0.0.1", listen_port), 15):
                raise RuntimeError(f"postfix smtpd did not listen; see {base}/maillog")
            with contextlib.suppress(OSError, ValueError):
                master_pid = int(pid_file.read_text().split()[0])
            yield Instance(listen_port, base)
        finally:
            subprocess.run(
                [POSTFIX, "-c", str(etc), "stop"], capture_output=True, timeout=60, check=False
            )
            if master_pid:
                wait_until(lambda: not Path(f"/proc/{master_pid}").exists(), 15)


def inject(port: int, message_file: Path, count: int, sessions: int) -> float:
    """smtp-source: `count` copies of the message over `sessions` parallel SMTP sessions;
    returns the seconds it took (the message is queued in Postfix when it returns)."""
    started = time.monotonic()
    subprocess.run(
        [
            SMTP_SOURCE,
            "-s",
            str(sessions),
            "-m",
            str(count),
            "-d",
            "-f",
            "form@relay.test",
            "-t",
            "help@support.test",
            "-M",
            "www.relay.test",
            "-F",
            str(message_file),
            f"127.0.0.1:{port}",
        ],
        check=True,
        timeout=600,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - started


def message_file(raw: bytes, path: Path) -> Path:
    """smtp-source -F appends CRLF to each line of the file: store it with LF endings."""
    path.write_bytes(raw.replace(b"\r\n", b"\n"))
    return path
