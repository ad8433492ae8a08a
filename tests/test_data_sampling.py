"""Frame sampling (TSN and evenly spaced) and the per-video transforms."""

import numpy as np
import pytest

from tam_jax.data import transforms
from tam_jax.data.sampling import tsn_frame_indices


def test_tsn_test_time_takes_segment_middles():
    # 80 frames in 8 segments of 10: middles at 5, 15, ..., 75.
    np.testing.assert_array_equal(tsn_frame_indices(80, 8), np.arange(5, 80, 10))


def test_tsn_training_takes_one_frame_per_segment_and_varies():
    rng = np.random.default_rng(0)
    draws = np.stack([tsn_frame_indices(83, 8, rng) for _ in range(500)])
    bounds = np.arange(9) * 83 / 8
    assert np.all(draws >= np.floor(bounds[:-1])) and np.all(draws < np.ceil(bounds[1:]))
    # Every frame of a segment is drawn, not only the middle one.
    assert len(np.unique(draws[:, 0])) == int(np.ceil(bounds[1]))


@pytest.mark.parametrize("mode", ["tsn", "uniform"])
@pytest.mark.parametrize("train", [False, True])
def test_short_videos_repeat_frames_in_order(mode, train):
    rng = np.random.default_rng(1) if train else None
    indices = tsn_frame_indices(3, 8, rng, mode)
    assert indices.shape == (8,)
    assert set(indices) <= {0, 1, 2} and np.all(np.diff(indices) >= 0)
    assert indices[0] == 0 or train


def test_uniform_mode_spans_the_video_and_jitters_ends_in_training():
    np.testing.assert_array_equal(tsn_frame_indices(71, 8, mode="uniform"), np.arange(0, 71, 10))
    rng = np.random.default_rng(0)
    draws = np.stack([tsn_frame_indices(71, 8, rng, "uniform") for _ in range(200)])
    assert set(draws[:, 0]) == set(range(6)) and set(draws[:, -1]) == set(range(65, 71))


def test_sampling_is_deterministic_given_the_rng_seed():
    a = tsn_frame_indices(50, 8, np.random.default_rng([3, 4]))
    b = tsn_frame_indices(50, 8, np.random.default_rng([3, 4]))
    np.testing.assert_array_equal(a, b)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown frame sampling mode"):
        tsn_frame_indices(10, 4, mode="dense")
    with pytest.raises(ValueError, match="num_frames >= 1"):
        tsn_frame_indices(0, 4)


def gradient_video(t=4, h=60, w=90):
    """uint8 [t, h, w, 3] whose pixels encode their position (so crops and flips are visible)."""
    yy, xx = np.mgrid[0:h, 0:w]
    frame = np.stack([yy * 4, xx * 2, np.zeros_like(xx)], -1).astype(np.uint8)
    return np.stack([frame + i for i in range(t)])


def test_resize_keeps_aspect_or_squares():
    video = gradient_video()
    assert transforms.resize_frames(video, 40).shape == (4, 40, 60, 3)
    assert transforms.resize_frames(video.transpose(0, 2, 1, 3), 40).shape == (4, 60, 40, 3)
    assert transforms.resize_frames(video, 40, square=True).shape == (4, 40, 40, 3)
    assert transforms.resize_frames(video, 60) is video


def test_test_transform_is_the_centre_crop():
    video = gradient_video()
    out = transforms.test_transform(video, resize=60, crop=40)
    assert out.dtype == np.uint8 and out.shape == (4, 40, 40, 3)
    np.testing.assert_array_equal(out, video[:, 10:50, 25:65])


def test_train_transform_crops_all_frames_alike_and_flips_sometimes():
    video = gradient_video()
    flipped = 0
    for seed in range(40):
        out = transforms.train_transform(video, np.random.default_rng(seed), resize=60, crop=32)
        assert out.dtype == np.uint8 and out.shape == (4, 32, 32, 3)
        # Undo a flip (x encoded in channel 1 decreases left to right), then find the crop window.
        if out[0, 0, 0, 1] > out[0, 0, -1, 1]:
            flipped += 1
            out = out[:, :, ::-1]
        top, left = int(out[0, 0, 0, 0]) // 4, int(out[0, 0, 0, 1]) // 2
        np.testing.assert_array_equal(out, video[:, top : top + 32, left : left + 32])
    assert 8 <= flipped <= 32


def test_train_transform_without_flip_never_flips():
    video = gradient_video()
    for seed in range(20):
        out = transforms.train_transform(
            video, np.random.default_rng(seed), resize=60, crop=32, flip=False
        )
        assert out[0, 0, 0, 1] < out[0, 0, -1, 1]


def test_crop_larger_than_frames_is_an_error():
    with pytest.raises(ValueError, match="crop 64 is larger"):
        transforms.test_transform(gradient_video(), resize=40, crop=64)
