"""Episode batches for training and whole splits for evaluation, read by grain worker processes.

Training (`TrainBatches`): batch b holds this host's E episodes `batch_episode_indices(b, E, p, P)`:

    {"support":      uint8 [E, way * shot, T, crop, crop, 3], class-major (class c at c*shot),
     "query":        uint8 [E, way * queries, T, crop, crop, 3], class-major,
     "query_labels": int32 [E, way * queries], in 0..way-1}.

A batch is a pure function of (sampler seed, b, host, files on disk): frame choice and augmentation
use `np.random.default_rng([seed, episode index, slot])`. The loader's position is therefore just
the index of the next batch: checkpoint the train step and resume with
`TrainBatches(..., start=step)` (or `get_state`/`set_state`, which hold {"next_batch": b}); the
resumed run sees exactly the batches the interrupted one would have.

A video that fails to read in an episode is recorded in the `SkipReport` and replaced by the next of
its class's spares (`Episode.spares`), so episodes keep their shape.

Evaluation (`load_split`): every item of a split (or the given items) with test transforms, in one
array, for cached-embedding evaluation; unreadable items are reported and left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from tam_jax.data.clips import ClipSpec, load_clip
from tam_jax.data.episodes import Episode, EpisodeSampler, batch_episode_indices
from tam_jax.data.report import Skipped, SkipReport, VideoError
from tam_jax.data.sources import VideoSource
from tam_jax.errors import DataError
from tam_jax.progress import bar as progress_bar

# More batches than any run takes: the training stream is endless in practice.
_ENDLESS = 2**62


def load_episode(
    source: VideoSource, sampler: EpisodeSampler, episode: Episode, spec: ClipSpec, train: bool
) -> tuple[np.ndarray, np.ndarray, list[Skipped]]:
    """-> support uint8 [way*shot, T, crop, crop, 3], query uint8 [way*queries, ...], skipped.

    Unreadable videos are replaced by the next spare of the same class; a class that runs out of
    readable videos raises RuntimeError (fix the data or use `find_usable` before building the
    sampler).
    """
    skipped: list[Skipped] = []
    spares = [list(s) for s in episode.spares]
    slots = [(c, int(item)) for c, row in enumerate(episode.support) for item in row]
    slots += [
        (int(c), int(item)) for c, item in zip(episode.query_labels, episode.query, strict=True)
    ]
    clips = []
    for slot, (c, item) in enumerate(slots):
        rng = np.random.default_rng([sampler.seed, episode.index, slot]) if train else None
        while True:
            try:
                clips.append(load_clip(source, item, spec, rng))
                break
            except VideoError as e:
                skipped.append(Skipped(e.path, e.reason))
                if not spares[c]:
                    name = source.class_names[episode.classes[c]]
                    raise DataError(
                        f"Episode {episode.index}: class {name!r} has no readable video left "
                        f"(last failure: {e}). Run find_usable on the source before sampling."
                    ) from e
                item = int(spares[c].pop(0))
    n_support = sampler.way * sampler.shot
    clips = np.stack(clips)
    return clips[:n_support], clips[n_support:], skipped


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch:
    """Picklable map function for grain: batch index -> batch dict (plus skipped entries)."""

    source: VideoSource
    sampler: EpisodeSampler
    spec: ClipSpec
    episodes_per_batch: int
    process_index: int
    process_count: int

    def __call__(self, batch_index: int) -> dict:
        indices = batch_episode_indices(
            batch_index, self.episodes_per_batch, self.process_index, self.process_count
        )
        support, query, labels, skipped = [], [], [], []
        for index in indices:
            episode = self.sampler.episode(int(index))
            s, q, bad = load_episode(self.source, self.sampler, episode, self.spec, train=True)
            support.append(s)
            query.append(q)
            labels.append(episode.query_labels)
            skipped += bad
        return {
            "support": np.stack(support),
            "query": np.stack(query),
            "query_labels": np.stack(labels).astype(np.int32),
            "skipped": tuple(skipped),
        }


def _allow_grain_workers() -> None:
    # grain's worker processes read absl flags; outside absl.app they are unparsed and reading them
    # raises (google/grain#1355). Their defaults are what we want.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def read_options(num_threads: int, prefetch: int) -> tuple[int, int]:
    """(threads, buffered elements) of grain's `ReadOptions` for this process.

    grain warns, and says it may one day refuse, when the buffer is smaller than the threads filling
    it; the buffer therefore holds at least one element per thread.
    """
    threads = max(1, num_threads)
    return threads, max(threads, prefetch, 1)


def _grain_iterator(
    map_fn, start: int, stop: int, num_workers: int, num_threads: int, prefetch: int
):
    import grain

    dataset = grain.MapDataset.range(start, stop).map(map_fn)
    threads, buffer = read_options(num_threads, prefetch)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    iter_dataset = dataset.to_iter_dataset(read)
    if num_workers > 0:
        _allow_grain_workers()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(1, prefetch)
            )
        )
    return iter(iter_dataset)


def _own(array: np.ndarray) -> np.ndarray:
    # Worker outputs live in shared memory that grain frees when the array dies; an owned copy keeps
    # that lifetime inside the loader instead of at interpreter exit.
    return np.array(array, copy=True)


class TrainBatches(Iterator[dict]):
    """Endless (or `num_batches`-long) iterator of training batches; see the module docstring.

    num_workers: grain worker processes (0: load in this process); num_threads: loading threads per
    process; prefetch: batches buffered per worker. Skipped videos go to `report`. Call `close()`
    when done.
    """

    def __init__(
        self,
        source: VideoSource,
        sampler: EpisodeSampler,
        spec: ClipSpec,
        *,
        episodes_per_batch: int = 1,
        start: int = 0,
        num_batches: int | None = None,
        num_workers: int = 0,
        num_threads: int = 1,
        prefetch: int = 2,
        process_index: int = 0,
        process_count: int = 1,
        report: SkipReport | None = None,
    ):
        self._iterator = None
        self._map_fn = _TrainBatch(
            source, sampler, spec, episodes_per_batch, process_index, process_count
        )
        self._stop = _ENDLESS if num_batches is None else num_batches
        self._options = (num_workers, num_threads, prefetch)
        self.report = report if report is not None else SkipReport()
        self._next = start

    def get_state(self) -> dict:
        return {"next_batch": self._next}

    def set_state(self, state: dict) -> None:
        self.close()
        self._next = int(state["next_batch"])

    def __next__(self) -> dict:
        if self._next >= self._stop:
            raise StopIteration
        if self._iterator is None:
            self._iterator = _grain_iterator(self._map_fn, self._next, self._stop, *self._options)
        batch = next(self._iterator)
        self.report.extend(batch["skipped"])
        self._next += 1
        keys = ("support", "query", "query_labels")
        if self._options[0] == 0:  # Loaded in this process: the arrays are already ours.
            return {key: batch[key] for key in keys}
        return {key: _own(batch[key]) for key in keys}

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def __del__(self):
        self.close()


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedClips:
    """A split's clips for evaluation.

    frames: uint8 [N, T, crop, crop, 3]; labels: int32 [N] class index within the split; items:
    int64 [N] source item of each row; skipped: how many items were left out as unreadable.
    """

    frames: np.ndarray
    labels: np.ndarray
    items: np.ndarray
    skipped: int


@dataclasses.dataclass(frozen=True, eq=False)
class _SplitChunk:
    """Picklable map function for grain: chunk index -> the chunk's test-transformed clips."""

    source: VideoSource
    spec: ClipSpec
    items: np.ndarray
    chunk_size: int

    def __call__(self, chunk: int) -> dict:
        clips, kept, skipped = [], [], []
        for item in self.items[chunk * self.chunk_size : (chunk + 1) * self.chunk_size]:
            try:
                clips.append(load_clip(self.source, int(item), self.spec))
                kept.append(int(item))
            except VideoError as e:
                skipped.append(Skipped(e.path, e.reason))
        frames = np.stack(clips) if clips else np.zeros((0, *self.spec.shape), np.uint8)
        return {"frames": frames, "items": np.array(kept, np.int64), "skipped": tuple(skipped)}


