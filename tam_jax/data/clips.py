"""One item of a source -> one clip: frame indices, decoded frames, uint8 [T, crop, crop, 3]."""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tam_jax.data.report import ClipError, VideoError
from tam_jax.data.sampling import MODES, tsn_frame_indices
from tam_jax.data.sources import PathSource, VideoSource
from tam_jax.data.transforms import test_transform, train_transform


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """How a video becomes a clip.

    num_frames: T, frames per clip (segments of TSN sampling).
    resize: short side (or square side with `square`) in pixels before cropping.
    crop: side of the square crop in pixels; clips are [T, crop, crop, 3].
    flip: random horizontal flips in training (turn off for Something-Something).
    sampling: "tsn" or "uniform" (see `tam_jax.data.sampling`).
    """

    num_frames: int = 8
    resize: int = 256
    crop: int = 224
    flip: bool = True
    square: bool = False
    sampling: str = "tsn"

    def __post_init__(self):
        if self.sampling not in MODES:
            raise ValueError(f"ClipSpec.sampling={self.sampling!r}; use one of {MODES}.")
        if not 0 < self.crop <= self.resize:
            raise ValueError(
                f"ClipSpec needs 0 < crop <= resize, got crop={self.crop}, resize={self.resize}."
            )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.crop, self.crop, 3)


def load_clip(
    source: VideoSource, index: int, spec: ClipSpec, rng: np.random.Generator | None = None
) -> np.ndarray:
    """uint8 [T, crop, crop, 3] of item `index`; augmented if `rng` is given, else test transform.

    Raises VideoError (from the source) for bad input.
    """
    frame_indices = tsn_frame_indices(source.num_frames(index), spec.num_frames, rng, spec.sampling)
    frames = source.read(index, frame_indices)
    if rng is None:
        return test_transform(frames, resize=spec.resize, crop=spec.crop, square=spec.square)
    return train_transform(
        frames, rng, resize=spec.resize, crop=spec.crop, flip=spec.flip, square=spec.square
    )


def read_clips(
    paths: Sequence[str | os.PathLike], spec: ClipSpec, *, num_threads: int = 4
) -> Iterator[tuple[int, np.ndarray | ClipError]]:
    """(index, uint8 `[T, crop, crop, 3]` test-time clip or ClipError) for each path (a video file or a
    frame folder), in order, decoded by `num_threads` threads a few clips ahead of the consumer (memory
    stays bounded)."""
    source = PathSource(paths)

    def read(index: int):
        try:
            return index, load_clip(source, index, spec)
        except VideoError as e:
            return index, ClipError(str(paths[index]), e.reason)

    threads = max(1, num_threads)
    with ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        for index in range(len(paths)):
            pending.append(pool.submit(read, index))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
