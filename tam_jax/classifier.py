"""Few-shot classification of new videos with a trained checkpoint: the Python API behind `tam_jax.predict`.

    from tam_jax.classifier import FewShotClassifier

    classifier = FewShotClassifier.from_checkpoint("runs/demo")   # a workdir: its best checkpoint
    classifier.fit("support/")                                    # <class>/<clip>, 1..k clips per class
    result = classifier.predict(["a.mp4", "frames_of_b/"])        # video files or frame folders
    result.predictions[0].ranking                                 # [(class, distance), ...] ascending
    result.errors                                                 # [ClipError(path, error)]: unreadable
    classifier.support.save("support.npz")                        # reuse: .fit(SupportSet.load(...))

Clips are read exactly as evaluation reads test videos (TSN middle frames, resize, centre crop, from the
checkpoint's `config.json`), embedded once, and scored with the checkpoint's `alignment.method`, `lam` and
`bidirectional` unless overridden: a class's distance is the mean over its support clips of the
query-clip distance (any number of clips per class), or for "tsn" the cosine distance of the mean-pooled
query to the class's mean pooled support vector (as `tam_jax.fewshot` does for equal shots).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from tam_jax import alignment, fewshot, train
from tam_jax.checkpoints import CheckpointManager
from tam_jax.data.report import VideoError

CACHE_FORMAT = 1
# Preprocessing a support cache must share with the checkpoint: (metadata key, what to call it).
_CLIP_KEYS = (("image_size", "crop size (data.image_size)"), ("resize", "resize (data.resize)"),
              ("square_resize", "data.square_resize"), ("sampling", "frame sampling (data.sampling)"))
_SCORE_CHUNK = 64  # queries scored per call: bounds the [chunk, Ns, T, T] frame-distance tensor


class CheckpointMismatchError(ValueError):
    """A checkpoint or support cache that does not fit the model it is used with; says what differs."""


class SupportError(ValueError):
    """A support set that cannot be used (e.g. a class without one readable clip); names the class."""


# ----------------------------------------------------------------------------------------------------
# The checkpoint.


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, Path, int]:
    """(workdir, checkpoints folder, step) for a training workdir, its `checkpoints/` folder (the best
    step by validation accuracy, else the latest) or one `checkpoints/<step>` folder (that step)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint {path} does not exist or is not a folder.")
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        workdir, directory, step = path, path / "checkpoints", None
    elif (path.parent / "config.json").is_file() and path.name == "checkpoints":
        workdir, directory, step = path.parent, path, None
    elif path.name.isdigit() and (path.parent.parent / "config.json").is_file():
        workdir, directory, step = path.parent.parent, path.parent, int(path.name)
    else:
        raise FileNotFoundError(
            f"{path} is neither a training workdir (config.json and checkpoints/) nor one checkpoint "
            "(WORKDIR/checkpoints/<step>/); pass the --workdir of a training run."
        )
    if step is None:
        manager = CheckpointManager(str(directory))
        step = manager.best_step()
        step = manager.latest_step() if step is None else step
        manager.close()
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {directory}: train first (python -m tam_jax.main).")
    return workdir, directory, step


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config a workdir's `config.json` holds."""
    with open(Path(workdir) / "config.json") as f:
        return ml_collections.ConfigDict(json.load(f))


