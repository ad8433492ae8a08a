"""N-way, K-shot episodes with Q queries per class, each a pure function of (seed, episode index).

`EpisodeSampler.episode(i)` draws its classes and videos from `np.random.default_rng([seed, i])`
alone, so any episode can be regenerated on its own, two runs see the same episodes, and hosts can
split episodes among themselves by index (`batch_episode_indices`, `host_episode_indices`) without
talking to each other.

Within an episode, class c (0..way-1) is split class `classes[c]`; the order of classes is random.
Support items are `support[c, :]`; queries are class-major, `query_labels` = [0]*Q + [1]*Q + ...
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from tam_jax.errors import DataError

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Episode:
    """One episode. Item indices are the sampler's `items` (source items by default).

    index: episode index.
    classes: int64 [way], the split class index of each episode class.
    support: int64 [way, shot] item indices.
    query: int64 [way * queries] item indices, class-major.
    query_labels: int32 [way * queries], episode class (0..way-1) of each query.
    spares: per episode class, int64 [n_c - shot - queries]: that class's other items in random
      order, the replacements for videos that turn out to be unreadable.
    """

    index: int
    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray
    spares: tuple[np.ndarray, ...]


class EpisodeSampler:
    """Samples episodes over labelled items.

    labels: int [N], the class (index into `class_names`) of each item.
    items: int [N], what episode indices refer to (default 0..N-1): e.g. the usable items of a
      source from `find_usable`, or rows of an array of embedded videos.
    class_names: names for error messages (default "class <index>").
    drop_small_classes: leave out (and log) classes with fewer than shot + queries items instead
      of raising.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        *,
        way: int,
        shot: int,
        queries: int,
        seed: int,
        items: Sequence[int] | np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        drop_small_classes: bool = False,
    ):
        labels = np.asarray(labels, np.int64)
        items = np.arange(len(labels)) if items is None else np.asarray(items, np.int64)
        if labels.shape != items.shape or labels.ndim != 1:
            raise ValueError(
                f"labels {labels.shape} and items {items.shape} must be equal-length vectors."
            )
        if min(way, shot, queries) < 1:
            raise ValueError(f"way, shot and queries must be >= 1, got {way}, {shot}, {queries}.")
        self.way, self.shot, self.queries, self.seed = way, shot, queries, seed
        num_classes = (
            len(class_names) if class_names is not None else int(labels.max(initial=-1)) + 1
        )
        if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}."
            )
        names = (
            list(class_names)
            if class_names is not None
            else [f"class {c}" for c in range(num_classes)]
        )
        per_class = [items[labels == c] for c in range(num_classes)]
        need = shot + queries
        small = [(names[c], len(v)) for c, v in enumerate(per_class) if len(v) < need]
        if small:
            listed = ", ".join(f"{name!r} ({n})" for name, n in small)
            if not drop_small_classes:
                raise DataError(
                    f"{len(small)} class(es) have fewer than shot + queries = {need} usable "
                    f"videos: {listed}. Restore the missing videos, lower shot/queries, or set "
                    "drop_small_classes=True to leave these classes out."
                )
            _log.warning(
                "Leaving out %d class(es) with fewer than %d usable videos: %s",
                len(small),
                need,
                listed,
            )
        self.classes = np.array([c for c, v in enumerate(per_class) if len(v) >= need], np.int64)
        self.dropped_classes = tuple(name for name, _ in small)
        if len(self.classes) < way:
            raise DataError(
                f"A {way}-way episode needs {way} classes with >= {need} usable videos each; "
                f"only {len(self.classes)} of {num_classes} have that many."
            )
        self._class_items = per_class

    def episode(self, index: int) -> Episode:
        """Episode `index`, a pure function of (seed, index)."""
        rng = np.random.default_rng([self.seed, index])
        classes = rng.choice(self.classes, self.way, replace=False)
        need = self.shot + self.queries
        orders = [rng.permutation(self._class_items[c]) for c in classes]
        support = np.stack([order[: self.shot] for order in orders])
        query = np.concatenate([order[self.shot : need] for order in orders])
        labels = np.repeat(np.arange(self.way, dtype=np.int32), self.queries)
        spares = tuple(order[need:] for order in orders)
        return Episode(index, classes, support, query, labels, spares)


def batch_episode_indices(
    batch_index: int, episodes_per_batch: int, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """Episode indices int64 [episodes_per_batch] of this host's part of batch `batch_index`.

    Consecutive blocks: batch b covers episodes [b * P * E, (b + 1) * P * E) over P hosts, host p
    the p-th block of E. Disjoint across hosts and batches, and independent of worker counts.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} is not in [0, process_count={process_count})."
        )
    first = (batch_index * process_count + process_index) * episodes_per_batch
    return np.arange(first, first + episodes_per_batch, dtype=np.int64)


def host_episode_indices(
    num_episodes: int, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """This host's strided share int64 [~num_episodes / P] of episodes 0..num_episodes-1."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} is not in [0, process_count={process_count})."
        )
    return np.arange(process_index, num_episodes, process_count, dtype=np.int64)
