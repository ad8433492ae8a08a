"""Frame folders: numbered JPEGs (as ffmpeg extracts them) -> uint8 frames.

A folder holds one video's frames, named with a number (``00000001.jpg``, ``img_00001.jpg``,
``frame12.jpg``); frames are ordered by the last number in the name, so ``frame10`` follows
``frame9``. Hidden files (``.DS_Store``, ``._00001.jpg``) are not frames. A folder that also holds
optical flow, as TSN/MMAction extractions write it (``img_00001.jpg`` beside ``flow_x_00001.jpg``
and ``flow_y_00001.jpg``, or ``x_00001.jpg`` and ``y_00001.jpg``), is read as its RGB frames only.
Errors are `VideoError`s naming the folder or the JPEG at fault.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tam_jax.data.report import VideoError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")
# Optical-flow frames of TSN's dense_flow (flow_x_00001.jpg) and MMAction's denseflow (x_00001.jpg).
_FLOW = re.compile(r"^(flow_)?[xy]_\d", re.IGNORECASE)


def is_flow_frame(name: str) -> bool:
    """True for an optical-flow frame name: ``flow_x_00001.jpg``, ``flow_y_...``, ``x_00001.jpg``."""
    return bool(_FLOW.match(name))


def _frame_order(name: str) -> tuple[int, str]:
    match = _NUMBER.search(name)
    return (int(match.group(1)) if match else -1, name)


def list_frames(folder: str | Path) -> list[str]:
    """A folder's frame file names in temporal order; VideoError if missing or without frames."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise VideoError(folder, "frame folder is missing") from None
    except OSError as e:
        raise VideoError(folder, f"frame folder cannot be listed ({e.strerror or e})") from None
    images = [n for n in names if n.lower().endswith(FRAME_SUFFIXES) and not n.startswith(".")]
    frames = [n for n in images if not is_flow_frame(n)]
    if not frames:
        what = "only optical-flow frames (x_/y_ or flow_x_/flow_y_), no RGB" if images else "no"
        raise VideoError(folder, f"frame folder holds {what} .jpg/.jpeg/.png frames")
    return sorted(frames, key=_frame_order)


def decode_image(data: bytes, path: object) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3]; an empty or corrupt image raises VideoError naming `path`."""
    if not data:
        raise VideoError(path, "corrupt image (empty file, 0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        reason = "corrupt image (not a readable JPEG/PNG: unknown format or damaged header)"
        raise VideoError(path, reason) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise VideoError(path, f"corrupt image ({e})") from None


def read_frames(folder: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Frames `indices` of the folder's ordered frames -> uint8 [len(indices), H, W, 3]."""
    names = list_frames(folder)
    folder = Path(folder)

    def decode(i: int) -> np.ndarray:
        path = folder / names[i]
        try:
            return decode_image(path.read_bytes(), path)
        except OSError as e:
            raise VideoError(path, f"frame cannot be read ({e.strerror or e})") from None

    return gather_frames(indices, len(names), decode, folder)


def gather_frames(
    indices: Sequence[int], count: int, decode: Callable[[int], np.ndarray], where: object
) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] from `decode(i)` for i in 0..count-1, decoding each distinct
    frame once (short videos repeat frames). `where` names the video in errors."""
    decoded: dict[int, np.ndarray] = {}
    for i in dict.fromkeys(int(i) for i in indices):
        if not 0 <= i < count:
            raise VideoError(where, f"frame {i} requested but the video holds {count} frames")
        decoded[i] = decode(i)
    return stack_frames([decoded[int(i)] for i in indices], where)


def stack_frames(frames: Sequence[np.ndarray], where: object) -> np.ndarray:
    """[H, W, 3] frames -> uint8 [T, H, W, 3]; a video whose frame size changes is a VideoError naming
    `where` (some real streams change resolution part-way)."""
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoError(where, f"frames differ in size: {sorted(shapes)}")
    return np.stack(frames)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_frame_folder(folder: str | Path, frames: np.ndarray, quality: int = 90) -> None:
    """Writes uint8 [T, H, W, 3] as ``00000001.jpg``, ... (ffmpeg's ``%08d.jpg``, from 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames, 1):
        (folder / f"{t:08d}.jpg").write_bytes(encode_jpeg(frame, quality))