@dataclasses.dataclass
class Checkpoint:
    """A restored training state and what is needed to embed clips with it."""

    config: ml_collections.ConfigDict
    directory: Path  # the checkpoints/<step> folder
    step: int
    model: Any
    state: train.TrainState
    mesh: jax.sharding.Mesh

    @functools.cached_property
    def variables(self) -> dict:
        return train.embedding_variables(self.state)

    @functools.cached_property
    def _embed_fn(self):
        return train.make_embed_fn(self.model, self.mesh)

    def embed(self, clips: np.ndarray) -> np.ndarray:
        """uint8 `[B, T, H, W, 3]` -> float32 `[B, T, D]`. B is padded to a power of two (a multiple of
        the devices) so that a few shapes compile, whatever the number of clips."""
        count = len(clips)
        size = max(self.mesh.size, 1 << max(count - 1, 0).bit_length())
        size = -(-size // self.mesh.size) * self.mesh.size
        if size > count:
            clips = np.concatenate([clips, np.repeat(clips[-1:], size - count, axis=0)])
        return np.asarray(self._embed_fn(self.variables, clips), np.float32)[:count]

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the embedder's weights: tells two checkpoints apart even at the same step."""
        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(jax.device_get(self.variables)):
            leaf = np.ascontiguousarray(leaf)
            digest.update(f"{leaf.dtype}{leaf.shape}".encode())
            digest.update(leaf.tobytes())
        return digest.hexdigest()[:16]

    def metadata(self) -> dict:
        """What a support cache records to be checked against the checkpoint that reads it."""
        data = self.config.data
        return {
            "arch": self.config.model.arch,
            "dtype": self.config.model.dtype,
            "num_frames": int(data.num_frames),
            "image_size": int(data.image_size),
            "resize": int(data.resize),
            "square_resize": bool(data.square_resize),
            "sampling": data.sampling,
            "checkpoint": str(self.directory),
            "checkpoint_step": int(self.step),
            "weights": self.fingerprint,
        }


def load_checkpoint(path: str | os.PathLike, *, num_devices: int = 1) -> Checkpoint:
    """Restore the checkpoint `path` names (see `resolve_checkpoint`) onto `num_devices` devices (0: all).

    Raises CheckpointMismatchError when the saved weights do not fit the `config.json` beside them.
    """
    workdir, directory, step = resolve_checkpoint(path)
    config = read_config(workdir)
    config.mesh.num_devices = num_devices
    mesh = train.make_mesh(config)
    model = train.build_model(config)
    # Shapes only: initialising the weights for real would cost more than the restore.
    target = train.abstract_train_state(config, model, train.make_optimizer(config), mesh)
    manager = CheckpointManager(str(directory))
    try:
        state = manager.restore(step, target)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatchError(
            f"Checkpoint {directory / str(step)} does not fit {workdir / 'config.json'} (architecture "
            f"model.arch={config.model.arch!r}, learn_temperature={config.fewshot.learn_temperature}, "
            f"optimizer={config.train.optimizer!r}): was it copied from another run? ({e})"
        ) from e
    finally:
        manager.close()
    return Checkpoint(config, directory / str(step), step, model, state, mesh)


# ----------------------------------------------------------------------------------------------------
# Clips from paths.


class PathSource:
    """A `VideoSource` over a list of paths, each a video file or a frame folder (label 0)."""

    class_names: tuple[str, ...] = ()

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        self._num_frames: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> int:
        return 0

    def location(self, index: int) -> str:
        return str(self.paths[index])

    def num_frames(self, index: int) -> int:
        from tam_jax.data import frames, videos

        if index not in self._num_frames:
            path = self.paths[index]
            if path.is_dir():
                count = len(frames.list_frames(path))
            elif path.exists():
                count = videos.count_frames(path)
            else:
                raise VideoError(path, "no such video file or frame folder")
            self._num_frames[index] = count
        return self._num_frames[index]

    def read(self, index: int, frame_indices: Sequence[int]) -> np.ndarray:
        from tam_jax.data import frames, videos

        path = self.paths[index]
        if path.is_dir():
            return frames.read_frames(path, frame_indices)
        return videos.read_video(path, frame_indices, self.num_frames(index))


@dataclasses.dataclass(frozen=True)
class ClipError:
    """A clip that could not be used and why."""

    path: str
    error: str

    def to_json(self) -> dict:
        return {"path": self.path, "error": self.error}


def read_clips(
    paths: Sequence[str | os.PathLike], spec, *, num_threads: int = 4
) -> Iterator[tuple[int, np.ndarray | ClipError]]:
    """(index, uint8 `[T, crop, crop, 3]` test-time clip or ClipError) for each path, in order, decoded by
    `num_threads` threads a few clips ahead of the consumer (memory stays bounded)."""
    from tam_jax.data.clips import load_clip

    source = PathSource(paths)

    def read(index: int):
        try:
            return index, load_clip(source, index, spec)
        except VideoError as e:
            return index, ClipError(str(paths[index]), e.reason)

    threads = max(1, num_threads)
    with ThreadPoolExecutor(threads) as pool:
        pending = collections.deque()
        for index in range(len(paths)):
            pending.append(pool.submit(read, index))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def embed_paths(
    checkpoint: Checkpoint, paths: Sequence[str | os.PathLike], *, desc: str = "embedding",
    progress: bool = True,
) -> tuple[np.ndarray, list[int], list[ClipError]]:
    """Embed clips read from paths, a batch at a time.

    Returns:
      (float32 `[n_ok, T, D]` features, indices into `paths` of those n_ok clips, errors of the others).
    """
    config = checkpoint.config
    batch_size = max(1, int(config.eval.embed_batch_size))
    features, kept, errors, batch, batch_indices = [], [], [], [], []

    def flush():
        if batch:
            features.append(checkpoint.embed(np.stack(batch)))
            kept.extend(batch_indices)
            batch.clear()
            batch_indices.clear()

    bar = _progress_bar(len(paths), desc, progress)
    for index, clip in read_clips(paths, train.clip_spec(config), num_threads=config.data.num_threads):
        if isinstance(clip, ClipError):
            errors.append(clip)
        else:
            batch.append(clip)
            batch_indices.append(index)
            if len(batch) == batch_size:
                flush()
        bar.update(1)
    flush()
    bar.close()
    dim = features[0].shape[-1] if features else 0
    empty = np.zeros((0, config.data.num_frames, dim), np.float32)
    return (np.concatenate(features) if features else empty), kept, errors


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="clip", dynamic_ncols=True, disable=not enabled, leave=False)


