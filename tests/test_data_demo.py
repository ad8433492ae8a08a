"""The generated demo dataset: determinism, class design, and that only temporal order matters."""

import numpy as np
import pytest

from tam_jax.data.clips import ClipSpec, load_clip
from tam_jax.data.demo import DemoConfig, DemoSource, demo_splits, render_video, write_demo
from tam_jax.data.sources import FrameFolderSource, VideoFileSource
from tam_jax.data.splits import read_split_list

SMALL = DemoConfig(train_classes=2, val_classes=1, test_classes=1, videos_per_class=2)


def test_splits_have_disjoint_classes_sharing_one_set_of_steps():
    config = DemoConfig()
    splits = demo_splits(config)
    sizes = {name: (len(s.classes), s.num_videos) for name, s in splits.items()}
    assert sizes == {"train": (24, 480), "val": (6, 120), "test": (10, 200)}
    classes = [c for s in splits.values() for c in s.classes]
    assert len(set(classes)) == 40
    # Every class is an ordering of the same steps: same letters, different order.
    assert {"".join(sorted(c.removeprefix("steps_"))) for c in classes} == {"ABCDE"}


def test_videos_are_deterministic_in_the_seed():
    source = DemoSource(DemoConfig(), "train")
    again = DemoSource(DemoConfig(), "train")
    other_seed = DemoSource(DemoConfig(seed=1), "train")
    indices = range(source.num_frames(5))
    np.testing.assert_array_equal(source.read(5, indices), again.read(5, indices))
    np.testing.assert_array_equal(source.read(5, [7, 3, 7]), source.read(5, indices)[[7, 3, 7]])
    assert source.class_names != other_seed.class_names
    assert not np.array_equal(source.read(5, [0, 1]), source.read(6, [0, 1]))


def test_videos_vary_in_length_and_start_and_end_idle():
    config = DemoConfig()
    source = DemoSource(config, "val")
    lengths = [source.num_frames(i) for i in range(len(source))]
    assert min(lengths) >= config.frames_range[0] and max(lengths) <= config.frames_range[1]
    assert len(set(lengths)) > 5

    def has_shape(frame):
        # A shape is a patch far from the background colour; noise alone never is.
        background = np.median(frame.reshape(-1, 3), axis=0)
        return (np.abs(frame.astype(float) - background).max(-1) > 60).sum() > 10

    idle_starts = idle_ends = 0
    for i in range(0, len(source), 4):
        video = source.read(i, range(lengths[i]))
        shown = [has_shape(f) for f in video]
        assert all(shown[len(shown) // 4 : 3 * len(shown) // 4])
        idle_starts += not shown[0]
        idle_ends += not shown[-1]
    assert idle_starts >= 5 and idle_ends >= 5


def test_frames_are_small_uint8():
    video = render_video(DemoConfig(), demo_splits(DemoConfig())["test"].classes[0], 3)
    assert video.dtype == np.uint8 and video.shape[1:] == (48, 56, 3)


def frame_features(clip):
    """float [T, 192]: background-subtracted 8x8 colour layout per frame."""
    x = clip.astype(np.float32)
    x -= np.median(x.reshape(len(x), -1, 3), axis=1)[:, None, None]
    return x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(x), -1)


def dtw_distance(a, b):
    cost = ((a[:, None] - b[None]) ** 2).sum(-1)
    acc = np.full((len(a) + 1, len(b) + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1])
    return acc[-1, -1]


def test_mean_pooling_is_near_chance_while_temporal_alignment_is_not():
    source = DemoSource(DemoConfig(), "test")
    spec = ClipSpec(num_frames=8, resize=40, crop=32)
    features = np.stack([frame_features(load_clip(source, i, spec)) for i in range(len(source))])
    labels = np.array([source.label(i) for i in range(len(source))])
    rng = np.random.default_rng(0)
    mean_hits = align_hits = total = 0
    for _ in range(60):  # 5-way 1-shot episodes
        classes = rng.choice(10, 5, replace=False)
        pairs = [rng.choice(np.flatnonzero(labels == c), 2, replace=False) for c in classes]
        support = [features[s] for s, _ in pairs]
        for truth, (_, q) in enumerate(pairs):
            mean_hits += (
                np.argmin([((features[q].mean(0) - s.mean(0)) ** 2).sum() for s in support])
                == truth
            )
            align_hits += np.argmin([dtw_distance(features[q], s) for s in support]) == truth
            total += 1
    mean_acc, align_acc = mean_hits / total, align_hits / total
    assert mean_acc < 0.33, f"mean pooling separates classes ({mean_acc:.2f}); the demo leaks"
    assert align_acc > 0.45 and align_acc - mean_acc > 0.2, (mean_acc, align_acc)


@pytest.mark.parametrize("kind", ["frames", "videos"])
def test_written_demo_reads_back_through_the_file_sources(tmp_path, kind):
    lists = write_demo(tmp_path, SMALL, kind=kind)
    split = read_split_list(lists["train"])
    assert split == demo_splits(SMALL)["train"]
    reader = FrameFolderSource if kind == "frames" else VideoFileSource
    on_disk, in_memory = reader(tmp_path, split), DemoSource(SMALL, "train")
    for i in range(len(on_disk)):
        assert on_disk.label(i) == in_memory.label(i)
        assert on_disk.num_frames(i) == in_memory.num_frames(i)
        indices = [0, 7, on_disk.num_frames(i) - 1]
        error = np.abs(on_disk.read(i, indices).astype(float) - in_memory.read(i, indices)).mean()
        assert error < 6, error  # JPEG / H.264 are lossy, but only slightly at these settings
