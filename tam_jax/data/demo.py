"""A generated few-shot video dataset whose classes differ only in the order of their steps.

Every video shows the same `num_steps` steps; a step is a coloured shape of its own (disc, square,
triangle, ...) gliding in its own direction across the middle of the frame. A class is one ordering
of all the steps, so every class contains the same content and only the order tells classes apart.
Each video also gets:

- random non-linear speed: the step phase advances at a smoothly varying random speed, so steps last
  different numbers of frames and move unevenly;
- idle frames (background only) at the start and the end, up to `max_idle` of the video each;
- appearance noise: background colour, shape colour and size, a position offset, per-pixel noise;
  and a random length in `frames_range`.

Averaging frame features over time therefore cannot separate the classes, while aligning frames in
time can: the situation temporal alignment (TAM / OTAM) is built for. Frames are small (48x56 by
default) so a 2-core CPU trains on it in minutes; classes are split disjointly into train/val/test
(24/6/10 by default).

Everything is a pure function of `DemoConfig` (seed included): `demo_splits` gives the `Split`s,
`DemoSource` renders videos on demand with the same interface as the file sources, and `write_demo`
writes the dataset to disk as JPEG frame folders or MP4 files (plus CMN-format split lists) so the
real readers can be exercised on it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tam_jax.data.splits import SPLIT_NAMES, Split
from tam_jax.errors import ConfigError

_STEP_LETTERS = "ABCDEFGH"
_SHAPES = ("disc", "square", "triangle", "ring", "cross", "bar", "diamond", "hbar")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Parameters of the demo dataset; the dataset is a pure function of them."""

    seed: int = 0
    num_steps: int = 5
    train_classes: int = 24
    val_classes: int = 6
    test_classes: int = 10
    videos_per_class: int = 20
    frames_range: tuple[int, int] = (32, 48)  # inclusive range of video lengths, in frames
    height: int = 48
    width: int = 56
    max_idle: float = 0.15  # longest idle stretch at either end, as a fraction of the video
    noise: float = 6.0  # std of per-pixel noise, in 0..255 units
    speed_variation: float = 0.5  # std of log speed: 0.5 makes the fastest moments ~5x the slowest

    def __post_init__(self):
        total = self.train_classes + self.val_classes + self.test_classes
        if not 2 <= self.num_steps <= len(_STEP_LETTERS):
            raise ConfigError(
                f"config.data.demo.num_steps (DemoConfig.num_steps) must be in 2..{len(_STEP_LETTERS)}, got "
                f"{self.num_steps}."
            )
        if total > np.prod(np.arange(1, self.num_steps + 1)):
            raise ConfigError(
                f"config.data.demo (DemoConfig) asks for {total} classes but {self.num_steps} steps have "
                f"only {int(np.prod(np.arange(1, self.num_steps + 1)))} orders; raise num_steps."
            )
        if self.height % 2 or self.width % 2 or min(self.height, self.width) < 16:
            raise ConfigError(
                f"config.data.demo.height/width (DemoConfig) must be even and >= 16, got "
                f"{self.height}x{self.width}."
            )


def class_orders(config: DemoConfig) -> list[tuple[int, ...]]:
    """Step order of every class (all distinct): train classes first, then val, then test."""
    orders = list(itertools.permutations(range(config.num_steps)))
    total = config.train_classes + config.val_classes + config.test_classes
    chosen = np.random.default_rng([config.seed, 0]).choice(len(orders), total, replace=False)
    return [orders[i] for i in chosen]


def _class_name(order: Sequence[int]) -> str:
    return "steps_" + "".join(_STEP_LETTERS[s] for s in order)


def demo_splits(config: DemoConfig) -> dict[str, Split]:
    """{"train", "val", "test"} -> Split; video references are "<class>_<nnn>"."""
    names = [_class_name(order) for order in class_orders(config)]
    counts = (config.train_classes, config.val_classes, config.test_classes)
    bounds = np.cumsum((0, *counts))
    splits = {}
    for split, lo, hi in zip(SPLIT_NAMES, bounds[:-1], bounds[1:], strict=True):
        classes = tuple(names[lo:hi])
        videos = {c: tuple(f"{c}_{v:03d}" for v in range(config.videos_per_class)) for c in classes}
        splits[split] = Split(split, classes, videos)
    return splits


