"""A local Mosquitto broker for tests and the demo: generated config, optional TLS, persistence.

``LocalBroker`` runs the Debian ``mosquitto`` binary as a child process with a config written
into a work directory, on free loopback ports. It can be stopped (SIGTERM: Mosquitto writes its
persistence file on the way out), killed (SIGKILL: "pull the plug", nothing is written) and
restarted on the same ports with the same persistence file, so persistent sessions and the
QoS 1 messages queued for them survive a clean restart.

Measured with Mosquitto 2.0.11 (Debian): on SIGTERM the broker logs "Saving in-memory database"
and a restarted broker still holds the sessions of clean-session-false subscribers, their
subscriptions and the QoS 1 messages queued for them while offline. On SIGKILL it writes
nothing: everything since the last save is gone. The last save is the previous clean stop or a
``save()`` (SIGUSR1); ``autosave_interval`` defaults to 0 here ("save only on exit or
SIGUSR1") so that ``kill()`` loses a predictable amount.

Limits set in the generated config (all global in Mosquitto):

* ``max_packet_size`` 16 MiB + 4 KiB: a 16 MiB payload with its topic and properties fits, so
  10 MB test payloads reach subscribers. Bigger packets make the broker disconnect the sender.
* ``max_queued_messages`` 1,000,000 per client (Mosquitto's default is 1000, which would drop
  most of a 10,000-message backlog for an offline subscriber without telling anyone);
  ``max_queued_bytes`` is left unlimited.
* ``max_inflight_messages`` 20 (Mosquitto's default): QoS 1 messages sent to one client and not
  yet acknowledged. Mosquitto 2.0 also announces it to MQTT 5 clients as Receive Maximum in
  CONNACK (measured), so it caps a v5 publisher's own unacknowledged QoS 1 messages too.

Mosquitto started as root drops to user ``mosquitto`` and then cannot read root-owned 0600 key
and password files, nor write a root-owned work directory. The config therefore names the
current user in ``user``, which Mosquitto ignores when it does not run as root.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

DEFAULT_MOSQUITTO = "/usr/sbin/mosquitto"
DEBIAN_PACKAGES = "mosquitto mosquitto-clients"

MAX_PACKET_SIZE = 16 * 1024 * 1024 + 4096
MAX_QUEUED_MESSAGES = 1_000_000
MAX_INFLIGHT_MESSAGES = 20

_HOST = "127.0.0.1"
_START_ATTEMPTS = 5
_FIXED_PORT_PATIENCE = 3.0
_RUNNING = re.compile(r"mosquitto version \S+ running")
_ADDRESS_IN_USE = "Address already in use"


class BrokerError(RuntimeError):
    """The local broker could not be started, stopped or configured."""


class BrokerNotInstalledError(BrokerError):
    """A Mosquitto program is missing."""


def free_port(host: str = _HOST) -> int:
    """Return a TCP port on host that was free a moment ago (bind to port 0, then release)."""
    return _free_ports(1, host)[0]


def _free_ports(count: int, host: str = _HOST) -> list[int]:
    """Return count distinct free ports: all sockets stay bound until every port is chosen."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pbkdf2_password_line(username: str, password: str) -> str:
    """Return a password-file line in Mosquitto's ``$7$`` format (PBKDF2-SHA512, 101 rounds)."""
    # The same format and parameters as mosquitto_passwd 2.0: 12-byte salt, 64-byte hash.
    iterations = 101
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    salt_b64 = base64.b64encode(salt).decode()
    digest_b64 = base64.b64encode(digest).decode()
    return f"{username}:$7${iterations}${salt_b64}${digest_b64}\n"


