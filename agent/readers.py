"""Credential readers of the lanes, built from the configuration, and what a read does.

Each reader runs on its own task (its driver keeps blocking I/O on a thread of its own); a
credential goes straight to admission, which unlocks the lane or records the refusal.
Driver modules are imported only when a lane uses them: opencv costs a camera-less gate
start-up time and memory for nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from agent.admission import Admission, Lane
from agent.config import (
    CameraReaderConfig,
    IdCardReaderConfig,
    QrSerialReaderConfig,
    ReaderConfig,
)
from drivers.base import Credential, CredentialReader

log = logging.getLogger(__name__)

RESTART_S = 1.0


def make_reader(
    lane_id: str, index: int, cfg: ReaderConfig, site_key: bytes | None, utc_offset_h: float
) -> CredentialReader:
    """The driver for one configured reader."""
    name = cfg.name or f"{lane_id}-{cfg.type}-{index + 1}"
    if isinstance(cfg, QrSerialReaderConfig):
        from drivers.qr_serial import SerialScanner

        return SerialScanner(
            name,
            cfg.port,
            baudrate=cfg.baudrate,
            terminator=cfg.terminator,
            prefix=cfg.prefix,
            suffix=cfg.suffix,
            max_length=cfg.max_length,
            debounce_s=cfg.debounce_s,
        )
    if isinstance(cfg, CameraReaderConfig):
        from drivers.camera import CameraScanner

        return CameraScanner(name, cfg.source, max_fps=cfg.max_fps, scan_density=cfg.scan_density)
    assert isinstance(cfg, IdCardReaderConfig)
    from drivers.idcard import IdCardReader
    from offline_cache import holder_hash

    if site_key is None:
        raise ValueError("an ID-card reader needs the site key (admission.holder_key_file)")
    return IdCardReader(
        name,
        cfg.port,
        functools.partial(holder_hash, site_key),
        baudrate=cfg.baudrate,
        poll_s=cfg.poll_s,
        reread_after_s=cfg.reread_after_s,
        utc_offset_h=utc_offset_h,
    )


class LaneReaders:
    """Runs a lane's readers and hands every credential to admission."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.readers: list[tuple[Lane, str, CredentialReader]] = []
        self.last: dict[str, dict[str, Any]] = {}
        """Per lane: the last decision, for status (no codes, no personal data)."""

    def add(self, lane: Lane, direction: str, reader: CredentialReader) -> None:
        self.readers.append((lane, direction, reader))

    def on_credential(self, lane: Lane, direction: str, cred: Credential) -> None:
        """A read at a lane: decide and unlock, or refuse with the reason shown."""
        try:
            if cred.kind == "idcard":
                problem = (
                    None
                    if cred.detail.get("card_valid")
                    else str(cred.detail.get("reason") or "card_invalid")
                )
                decision, outcome = self.admission.present_holder(
                    lane, cred.value, direction, problem
                )
            else:
                decision, outcome = self.admission.present(lane, cred.value, direction)
        except Exception:
            # Fail closed: the lane stays locked; the log says which reader, never the code.
            log.exception("lane %s: credential from %s could not be decided", lane.id, cred.reader)
            return
        self.last[lane.id] = {
            "reader": cred.reader,
            "kind": cred.kind,
            "reason": decision.reason.value,
            "outcome": outcome,
            "prompt_zh": decision.prompt_zh,
            "prompt_en": decision.prompt_en,
        }
        log.info(
            "lane %s: %s from %s -> %s (%s)",
            lane.id,
            cred.kind,
            cred.reader,
            outcome,
            decision.reason.value,
        )

    async def _run(self, lane: Lane, direction: str, reader: CredentialReader) -> None:
        listener = functools.partial(self.on_credential, lane, direction)
        while True:
            try:
                await reader.run(listener)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reader %s stopped; restarting", reader.name)
            await asyncio.sleep(RESTART_S)

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self._run(lane, direction, reader), name=f"reader-{reader.name}")
            for lane, direction, reader in self.readers
        ]

    def stats(self) -> list[dict[str, object]]:
        return [{"reader": r.name, "lane": lane.id, **r.stats()} for lane, _, r in self.readers]
