"""Few-shot classification of new videos with a trained checkpoint: the Python API behind `tam_jax.predict`.

    from tam_jax.inference import FewShotClassifier

    classifier = FewShotClassifier.from_checkpoint("runs/demo")   # a workdir: its best checkpoint
    classifier.fit("support/")                                    # <class>/<clip>, 1..k clips per class
    result = classifier.predict(["a.mp4", "frames_of_b/"])        # video files or frame folders
    result.predictions[0].ranking                                 # [(class, distance), ...] ascending
    result.errors                                                 # [ClipError(path, error)]: unreadable
    classifier.support.save("support.npz")                        # reuse: .fit(SupportSet.load(...))

Clips are read exactly as evaluation reads test videos (TSN middle frames, resize, centre crop, from the
checkpoint's `config.json`), embedded once, and scored with the checkpoint's method (`fewshot.scorer`,
`tam_jax.methods`, with its learned parameters if it has them), `lam` and `bidirectional` unless
overridden (any number of clips per class). Only the weights (the embedder's and a learned method's) are
restored: no optimiser is built.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from tam_jax import checkpoints, hosts, methods, models
from tam_jax.checkpoints import CheckpointMismatchError
from tam_jax.data.pipeline import clip_spec
from tam_jax.data.report import ClipError
from tam_jax.embedding import Embedder, map_batches
from tam_jax.errors import UserError
from tam_jax.files import atomic_write
from tam_jax.train_state import TrainState, embedder_variables, restore_trained

CACHE_FORMAT = 1
# Preprocessing a support cache must share with the checkpoint: (metadata key, what to call it).
_CLIP_KEYS = (("image_size", "crop size (data.image_size)"), ("resize", "resize (data.resize)"),
              ("square_resize", "data.square_resize"), ("sampling", "frame sampling (data.sampling)"))
_SCORE_CHUNK = 64  # queries scored per call: bounds the [chunk, Ns, T, T] frame-distance tensor


class SupportError(UserError, ValueError):
    """A support set that cannot be used (e.g. a class without one readable clip); names the class."""


class SupportWarning(UserWarning):
    """A support set that runs but may not give what is meant (e.g. one class: every query ranks it first)."""


# ----------------------------------------------------------------------------------------------------
# The checkpoint.


@dataclasses.dataclass
class TrainedModel:
    """A trained embedder restored from a checkpoint (weights only), and what is needed to embed clips."""

    config: ml_collections.ConfigDict
    directory: Path  # the checkpoints/<step> folder
    step: int
    model: Any  # the frame embedder (flax module)
    state: TrainState  # weights only: opt_state is None
    mesh: jax.sharding.Mesh

    @functools.cached_property
    def variables(self) -> dict:
        return embedder_variables(self.state)

    @functools.cached_property
    def embedder(self) -> Embedder:
        return Embedder(self.model, self.variables, self.mesh,
                        batch_size=int(self.config.eval.embed_batch_size))

    def embed(self, clips: np.ndarray) -> np.ndarray:
        """uint8 `[B, T, H, W, 3]` -> float32 `[B, T, D]`."""
        return self.embedder.embed(clips, show_progress=False)

    def embed_paths(self, paths: Sequence[str | os.PathLike], *, desc: str = "embedding",
                    progress: bool = True):
        """(features `[n_ok, T, D]`, indices of the n_ok readable paths, ClipErrors of the others)."""
        return self.embedder.embed_paths(paths, clip_spec(self.config), desc=desc, show_progress=progress,
                                         num_threads=self.config.data.num_threads)

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


def _resolve_run(path: str | os.PathLike) -> tuple[Path, Path, int, ml_collections.ConfigDict]:
    """(workdir, checkpoint folder, step, config) of the checkpoint `path` names, the run's own methods
    registered (`config.plugins`)."""
    workdir, directory, step = checkpoints.resolve_checkpoint(path)
    config = checkpoints.read_config(workdir)
    methods.import_plugins(config.plugins)
    return workdir, directory, step, config


def load_trained_model(path: str | os.PathLike, *, num_devices: int = 1) -> TrainedModel:
    """Restore the embedder of the checkpoint `path` names (`tam_jax.checkpoints.resolve_checkpoint`) onto
    `num_devices` devices (0: all).

    A workdir whose chosen checkpoint is damaged falls back to the next good one, saying so; one step
    named explicitly is restored or fails. Raises CheckpointMismatchError when the saved weights do not fit
    the `config.json` beside them.
    """
    workdir, directory, step, config = _resolve_run(path)
    mesh = hosts.make_mesh(num_devices)
    manager = checkpoints.CheckpointManager(str(directory))
    restore = lambda s: restore_trained(manager, s, config, mesh, where=str(workdir / "config.json"))
    try:
        if Path(path).name.isdigit():  # one step named: that one or an error, never another
            state = manager.restore_good([step], restore, move_aside=False)
        else:
            state = manager.restore_good(manager.fallback_order("best"), restore, move_aside=False)
            step = int(state.step)
    finally:
        manager.close()
    return TrainedModel(config, directory / str(step), step, models.build_embedder(config.model), state, mesh)


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
        """Write an `.npz` (no pickles) that `SupportSet.load` reads back, atomically."""
        with atomic_write(path, "wb") as f:
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


def check_support_matches(metadata: dict, checkpoint: TrainedModel) -> None:
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


@functools.partial(jax.jit, static_argnames=("method", "num_classes"))
def _class_distances(method, params, query, support, labels, num_classes):
    embed = functools.partial(method.video_embeddings, params)
    return method.class_distances(params, embed(query), embed(support), labels, num_classes)


def class_distances(
    query: np.ndarray, support: np.ndarray, labels: np.ndarray, num_classes: int, *, method: methods.Method,
    params=None,
) -> np.ndarray:
    """`method`'s class distances (`tam_jax.methods`) for any number of queries `[Nq, T, D]` from support
    frame features `[Ns, T, D]` with labels `[Ns]`, any number per class: scored `_SCORE_CHUNK` queries at
    a time (bounding e.g. the `[chunk, Ns, T, T]` frame distances), padded to a few shapes. `params`: a
    learned method's.

    Returns:
      float32 `[Nq, num_classes]`.
    """
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    if len(counts) != num_classes or not counts.all():
        raise ValueError(f"every class in 0..{num_classes - 1} needs a support clip; counts {counts}.")
    if not len(query):
        return np.zeros((0, num_classes), np.float32)
    labels = np.asarray(labels, np.int32)
    score = lambda chunk: _class_distances(method, params, chunk, support, labels, num_classes)
    return map_batches(score, query, _SCORE_CHUNK)


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


def _warn_if_one_class(class_names: Sequence[str]) -> None:
    """A SupportWarning when the support set has one class: every query would rank it first."""
    if len(class_names) == 1:
        warnings.warn(
            f"the support set has one class, {class_names[0]!r}: every query is ranked first in it. Give "
            "two or more classes to classify among.", SupportWarning, stacklevel=3,
        )


def rank(distances: np.ndarray, class_names: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """`[C]` distances -> ((class, distance), ...) ascending, ties in class order."""
    order = np.argsort(distances, kind="stable")
    return tuple((class_names[i], float(distances[i])) for i in order)


# ----------------------------------------------------------------------------------------------------
# The classifier.


def scoring_settings(
    config: ml_collections.ConfigDict, where: str | os.PathLike, *, scorer: str | None = None,
    lam: float | None = None, bidirectional: bool | None = None,
) -> tuple[str, float, bool]:
    """(scorer, lam, bidirectional) a classifier of the run `config` scores with: those given, else the
    run's. Needs only the run's config, so that a bad choice fails before anything is restored.

    Raises:
      ValueError: an unregistered scorer, a learned one the run (`where`) did not train, lam < 0, or
        bidirectional with another scorer than TAM.
    """
    scorer = scorer or config.fewshot.scorer
    if methods.get(scorer).learned and scorer != config.fewshot.scorer:  # get: ValueError if unregistered
        raise _no_parameters_error(scorer, where, config)
    lam = float(config.alignment.lam if lam is None else lam)
    if lam < 0:
        raise ValueError(f"lam must be >= 0 (0: the hard minimum), got {lam}.")
    if bidirectional and scorer != "tam":
        raise ValueError(f"bidirectional applies to scorer 'tam' only, not {scorer!r}.")
    # The run's bidirectional setting follows its scorer; another scorer drops it.
    if bidirectional is None:
        bidirectional = config.alignment.bidirectional and scorer == "tam"
    return scorer, lam, bool(bidirectional)


def _no_parameters_error(scorer: str, where, config: ml_collections.ConfigDict) -> ValueError:
    return ValueError(
        f"Scorer {scorer!r} is a learned method, and checkpoint {where} holds no parameters for it (it "
        f"trained {config.fewshot.scorer!r}); choose a method without parameters with scorer= (--scorer): "
        f"{', '.join(methods.names(learned=False))}."
    )


class FewShotClassifier:
    """Classify videos among classes given by a few example clips each, with a trained checkpoint.

    `FewShotClassifier.from_checkpoint(DIR).fit(support).predict(queries)`; see the module docstring.
    """

    def __init__(
        self, model: TrainedModel, *, scorer: str | None = None, lam: float | None = None,
        bidirectional: bool | None = None, progress: bool = True,
    ):
        self.model = model
        self.scorer, self.lam, self.bidirectional = scoring_settings(
            model.config, model.directory, scorer=scorer, lam=lam, bidirectional=bidirectional)
        self.params = model.state.params.get("head") if self.scorer == model.config.fewshot.scorer else None
        if methods.get(self.scorer).learned and self.params is None:
            raise _no_parameters_error(self.scorer, model.directory, model.config)
        config = model.config.copy_and_resolve_references()
        config.alignment.lam, config.alignment.bidirectional = self.lam, self.bidirectional
        self.method = methods.build(self.scorer, config)
        self.progress = progress
        self.support: SupportSet | None = None
        self.support_errors: tuple[ClipError, ...] = ()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, num_devices: int = 1, **kwargs) -> FewShotClassifier:
        """From a training workdir (its best checkpoint) or one `checkpoints/<step>` folder (its embedder
        only). kwargs:
        scorer, lam, bidirectional (default: the checkpoint's `config.alignment`), progress."""
        workdir, _, _, config = _resolve_run(path)
        chosen = {k: v for k, v in kwargs.items() if k in ("scorer", "lam", "bidirectional")}
        scoring_settings(config, workdir, **chosen)  # a bad choice fails before the restore
        return cls(load_trained_model(path, num_devices=num_devices), **kwargs)

    @property
    def settings(self) -> dict:
        return {"scorer": self.scorer, "lam": self.lam, "bidirectional": self.bidirectional}

    def fit(self, support: str | os.PathLike | Mapping[str, Sequence[str]] | SupportSet) -> FewShotClassifier:
        """Embed the support clips: a `<class>/<clip>` folder, a {class: [paths]} mapping, or a SupportSet
        (e.g. `SupportSet.load(FILE)`, checked against this checkpoint).

        Unreadable clips are left out and listed in `support_errors`; a class left without a readable
        clip raises SupportError naming it.
        """
        if isinstance(support, SupportSet):
            check_support_matches(support.metadata, self.model)
            self._warn_if_scorer_differs(support.metadata)
            self.support, self.support_errors = support, ()
            _warn_if_one_class(support.class_names)
            return self
        clips = find_support_clips(support) if isinstance(support, (str, os.PathLike)) else support
        clips = {str(name): [str(p) for p in paths] for name, paths in clips.items()}
        if not clips:
            raise SupportError("The support set has no classes; give at least one class with one clip.")
        paths = [p for name in clips for p in clips[name]]
        labels = np.array([c for c, name in enumerate(clips) for _ in clips[name]], np.int64)
        features, kept, errors = self.model.embed_paths(paths, desc="support", progress=self.progress)
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
        metadata = {**self.model.metadata(), **self.settings}
        kept_paths = tuple(paths[i] for i in kept)
        self.support = SupportSet(tuple(clips), features, labels[kept], kept_paths, metadata)
        self.support_errors = tuple(errors)
        _warn_if_one_class(self.support.class_names)
        return self

    def _warn_if_scorer_differs(self, metadata: dict) -> None:
        saved = {key: metadata.get(key) for key in self.settings}
        if saved != self.settings:
            warnings.warn(
                f"Support cache {metadata.get('file')} was saved while scoring with {saved}; it is used with "
                f"{self.settings} (the embeddings do not depend on the scorer).",
                SupportWarning, stacklevel=3,
            )

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Query features `[Nq, T, D]` -> float32 `[Nq, num_classes]` class distances."""
        if self.support is None:
            raise RuntimeError("Call fit(support) before predict or distances.")
        return class_distances(features, self.support.embeddings, self.support.labels,
                               len(self.support.class_names), method=self.method, params=self.params)

    def predict(self, queries: str | os.PathLike | Sequence[str | os.PathLike]) -> Predictions:
        """Rank the support classes for each query (a video file or a frame folder, or a list of them).

        Unreadable queries are listed in the result's `errors`; the others are still classified.
        """
        if self.support is None:
            raise RuntimeError("Call fit(support) before predict.")
        if isinstance(queries, (str, os.PathLike)):
            queries = [queries]
        paths = [str(q) for q in queries]
        features, kept, errors = self.model.embed_paths(paths, desc="queries", progress=self.progress)
        distances = self.distances(features)
        names = self.support.class_names
        predictions = tuple(
            Prediction(paths[i], rank(row, names)) for i, row in zip(kept, distances, strict=True)
        )
        return Predictions(predictions, tuple(errors))
