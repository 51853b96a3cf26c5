"""The MQTT link: the one module that imports paho-mqtt.

A thread of its own connects, runs paho's network loop and reconnects with jittered
exponential backoff. Each connection gets a fresh paho client, so nothing a broken
connection had in flight survives into the next one: what was not acknowledged is still in
the outbox and is sent again from there (same ids; the cloud de-duplicates). Callbacks reach
the listener on the link thread (it must return quickly and be thread-safe), tagged with the
connection's number so a late callback of a dead connection is recognised.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

LOOP_TIMEOUT_S = 0.05


@dataclass(frozen=True)
class LinkSettings:
    """How to reach the broker (from the ``[cloud]`` config, files already resolved)."""

    host: str
    port: int
    client_id: str
    protocol: str = "5"
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 15
    session_expiry_s: int = 7 * 86400
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    max_packet_bytes: int = 16 * 1024 * 1024
    manual_ack: bool = False
    """Acknowledge a received message only when the caller calls ack(): with receive_maximum
    this is flow control, the broker holding back what the gate has not handled yet."""
    receive_maximum: int = 0
    """MQTT 5: messages the broker may have in flight to us at once (0: the broker's choice)."""


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0
    dup: bool = False


class LinkListener:
    """What the link reports, on the link thread; ``conn`` numbers the connection."""

    def connected(self, conn: int, session_present: bool) -> None: ...
    def disconnected(self, conn: int, reason: str) -> None: ...
    def acked(self, conn: int, mid: int, ok: bool) -> None: ...
    def message(self, conn: int, msg: Incoming) -> None: ...


class MqttLink:
    """One broker connection at a time, kept up by a thread; publish from any thread."""

    def __init__(
        self,
        settings: LinkSettings,
        listener: LinkListener,
        subscriptions: list[str],
        will: Callable[[], tuple[str, bytes]] | None = None,
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.subscriptions = subscriptions
        self.will = will
        self.conn = 0
        self.connected = False
        self.last_error: str | None = None
        self.connects = 0
        self.disconnects = 0
        self._client: mqtt.Client | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connack_conn = 0

    # --- caller side ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()

    def stop(self, final: tuple[str, bytes] | None = None, timeout_s: float = 2.0) -> None:
        """Disconnect (publishing ``final`` first, retained, if connected) and end the thread."""
        with self._lock:
            client = self._client if self.connected else None
        if client is not None and final is not None:
            try:
                info = client.publish(final[0], final[1], qos=1, retain=True)
                deadline = time.monotonic() + timeout_s
                while not info.is_published() and time.monotonic() < deadline:
                    time.sleep(0.01)
            except (ValueError, RuntimeError, OSError):
                pass
        self._stop.set()
        self._wake.set()
        if client is not None:
            with contextlib.suppress(ValueError, RuntimeError, OSError):
                client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout_s + 2)

    def retry_now(self) -> None:
        """Skip the backoff wait (``gatectl sync now``)."""
        self._wake.set()

    def ack(self, conn: int, msg: Incoming) -> None:
        """Acknowledge a received QoS 1 message (manual_ack); a message of a connection that
        has since ended is not: the broker hands it out again."""
        if msg.qos == 0:
            return
        with self._lock:
            client = self._client if self.connected and conn == self.conn else None
        if client is None:
            return
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            client.ack(msg.mid, msg.qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue a message on the current connection; its mid, or -1 when not connected."""
        with self._lock:
            client = self._client if self.connected else None
        if client is None:
            return -1
        try:
            info = client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, RuntimeError, OSError) as exc:
            log.warning("mqtt: publish on %s failed: %s", topic, exc)
            return -1
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return -1
        return int(info.mid)

    # --- the link thread ------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            # The listener's bug must not take the link down with it.
            log.exception("mqtt: listener failed")

    def _new_client(self, conn: int, ended: threading.Event) -> mqtt.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=s.manual_ack,
        )
        client.connect_timeout = s.connect_timeout_s
        # Our own window bounds what is in flight; paho must never hold messages back.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if self.will is not None:
            # Built per connection: the broker sends it as it is, so it carries this time.
            topic, payload = self.will()
            client.will_set(topic, payload, qos=1, retain=True)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(
                ca_certs=str(s.ca_file) if s.ca_file else None,
                certfile=str(s.cert_file) if s.cert_file else None,
                keyfile=str(s.key_file) if s.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = lambda c, u, flags, rc, props: self._on_connect(conn, c, flags, rc)
        client.on_disconnect = lambda c, u, flags, rc, props: self._on_disconnect(
            conn, c, rc, ended
        )
        client.on_publish = lambda c, u, mid, rc, props: self._post(
            self.listener.acked, conn, mid, not rc.is_failure
        )
        client.on_message = lambda c, u, msg: self._post(
            self.listener.message,
            conn,
            Incoming(
                msg.topic,
                bytes(msg.payload),
                bool(msg.retain),
                int(msg.mid),
                int(msg.qos),
                bool(msg.dup),
            ),
        )
        return client

    def _on_connect(self, conn: int, client: mqtt.Client, flags: object, rc: ReasonCode) -> None:
        if rc.is_failure:
            self._set_error(f"broker refused the connection: {rc}")
            return
        for topic in self.subscriptions:
            client.subscribe(topic, qos=1)
        with self._lock:
            self.connected = True
            self._connack_conn = conn
        self.connects += 1
        if self.last_error is not None:
            log.warning("mqtt: connected to %s:%d again", self.settings.host, self.settings.port)
        else:
            log.info("mqtt: connected to %s:%d", self.settings.host, self.settings.port)
        self.last_error = None
        present = bool(getattr(flags, "session_present", False))
        self._post(self.listener.connected, conn, present)

    def _on_disconnect(
        self, conn: int, client: mqtt.Client, rc: ReasonCode, ended: threading.Event
    ) -> None:
        # Runs on paho's thread: tell it to end rather than reconnect by itself; the next
        # connection is a new client, after a jittered wait.
        client.loop_stop()
        # A connection the broker refused already said why; keep that as the last error.
        if not self._stop.is_set() and (self._connack_conn == conn or self.last_error is None):
            self._set_error(f"link to {self.settings.host}:{self.settings.port} lost ({rc})")
        self._mark_down(conn, str(rc))
        ended.set()

    def _mark_down(self, conn: int, reason: str) -> None:
        with self._lock:
            was = self.connected
            self.connected = False
        if was:
            self.disconnects += 1
            self._post(self.listener.disconnected, conn, reason)

    def _set_error(self, error: str) -> None:
        # An outage is logged once at ERROR, repeats at DEBUG, and the recovery once more.
        if self.last_error is None:
            log.error("mqtt: %s", error)
        else:
            log.debug("mqtt: %s", error)
        self.last_error = error

    def _connect_properties(self) -> Properties | None:
        if self.settings.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        props.MaximumPacketSize = self.settings.max_packet_bytes
        if self.settings.receive_maximum:
            props.ReceiveMaximum = self.settings.receive_maximum
        return props

    def _run(self) -> None:
        s = self.settings
        delay = s.reconnect_min_s
        while not self._stop.is_set():
            self.conn += 1
            conn = self.conn
            ended = threading.Event()
            client = self._new_client(conn, ended)
            with self._lock:
                self._client = client
            try:
                if s.protocol == "5":
                    client.connect(
                        s.host,
                        s.port,
                        keepalive=s.keepalive_s,
                        clean_start=False,
                        properties=self._connect_properties(),
                    )
                else:
                    client.connect(s.host, s.port, keepalive=s.keepalive_s)
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._set_error(f"cannot connect to {s.host}:{s.port}: {exc}")
            else:
                # paho's own network thread runs this one connection: publish() from any
                # thread is then only queued, and that thread alone writes to the socket.
                client.loop_start()
                self._serve(client, conn, ended, time.monotonic())
                client.loop_stop()
                if self._connack_conn == conn:
                    delay = s.reconnect_min_s
            self._mark_down(conn, self.last_error or "closed")
            with self._lock:
                self._client = None
            # Close paho's socket pair now rather than at garbage collection.
            client._reset_sockets()
            if self._stop.is_set():
                break
            # Full jitter: a fleet of gates that lost the broker together does not come back
            # together.
            wait = random.uniform(s.reconnect_min_s, delay)
            delay = min(delay * 2, s.reconnect_max_s)
            self._wake.wait(wait)
            self._wake.clear()

    def _serve(
        self, client: mqtt.Client, conn: int, ended: threading.Event, started: float
    ) -> None:
        """Watch one connection until it ends (or must be given up)."""
        s = self.settings
        while not ended.wait(LOOP_TIMEOUT_S):
            if self._stop.is_set():
                # stop() has sent DISCONNECT; give paho's thread a moment to flush it, so the
                # broker does not publish our Last Will over the clean offline status.
                ended.wait(1.0)
                return
            if self._connack_conn != conn and time.monotonic() - started > s.connect_timeout_s:
                self._set_error(f"no CONNACK from {s.host}:{s.port} in {s.connect_timeout_s} s")
                with contextlib.suppress(ValueError, RuntimeError, OSError):
                    client.disconnect()
                ended.wait(1.0)
                return
