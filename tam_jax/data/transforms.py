"""Per-video image transforms on uint8 frames [T, H, W, 3] -> uint8 [T, crop, crop, 3].

Training: resize (short side to `resize`, or to `resize` x `resize` with `square=True`), one random
`crop` x `crop` window for all frames of the video, and a horizontal flip of the whole video with
probability 1/2 unless `flip=False` (Something-Something labels say "left" and "right"). Test: the
same resize and the centre crop. Frames stay uint8; normalisation belongs to the model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_frames(frames: np.ndarray, size: int, square: bool = False) -> np.ndarray:
    """uint8 [T, H, W, 3] -> short side `size` (aspect kept) or `size` x `size`; bilinear."""
    height, width = frames.shape[1:3]
    if square:
        new_h = new_w = size
    elif height <= width:
        new_h, new_w = size, max(1, round(width * size / height))
    else:
        new_h, new_w = max(1, round(height * size / width)), size
    if (new_h, new_w) == (height, width):
        return frames
    resized = [Image.fromarray(f).resize((new_w, new_h), Image.Resampling.BILINEAR) for f in frames]
    return np.stack([np.asarray(f) for f in resized])


def _crop(frames: np.ndarray, top: int, left: int, crop: int) -> np.ndarray:
    return frames[:, top : top + crop, left : left + crop]


def _check_crop(frames: np.ndarray, crop: int) -> tuple[int, int]:
    height, width = frames.shape[1:3]
    if crop > min(height, width):
        raise ValueError(
            f"crop {crop} is larger than the resized frames ({height}x{width}); need crop <= resize"
        )
    return height - crop, width - crop


def train_transform(
    frames: np.ndarray,
    rng: np.random.Generator,
    *,
    resize: int = 256,
    crop: int = 224,
    flip: bool = True,
    square: bool = False,
) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, crop, crop, 3]: resize, one random crop, random flip."""
    frames = resize_frames(frames, resize, square)
    max_top, max_left = _check_crop(frames, crop)
    out = _crop(frames, int(rng.integers(0, max_top + 1)), int(rng.integers(0, max_left + 1)), crop)
    if flip and rng.random() < 0.5:
        out = out[:, :, ::-1]
    return np.ascontiguousarray(out)


def test_transform(
    frames: np.ndarray, *, resize: int = 256, crop: int = 224, square: bool = False
) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, crop, crop, 3]: resize and centre crop."""
    frames = resize_frames(frames, resize, square)
    max_top, max_left = _check_crop(frames, crop)
    return np.ascontiguousarray(_crop(frames, max_top // 2, max_left // 2, crop))


# Its name starts with "test": keep pytest from collecting it when a test module imports it by name.
test_transform.__test__ = False
