"""Real files as users' datasets hold them, for the data tests.

Frames are JPEGs at the sizes real extractions have (256x256 squares, 340x256 and 455x256 Kinetics-style,
240 high with odd widths as SSv2's); videos are H.264 MP4s with B-frames (frames stored out of display
order) at 29.97 (30000/1001) frames per second. Frame t of every clip is flat grey `level(t)` with a
coloured corner, so `frame_numbers` recovers which frames were read after lossy coding and resizing.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from tam_jax.data.frames import encode_jpeg

# (height, width) of real extractions.
SQUARE = (256, 256)
KINETICS_340 = (256, 340)
KINETICS_455 = (256, 455)
SSV2_427 = (240, 427)  # SSv2 frames are 240 high with varying, often odd, widths
SSV2_351 = (240, 351)
NTSC = Fraction(30000, 1001)  # 29.97 frames per second


def level(t: int) -> int:
    """Grey level of frame t (t < 18)."""
    return 20 + 12 * t


def clip(num_frames: int, size: tuple[int, int], colour=(200, 40, 40)) -> np.ndarray:
    """uint8 [num_frames, H, W, 3]: frame t flat `level(t)`, its top-left 1/8 x 1/8 in `colour`."""
    h, w = size
    frames = np.empty((num_frames, h, w, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = level(t)
    frames[:, : h // 8, : w // 8] = colour
    return frames


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    """int [T]: the t of each frame of uint8 [T, H, W, 3] made by `clip` (the median is the grey)."""
    medians = np.median(frames.reshape(len(frames), -1), axis=1)
    return np.round((medians - level(0)) / (level(1) - level(0))).astype(int)


def write_jpegs(folder: Path, frames: np.ndarray, name: str = "{:08d}.jpg", flow: str | None = None) -> Path:
    """Writes frames 1.. as `name.format(t)`; with `flow` ("flow_" or ""), also the optical-flow frames
    `{flow}x_{t:05d}.jpg` / `{flow}y_...` that TSN / MMAction extractions put beside them (mid-grey 128:
    a reader that took them for RGB frames would see the wrong numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames, 1):
        (folder / name.format(t)).write_bytes(encode_jpeg(frame))
        if flow is not None:
            flat = np.full(frame.shape[:2] + (3,), 128, np.uint8)
            for axis in "xy":
                (folder / f"{flow}{axis}_{t:05d}.jpg").write_bytes(encode_jpeg(flat))
    return folder


def write_mp4(path: Path, frames: np.ndarray, rate: Fraction = NTSC) -> Path:
    """H.264 (yuv420p, even sizes) with up to 2 B-frames between references, at `rate` frames/s."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "bf": "2", "b_strategy": "0", "g": "12"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_hidden_clutter(folder: Path) -> None:
    """What macOS and Jupyter leave in a folder: never a class, a video or a frame."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._00000001.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".ipynb_checkpoints").mkdir(exist_ok=True)
    (folder / ".ipynb_checkpoints" / "notes.jpg").write_bytes(b"not a frame")


# ---------------------------------------------------------------------------------------------------
# Whole datasets, laid out as the public codebases lay them out. Each returns what was written.

CLASSES = {
    "train": ("archery", "bowling", "cartwheel"),
    "val": ("diving", "fencing"),
    "test": ("golf", "hurdling"),
}
FRAME_SIZES = (SQUARE, KINETICS_340, KINETICS_455)


def split_folders_of_frames(root: Path, videos_per_class: int = 3) -> dict[str, int]:
    """``root/<split>/<class>/<video>/<frames>`` with no lists; every other video also holds optical
    flow (``img_00001.jpg`` beside ``flow_x_``/``flow_y_``, or ``x_``/``y_``), and hidden clutter sits at
    every level. Returns {"<split>/<class>/<video>": its number of RGB frames}."""
    counts = {}
    write_hidden_clutter(root)
    for split, classes in CLASSES.items():
        write_hidden_clutter(root / split)
        for c, name in enumerate(classes):
            write_hidden_clutter(root / split / name)
            for v in range(videos_per_class):
                key = f"{split}/{name}/v{v}"
                num_frames = 6 + (c + v) % 3
                frames = clip(num_frames, FRAME_SIZES[(c + v) % 3], colour=(40 * c, 200, 40 * v))
                flow = (None, "flow_", "")[v % 3]
                write_jpegs(root / key, frames, "{:08d}.jpg" if flow is None else "img_{:05d}.jpg", flow)
                write_hidden_clutter(root / key)
                counts[key] = num_frames
    return counts


def split_folders_of_mp4s(root: Path, videos_per_class: int = 3) -> dict[str, int]:
    """``root/<split>/<class>/<video>.mp4`` (H.264, B-frames, 29.97 fps) with no lists, and an
    AppleDouble ``._<video>.mp4`` beside each. Returns {"<split>/<class>/<video>.mp4": frames}."""
    counts = {}
    for split, classes in CLASSES.items():
        for c, name in enumerate(classes):
            for v in range(videos_per_class):
                key = f"{split}/{name}/v{v}.mp4"
                num_frames = 10 + (c + v) % 3
                write_mp4(root / key, clip(num_frames, (SQUARE, KINETICS_340)[v % 2], (200, 40 * c, 0)))
                (root / split / name / f"._v{v}.mp4").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
                counts[key] = num_frames
    return counts


def otam_lists_over_split_folders(root: Path, lists: Path, videos_per_class: int = 3) -> dict[str, int]:
    """SSv2 as the OTAM lists name it: lines ``<split><class index>/<video id>`` in
    ``lists/<split>list07.txt``, frames at ``root/<split>/<split><index>/<id>/00000001.jpg``, 240 high
    with odd widths. Returns {list line: frames}."""
    counts = {}
    lists.mkdir(parents=True, exist_ok=True)
    video = 10430
    for split, classes in CLASSES.items():
        lines = []
        for c in range(len(classes)):
            for v in range(videos_per_class):
                line = f"{split}{c}/{video}"
                num_frames = 7 + v
                write_jpegs(root / split / line, clip(num_frames, (SSV2_427, SSV2_351)[v % 2]))
                counts[line] = num_frames
                lines.append(line)
                video += 1
        (lists / f"{split}list07.txt").write_text("\n".join(lines) + "\n")
    return counts
