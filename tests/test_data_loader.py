"""The grain loader: batch layout, resumption, hosts, workers, bad videos, and load_split."""

import numpy as np
import pytest

from tam_jax.data.clips import ClipSpec
from tam_jax.data.demo import DemoConfig, DemoSource
from tam_jax.data.episodes import EpisodeSampler, batch_episode_indices
from tam_jax.data.loader import TrainBatches, load_split
from tam_jax.data.report import SkipReport, VideoError
from tam_jax.errors import DataError

SPEC = ClipSpec(num_frames=4, resize=16, crop=12)


class LabelledSource:
    """In-memory source whose pixels say what they are: channel 0 = item, 1 = frame, 2 = class."""

    def __init__(self, num_classes=6, per_class=10, num_frames=20, bad=()):
        self.labels = np.repeat(np.arange(num_classes), per_class)
        self.frames = num_frames
        self.bad = set(bad)
        self.class_names = tuple(f"class{c}" for c in range(num_classes))

    def __len__(self):
        return len(self.labels)

    def label(self, index):
        return int(self.labels[index])

    def location(self, index):
        return f"/data/item{index}.mp4"

    def num_frames(self, index):
        return self.frames

    def read(self, index, frame_indices):
        if index in self.bad:
            raise VideoError(self.location(index), "truncated")
        out = np.zeros((len(frame_indices), 20, 24, 3), np.uint8)
        out[..., 0], out[..., 2] = index, self.labels[index]
        out[..., 1] = np.asarray(frame_indices)[:, None, None]
        return out