def _kill_quietly(box: list[subprocess.Popen[bytes] | None]) -> None:
    """Finalizer: SIGKILL and reap a broker that its owner forgot to stop."""
    proc = box[0]
    if proc is not None and proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _setpriv_pdeathsig() -> str | None:
    """Return setpriv's path if it supports --pdeathsig (util-linux 2.33+), else None."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in out else None


class LocalBroker:
    """A Mosquitto child process on free loopback ports, with a generated config and TLS."""

    def __init__(
        self,
        work_dir: str | os.PathLike[str] | None = None,
        *,
        tls: bool = False,
        require_certificate: bool = True,
        plain_auth: bool = False,
        username: str = "gate-agent",
        password: str | None = None,
        port: int = 0,
        tls_port: int = 0,
        autosave_interval: int = 0,
        max_packet_size: int = MAX_PACKET_SIZE,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        max_inflight_messages: int = MAX_INFLIGHT_MESSAGES,
        verbose: bool = False,
        mosquitto: str | os.PathLike[str] = DEFAULT_MOSQUITTO,
        mosquitto_passwd: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        """Prepare a broker; nothing runs until start(). Port 0 means "pick a free one"."""
        if ":" in username:
            raise ValueError("a Mosquitto username cannot contain ':'")
        self._mosquitto = Path(mosquitto)
        self._mosquitto_passwd = mosquitto_passwd
        self._tls = tls
        self._require_certificate = require_certificate
        self._plain_auth = plain_auth
        self._username = username
        self._password = password if password is not None else secrets.token_urlsafe(16)
        self._requested_ports = (port, tls_port if tls else 0)
        self._port = port
        self._tls_port = tls_port if tls else 0
        self._ports_fixed = port != 0 and (not tls or tls_port != 0)
        self._autosave_interval = autosave_interval
        self._max_packet_size = max_packet_size
        self._max_queued_messages = max_queued_messages
        self._max_inflight_messages = max_inflight_messages
        self._verbose = verbose
        self._start_timeout = start_timeout
        self._owns_dir = work_dir is None
        self._dir = Path(work_dir) if work_dir is not None else None
        self._prepared = False
        self._procbox: list[subprocess.Popen[bytes] | None] = [None]
        self._finalizer = weakref.finalize(self, _kill_quietly, self._procbox)

    # --- where to connect -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The loopback address every listener binds to."""
        return _HOST

    @property
    def port(self) -> int:
        """The plain MQTT listener's port (known after start())."""
        self._require_ports()
        return self._port

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (known after start(); only with tls=True)."""
        self._require_tls()
        self._require_ports()
        return self._tls_port

    @property
    def username(self) -> str:
        """The user in the password file (TLS listener, and the plain one with plain_auth)."""
        return self._username

    @property
    def password(self) -> str:
        """That user's password."""
        return self._password

    @property
    def work_dir(self) -> Path:
        """The directory holding config, certificates, password file, log and persistence."""
        return self._work_dir()

    @property
    def config_path(self) -> Path:
        """The generated mosquitto.conf."""
        return self._work_dir() / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """Mosquitto's log file; it grows across restarts."""
        return self._work_dir() / "mosquitto.log"

    @property
    def persistence_path(self) -> Path:
        """Mosquitto's persistence file (exists after the first save)."""
        return self._work_dir() / "mosquitto.db"

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM) that signed the server and client certificates."""
        self._require_tls()
        return self._work_dir() / "ca.pem"

    @property
    def client_cert(self) -> Path:
        """A client certificate (PEM) signed by the CA."""
        self._require_tls()
        return self._work_dir() / "client.pem"

    @property
    def client_key(self) -> Path:
        """The client certificate's private key (PEM)."""
        self._require_tls()
        return self._work_dir() / "client.key"

    @property
    def pid(self) -> int | None:
        """The running broker's process id, or None."""
        proc = self._procbox[0]
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self.pid is not None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start Mosquitto; return once it reports running and the plain port accepts TCP."""
        if self.running:
            raise BrokerError("the broker is already running")
        if not self._mosquitto.exists():
            raise BrokerNotInstalledError(
                f"Mosquitto not found at {self._mosquitto}: install the Debian packages "
                f"{DEBIAN_PACKAGES!r} (apt-get install {DEBIAN_PACKAGES})"
            )
        self._prepare()
        # Fresh ports are picked again if one was taken between bind-to-0 and Mosquitto's bind.
        # Fixed ports (given, or kept for a restart) are retried for a while instead: on
        # loopback a client reconnecting to a closed port can briefly hold it (TCP self-connect).
        deadline = time.monotonic() + _FIXED_PORT_PATIENCE
        attempt = 0
        while True:
            attempt += 1
            if not self._ports_fixed:
                self._choose_ports()
            try:
                self._start_once()
            except _AddressInUseError:
                if self._ports_fixed and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                if not self._ports_fixed and attempt < _START_ATTEMPTS:
                    log.debug("a port was taken before Mosquitto could bind it, retrying")
                    continue
                raise BrokerError(
                    f"ports {self._ports()} are in use; log tail:\n{self._tail()}"
                ) from None
            self._ports_fixed = True
            return

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop with SIGTERM (Mosquitto saves its persistence file), SIGKILL after timeout."""
        proc = self._procbox[0]
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("Mosquitto ignored SIGTERM for %.1f s, killing it", timeout)
                proc.kill()
                proc.wait()
        self._procbox[0] = None
        log.info("local broker stopped (exit status %s)", proc.returncode)
        return proc.returncode

    def kill(self) -> None:
        """Kill with SIGKILL: the plug is pulled, nothing is saved since the last save."""
        proc = self._procbox[0]
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._procbox[0] = None
        log.info("local broker killed")

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same ports with the same persistence file."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def save(self, timeout: float = 10.0) -> None:
        """Make Mosquitto write its persistence file now (SIGUSR1) and wait until it has."""
        proc = self._procbox[0]
        if proc is None or proc.poll() is not None:
            raise BrokerError("the broker is not running")
        before = self._persistence_inode()
        proc.send_signal(signal.SIGUSR1)
        # Mosquitto logs "Saving in-memory database" *before* it writes mosquitto.db.new and
        # renames it over mosquitto.db: a SIGKILL right after that line loses the save
        # (measured). The rename gives the file a new inode; the old one is still in use
        # while the new file is created, so a changed inode means the save is complete.
        deadline = time.monotonic() + timeout
        while self._persistence_inode() in (before, None):
            if proc.poll() is not None:
                raise BrokerError(f"Mosquitto exited while saving; log tail:\n{self._tail()}")
            if time.monotonic() > deadline:
                raise BrokerError(f"no save within {timeout} s; log tail:\n{self._tail()}")
            time.sleep(0.005)

    def _persistence_inode(self) -> int | None:
        try:
            return self.persistence_path.stat().st_ino
        except FileNotFoundError:
            return None

    def close(self) -> None:
        """Stop the broker and remove the work directory if this object created it."""
        self.stop()
        if self._owns_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._prepared = False

    def __enter__(self) -> LocalBroker:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of Mosquitto's log and of its stderr."""
        return self._tail(lines)

    # --- internals --------------------------------------------------------------------------

    def _work_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="gate-broker-"))
        return self._dir

    def _require_tls(self) -> None:
        if not self._tls:
            raise BrokerError("this broker has no TLS listener (tls=False)")

    def _require_ports(self) -> None:
        if not self._ports_fixed:
            raise BrokerError("ports are chosen at start(): start the broker first")

    def _ports(self) -> list[int]:
        return [self._port, self._tls_port] if self._tls else [self._port]

    def _choose_ports(self) -> None:
        ports = _free_ports(2 if self._tls else 1)
        self._port = self._requested_ports[0] or ports[0]
        if self._tls:
            self._tls_port = self._requested_ports[1] or ports[1]

    def _prepare(self) -> None:
        """Write certificates and the password file once; the config on every start."""
        directory = self._work_dir()
        if any(ch.isspace() for ch in str(directory)):
            raise BrokerError(f"Mosquitto's config cannot name a path with spaces: {directory}")
        if self._prepared:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if self._tls:
            self._write_certificates(directory)
        if self._tls or self._plain_auth:
            self._write_password_file(directory / "passwords")
        self._prepared = True

    def _write_certificates(self, directory: Path) -> None:
        try:
            import trustme
        except ImportError as exc:
            raise BrokerError(
                "tls=True needs the 'trustme' package (a dev dependency of gate-agent)"
            ) from exc
        ca = trustme.CA()
        server = ca.issue_cert(_HOST, "localhost")
        client = ca.issue_cert("gate-agent.client")
        ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        with open(directory / "server.pem", "wb") as chain:
            for blob in server.cert_chain_pems:
                chain.write(blob.bytes())
        client.cert_chain_pems[0].write_to_path(str(directory / "client.pem"))
        for name, leaf in (("server.key", server), ("client.key", client)):
            key_path = directory / name
            key_path.touch(mode=0o600)
            leaf.private_key_pem.write_to_path(str(key_path))
            key_path.chmod(0o600)

    def _write_password_file(self, path: Path) -> None:
        if self._mosquitto_passwd is not None:
            tool = shutil.which(os.fspath(self._mosquitto_passwd))
            if tool is None:
                raise BrokerNotInstalledError(
                    f"{self._mosquitto_passwd} not found: install the Debian packages "
                    f"{DEBIAN_PACKAGES!r}"
                )
        else:
            tool = shutil.which("mosquitto_passwd") or shutil.which(
                "mosquitto_passwd", path="/usr/bin:/usr/sbin"
            )
        path.touch(mode=0o600)
        path.chmod(0o600)
        if tool is None:
            log.debug("mosquitto_passwd not found, writing the $7$ hash directly")
            path.write_text(_pbkdf2_password_line(self._username, self._password))
            return
        # A plain "user:password" file hashed in place with -U: the password never appears
        # on a command line (where other users could read it in /proc).
        path.write_text(f"{self._username}:{self._password}\n")
        result = subprocess.run(
            [tool, "-U", str(path)], capture_output=True, text=True, timeout=30, check=False
        )
        if result.returncode != 0 or ":$7$" not in path.read_text():
            path.write_text("")
            raise BrokerError(f"mosquitto_passwd -U failed: {result.stderr.strip()}")

    def _write_config(self) -> None:
        directory = self._work_dir()
        user = pwd.getpwuid(os.geteuid()).pw_name
        types = ["all"] if self._verbose else ["error", "warning", "notice", "information"]
        lines = [
            "# Generated by agent.localbroker: a local test/demo broker.",
            f"user {user}",
            "per_listener_settings true",
            "persistence true",
            f"persistence_location {directory}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {self._autosave_interval}",
            f"log_dest file {directory / 'mosquitto.log'}",
            *(f"log_type {t}" for t in types),
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            f"max_packet_size {self._max_packet_size}",
            f"max_queued_messages {self._max_queued_messages}",
            f"max_inflight_messages {self._max_inflight_messages}",
            "set_tcp_nodelay true",
            "",
            f"listener {self._port} {_HOST}",
        ]
        if self._plain_auth:
            lines += ["allow_anonymous false", f"password_file {directory / 'passwords'}"]
        else:
            lines += ["allow_anonymous true"]
        if self._tls:
            lines += [
                "",
                f"listener {self._tls_port} {_HOST}",
                "allow_anonymous false",
                f"password_file {directory / 'passwords'}",
                f"cafile {directory / 'ca.pem'}",
                f"certfile {directory / 'server.pem'}",
                f"keyfile {directory / 'server.key'}",
                f"require_certificate {'true' if self._require_certificate else 'false'}",
                "use_identity_as_username false",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        command = [str(self._mosquitto), "-c", str(self.config_path)]
        # A broker must not outlive a test run that is killed outright. The parent-death
        # signal fires when the *thread* that forked exits, so only use it from the main thread.
        if threading.current_thread() is threading.main_thread():
            setpriv = _cached_setpriv()
            if setpriv is not None:
                command = [setpriv, "--pdeathsig", "TERM", "--", *command]
        return command

    def _start_once(self) -> None:
        self._write_config()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        stderr_path = self._work_dir() / "mosquitto.stderr"
        with open(stderr_path, "ab") as stderr:
            stderr_offset = stderr.tell()
            proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr
            )
        self._procbox[0] = proc
        deadline = time.monotonic() + self._start_timeout
        while True:
            status = proc.poll()
            if status is not None:
                self._procbox[0] = None
                news = self._read_from(self.log_path, log_offset) + self._read_from(
                    stderr_path, stderr_offset
                )
                if _ADDRESS_IN_USE in news:
                    raise _AddressInUseError
                raise BrokerError(
                    f"Mosquitto exited with status {status} at start; "
                    f"config {self.config_path}; log tail:\n{self._tail()}"
                )
            # Mosquitto logs "running" after binding every listener. Only the plain port is
            # probed: a bare TCP probe of the TLS port leaves an SSL error in the log.
            if _RUNNING.search(self._read_from(self.log_path, log_offset)) and _port_accepts(
                _HOST, self._port
            ):
                log.info("local broker up on %s ports %s (pid %s)", _HOST, self._ports(), proc.pid)
                return
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"Mosquitto did not accept connections within {self._start_timeout} s; "
                    f"log tail:\n{self._tail()}"
                )
            time.sleep(0.01)

    @staticmethod
    def _read_from(path: Path, offset: int) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.log_path, self._work_dir() / "mosquitto.stderr"):
            text = self._read_from(path, 0).strip()
            if text:
                parts.append(f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or "(no log output)"


class _AddressInUseError(Exception):
    """Mosquitto could not bind a port that was free a moment before."""


_setpriv_lock = threading.Lock()
_setpriv_cache: list[str | None] = []


def _cached_setpriv() -> str | None:
    with _setpriv_lock:
        if not _setpriv_cache:
            _setpriv_cache.append(_setpriv_pdeathsig())
        return _setpriv_cache[0]
