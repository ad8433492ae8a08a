"""Video files (.mp4, .webm, .avi, ...) -> uint8 frames, decoded with PyAV.

Decoding stops at the last frame asked for. The frame count comes from the stream's metadata;
containers that do not store it (WebM) are counted by decoding once. Errors are `VideoError`s naming
the file. PyAV is imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tam_jax.data.frames import stack_frames
from tam_jax.data.report import VideoError

# Metadata frame counts of real videos are often off by a frame or two; a stream that ends this
# close to the count is complete (missing frames repeat the last one); one that ends earlier is
# truncated.
_COUNT_SLACK = 0.05
_CODECS = {
    ".mp4": "libx264",
    ".mkv": "libx264",
    ".mov": "libx264",
    ".webm": "libvpx",
    ".avi": "mpeg4",
}


@contextlib.contextmanager
def _open_video(path: str | Path):
    import av

    path = Path(path)
    if not path.is_file():
        raise VideoError(path, "video file is missing")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(path, f"video cannot be opened ({e})") from None
    try:
        if not container.streams.video:
            raise VideoError(path, "file has no video stream")
        yield container, container.streams.video[0]
    finally:
        container.close()


def count_frames(path: str | Path) -> int:
    """Frame count from the stream's metadata, else by decoding. VideoError if there are none."""
    import av

    with _open_video(path) as (container, stream):
        count = stream.frames
        if count <= 0:
            count = 0
            try:
                for _ in container.decode(stream):
                    count += 1
            except av.FFmpegError as e:
                if count == 0:
                    raise VideoError(path, f"no frame can be decoded ({e})") from None
    if count <= 0:
        raise VideoError(path, "video has no frames")
    return count


def read_video(
    path: str | Path, indices: Sequence[int], num_frames: int | None = None
) -> np.ndarray:
    """Frames `indices` (0-based, any order, repeats allowed) -> uint8 [len(indices), H, W, 3].

    `num_frames` is the count the indices were chosen from (default: the stream metadata); it
    decides whether a stream that ends early is complete up to the usual metadata error or truncated
    (VideoError).
    """
    import av

    wanted = {int(i) for i in indices}
    if not wanted or min(wanted) < 0:
        raise ValueError(
            f"read_video({path}): frame indices must be non-negative, got {list(indices)}"
        )
    last_wanted = max(wanted)
    decoded: dict[int, np.ndarray] = {}
    count, last_frame, error = 0, None, None
    with _open_video(path) as (container, stream):
        expected = num_frames or stream.frames or None
        try:
            for frame in container.decode(stream):
                if count in wanted:
                    decoded[count] = frame.to_ndarray(format="rgb24")
                last_frame, count = frame, count + 1
                if count > last_wanted:
                    break
        except av.FFmpegError as e:
            error = e
    if count == 0:
        raise VideoError(path, f"no frame can be decoded ({error or 'empty stream'})")
    if count <= last_wanted:
        complete = error is None and expected and count >= expected * (1 - _COUNT_SLACK) - 1
        if not complete:
            why = f"decoding failed ({error})" if error else "the stream ends"
            raise VideoError(
                path, f"truncated: {why} after {count} frames, frame {last_wanted} needed"
            )
        tail = last_frame.to_ndarray(format="rgb24")
        decoded.update({i: tail for i in wanted if i >= count})
    return stack_frames([decoded[int(i)] for i in indices], path)


def write_video(
    path: str | Path, frames: np.ndarray, fps: int = 12, faststart: bool = False
) -> None:
    """Writes uint8 [T, H, W, 3] (H, W even) as a video; the codec follows the suffix (.mp4: H.264).

    `faststart` puts the MP4 index before the frames, as web videos do (a truncated copy then still
    opens).
    """
    import av

    path = Path(path)
    codec = _CODECS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"write_video({path}): unknown suffix; use one of {sorted(_CODECS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # Near-transparent quality: these files are demo data and test fixtures, not archives.
        if codec == "libx264":
            stream.options = {"crf": "16"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