# ----------------------------------------------------------------------------------------------------
# The support set.


def find_support_clips(support_dir: str | os.PathLike) -> dict[str, list[str]]:
    """{class: [clip paths]} of a folder of `<class>/<clip>` entries (video files or frame folders),
    classes and clips in name order; hidden entries and files directly in `support_dir` are ignored."""
    root = Path(support_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"Support folder {root} does not exist or is not a folder.")
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[folder.name] = [str(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    if not classes:
        raise SupportError(
            f"Support folder {root} holds no class folders; lay it out as {root}/<class>/<clip>, each clip a "
            "video file or a folder of frames."
        )
    return classes


@dataclasses.dataclass
class SupportSet:
    """Embedded support clips: `embeddings` float32 `[Ns, T, D]`, `labels` int `[Ns]` indexing
    `class_names`, the clips' `paths`, and `metadata` (the checkpoint and scorer they were made with)."""

    class_names: tuple[str, ...]
    embeddings: np.ndarray
    labels: np.ndarray
    paths: tuple[str, ...]
    metadata: dict

    def save(self, path: str | os.PathLike) -> None:
        """Write an `.npz` (no pickles) that `SupportSet.load` reads back."""
        with open(path, "wb") as f:
            np.savez(
                f, embeddings=self.embeddings, labels=self.labels, class_names=np.array(self.class_names),
                paths=np.array(self.paths), metadata=np.array(json.dumps({"format": CACHE_FORMAT,
                                                                          **self.metadata})),
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SupportSet:
        try:
            with np.load(path, allow_pickle=False) as f:
                metadata = json.loads(str(f["metadata"]))
                support = cls(tuple(str(c) for c in f["class_names"]), f["embeddings"], f["labels"],
                              tuple(str(p) for p in f["paths"]), metadata)
        except FileNotFoundError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(
                f"Support cache {path} cannot be read ({e}); write it with --save-support (or "
                "SupportSet.save)."
            ) from e
        if metadata.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"Support cache {path} has format {metadata.get('format')!r}, this version reads "
                f"{CACHE_FORMAT}; recompute it with --save-support."
            )
        support.metadata.pop("format")
        support.metadata["file"] = str(path)
        return support


def check_support_matches(metadata: dict, checkpoint: Checkpoint) -> None:
    """Raise CheckpointMismatchError saying what differs when support embeddings were made by another
    model than `checkpoint`: its architecture, frame count, clip preprocessing or weights."""
    where = f"Support cache {metadata['file']}" if "file" in metadata else "The support set"
    own = checkpoint.metadata()
    redo = "recompute it with this checkpoint: --support SUPPORT_DIR --save-support FILE."
    if metadata.get("arch") != own["arch"]:
        raise CheckpointMismatchError(
            f"{where} holds embeddings of a {metadata.get('arch')!r} backbone but checkpoint "
            f"{checkpoint.directory} has architecture {own['arch']!r} (model.arch); {redo}"
        )
    if metadata.get("num_frames") != own["num_frames"]:
        raise CheckpointMismatchError(
            f"{where} holds clips of {metadata.get('num_frames')} frames but checkpoint "
            f"{checkpoint.directory} uses a frame count of {own['num_frames']} (data.num_frames); {redo}"
        )
    for key, what in _CLIP_KEYS:
        if metadata.get(key) != own[key]:
            raise CheckpointMismatchError(
                f"{where} was made with {what} = {metadata.get(key)!r} but checkpoint "
                f"{checkpoint.directory} uses {own[key]!r}; {redo}"
            )
    if metadata.get("weights") != own["weights"]:
        raise CheckpointMismatchError(
            f"{where} was embedded with other weights (checkpoint {metadata.get('checkpoint')}, step "
            f"{metadata.get('checkpoint_step')}) than checkpoint {checkpoint.directory} (step "
            f"{own['checkpoint_step']}); {redo}"
        )


# ----------------------------------------------------------------------------------------------------
# Scoring.


@functools.partial(jax.jit, static_argnames=("method", "lam", "bidirectional"))
def _video_distances(query, support, method: str, lam: float, bidirectional: bool):
    # lam is static: the alignment module takes the hard minimum only for a Python lam == 0.
    frame_distances = alignment.cosine_distance(query[:, None], support[None])  # [Nq, Ns, Tq, Ts], Eq. 1
    return alignment.alignment_distance(frame_distances, method, lam, bidirectional)


def class_distances(
    query: np.ndarray, support: np.ndarray, labels: np.ndarray, num_classes: int, *, method: str = "tam",
    lam: float = 0.1, bidirectional: bool = False,
) -> np.ndarray:
    """Distance of each query to each class, any number of support clips per class.

    Alignment methods: the mean over a class's clips of the query-clip distance. "tsn": 1 - cos of the
    mean-pooled query and the mean of the class's mean-pooled clips. With equal shots this is
    `tam_jax.fewshot.class_distances`.

    Args:
      query: `[Nq, T, D]` frame features.
      support: `[Ns, T, D]` frame features.
      labels: int `[Ns]`, each clip's class in 0..num_classes-1 (every class at least once).

    Returns:
      float32 `[Nq, num_classes]`.
    """
    fewshot.check_scorer(method)
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes)
    if len(counts) != num_classes or not counts.all():
        raise ValueError(f"every class in 0..{num_classes - 1} needs a support clip; counts {counts}.")
    averaging = np.eye(num_classes, dtype=np.float32)[labels] / counts.astype(np.float32)  # [Ns, C]
    if method == "tsn":
        prototypes = averaging.T @ np.mean(support, axis=1, dtype=np.float32)  # [C, D]
        pooled = np.mean(query, axis=1, dtype=np.float32)
        return np.asarray(alignment.cosine_distance(pooled, prototypes), np.float32)
    chunks = []
    for start in range(0, len(query), _SCORE_CHUNK):
        chunk = query[start : start + _SCORE_CHUNK]
        size = 1 << max(len(chunk) - 1, 0).bit_length()  # a few shapes, a few compilations
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
        per_clip = _video_distances(padded, support, method, float(lam), bool(bidirectional))
        chunks.append(np.asarray(per_clip, np.float32)[: len(chunk)])
    per_clip = np.concatenate(chunks) if chunks else np.zeros((0, len(support)), np.float32)
    return per_clip @ averaging


# ----------------------------------------------------------------------------------------------------
# Results.


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One query's classes ranked by ascending distance."""

    query: str
    ranking: tuple[tuple[str, float], ...]

    @property
    def label(self) -> str:
        """The nearest class."""
        return self.ranking[0][0]

    def to_json(self) -> dict:
        return {"query": self.query, "ranking": [{"class": c, "distance": d} for c, d in self.ranking]}


@dataclasses.dataclass(frozen=True)
class Predictions:
    """`predictions` of the readable queries (in input order) and `errors` of the unreadable ones."""

    predictions: tuple[Prediction, ...]
    errors: tuple[ClipError, ...]

    def to_json(self) -> dict:
        return {"predictions": [p.to_json() for p in self.predictions],
                "errors": [e.to_json() for e in self.errors]}


def rank(distances: np.ndarray, class_names: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """`[C]` distances -> ((class, distance), ...) ascending, ties in class order."""
    order = np.argsort(distances, kind="stable")
    return tuple((class_names[i], float(distances[i])) for i in order)


# ----------------------------------------------------------------------------------------------------
# The classifier.


class FewShotClassifier:
    """Classify videos among classes given by a few example clips each, with a trained checkpoint.

    `FewShotClassifier.from_checkpoint(DIR).fit(support).predict(queries)`; see the module docstring.
    """

    def __init__(
        self, checkpoint: Checkpoint, *, method: str | None = None, lam: float | None = None,
        bidirectional: bool | None = None, progress: bool = True,
    ):
        settings = checkpoint.config.alignment
        self.checkpoint = checkpoint
        self.method = method or settings.method
        if self.method in fewshot.HEAD_SCORERS:
            raise ValueError(
                f"Checkpoint {checkpoint.directory} scores with a learned {self.method!r} head, which "
                "prediction does not support yet; choose a frame-feature scorer with method= (--method): "
                f"{', '.join(fewshot.SCORERS)}."
            )
        fewshot.check_scorer(self.method)
        self.lam = float(settings.lam if lam is None else lam)
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0 (0: the hard minimum), got {self.lam}.")
        if bidirectional and self.method != "tam":
            raise ValueError(f"bidirectional applies to method 'tam' only, not {self.method!r}.")
        # The checkpoint's bidirectional setting follows its method; another method drops it.
        self.bidirectional = bool(settings.bidirectional and self.method == "tam"
                                  if bidirectional is None else bidirectional)
        self.progress = progress
        self.support: SupportSet | None = None
        self.support_errors: tuple[ClipError, ...] = ()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, num_devices: int = 1, **kwargs) -> FewShotClassifier:
        """From a training workdir (its best checkpoint) or one `checkpoints/<step>` folder. kwargs:
        method, lam, bidirectional (default: the checkpoint's `config.alignment`), progress."""
        return cls(load_checkpoint(path, num_devices=num_devices), **kwargs)

    @property
    def scorer(self) -> dict:
        return {"method": self.method, "lam": self.lam, "bidirectional": self.bidirectional}

    def fit(self, support: str | os.PathLike | Mapping[str, Sequence[str]] | SupportSet) -> FewShotClassifier:
        """Embed the support clips: a `<class>/<clip>` folder, a {class: [paths]} mapping, or a SupportSet
        (e.g. `SupportSet.load(FILE)`, checked against this checkpoint).

        Unreadable clips are left out and listed in `support_errors`; a class left without a readable
        clip raises SupportError naming it.
        """
        if isinstance(support, SupportSet):
            check_support_matches(support.metadata, self.checkpoint)
            self._warn_if_scorer_differs(support.metadata)
            self.support, self.support_errors = support, ()
            return self
        clips = find_support_clips(support) if isinstance(support, (str, os.PathLike)) else support
        clips = {str(name): [str(p) for p in paths] for name, paths in clips.items()}
        if not clips:
            raise SupportError("The support set has no classes; give at least one class with one clip.")
        paths = [p for name in clips for p in clips[name]]
        labels = np.array([c for c, name in enumerate(clips) for _ in clips[name]], np.int64)
        features, kept, errors = embed_paths(self.checkpoint, paths, desc="support", progress=self.progress)
        found = np.bincount(labels[kept], minlength=len(clips))
        empty = [name for name, count in zip(clips, found, strict=True) if not count]
        if empty:
            failures = {e.path: e.error for e in errors}
            details = "; ".join(
                f"{name!r}: " + (", ".join(f"{p} ({failures[p]})" for p in clips[name]) or "no clips")
                for name in empty
            )
            raise SupportError(
                f"Support class(es) without one readable clip: {details}. Give each class at least one "
                "readable video file or frame folder, or remove the class."
            )
        metadata = {**self.checkpoint.metadata(), **self.scorer}
        kept_paths = tuple(paths[i] for i in kept)
        self.support = SupportSet(tuple(clips), features, labels[kept], kept_paths, metadata)
        self.support_errors = tuple(errors)
        return self

    def _warn_if_scorer_differs(self, metadata: dict) -> None:
        saved = {key: metadata.get(key) for key in self.scorer}
        if saved != self.scorer:
            warnings.warn(
                f"Support cache {metadata.get('file')} was saved while scoring with {saved}; it is used with "
                f"{self.scorer} (the embeddings do not depend on the scorer).", stacklevel=3,
            )

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Query features `[Nq, T, D]` -> float32 `[Nq, num_classes]` class distances."""
        if self.support is None:
            raise RuntimeError("Call fit(support) before predict or distances.")
        return class_distances(features, self.support.embeddings, self.support.labels,
                               len(self.support.class_names), **self.scorer)

    def predict(self, queries: str | os.PathLike | Sequence[str | os.PathLike]) -> Predictions:
        """Rank the support classes for each query (a video file or a frame folder, or a list of them).

        Unreadable queries are listed in the result's `errors`; the others are still classified.
        """
        if self.support is None:
            raise RuntimeError("Call fit(support) before predict.")
        if isinstance(queries, (str, os.PathLike)):
            queries = [queries]
        paths = [str(q) for q in queries]
        features, kept, errors = embed_paths(self.checkpoint, paths, desc="queries", progress=self.progress)
        distances = self.distances(features)
        names = self.support.class_names
        predictions = tuple(
            Prediction(paths[i], rank(row, names)) for i, row in zip(kept, distances, strict=True)
        )
        return Predictions(predictions, tuple(errors))