def load_split(
    source: VideoSource,
    spec: ClipSpec,
    *,
    items: Sequence[int] | np.ndarray | None = None,
    chunk_size: int = 16,
    num_workers: int = 0,
    num_threads: int = 1,
    report: SkipReport | None = None,
    progress: bool = True,
) -> LoadedClips:
    """Loads `items` (default: all) of `source` with test transforms; see `LoadedClips`."""
    items = np.arange(len(source)) if items is None else np.asarray(items, np.int64)
    report = report if report is not None else SkipReport()
    num_chunks = -(-len(items) // chunk_size)
    frames = np.empty((len(items), *spec.shape), np.uint8)
    kept: list[np.ndarray] = []
    num_kept, num_skipped = 0, 0
    iterator = _grain_iterator(
        _SplitChunk(source, spec, items, chunk_size),
        0,
        num_chunks,
        num_workers,
        num_threads,
        prefetch=2,
    )
    bar = progress_bar(len(items), "Loading videos", "video", enabled=progress)
    try:
        for chunk in iterator:
            n = len(chunk["items"])
            frames[num_kept : num_kept + n] = chunk["frames"]
            kept.append(_own(chunk["items"]))
            num_kept += n
            num_skipped += len(chunk["skipped"])
            report.extend(chunk["skipped"])
            bar.update(n + len(chunk["skipped"]))
            del chunk
    finally:
        bar.close()
        if hasattr(iterator, "close"):
            iterator.close()
    kept_items = np.concatenate(kept) if kept else np.zeros((0,), np.int64)
    labels = np.array([source.label(int(i)) for i in kept_items], np.int32)
    return LoadedClips(frames[:num_kept], labels, kept_items, num_skipped)
