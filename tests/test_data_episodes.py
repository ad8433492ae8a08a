"""Episode sampling: structure, determinism in (seed, index), small classes, host sharding."""

import numpy as np
import pytest

from tam_jax.data.episodes import EpisodeSampler, batch_episode_indices, host_episode_indices

# 10 classes with 8..17 items each; items numbered so that the class of item i is LABELS[i].
LABELS = np.repeat(np.arange(10), np.arange(8, 18))


def make_sampler(**kwargs):
    options = dict(way=5, shot=2, queries=3, seed=7)
    return EpisodeSampler(LABELS, **{**options, **kwargs})


def test_episode_structure():
    episode = make_sampler().episode(3)
    assert episode.support.shape == (5, 2) and episode.query.shape == (15,)
    assert episode.query_labels.dtype == np.int32
    np.testing.assert_array_equal(episode.query_labels, np.repeat(np.arange(5), 3))
    assert len(set(episode.classes)) == 5
    for c, cls in enumerate(episode.classes):
        assert np.all(LABELS[episode.support[c]] == cls)
        assert np.all(LABELS[episode.query[episode.query_labels == c]] == cls)
        assert np.all(LABELS[episode.spares[c]] == cls)
        everything = np.concatenate(
            [episode.support[c], episode.query[episode.query_labels == c], episode.spares[c]]
        )
        class_items = [i for i, label in enumerate(LABELS) if label == cls]
        assert sorted(everything) == class_items


def test_items_map_episode_indices_to_caller_items():
    items = 1000 + np.arange(len(LABELS))[::-1]
    episode = make_sampler(items=items).episode(0)
    assert np.all(episode.support >= 1000)
    plain = make_sampler().episode(0)
    np.testing.assert_array_equal(episode.support, items[plain.support])


def test_episodes_are_a_function_of_seed_and_index_only():
    a, b = make_sampler(), make_sampler()
    late = b.episode(41)  # regenerated alone, without drawing episodes 0..40 first
    for _ in range(41):
        a.episode(0)
    again = a.episode(41)
    for field in ("classes", "support", "query"):
        np.testing.assert_array_equal(getattr(late, field), getattr(again, field))
    assert not np.array_equal(a.episode(1).support, a.episode(2).support)
    assert not np.array_equal(make_sampler(seed=8).episode(41).support, late.support)


def test_class_order_within_episodes_is_random():
    sampler = make_sampler()
    orders = [tuple(sampler.episode(i).classes) for i in range(50)]
    assert any(list(o) != sorted(o) for o in orders)
    assert len({c for o in orders for c in o}) == 10


def test_small_classes_are_an_error_naming_them():
    names = [f"class{c}" for c in range(10)]
    with pytest.raises(ValueError, match=r"'class0' \(8\), 'class1' \(9\).*drop_small_classes"):
        EpisodeSampler(LABELS, way=5, shot=5, queries=5, seed=0, class_names=names)


def test_small_classes_can_be_dropped():
    sampler = EpisodeSampler(LABELS, way=5, shot=5, queries=5, seed=0, drop_small_classes=True)
    assert sampler.dropped_classes == ("class 0", "class 1")
    assert all(min(sampler.episode(i).classes) >= 2 for i in range(30))


def test_too_few_classes_for_the_way_is_an_error():
    with pytest.raises(ValueError, match="needs 5 classes"):
        EpisodeSampler(LABELS[LABELS < 4], way=5, shot=1, queries=1, seed=0)


def test_batch_episode_indices_partition_episodes_over_hosts_and_batches():
    seen = np.concatenate([batch_episode_indices(b, 3, p, 4) for b in range(5) for p in range(4)])
    assert sorted(seen) == list(range(60))
    np.testing.assert_array_equal(batch_episode_indices(2, 3, 1, 4), [27, 28, 29])


def test_host_episode_indices_partition_evaluation_episodes():
    shares = [host_episode_indices(10, p, 3) for p in range(3)]
    assert sorted(np.concatenate(shares)) == list(range(10))
    with pytest.raises(ValueError, match="process_index 3"):
        host_episode_indices(10, 3, 3)
