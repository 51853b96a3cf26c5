"""The camera QR reader playing rendered frames: decoding, once-per-appearance, outages."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest

from drivers.base import Credential
from drivers.camera import CameraScanner, decode_qr, to_gray
from drivers.sim.camera import blank_frame, qr_frame, write_folder, write_video

WAIT_S = 5.0


async def until(check: Callable[[], bool], within_s: float = WAIT_S) -> None:
    """Wait until ``check()`` holds, polling the loop."""
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(camera: CameraScanner) -> AsyncIterator[list[Credential]]:
    """Run the camera into a list until the block ends, then stop it."""
    got: list[Credential] = []
    task = asyncio.create_task(camera.run(got.append))
    try:
        yield got
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def values(got: list[Credential]) -> list[str]:
    return [c.value for c in got]


def test_decode_qr_reads_rendered_codes_grey_and_bgr() -> None:
    for text in ("GA1.eyJ0IjoiMTIzIn0.c2ln", "Zürich ✓ 42", "x"):
        assert decode_qr(qr_frame(text)) == [text]
        assert decode_qr(to_gray(qr_frame(text, bgr=True))) == [text]
    assert decode_qr(qr_frame("NOISY", noise=25, seed=3)) == ["NOISY"]
    assert decode_qr(blank_frame()) == []
    two = qr_frame("LEFT", scale=3, at=(10, 10))
    two[250:, 350:] = qr_frame("RIGHT", scale=3, width=290, height=230)
    assert sorted(decode_qr(two)) == ["LEFT", "RIGHT"]
    assert sorted(decode_qr(two, density=2)) == ["LEFT", "RIGHT"]
    with pytest.raises(ValueError):
        decode_qr(qr_frame("x", bgr=True))


async def test_code_in_consecutive_frames_is_handed_on_once(tmp_path: Path) -> None:
    frames = [qr_frame("A", at=(40 + n, 60 + 3 * n)) for n in range(4)]
    frames += [qr_frame("B", bgr=True)] * 3
    frames += [qr_frame("A")]
    write_folder(tmp_path, frames)
    camera = CameraScanner(
        "cam", str(tmp_path), max_fps=200, loop=False, forget_frames=2, forget_s=0
    )
    async with running(camera) as got:
        await until(lambda: camera.stats()["ended"] is True)
        await asyncio.sleep(0.05)
    # A comes back after three frames without it, more than forget_frames: a new presentation.
    assert values(got) == ["A", "B", "A"]
    assert {c.kind for c in got} == {"qr"} and {c.reader for c in got} == {"cam"}
    stats = camera.stats()
    assert stats["frames"] == 8 and stats["decoded"] == 8 and stats["reads"] == 3


async def test_a_code_missed_in_one_frame_is_not_read_twice(tmp_path: Path) -> None:
    write_folder(tmp_path, [qr_frame("HELD"), qr_frame("HELD"), blank_frame(), qr_frame("HELD")])
    camera = CameraScanner("cam", str(tmp_path), max_fps=200, loop=False, forget_frames=5)
    async with running(camera) as got:
        await until(lambda: camera.stats()["ended"] is True)
        await asyncio.sleep(0.05)
    assert values(got) == ["HELD"]


async def test_blank_and_noisy_frames_yield_nothing(tmp_path: Path) -> None:
    frames = [blank_frame(level=lv) for lv in (0, 90, 255)]
    frames += [np.random.default_rng(1).integers(0, 256, (480, 640), dtype=np.uint8)]
    # Half a code (the rest cut off by the frame edge) is no code.
    half = qr_frame("HALF")
    half[240:, :] = 170
    frames += [half]
    write_folder(tmp_path, frames)
    camera = CameraScanner("cam", str(tmp_path), max_fps=200, loop=False)
    async with running(camera) as got:
        await until(lambda: camera.stats()["ended"] is True)
    assert got == []
    assert camera.stats()["frames"] == 5 and camera.stats()["alarm"] is False


async def test_frame_rate_is_bounded(tmp_path: Path) -> None:
    write_folder(tmp_path, [blank_frame()] * 3)
    camera = CameraScanner("cam", str(tmp_path), max_fps=20, loop=True)
    async with running(camera):
        await until(lambda: camera.stats()["frames"] >= 1)  # type: ignore[operator]
        first = camera.stats()["frames"]
        await asyncio.sleep(0.5)
        played = camera.stats()["frames"] - first  # type: ignore[operator]
    # 0.5 s at 20 fps is 10 frames; the upper bound is the point, the lower one only shows life.
    assert 2 <= played <= 12


async def test_folder_that_disappears_raises_alarm_and_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    aside = tmp_path / "aside"
    write_folder(folder, [qr_frame("LOOPING")] * 2)
    camera = CameraScanner("cam", str(folder), max_fps=50, loop=True, reopen_max_s=0.2)
    async with running(camera) as got:
        await until(lambda: len(got) == 1)
        assert camera.stats()["connected"] is True
        shutil.move(folder, aside)
        await until(lambda: camera.stats()["alarm"] is True)
        assert camera.stats()["connected"] is False
        write_folder(aside, [qr_frame("NEXT")], start=2)
        shutil.move(aside, folder)
        await until(lambda: camera.stats()["connected"] is True)
        assert camera.stats()["alarm"] is False
        await until(lambda: len(got) == 2)
        await asyncio.sleep(0.2)
    # LOOPING, still in view after the outage, is the same presentation: it is not read again.
    assert values(got) == ["LOOPING", "NEXT"]
    assert camera.stats()["outages"] == 1


@pytest.mark.parametrize(
    "source",
    ["missing.avi", "rtsp://127.0.0.1:9/stream", 57, "/dev/v4l/by-id/no-such-camera"],
    ids=["file", "rtsp", "v4l2-index", "v4l2-path"],
)
async def test_missing_source_is_an_alarm_and_never_raises(
    tmp_path: Path, source: str | int, caplog: pytest.LogCaptureFixture
) -> None:
    if source == "missing.avi":
        source = str(tmp_path / "missing.avi")
    camera = CameraScanner("cam", source, reopen_max_s=0.1)
    async with running(camera) as got:
        await until(lambda: camera.stats()["alarm"] is True)
        await asyncio.sleep(0.35)
    assert got == [] and camera.stats()["connected"] is False
    assert camera.stats()["outages"] == 1
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


def test_bad_settings_are_refused_at_construction() -> None:
    with pytest.raises(ValueError):
        CameraScanner("cam", "ticket.png")
    with pytest.raises(ValueError):
        CameraScanner("cam", 0, max_fps=0)
    with pytest.raises(ValueError):
        CameraScanner("cam", 0, scan_density=9)


async def test_video_file_is_played(tmp_path: Path) -> None:
    frames = [qr_frame("V-1", scale=6)] * 3 + [blank_frame()] * 8 + [qr_frame("V-2", scale=6)] * 3
    video = write_video(tmp_path / "clip.avi", frames)
    camera = CameraScanner("cam", str(video), max_fps=200, loop=False, forget_s=0)
    async with running(camera) as got:
        await until(lambda: camera.stats()["ended"] is True)
        await asyncio.sleep(0.05)
    assert values(got) == ["V-1", "V-2"]
