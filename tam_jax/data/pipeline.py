"""Config -> data: the clip spec, a split's source and usable videos, training batches, evaluation clips.

The only module of `tam_jax.data` that reads a run's config; everything below it takes plain values.
Multi-host: each process checks and loads its share of a split; the usable set and the row order are
shared so that every result is the same whatever the process count.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from tam_jax import hosts
from tam_jax.data.clips import ClipSpec
from tam_jax.data.episodes import EpisodeSampler
from tam_jax.data.loader import TrainBatches, load_split
from tam_jax.data.report import SkipReport
from tam_jax.data.sources import VideoSource, build_source, find_usable
from tam_jax.errors import DataError


def clip_spec(config: ml_collections.ConfigDict) -> ClipSpec:
    """How the run turns a video into a clip (`config.data`)."""
    data = config.data
    return ClipSpec(
        num_frames=data.num_frames,
        resize=data.resize,
        crop=data.image_size,
        flip=data.flip,
        square=data.square_resize,
        sampling=data.sampling,
    )


def split_source(config: ml_collections.ConfigDict, split: str) -> VideoSource:
    """The source of split "train", "val" or "test" that `config.data` describes."""
    data = config.data
    return build_source(
        data.kind,
        split,
        root=data.root or None,
        split_dir=data.split_dir or None,
        tfds_name=data.tfds_name or None,
        data_dir=data.tfds_data_dir or None,
        demo_options=data.demo.to_dict(),
    )


@dataclasses.dataclass
class UsableSplit:
    """A split's source, its usable items `[N]` and their labels `[N]` (after checking every video once),
    and the episode sampler over them for the run's shot."""

    source: VideoSource
    items: np.ndarray
    labels: np.ndarray
    sampler: EpisodeSampler


def prepare_split(
    config: ml_collections.ConfigDict,
    split: str,
    report: SkipReport,
    shots: tuple[int, ...] = (),
    queries: int | None = None,
) -> UsableSplit:
    """Open a split, check every video once (bad ones go to `report`), and check that episodes of
    `config.fewshot.shot` and of every shot in `shots`, with `queries` queries per class (default
    `config.fewshot.queries`), can be drawn; DataError, naming the split and its fix, if not.

    Each process checks every P-th video and the usable set is then shared, so all processes agree on it
    and each bad video is reported once.
    """
    source = split_source(config, split)
    mine = np.arange(jax.process_index(), len(source), jax.process_count())
    usable = np.zeros(len(source), bool)
    usable[find_usable(source, report, indices=mine, num_threads=config.data.num_threads)] = True
    items = np.flatnonzero(hosts.gather(usable[None]).any(axis=0))
    labels = np.array([source.label(int(i)) for i in items], np.int64)
    queries = queries or config.fewshot.queries
    samplers = {}
    for shot in dict.fromkeys((config.fewshot.shot, *shots)):
        try:
            samplers[shot] = EpisodeSampler(
                labels, way=config.fewshot.way, shot=shot, queries=queries,
                seed=config.seed, items=items, class_names=source.class_names,
                drop_small_classes=config.data.drop_small_classes,
            )
        except ValueError as e:
            raise DataError(
                f"The {split} split cannot make {config.fewshot.way}-way {shot}-shot episodes with "
                f"{queries} queries (config.fewshot.*, config.eval.shots, config.eval.queries, "
                f"config.data.drop_small_classes): {e}{unreadable_classes(source, labels, report)}"
            ) from e
    return UsableSplit(source, items, labels, samplers[config.fewshot.shot])


def unreadable_classes(source: VideoSource, usable_labels: np.ndarray, report: SkipReport) -> str:
    """A sentence naming the classes that list videos but have none usable (`usable_labels`: int [N], the
    usable items' labels), with one skip reason from `report`; "" when there are none."""
    all_labels = np.array([source.label(i) for i in range(len(source))], np.int64)
    listed = np.bincount(all_labels, minlength=len(source.class_names))
    usable = np.bincount(usable_labels, minlength=len(source.class_names))
    empty = np.flatnonzero((listed > 0) & (usable == 0))
    if not len(empty):
        return ""
    names = ", ".join(repr(source.class_names[c]) for c in empty)
    first = source.location(int(np.flatnonzero(all_labels == empty[0])[0]))
    reasons = [e for e in report.entries if e.path == first or e.path.startswith(first.rstrip("/") + "/")]
    example = f" (e.g. {reasons[0].path}: {reasons[0].reason})" if reasons else ""
    return f" No video of class(es) {names} is readable{example}: repair or re-extract them."


def train_batches(
    config: ml_collections.ConfigDict, split: UsableSplit, report: SkipReport, *, start: int
) -> TrainBatches:
    """This process's share of every training batch from batch `start` on (augmented clips)."""
    return TrainBatches(
        split.source, split.sampler, clip_spec(config),
        episodes_per_batch=config.train.episodes_per_step // jax.process_count(), start=start,
        num_batches=config.train.num_steps, num_workers=config.data.num_workers,
        num_threads=config.data.num_threads, prefetch=config.data.prefetch,
        process_index=jax.process_index(), process_count=jax.process_count(), report=report,
    )


@dataclasses.dataclass
class ClipShare:
    """A split's test-time clips, of which this process holds and embeds only its share.

    frames: uint8 `[n, T, H, W, 3]`, this process's videos, padded to the same n on every process.
    labels: int `[N]`, the labels of all readable videos, ordered by item (as on one process).
    rows: int `[N]`, where each of those videos sits among the `[P * n]` gathered rows.
    """

    frames: np.ndarray
    labels: np.ndarray
    rows: np.ndarray


def load_clip_share(config: ml_collections.ConfigDict, split: UsableSplit, report: SkipReport) -> ClipShare:
    """Load this process's share (every P-th usable video) of a split with test transforms."""
    share = split.items[jax.process_index() :: jax.process_count()]
    clips = load_split(
        split.source, clip_spec(config), items=share, num_workers=config.data.num_workers,
        num_threads=config.data.num_threads, report=report,
    )
    padded = int(hosts.gather(np.array([len(clips.items)])).max())
    missing = padded - len(clips.items)
    frames = np.concatenate([clips.frames, np.zeros((missing, *clips.frames.shape[1:]), np.uint8)])
    items = hosts.gather(np.concatenate([clips.items, np.full(missing, -1, np.int64)]))
    labels = hosts.gather(np.concatenate([clips.labels, np.full(missing, -1, clips.labels.dtype)]))
    # Episodes index videos by row: order rows by item so that they do not depend on the process count.
    rows = np.flatnonzero(items >= 0)
    rows = rows[np.argsort(items[rows], kind="stable")]
    return ClipShare(frames, labels[rows], rows)