def items_of(clips):
    """[N, T, H, W, 3] -> item index of each clip (checked constant over frames and pixels)."""
    assert np.all(clips[..., 0] == clips[:, :1, :1, :1, 0])
    return clips[:, 0, 0, 0, 0].astype(int)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_follow_the_documented_layout():
    source = LabelledSource()
    sampler = EpisodeSampler(source.labels, way=3, shot=2, queries=2, seed=0)
    batches = TrainBatches(source, sampler, SPEC, episodes_per_batch=2)
    for b, batch in enumerate(take(batches, 2)):
        assert set(batch) == {"support", "query", "query_labels"}
        assert batch["support"].shape == (2, 6, 4, 12, 12, 3) and batch["support"].dtype == np.uint8
        assert batch["query"].shape == (2, 6, 4, 12, 12, 3)
        assert batch["query_labels"].dtype == np.int32
        for e, index in enumerate(batch_episode_indices(b, 2)):
            episode = sampler.episode(int(index))
            # Class-major support: class c at c*shot:(c+1)*shot.
            np.testing.assert_array_equal(items_of(batch["support"][e]), episode.support.ravel())
            np.testing.assert_array_equal(items_of(batch["query"][e]), episode.query)
            np.testing.assert_array_equal(batch["query_labels"][e], episode.query_labels)
            # One frame from each quarter of the video, in order.
            frames = batch["support"][e][:, :, 0, 0, 1]
            assert np.all(frames // 5 == np.arange(4))
    batches.close()


def test_batches_are_reproducible_and_resume_exactly():
    source = LabelledSource()
    sampler = EpisodeSampler(source.labels, way=3, shot=1, queries=2, seed=3)
    full = take(TrainBatches(source, sampler, SPEC), 5)
    resumed = TrainBatches(source, sampler, SPEC, start=3)
    for expected, got in zip(full[3:], take(resumed, 2), strict=True):
        for key in expected:
            np.testing.assert_array_equal(expected[key], got[key])
    # Augmentation differs between batches, so equality above is not trivial.
    assert not np.array_equal(full[0]["support"][..., 1], full[1]["support"][..., 1])

    loader = TrainBatches(source, sampler, SPEC, num_batches=5)
    take(loader, 2)
    assert loader.get_state() == {"next_batch": 2}
    loader.set_state({"next_batch": 4})
    np.testing.assert_array_equal(next(loader)["query"], full[4]["query"])
    with pytest.raises(StopIteration):
        next(loader)


def test_hosts_load_their_own_episodes():
    source = LabelledSource()
    sampler = EpisodeSampler(source.labels, way=3, shot=1, queries=1, seed=0)
    for host in range(2):
        batches = TrainBatches(
            source, sampler, SPEC, episodes_per_batch=2, process_index=host, process_count=2
        )
        batch = take(batches, 2)[1]
        for e, index in enumerate(batch_episode_indices(1, 2, host, 2)):
            np.testing.assert_array_equal(
                items_of(batch["support"][e]), sampler.episode(int(index)).support.ravel()
            )


def test_unreadable_videos_are_replaced_by_their_class_spares_and_reported():
    bad = {0, 1, 2, 13, 27}
    source = LabelledSource(bad=bad)
    sampler = EpisodeSampler(source.labels, way=5, shot=2, queries=3, seed=1)
    report = SkipReport()
    batches = take(TrainBatches(source, sampler, SPEC, episodes_per_batch=3, report=report), 4)
    for batch in batches:
        support, query = batch["support"], batch["query"]
        assert support.shape[:2] == (3, 10) and query.shape[:2] == (3, 15)
        for e in range(3):
            items = np.concatenate([items_of(support[e]), items_of(query[e])])
            assert not set(items) & bad and len(set(items)) == 25
            # Replacements come from the same class: support/query rows keep one class per block.
            classes = source.labels[items_of(support[e])].reshape(5, 2)
            assert np.all(classes == classes[:, :1])
    assert {e.path for e in report.entries} <= {f"/data/item{i}.mp4" for i in bad}
    assert len(report) >= 3  # class 0 (items 0-2) shows up in 12 episodes


def test_a_class_without_readable_videos_is_a_clear_error():
    source = LabelledSource(per_class=3, bad=range(3))
    sampler = EpisodeSampler(source.labels, way=6, shot=1, queries=1, seed=0)
    with pytest.raises(DataError, match="class 'class0' has no readable video left"):
        next(TrainBatches(source, sampler, SPEC))


def test_worker_processes_give_the_same_batches():
    source = DemoSource(DemoConfig(videos_per_class=4), "train")
    sampler = EpisodeSampler(
        [source.label(i) for i in range(len(source))], way=2, shot=1, queries=1, seed=0
    )
    spec = ClipSpec(num_frames=4, resize=40, crop=32)
    local = take(TrainBatches(source, sampler, spec, start=1), 3)
    workers = TrainBatches(source, sampler, spec, start=1, num_workers=2)
    try:
        for expected, got in zip(local, take(workers, 3), strict=True):
            for key in expected:
                np.testing.assert_array_equal(expected[key], got[key])
    finally:
        workers.close()


def test_load_split_returns_every_readable_video_with_test_transforms():
    source = LabelledSource(num_classes=3, per_class=5, bad={4, 9})
    report = SkipReport()
    loaded = load_split(source, SPEC, chunk_size=4, report=report, progress=False)
    kept = [i for i in range(15) if i not in {4, 9}]
    assert loaded.frames.shape == (13, 4, 12, 12, 3) and loaded.frames.dtype == np.uint8
    np.testing.assert_array_equal(loaded.items, kept)
    np.testing.assert_array_equal(items_of(loaded.frames), kept)
    np.testing.assert_array_equal(loaded.labels, source.labels[kept])
    assert loaded.labels.dtype == np.int32
    np.testing.assert_array_equal(loaded.frames[0, :, 0, 0, 1], [2, 7, 12, 17])  # segment middles
    assert loaded.skipped == 2 and len(report) == 2

    subset = load_split(source, SPEC, items=[3, 4, 5], progress=False)
    np.testing.assert_array_equal(subset.items, [3, 5])
    assert subset.skipped == 1