def _video_rng(config: DemoConfig, class_name: str, video: int, stream: int) -> np.random.Generator:
    # Seeded by the class's step order and the video number, so a video is the same whichever split
    # holds it.
    order = [_STEP_LETTERS.index(letter) for letter in class_name.removeprefix("steps_")]
    return np.random.default_rng([config.seed, stream, *order, video])


def video_length(config: DemoConfig, class_name: str, video: int) -> int:
    lo, hi = config.frames_range
    return int(_video_rng(config, class_name, video, 1).integers(lo, hi + 1))


def _step_phase(rng: np.random.Generator, num_frames: int, config: DemoConfig) -> np.ndarray:
    """float [num_frames]: step phase in [0, num_steps) per frame, NaN on idle frames."""
    num_steps = config.num_steps
    idle_start, idle_end = (int(rng.uniform(0, config.max_idle) * num_frames) for _ in range(2))
    active = max(num_steps, num_frames - idle_start - idle_end)
    # Speed: exp of a smoothed random walk, so it changes smoothly but by up to several times.
    walk = np.convolve(rng.normal(0, 1, active + 4), np.ones(5) / 5, mode="valid")[:active]
    speed = np.exp(config.speed_variation * walk / max(walk.std(), 1e-6))
    phase = np.concatenate(([0.0], np.cumsum(speed)[:-1])) / speed.sum() * num_steps
    out = np.full(num_frames, np.nan)
    out[idle_start : idle_start + active] = np.minimum(phase, num_steps - 1e-6)[
        : num_frames - idle_start
    ]
    return out


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    ay, ax = np.abs(yy), np.abs(xx)
    if shape == "disc":
        return yy**2 + xx**2 <= radius**2
    if shape == "square":
        return (ay <= radius * 0.85) & (ax <= radius * 0.85)
    if shape == "triangle":
        return (yy <= radius * 0.8) & (yy >= -radius) & (ax <= (yy + radius) * 0.6)
    if shape == "ring":
        return (yy**2 + xx**2 <= radius**2) & (yy**2 + xx**2 >= (radius * 0.55) ** 2)
    if shape == "cross":
        return ((ay <= radius * 0.3) & (ax <= radius)) | ((ax <= radius * 0.3) & (ay <= radius))
    if shape == "bar":
        return (ax <= radius * 0.35) & (ay <= radius * 1.2)
    if shape == "diamond":
        return ay + ax <= radius * 1.1
    return (ay <= radius * 0.35) & (ax <= radius * 1.2)  # hbar


