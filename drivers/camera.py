"""Camera QR reader: frames from V4L2, an RTSP/HTTP URL, a video file or an image folder.

Capture and decoding run in a worker thread (OpenCV and zbar block and hold no event loop);
each newly seen code is passed to the event loop with ``call_soon_threadsafe``. This is the
only module that imports ``cv2`` and ``pyzbar`` (the camera simulator writes its video files
with ``encode_video``).

The code text is a bearer credential: it never appears in a log line, only lengths and counters.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from pyzbar import wrapper as zbar  # type: ignore[import-untyped]  # pyzbar 0.1.9: no types

from drivers.base import Credential, CredentialListener
from drivers.reader_thread import Alarm, Backoff, Worker, run_in_thread

log = logging.getLogger(__name__)

Frame = npt.NDArray[np.uint8]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".mjpeg", ".mjpg"})
REOPEN_FIRST_S = 0.1
STOP_WAIT_S = 3.0
# zbar's fourcc for 8-bit grey (pyzbar files it under the key "L800", but the value is Y800).
ZBAR_GREY = int.from_bytes(b"Y800", "little")
STREAM_OPEN_TIMEOUT_MS = 5000
STREAM_READ_TIMEOUT_MS = 3000
# How long a decode takes, for stats: a moving average is enough for a status page.
DECODE_EWMA = 0.1

# OpenCV warns on stderr at every failed open; the driver logs an outage once itself.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class SourceLost(Exception):
    """The camera, stream, file or folder cannot deliver frames right now."""


def to_gray(frame: Frame) -> Frame:
    """The frame as 8-bit grey, converting a BGR or BGRA frame once."""
    if frame.ndim == 2:
        return frame
    code = cv2.COLOR_BGRA2GRAY if frame.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return np.asarray(cv2.cvtColor(frame, code), dtype=np.uint8)


def decode_qr(gray: Frame, *, density: int = 1) -> list[str]:
    """Texts of the QR codes in an 8-bit grey frame (codes that are not UTF-8 are skipped).

    ``density`` 2 scans every other row and column: half the time, still finding codes whose
    modules are 3 px or wider (measured on rendered 640×480 frames).
    """
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError("decode_qr wants an 8-bit grey frame")
    scanner = zbar.zbar_image_scanner_create()
    if not scanner:
        raise MemoryError("zbar could not create an image scanner")
    texts: list[str] = []
    try:
        # pyzbar.decode would set 20 symbologies up for every frame; zbar takes 0 for "all".
        zbar.zbar_image_scanner_set_config(scanner, 0, zbar.ZBarConfig.CFG_ENABLE, 0)
        zbar.zbar_image_scanner_set_config(
            scanner, zbar.ZBarSymbol.QRCODE, zbar.ZBarConfig.CFG_ENABLE, 1
        )
        for axis in (zbar.ZBarConfig.CFG_X_DENSITY, zbar.ZBarConfig.CFG_Y_DENSITY):
            zbar.zbar_image_scanner_set_config(scanner, 0, axis, density)
        image = zbar.zbar_image_create()
        if not image:
            raise MemoryError("zbar could not create an image")
        try:
            # zbar reads the pixels in place: `pixels` must outlive the scan.
            pixels = np.ascontiguousarray(gray).tobytes()
            height, width = gray.shape
            zbar.zbar_image_set_format(image, ZBAR_GREY)
            zbar.zbar_image_set_size(image, width, height)
            zbar.zbar_image_set_data(image, pixels, len(pixels), None)
            if zbar.zbar_scan_image(scanner, image) > 0:
                symbol = zbar.zbar_image_first_symbol(image)
                while symbol:
                    data = ctypes.string_at(
                        zbar.zbar_symbol_get_data(symbol), zbar.zbar_symbol_get_data_length(symbol)
                    )
                    with contextlib.suppress(UnicodeDecodeError):
                        text = data.decode("utf-8")
                        if text and text not in texts:
                            texts.append(text)
                    symbol = zbar.zbar_symbol_next(symbol)
        finally:
            zbar.zbar_image_destroy(image)
    finally:
        zbar.zbar_image_scanner_destroy(scanner)
    return texts


class _FolderSource:
    """Images of a folder in name order; the listing is re-read on every pass."""

    def __init__(self, folder: Path, loop: bool) -> None:
        self.folder = folder
        self.loop = loop
        self._files: list[Path] = []
        self._list()

    def _list(self) -> None:
        try:
            entries = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise SourceLost(type(exc).__name__) from exc
        self._files = entries

    def read(self) -> Frame | None:
        """The next image, or None at the end of a pass that does not loop (or an empty folder)."""
        if not self._files:
            if not self.loop:
                if not self.folder.is_dir():
                    raise SourceLost("folder gone")
                return None
            self._list()
        while self._files:
            path = self._files.pop(0)
            # Read straight to grey: the one conversion the decoder needs, whatever the file holds.
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is not None:
                return np.asarray(image, dtype=np.uint8)
            if not self.folder.is_dir():
                raise SourceLost("folder gone")
            # A file being written or not an image: skip it, as a camera drops a bad frame.
        return None

    def close(self) -> None:
        """Nothing to release."""


class _CaptureSource:
    """An OpenCV capture: a V4L2 index, a stream URL or a video file."""

    def __init__(self, source: int | str, live: bool, loop: bool) -> None:
        self.source = source
        self.live = live
        self.loop = loop
        if isinstance(source, int) or source.startswith("/dev/"):
            self.cap = cv2.VideoCapture(source, cv2.CAP_V4L2)
        elif live:
            # FFmpeg's own timeouts are 30 s: a stalled stream would hold the worker that long.
            self.cap = cv2.VideoCapture(
                source,
                cv2.CAP_FFMPEG,
                [
                    cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                    STREAM_OPEN_TIMEOUT_MS,
                    cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                    STREAM_READ_TIMEOUT_MS,
                ],
            )
        else:
            if not Path(source).is_file():
                raise SourceLost("no such file")
            self.cap = cv2.VideoCapture(source)
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceLost("cannot open")
        if live:
            # Reading slower than the camera delivers would otherwise return frames seconds old.
            self.cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)

    def read(self) -> Frame | None:
        """The next frame, or None at the end of a video that does not loop."""
        ok, frame = self.cap.read()
        if ok and frame is not None:
            return np.asarray(frame, dtype=np.uint8)
        if self.live:
            raise SourceLost("read failed")
        if not self.loop:
            return None
        self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ok, frame = self.cap.read()
        if not ok or frame is None:
            raise SourceLost("video unreadable")
        return np.asarray(frame, dtype=np.uint8)

    def close(self) -> None:
        """Release the device or stream."""
        self.cap.release()


def encode_video(path: Path, frames: Iterable[Frame], *, fps: float) -> None:
    """Store grey or BGR frames as an MJPG AVI file (a codec every OpenCV build carries)."""
    writer: cv2.VideoWriter | None = None
    try:
        for frame in frames:
            bgr = np.repeat(frame[:, :, None], 3, axis=2) if frame.ndim == 2 else frame
            if writer is None:
                height, width = bgr.shape[:2]
                fourcc = cv2.VideoWriter.fourcc(*"MJPG")
                writer = cv2.VideoWriter(str(path), fourcc, fps, (width, height))
                if not writer.isOpened():
                    raise OSError(f"cannot write a video to {path}")
            writer.write(np.ascontiguousarray(bgr))
    finally:
        if writer is not None:
            writer.release()


class CameraScanner:
    """Reads QR codes from camera frames at a bounded rate; reopens a camera that went away."""

    def __init__(
        self,
        name: str,
        source: int | str,
        *,
        max_fps: float = 10.0,
        loop: bool = True,
        forget_frames: int = 5,
        forget_s: float = 1.0,
        scan_density: int = 1,
        clock: Callable[[], float] = time.monotonic,
        reopen_max_s: float = 5.0,
    ) -> None:
        if max_fps <= 0:
            raise ValueError("max_fps must be positive")
        if scan_density not in (1, 2, 3, 4):
            raise ValueError("scan_density must be 1 to 4")
        if isinstance(source, str) and Path(source).suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError("an image source is a folder of images, not one image file")
        self.name = name
        self.source = source
        self.max_fps = max_fps
        self.loop = loop
        self.forget_frames = forget_frames
        self.forget_s = forget_s
        self.scan_density = scan_density
        self.reopen_max_s = max(reopen_max_s, REOPEN_FIRST_S)
        self._clock = clock
        self._listener: CredentialListener | None = None
        self._connected = False
        self._alarm = Alarm()
        self._ended = False
        self._frame_no = 0
        # code -> (frame number, clock time) when it was last in view
        self._in_view: dict[str, tuple[int, float]] = {}
        self._decode_ms = 0.0
        self._counts: Counter[str] = Counter()

    def _kind(self) -> str:
        # A /dev/v4l/by-id/… path survives re-plugging, unlike an index.
        if isinstance(self.source, int) or self.source.startswith("/dev/"):
            return "v4l2"
        if "://" in self.source:
            return "url"
        if Path(self.source).suffix.lower() in VIDEO_SUFFIXES:
            return "video"
        return "folder"

    def _open(self) -> _FolderSource | _CaptureSource:
        kind = self._kind()
        if kind == "folder":
            return _FolderSource(Path(str(self.source)), self.loop)
        return _CaptureSource(self.source, live=kind in ("v4l2", "url"), loop=self.loop)

    async def run(self, listener: CredentialListener) -> None:
        """Read codes and hand each new one to ``listener`` until cancelled; never raises."""
        self._listener = listener
        try:
            await run_in_thread(
                f"camera {self.name}",
                self._capture_forever,
                stop_wait_s=STOP_WAIT_S,
                on_stop=self._stopping,
            )
        finally:
            self._connected = False

    def _stopping(self) -> None:
        self._listener = None

    def stats(self) -> dict[str, object]:
        """Link state, alarm flag and counters (never the code text)."""
        return {
            "connected": self._connected,
            "alarm": self._alarm.up,
            "ended": self._ended,
            "frames": self._counts["frames"],
            "decoded": self._counts["decoded"],
            "reads": self._counts["reads"],
            "errors": self._counts["errors"],
            "outages": self._alarm.raised,
            "decode_ms": round(self._decode_ms, 2),
        }

    def _deliver(self, code: str, at: float) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            listener(Credential(kind="qr", value=code, reader=self.name, at=at))
        except Exception:
            log.exception("camera %s: credential listener failed (len %d)", self.name, len(code))

    def _new_codes(self, codes: list[str], now: float) -> list[str]:
        """The codes not in view just before; a code counts as gone after both forget limits."""
        frame_no = self._frame_no
        fresh: list[str] = []
        for code in codes:
            seen = self._in_view.get(code)
            if seen is None or (
                frame_no - seen[0] > self.forget_frames and now - seen[1] >= self.forget_s
            ):
                fresh.append(code)
            self._in_view[code] = (frame_no, now)
        # Forget codes long out of view so the table stays small.
        for code, (seen_no, seen_at) in list(self._in_view.items()):
            if frame_no - seen_no > self.forget_frames and now - seen_at >= self.forget_s:
                del self._in_view[code]
        return fresh

    def _process(self, frame: Frame) -> list[tuple[str, float]]:
        self._frame_no += 1
        self._counts["frames"] += 1
        started = time.perf_counter()
        codes = decode_qr(to_gray(frame), density=self.scan_density)
        took_ms = (time.perf_counter() - started) * 1000
        self._decode_ms += DECODE_EWMA * (took_ms - self._decode_ms)
        now = self._clock()
        self._counts["decoded"] += len(codes)
        fresh = self._new_codes(codes, now)
        self._counts["reads"] += len(fresh)
        return [(code, now) for code in fresh]

    def _up(self) -> None:
        if self._alarm.recover():
            log.warning("camera %s: source back", self.name)
        self._connected = True

    def _lost(self, reason: str) -> None:
        # Codes in view stay remembered: a code still held up after a stream hiccup is the same
        # presentation, and frames never seen do not count as the code being absent.
        self._connected = False
        if self._alarm.fail(reason):
            log.error("camera %s: source unavailable (%s); retrying", self.name, reason)
        else:
            log.debug("camera %s: still unavailable (%s)", self.name, reason)

    def _capture_forever(self, worker: Worker) -> None:
        stop = worker.stop
        interval = 1.0 / self.max_fps
        backoff = Backoff(REOPEN_FIRST_S, self.reopen_max_s)
        while not stop.is_set():
            try:
                source = self._open()
            except SourceLost as exc:
                self._lost(str(exc))
                backoff.wait(stop)
                continue
            except Exception:
                # A thread boundary: an OpenCV surprise must not end the camera for good.
                log.exception("camera %s: opening the source failed", self.name)
                self._lost("open error")
                backoff.wait(stop)
                continue
            try:
                due = time.monotonic()
                while not stop.is_set():
                    frame = source.read()
                    if not self._connected:
                        # Only a read that worked proves the source sound: a stream that opens
                        # and fails at once stays one outage and keeps backing off.
                        self._up()
                        backoff.reset()
                    self._ended = frame is None
                    if frame is not None:
                        for code, at in self._process(frame):
                            worker.post(self._deliver, code, at)
                    due = max(due + interval, time.monotonic())
                    stop.wait(due - time.monotonic())
            except SourceLost as exc:
                self._lost(str(exc))
                backoff.wait(stop)
            except Exception:
                self._counts["errors"] += 1
                log.exception("camera %s: capture failed", self.name)
                self._lost("capture error")
                backoff.wait(stop)
            finally:
                source.close()
