"""Which frames of a video to use: TSN sparse sampling and the evenly spaced variant.

``mode="tsn"`` (TSN, Wang et al. 2016; what TAM uses): the video is cut into `num_segments` equal
segments and one frame is taken from each, a random one in training (`rng` given) and the middle one
at test (`rng=None`).

``mode="uniform"``: `num_segments` evenly spaced frames between a start and an end frame, as the
public PyTorch few-shot codebases (TRX and its descendants) sample; in training both ends move
inward by a random amount of up to min(5, (num_frames - num_segments) // 2) frames.

Both return indices in temporal order; a video shorter than `num_segments` repeats frames.
"""

from __future__ import annotations

import numpy as np

MODES = ("tsn", "uniform")
_UNIFORM_MAX_PAD = 5


def tsn_frame_indices(
    num_frames: int,
    num_segments: int,
    rng: np.random.Generator | None = None,
    mode: str = "tsn",
) -> np.ndarray:
    """Frame indices int64 [num_segments] in 0..num_frames-1, non-decreasing; `rng=None`: test."""
    if num_frames < 1 or num_segments < 1:
        raise ValueError(
            f"need num_frames >= 1 and num_segments >= 1, got {num_frames}, {num_segments}"
        )
    if mode == "tsn":
        starts = np.arange(num_segments) * num_frames / num_segments
        offset = 0.5 if rng is None else rng.random(num_segments)
        indices = np.floor(starts + offset * num_frames / num_segments)
    elif mode == "uniform":
        start, end = 0, num_frames - 1
        pad = min(_UNIFORM_MAX_PAD, (num_frames - num_segments) // 2)
        if rng is not None and pad > 0:
            start = int(rng.integers(0, pad + 1))
            end = num_frames - 1 - int(rng.integers(0, pad + 1))
        indices = np.floor(np.linspace(start, end, num_segments))
    else:
        raise ValueError(f"unknown frame sampling mode {mode!r}; use one of {MODES}")
    return np.clip(indices.astype(np.int64), 0, num_frames - 1)
