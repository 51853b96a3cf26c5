"""Shared pieces of the cloud-sync tests and benchmarks: config text, a gate with a cloud."""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from agent.cloud.mqtt import LinkSettings
from agent.cloud.reference import ReferenceCloud
from agent.localbroker import LocalBroker
from agent.testbed import Testbed, wait_for
from agent.testbed import cloud_toml as testbed_cloud_toml
from offline_cache import Cache

CLOUD_SEED = bytes(range(100, 132))
ROGUE_SEED = bytes(range(200, 232))
_sites = itertools.count(1)


def public_hex(seed: bytes) -> str:
    return bytes(SigningKey(seed).verify_key).hex()


def unique_site() -> str:
    """A site id of its own per test: retained messages and sessions never cross tests."""
    return f"s{os.getpid() % 10000}-{next(_sites)}-{uuid.uuid4().hex[:6]}"


def cloud_toml(host: str, port: int, *, seed: bytes = CLOUD_SEED, **options: Any) -> str:
    """A ``[cloud]`` section for the daemon's config, trusting ``seed``'s key."""
    return testbed_cloud_toml(host, port, public_hex(seed), **options)


def reference_cloud(broker: LocalBroker, site: str) -> ReferenceCloud:
    settings = LinkSettings(broker.host, broker.port, f"cloud-{site}", reconnect_max_s=1.0)
    return ReferenceCloud(settings, site, CLOUD_SEED)


@contextmanager
def gate_with_cloud(
    workdir: Path,
    broker: LocalBroker,
    *,
    port: int | None = None,
    lanes: int = 2,
    extra_toml: str = "",
    cloud_options: dict[str, Any] | None = None,
    bus: dict[str, Any] | None = None,
    backlog: int = 0,
    connected: bool = True,
) -> Iterator[tuple[Testbed, ReferenceCloud]]:
    """A simulated gate whose daemon syncs to ``broker`` (or ``port``), and its site cloud;
    ``backlog`` events wait in its outbox at start, as after a long time offline."""
    site = unique_site()
    toml = cloud_toml(broker.host, port or broker.port, **(cloud_options or {}))
    with (
        reference_cloud(broker, site) as cloud,
        Testbed(
            workdir,
            site_id=site,
            fail_states=("open",) * lanes,
            extra_toml=extra_toml + "\n" + toml,
            bus=bus,
        ) as tb,
    ):
        tb.start_sim()
        if backlog:
            fill_outbox(tb.state_dir / "gate.db", backlog)
        tb.start_daemon()
        if connected:
            wait_for(lambda: sync_status(tb).get("connected"), 15, "the gate connecting")
        yield tb, cloud


def fill_outbox(path: Path, count: int) -> None:
    """``count`` passage-sized events in the outbox of the cache at ``path``."""
    with Cache(path) as cache:
        for i in range(count):
            cache.append(
                "free_passage", f"L{i % 2 + 1}", direction="entry", reason="held_open", n=i
            )


def sync_status(tb: Testbed) -> dict[str, Any]:
    reply = tb.ctl({"cmd": "sync_status"})
    sync: dict[str, Any] = reply.get("sync", {})
    return sync


def wait_uplink_idle(tb: Testbed, timeout_s: float) -> dict[str, Any]:
    """Wait until every event the gate has issued is acknowledged (outbox empty)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = sync_status(tb)
        if s.get("outbox_depth") == 0 and s.get("uplink", {}).get("inflight_messages") == 0:
            return s
        if time.monotonic() > deadline:
            raise TimeoutError(f"outbox not drained: {s}")
        time.sleep(0.1)
