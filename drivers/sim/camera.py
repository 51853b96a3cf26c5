"""A simulated camera: renders QR codes into 640×480 frames and stores them for playback.

Frames are written as binary PGM/PPM, which OpenCV reads and which need no image library here;
only ``write_video`` needs OpenCV's encoder, through the camera driver that owns it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import segno

Frame = npt.NDArray[np.uint8]

WIDTH = 640
HEIGHT = 480


def blank_frame(width: int = WIDTH, height: int = HEIGHT, *, level: int = 200) -> Frame:
    """A frame with nothing on it: an even grey field."""
    return np.full((height, width), level, dtype=np.uint8)


def qr_frame(
    text: str,
    *,
    width: int = WIDTH,
    height: int = HEIGHT,
    scale: int = 5,
    at: tuple[int, int] | None = None,
    bgr: bool = False,
    noise: int = 0,
    seed: int = 0,
) -> Frame:
    """A frame showing one QR code (centred unless ``at`` gives its top-left corner)."""
    matrix = np.array(segno.make(text, error="m", micro=False).matrix, dtype=bool)
    module = np.kron(matrix, np.ones((scale, scale), dtype=bool))
    # The quiet zone of four modules is part of the code: decoders need it.
    code = np.pad(np.where(module, 0, 255).astype(np.uint8), 4 * scale, constant_values=255)
    h, w = code.shape
    if h > height or w > width:
        raise ValueError(f"a code of {w}×{h} px does not fit a {width}×{height} frame")
    frame = blank_frame(width, height, level=170)
    top, left = at if at is not None else ((height - h) // 2, (width - w) // 2)
    frame[top : top + h, left : left + w] = code
    if noise:
        rng = np.random.default_rng(seed)
        jitter = rng.integers(-noise, noise + 1, size=frame.shape)
        frame = np.clip(frame.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    if bgr:
        return np.ascontiguousarray(np.repeat(frame[:, :, None], 3, axis=2))
    return frame


def write_image(path: str | os.PathLike[str], frame: Frame) -> Path:
    """Store a grey frame as PGM or a BGR frame as PPM (the suffix is set to match)."""
    path = Path(path)
    if frame.ndim == 2:
        path, magic, pixels = path.with_suffix(".pgm"), b"P5", frame
    else:
        # PPM stores RGB; OpenCV frames are BGR.
        path, magic, pixels = path.with_suffix(".ppm"), b"P6", frame[:, :, ::-1]
    height, width = frame.shape[:2]
    # Write then rename, so a player reading the folder never sees half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(
        b"%s\n%d %d\n255\n" % (magic, width, height) + np.ascontiguousarray(pixels).tobytes()
    )
    tmp.replace(path)
    return path


def write_folder(
    folder: str | os.PathLike[str], frames: Iterable[Frame], *, start: int = 0
) -> list[Path]:
    """Store frames as frame_000000, frame_000001, … so name order is play order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_image(folder / f"frame_{n:06d}", f) for n, f in enumerate(frames, start)]


def write_video(path: str | os.PathLike[str], frames: Iterable[Frame], *, fps: float = 10) -> Path:
    """Store frames as an MJPG AVI file (a codec every OpenCV build carries)."""
    # Imported here: only video playback needs OpenCV, and loading it costs frame writers time.
    from drivers.camera import encode_video

    path = Path(path)
    encode_video(path, frames, fps=fps)
    return path