def _step_styles(num_steps: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(shape, RGB colour, unit motion direction (dy, dx)) of each step; the same in every video."""
    styles = []
    for s in range(num_steps):
        hue = s / num_steps
        rgb = np.clip(np.abs(((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)
        colour = 40 + 200 * rgb
        angle = 2 * np.pi * (s * 2 % num_steps) / num_steps
        styles.append((_SHAPES[s], colour, np.array([np.sin(angle), np.cos(angle)])))
    return styles


def render_frames(
    config: DemoConfig, class_name: str, video: int, frame_indices: Sequence[int]
) -> np.ndarray:
    """uint8 [len(frame_indices), height, width, 3]: frames of video number `video` of class
    `class_name`. Each frame is the same whichever others are rendered with it."""
    order = [_STEP_LETTERS.index(letter) for letter in class_name.removeprefix("steps_")]
    num_frames = video_length(config, class_name, video)
    rng = _video_rng(config, class_name, video, 2)
    h, w = config.height, config.width
    styles = _step_styles(config.num_steps)
    background = np.clip(110 + rng.normal(0, 25, 3), 0, 255)
    offset = rng.uniform(-0.06, 0.06, 2) * np.array([h, w])
    radius = h * 0.13 * rng.uniform(0.85, 1.15)
    amplitude = h * 0.16
    colour_jitter = rng.normal(0, 12, (config.num_steps, 3))
    phase = _step_phase(rng, num_frames, config)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((len(frame_indices), h, w, 3), np.float32)
    for k, t in enumerate(frame_indices):
        frames[k] = background
        if not np.isnan(phase[t]):
            p = phase[t]
            step = order[int(p)]
            shape, colour, direction = styles[step]
            centre = (
                np.array([h / 2, w / 2]) + offset + (2 * (p - int(p)) - 1) * amplitude * direction
            )
            mask = _shape_mask(shape, yy - centre[0], xx - centre[1], radius)
            frames[k][mask] = colour + colour_jitter[step]
        # Noise drawn per frame, so a frame does not depend on which others are rendered.
        noise_rng = np.random.default_rng([config.seed, 3, *order, video, int(t)])
        frames[k] += noise_rng.normal(0, config.noise, (h, w, 3)).astype(np.float32)
    return np.clip(frames, 0, 255).round().astype(np.uint8)


def render_video(config: DemoConfig, class_name: str, video: int) -> np.ndarray:
    """uint8 [F, height, width, 3]: all frames of video number `video` of class `class_name`."""
    return render_frames(config, class_name, video, range(video_length(config, class_name, video)))


class DemoSource:
    """A `VideoSource` over one demo split; each video is rendered when read (nothing is stored)."""

    frames_verified = True  # rendered, never unreadable: `find_usable` need not render a frame

    def __init__(self, config: DemoConfig, split: str):
        splits = demo_splits(config)
        if split not in splits:
            raise ValueError(f"Demo split {split!r} does not exist; use one of {tuple(splits)}.")
        self.config = config
        self.split = splits[split]
        self._items = [(c, int(ref.rsplit("_", 1)[1])) for ref, c in self.split.items()]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.split.classes

    def __len__(self) -> int:
        return len(self._items)

    def label(self, index: int) -> int:
        return self._items[index][0]

    def location(self, index: int) -> str:
        c, video = self._items[index]
        return f"demo://{self.split.name}/{self.split.classes[c]}_{video:03d}"

    def num_frames(self, index: int) -> int:
        c, video = self._items[index]
        return video_length(self.config, self.split.classes[c], video)

    def read(self, index: int, frame_indices: Sequence[int]) -> np.ndarray:
        c, video = self._items[index]
        return render_frames(self.config, self.split.classes[c], video, frame_indices)


def write_demo(
    root: str | Path, config: DemoConfig, kind: str = "frames", fps: int = 12
) -> dict[str, Path]:
    """Writes the dataset under `root` and returns {"train"|"val"|"test": split list path}.

    kind="frames": ``<root>/<class>/<video>/00000001.jpg ...``; kind="videos":
    ``<root>/<class>/<video>.mp4``. The split lists (CMN format, ``<class>/<video>``) go to
    ``<root>/splits/{train,val,test}list.txt``.
    """
    from tam_jax.data.frames import write_frame_folder
    from tam_jax.data.videos import write_video

    if kind not in ("frames", "videos"):
        raise ValueError(f"write_demo(kind={kind!r}): use 'frames' or 'videos'.")
    root = Path(root)
    lists = {}
    for name, split in demo_splits(config).items():
        for reference, c in split.items():
            frames = render_video(config, split.classes[c], int(reference.rsplit("_", 1)[1]))
            target = root / split.classes[c] / reference
            if kind == "frames":
                write_frame_folder(target, frames)
            else:
                write_video(target.with_suffix(".mp4"), frames, fps=fps)
        lists[name] = root / "splits" / f"{name}list.txt"
        lists[name].parent.mkdir(parents=True, exist_ok=True)
        lists[name].write_text("".join(f"{split.classes[c]}/{ref}\n" for ref, c in split.items()))
    return lists
