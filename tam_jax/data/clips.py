"""One item of a source -> one clip: frame indices, decoded frames, uint8 [T, crop, crop, 3]."""

from __future__ import annotations

import dataclasses

import numpy as np

from tam_jax.data.sampling import MODES, tsn_frame_indices
from tam_jax.data.sources import VideoSource
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
