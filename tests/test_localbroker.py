"""The local Mosquitto broker and the link-fault relay, driven with mosquitto_pub/mosquitto_sub.

A real broker: plain and TLS listeners, a password file, persistence across a clean restart and
what a SIGKILL loses. The relay is checked with raw MQTT packets (CONNECT/CONNACK,
PINGREQ/PINGRESP) so every byte is accounted for, then with a real client that reconnects.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from relay import Relay

from agent import localbroker
from agent.localbroker import BrokerError, BrokerNotInstalledError, LocalBroker

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
STDBUF = shutil.which("stdbuf") or "/usr/bin/stdbuf"

pytestmark = pytest.mark.skipif(
    not (Path(localbroker.DEFAULT_MOSQUITTO).exists() and Path(MOSQUITTO_SUB).exists()),
    reason="needs the Debian packages 'mosquitto mosquitto-clients'",
)

# mosquitto_pub/sub exit codes (libmosquitto MOSQ_ERR_*): 5 = not authorised, 27 = -W timeout.
NOT_AUTHORISED = 5
TIMED_OUT = 27

# Raw MQTT 3.1.1 packets for the relay tests.
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, keepalive 60 s."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes([0x10, len(body)]) + body


def recv_exactly(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    """Read exactly count bytes or fail: a short read means the peer closed."""
    sock.settimeout(timeout)
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def plain(broker: LocalBroker, port: int | None = None) -> list[str]:
    return ["-h", broker.host, "-p", str(port or broker.port)]


def tls(broker: LocalBroker, *, cert: bool = True, password: str | None = None) -> list[str]:
    args = ["-h", broker.host, "-p", str(broker.tls_port), "--cafile", str(broker.ca_file)]
    if cert:
        args += ["--cert", str(broker.client_cert), "--key", str(broker.client_key)]
    return [*args, "-u", broker.username, "-P", password or broker.password]


def publish(
    args: list[str], topic: str, message: str = "hello", *, file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Publish one QoS 1 message (or a file's bytes); exit status 0 means PUBACK came back."""
    body = ["-f", str(file)] if file is not None else ["-m", message]
    return subprocess.run(
        [MOSQUITTO_PUB, *args, "-q", "1", "-t", topic, *body],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def subscribe_once(args: list[str], topic: str, *extra: str, wait: int = 5) -> tuple[int, str]:
    """Subscribe, take what arrives within wait seconds, return (exit status, output)."""
    result = subprocess.run(
        [MOSQUITTO_SUB, *args, "-q", "1", "-t", topic, "-W", str(wait), *extra],
        capture_output=True,
        text=True,
        timeout=wait + 20,
        check=False,
    )
    return result.returncode, result.stdout


class Subscriber:
    """A mosquitto_sub in the background (with -d) whose output a test can wait for."""

    def __init__(self, args: list[str], topic: str, *extra: str) -> None:
        # mosquitto_sub's debug lines go through stdio, block-buffered into a pipe: stdbuf
        # makes them line-buffered so the test sees SUBACK when it happens.
        self.proc = subprocess.Popen(
            [STDBUF, "-oL", MOSQUITTO_SUB, "-d", *args, "-q", "1", "-t", topic, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = b""

    def wait_for(self, needle: bytes, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until needle has appeared count times in the output."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self.output.count(needle) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {needle!r} x{count} in:\n{self.output.decode()}")
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise AssertionError(f"exited before {needle!r}:\n{self.output.decode()}")
                self.output += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalBroker]:
    """One broker for the module: plain listener and TLS listener with certificate + password."""
    with LocalBroker(tls=True) as running:
        yield running


# --- the broker ---------------------------------------------------------------------------


def test_published_message_reaches_subscriber(broker: LocalBroker) -> None:
    with Subscriber(plain(broker), "gate/plain", "-C", "1") as sub:
        sub.wait_for(b"SUBACK")
        assert publish(plain(broker), "gate/plain", "passage-1").returncode == 0
        sub.wait_for(b"passage-1")


def test_tls_with_ca_client_certificate_and_password(broker: LocalBroker) -> None:
    with Subscriber(tls(broker), "gate/tls", "-C", "1") as sub:
        sub.wait_for(b"SUBACK")
        result = publish(tls(broker), "gate/tls", "over-tls")
        assert result.returncode == 0, result.stderr
        sub.wait_for(b"over-tls")


def test_tls_refuses_a_wrong_password(broker: LocalBroker) -> None:
    result = publish(tls(broker, password="not-the-password"), "gate/tls")
    assert result.returncode == NOT_AUTHORISED, result.stderr


def test_tls_refuses_a_client_without_certificate(broker: LocalBroker) -> None:
    result = publish(tls(broker, cert=False), "gate/tls")
    assert result.returncode != 0


def test_ten_megabyte_payload_reaches_subscriber(broker: LocalBroker, tmp_path: Path) -> None:
    payload = tmp_path / "snapshot.bin"
    payload.write_bytes(os.urandom(10 * 1000 * 1000))
    with Subscriber(plain(broker), "gate/big", "-C", "1", "-F", "length=%l") as sub:
        sub.wait_for(b"SUBACK")
        result = publish(plain(broker), "gate/big", file=payload)
        assert result.returncode == 0, result.stderr
        sub.wait_for(b"length=10000000")


def test_password_file_written_without_mosquitto_passwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = shutil.which

    def which_without_passwd(name: str, *args: object, **kwargs: object) -> str | None:
        return None if "mosquitto_passwd" in name else real_which(name)

    monkeypatch.setattr(shutil, "which", which_without_passwd)
    with LocalBroker(tmp_path, plain_auth=True, password="s3cret") as broker:
        assert ":$7$101$" in (tmp_path / "passwords").read_text()
        auth = [*plain(broker), "-u", broker.username, "-P", "s3cret"]
        assert publish(auth, "gate/auth").returncode == 0
        assert publish(plain(broker), "gate/auth").returncode == NOT_AUTHORISED


def test_restart_keeps_persistent_session_and_queued_message(tmp_path: Path) -> None:
    with LocalBroker(tmp_path) as broker:
        port = broker.port
        session = ["-c", "-i", "cloud-ingest"]
        status, _ = subscribe_once(plain(broker), "gate/events", *session, "-E")
        assert status == 0
        assert publish(plain(broker), "gate/events", "while-offline").returncode == 0

        broker.restart()

        assert broker.port == port
        status, out = subscribe_once(plain(broker), "gate/events", *session, "-C", "1")
        assert (status, out) == (0, "while-offline\n")


def test_sigkill_loses_what_was_not_saved_and_save_keeps_it(tmp_path: Path) -> None:
    with LocalBroker(tmp_path) as broker:
        for client in ("lost", "kept"):
            subscribe_once(plain(broker), "gate/events", "-c", "-i", client, "-E")
        assert publish(plain(broker), "gate/events", "queued-1").returncode == 0

        broker.restart(kill=True)

        status, out = subscribe_once(plain(broker), "gate/events", "-c", "-i", "lost", wait=1)
        assert (status, out) == (TIMED_OUT, "")

        subscribe_once(plain(broker), "gate/events", "-c", "-i", "kept", "-E")
        assert publish(plain(broker), "gate/events", "queued-2").returncode == 0
        broker.save()
        broker.restart(kill=True)

        status, out = subscribe_once(plain(broker), "gate/events", "-c", "-i", "kept", "-C", "1")
        assert (status, out) == (0, "queued-2\n")


def test_ten_thousand_queued_messages_survive_restart(tmp_path: Path) -> None:
    count = 10_000
    with LocalBroker(tmp_path) as broker:
        session = ["-c", "-i", "cloud-ingest"]
        subscribe_once(plain(broker), "gate/events", *session, "-E")
        lines = "".join(f"event-{i}\n" for i in range(count))
        result = subprocess.run(
            [MOSQUITTO_PUB, *plain(broker), "-q", "1", "-t", "gate/events", "-l"],
            input=lines,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr

        broker.restart()

        status, out = subscribe_once(plain(broker), "gate/events", *session, "-C", str(count))
        assert status == 0
        assert out.splitlines() == [f"event-{i}" for i in range(count)]


def test_missing_mosquitto_names_the_debian_packages(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path, mosquitto=tmp_path / "no-such-mosquitto")
    with pytest.raises(BrokerNotInstalledError, match="mosquitto mosquitto-clients"):
        broker.start()


def test_port_taken_before_start_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([[taken]])
        real = localbroker._free_ports

        def first_pick_taken(count: int, host: str = "127.0.0.1") -> list[int]:
            return next(picks, None) or real(count, host)

        monkeypatch.setattr(localbroker, "_free_ports", first_pick_taken)
        with LocalBroker(tmp_path) as broker:
            assert broker.port != taken
            assert publish(plain(broker), "gate/x").returncode == 0


def test_fixed_port_in_use_is_an_error_with_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localbroker, "_FIXED_PORT_PATIENCE", 0.2)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        broker = LocalBroker(tmp_path, port=squatter.getsockname()[1])
        with pytest.raises(BrokerError, match="in use"):
            broker.start()
        assert not broker.running


# --- the relay ----------------------------------------------------------------------------


def test_relay_forwards_both_ways(broker: LocalBroker) -> None:
    with (
        Relay(broker.host, broker.port) as relay,
        socket.create_connection((relay.host, relay.port)) as sock,
    ):
        packet = connect_packet("relay-forward")
        sock.sendall(packet)
        assert recv_exactly(sock, 4) == CONNACK_ACCEPTED
        sock.sendall(PINGREQ)
        assert recv_exactly(sock, 2) == PINGRESP
        assert (relay.bytes_up, relay.bytes_down) == (len(packet) + 2, 6)
        assert relay.open_connections == 1


def test_relay_cut_resets_connections_and_new_ones_until_restore(broker: LocalBroker) -> None:
    with Relay(broker.host, broker.port) as relay:
        with socket.create_connection((relay.host, relay.port)) as sock:
            sock.sendall(connect_packet("relay-cut"))
            assert recv_exactly(sock, 4) == CONNACK_ACCEPTED

            relay.cut()

            with pytest.raises(ConnectionResetError):
                recv_exactly(sock, 1)
        assert relay.open_connections == 0
        with (
            socket.create_connection((relay.host, relay.port)) as sock,
            pytest.raises(ConnectionResetError),
        ):
            recv_exactly(sock, 1)

        relay.restore()

        with socket.create_connection((relay.host, relay.port)) as sock:
            sock.sendall(connect_packet("relay-cut"))
            assert recv_exactly(sock, 4) == CONNACK_ACCEPTED


def test_relay_silence_drops_bytes_then_restore_recovers(broker: LocalBroker) -> None:
    with (
        Relay(broker.host, broker.port) as relay,
        socket.create_connection((relay.host, relay.port)) as sock,
    ):
        sock.sendall(connect_packet("relay-silence"))
        assert recv_exactly(sock, 4) == CONNACK_ACCEPTED

        relay.silence()
        sock.sendall(PINGREQ)
        with pytest.raises(TimeoutError):
            recv_exactly(sock, 1, timeout=0.3)
        assert relay.dropped_up == len(PINGREQ)

        relay.restore()
        # The dropped PINGREQ was a whole packet, so the stream is still in step.
        sock.sendall(PINGREQ)
        assert recv_exactly(sock, 2) == PINGRESP


def test_relay_silence_hold_delivers_after_restore(broker: LocalBroker) -> None:
    with (
        Relay(broker.host, broker.port) as relay,
        socket.create_connection((relay.host, relay.port)) as sock,
    ):
        sock.sendall(connect_packet("relay-hold"))
        assert recv_exactly(sock, 4) == CONNACK_ACCEPTED

        relay.silence(hold=True)
        sock.sendall(PINGREQ)
        with pytest.raises(TimeoutError):
            recv_exactly(sock, 1, timeout=0.3)

        relay.restore()
        assert recv_exactly(sock, 2) == PINGRESP
        assert relay.dropped_up == 0


def test_client_reconnects_through_relay_after_cut(broker: LocalBroker) -> None:
    with (
        Relay(broker.host, broker.port) as relay,
        Subscriber(plain(broker, relay.port), "gate/relayed", "-C", "1") as sub,
    ):
        sub.wait_for(b"SUBACK")
        accepted = relay.accepted

        relay.cut()
        deadline = time.monotonic() + 10
        while relay.accepted == accepted:  # the client tries again and is reset
            assert time.monotonic() < deadline, "no reconnect attempt while cut"
            time.sleep(0.05)
        relay.restore()

        sub.wait_for(b"SUBACK", count=2)
        assert publish(plain(broker), "gate/relayed", "after-cut").returncode == 0
        sub.wait_for(b"after-cut")
