"""Episodic training (Eq. 8): the train state, the data-parallel train step, and the loop.

State: one `TrainState` pytree (step, parameters, BatchNorm statistics, optimiser state) that Orbax saves
whole. All other randomness is a pure function of (config.seed, episode index): which classes and videos,
which frames, which crops and flips. So the step alone fixes the data position and the random stream, and a
resumed run sees exactly the batches an uninterrupted one would have.

Parallelism: one `jax.jit` step over a 1-D `data` mesh; the episodes of a batch are sharded over devices,
parameters replicated. BatchNorm statistics are computed over the global batch, so 1 device and 8 give the
same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tam_jax import checkpoints, evaluate, fewshot, heads, models
from tam_jax.configuration import csv_values, validate

_log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything a train step changes.

    params: {"embedder": backbone parameters, "log_temperature": scalar (only when learned),
      "head": TRN++ / CMN++ head parameters (only for alignment.method "trn" / "cmn", `tam_jax.heads`)}.
    batch_stats: BatchNorm running statistics of the embedder.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


class StopTraining(Exception):
    """A NaN or infinite loss: the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------------------
# Model, optimiser and state.


def build_model(config: ml_collections.ConfigDict) -> models.FrameEmbedder:
    return models.FrameEmbedder(
        arch=config.model.arch, dtype=jnp.dtype(config.model.dtype), freeze_bn=config.model.freeze_bn
    )


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """A 1-D mesh named "data" over `config.mesh.num_devices` devices (0: all)."""
    devices = jax.devices()
    wanted = config.mesh.num_devices or len(devices)
    if wanted > len(devices):
        raise ValueError(
            f"config.mesh.num_devices={wanted} but only {len(devices)} devices are visible; lower it."
        )
    if jax.process_count() > 1 and wanted != len(devices):
        raise ValueError(
            f"config.mesh.num_devices={wanted}: with {jax.process_count()} processes every device takes "
            "part; set it to 0."
        )
    return Mesh(np.asarray(devices[:wanted]), ("data",))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    train = config.train
    if train.schedule == "step":
        return optax.exponential_decay(
            train.learning_rate, train.decay_every_steps, train.decay_factor, staircase=True
        )
    if train.schedule == "cosine":
        return optax.cosine_decay_schedule(train.learning_rate, max(1, train.num_steps))
    return optax.constant_schedule(train.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum (the paper) or Adam; weight decay and gradient clipping as configured."""
    train = config.train
    parts = []
    if train.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip_norm))
    if train.weight_decay > 0:
        parts.append(optax.add_decayed_weights(train.weight_decay))
    schedule = learning_rate_schedule(config)
    if train.optimizer == "sgd":
        parts.append(optax.sgd(schedule, momentum=train.momentum or None))
    else:
        parts.append(optax.adam(schedule))
    return optax.chain(*parts)


def initial_variables(config: ml_collections.ConfigDict, model: models.FrameEmbedder) -> dict:
    """Embedder variables {"params", "batch_stats"}: from `model.init_from` or randomly initialised."""
    if config.model.init_from:
        info = models.read_backbone_metadata(config.model.init_from)
        if info["arch"] != config.model.arch:
            raise ValueError(
                f"config.model.init_from={config.model.init_from!r} holds a {info['arch']} backbone "
                f"but config.model.arch={config.model.arch!r}; make them agree."
            )
        _, variables = models.load_backbone(config.model.init_from)
        return models.embedder_variables_from_backbone(variables)
    size = config.data.image_size
    frames = jnp.zeros((1, 1, size, size, 3), jnp.uint8)
    # Jitted: eager initialisation of a ResNet runs op by op and takes many seconds.
    return jax.jit(model.init, static_argnames="train")(jax.random.key(config.seed), frames, train=False)


def create_train_state(
    config: ml_collections.ConfigDict, model: models.FrameEmbedder, optimizer, mesh: Mesh
) -> TrainState:
    """The initial state, replicated over the mesh."""
    variables = initial_variables(config, model)
    params = {"embedder": variables["params"]}
    if config.fewshot.learn_temperature:
        params["log_temperature"] = jnp.log(jnp.float32(config.fewshot.temperature))
    head = heads.build_head(config)
    if head is not None:
        params["head"] = heads.init_params(
            head, config.data.num_frames, models.feature_dim(config.model.arch),
            jax.random.fold_in(jax.random.key(config.seed), 1),
        )

    def init(params, batch_stats):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=optimizer.init(params),
        )

    replicated = NamedSharding(mesh, P())
    return jax.jit(init, out_shardings=replicated)(params, variables.get("batch_stats", {}))


def abstract_train_state(config, model, optimizer, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the train state, without initialising anything: the
    target a checkpoint is restored into."""
    fresh = ml_collections.ConfigDict(config.to_dict())
    fresh.model.init_from = ""  # the checkpoint holds the weights; the initialisation need not exist
    shapes = jax.eval_shape(lambda: create_train_state(fresh, model, optimizer, mesh))
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)


def temperature(params, config: ml_collections.ConfigDict) -> jax.Array:
    if config.fewshot.learn_temperature:
        return jnp.exp(params["log_temperature"])
    return jnp.float32(config.fewshot.temperature)


# ----------------------------------------------------------------------------------------------------
# The train step.


def episode_loss(
    params,
    batch_stats,
    batch: dict,
    *,
    model: models.FrameEmbedder,
    config: ml_collections.ConfigDict,
):
    """Mean Eq. 8 loss over a batch of episodes.

    Args:
      batch: {"support": uint8 `[E, way*shot, T, H, W, 3]`, "query": uint8 `[E, Nq, T, H, W, 3]`,
        "query_labels": int `[E, Nq]`}.

    Returns:
      (loss, (new batch_stats, {"loss", "accuracy"}))
    """
    support, query, labels = batch["support"], batch["query"], batch["query_labels"]
    episodes, num_support = support.shape[:2]
    num_query = query.shape[1]
    # Every frame of every video of the batch goes through the backbone in one call, so BatchNorm sees
    # the whole global batch.
    videos = jnp.concatenate([support, query], axis=1).reshape((-1,) + support.shape[2:])
    features, updates = model.apply(
        {"params": params["embedder"], "batch_stats": batch_stats},
        videos,
        train=True,
        mutable=["batch_stats"],
    )
    features = features.reshape(episodes, num_support + num_query, *features.shape[1:])
    head, head_query, head_support = heads.build_head(config), None, None
    if head is not None:  # TRN++ / CMN++: one embedding per video, [E, N, F] (tam_jax.heads)
        vectors = heads.video_embeddings(head, params["head"], features)
        head_query, head_support = vectors[:, num_support:], vectors[:, :num_support]
    distances = jax.vmap(
        functools.partial(
            fewshot.class_distances,
            way=config.fewshot.way,
            shot=config.fewshot.shot,
            method=config.alignment.method,
            lam=config.alignment.lam,
            bidirectional=config.alignment.bidirectional,
        )
    )(features[:, num_support:], features[:, :num_support], head_query, head_support)
    logits = fewshot.logits_from_distances(distances, temperature(params, config))
    loss = fewshot.cross_entropy(logits, labels)
    metrics = {"loss": loss, "accuracy": fewshot.accuracy(logits, labels)}
    return loss, (updates["batch_stats"], metrics)


def make_train_step(config, model, optimizer, mesh: Mesh):
    """A jitted `(state, batch) -> (state, metrics)`, batch sharded over "data", state replicated."""

    def train_step(state: TrainState, batch: dict):
        grad_fn = jax.value_and_grad(
            functools.partial(episode_loss, model=model, config=config), has_aux=True
        )
        (_, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["learning_rate"] = learning_rate_schedule(config)(state.step)
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    return jax.jit(
        train_step,
        in_shardings=(replicated, sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host arrays (this process's episodes) -> global arrays sharded over "data" on the first axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------
# Data.


def clip_spec(config: ml_collections.ConfigDict):
    from tam_jax.data.clips import ClipSpec

    data = config.data
    return ClipSpec(
        num_frames=data.num_frames,
        resize=data.resize,
        crop=data.image_size,
        flip=data.flip,
        square=data.square_resize,
        sampling=data.sampling,
    )


def build_source(config: ml_collections.ConfigDict, split: str):
    from tam_jax.data.sources import build_source as build

    data = config.data
    return build(
        data.kind,
        split,
        root=data.root or None,
        split_dir=data.split_dir or None,
        tfds_name=data.tfds_name or None,
        data_dir=data.tfds_data_dir or None,
        demo_options=data.demo.to_dict(),
    )


@dataclasses.dataclass
class SplitData:
    """A split's source, its usable items and their labels (after checking every video once), and the
    episode sampler over them for the configured shot."""

    source: Any
    items: np.ndarray
    labels: np.ndarray
    sampler: Any


def prepare_split(config, split: str, report, shots: tuple[int, ...] = ()) -> SplitData:
    """Open a split, check every video once (bad ones go to `report`), and check that episodes of
    `config.fewshot.shot` and of every shot in `shots` can be drawn.

    Each process checks every P-th video and the usable set is then shared, so all processes agree on it
    and each bad video is reported once.
    """
    from tam_jax.data.episodes import EpisodeSampler
    from tam_jax.data.sources import find_usable

    source = build_source(config, split)
    mine = np.arange(jax.process_index(), len(source), jax.process_count())
    usable = np.zeros(len(source), bool)
    usable[find_usable(source, report, indices=mine, num_threads=config.data.num_threads,
                       progress=is_chief())] = True
    items = np.flatnonzero(_gather(usable[None]).any(axis=0))
    labels = np.array([source.label(int(i)) for i in items], np.int64)
    samplers = {}
    for shot in dict.fromkeys((config.fewshot.shot, *shots)):
        try:
            samplers[shot] = EpisodeSampler(
                labels, way=config.fewshot.way, shot=shot, queries=config.fewshot.queries,
                seed=config.seed, items=items, class_names=source.class_names,
                drop_small_classes=config.data.drop_small_classes,
            )
        except ValueError as e:
            raise ValueError(
                f"The {split} split cannot make {config.fewshot.way}-way {shot}-shot episodes with "
                f"{config.fewshot.queries} queries (config.fewshot.*, config.eval.shots, "
                f"config.data.drop_small_classes): {e}"
            ) from e
    return SplitData(source, items, labels, samplers[config.fewshot.shot])


def is_chief() -> bool:
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------------
# Embedding and validation.


def local_mesh(mesh: Mesh) -> Mesh:
    """The part of `mesh` on this process's devices, for work each process does alone."""
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return Mesh(np.asarray(devices), ("data",))


@functools.lru_cache(maxsize=8)
def _inference_apply(model: models.FrameEmbedder):
    """One jitted inference function per model, so repeated validations compile once."""
    return jax.jit(lambda variables, frames: model.apply(variables, frames, train=False))


def make_embed_fn(model: models.FrameEmbedder, mesh: Mesh):
    """`(variables, frames [B, T, H, W, 3]) -> [B, T, D]` in inference mode, jitted, B sharded over `mesh`
    (a mesh of this process's devices; host arrays are placed explicitly, as multi-process JAX requires)."""
    sharded = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    apply = _inference_apply(model)

    def embed(variables, frames):
        return apply(jax.device_put(variables, replicated), jax.device_put(frames, sharded))

    return embed


def embedding_variables(state: TrainState) -> dict:
    return {"params": state.params["embedder"], "batch_stats": state.batch_stats}


def _local_copy(tree):
    """Host copies of replicated (possibly multi-process) arrays: this process's replica of each."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def embed_split(config, state: TrainState, model, mesh, frames: np.ndarray) -> np.ndarray:
    """uint8 `[N, T, H, W, 3]` -> float32 `[N, T, D]` with the state's current weights, on this process's
    devices of `mesh`."""
    here = local_mesh(mesh)
    apply = make_embed_fn(model, here)
    variables = jax.device_put(_local_copy(embedding_variables(state)), NamedSharding(here, P()))
    batch_size = _round_up(config.eval.embed_batch_size, here.size)
    return evaluate.embed_videos(
        lambda chunk: apply(variables, chunk), frames, batch_size, progress=is_chief()
    )


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def load_split_frames(config, split_data: SplitData, report, items: np.ndarray | None = None):
    """Test-transformed clips of `items` (default: all usable) -> (uint8 `[N, T, H, W, 3]`, labels `[N]`)."""
    from tam_jax.data.loader import load_split

    arrays = load_split(
        split_data.source, clip_spec(config), items=split_data.items if items is None else items,
        num_workers=config.data.num_workers, num_threads=config.data.num_threads,
        report=report, progress=is_chief(),
    )
    return arrays.frames, arrays.labels


@dataclasses.dataclass
class EvalVideos:
    """A split prepared for repeated embedding: each process holds and embeds only its share.

    frames: uint8 `[n, T, H, W, 3]`, this process's videos, padded to the same n on every process.
    labels: int `[N]`, the labels of all readable videos, ordered by item (as on one process).
    rows: int `[N]`, where each of those videos sits among the `[P * n]` gathered rows.
    """

    frames: np.ndarray
    labels: np.ndarray
    rows: np.ndarray


def _gather(local: np.ndarray) -> np.ndarray:
    """Concatenate every process's equally sized `local` along axis 0 (identity on one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def load_eval_videos(config, split_data: SplitData, report) -> EvalVideos:
    """Load this process's share (every P-th usable video) of a split with test transforms."""
    from tam_jax.data.loader import load_split

    share = split_data.items[jax.process_index() :: jax.process_count()]
    arrays = load_split(
        split_data.source, clip_spec(config), items=share, num_workers=config.data.num_workers,
        num_threads=config.data.num_threads, report=report, progress=is_chief(),
    )
    padded = int(_gather(np.array([len(arrays.items)])).max())
    missing = padded - len(arrays.items)
    frames = np.concatenate([arrays.frames, np.zeros((missing, *arrays.frames.shape[1:]), np.uint8)])
    items = _gather(np.concatenate([arrays.items, np.full(missing, -1, np.int64)]))
    labels = _gather(np.concatenate([arrays.labels, np.full(missing, -1, arrays.labels.dtype)]))
    # Episodes index videos by row: order rows by item so that they do not depend on the process count.
    rows = np.flatnonzero(items >= 0)
    rows = rows[np.argsort(items[rows], kind="stable")]
    return EvalVideos(frames, labels[rows], rows)


def embed_eval_videos(config, state: TrainState, model, mesh, videos: EvalVideos) -> np.ndarray:
    """Every process embeds its share once; all gather the result: float32 `[N, T, D]`."""
    local = embed_split(config, state, model, mesh, videos.frames)
    return _gather(local)[videos.rows]


def head_embeddings(config, state: TrainState, embeddings: np.ndarray) -> np.ndarray | None:
    """The run's learned head applied to cached frame features `[N, T, D]` -> `[N, F]` (None: no head)."""
    head = heads.build_head(config)
    return None if head is None else heads.embed_cached(head, _local_copy(state.params["head"]), embeddings)


def eval_scorers(config) -> tuple[str, ...]:
    """`config.eval.scorers`, led by the run's own scorer when it trained a head ("trn" / "cmn")."""
    scorers = csv_values(config.eval.scorers)
    method = config.alignment.method
    if method in fewshot.HEAD_SCORERS and method not in scorers:
        scorers = (method, *scorers)
    return scorers


def validation_accuracy(config, state, model, mesh, videos: EvalVideos, scorer: str) -> float:
    embeddings = embed_eval_videos(config, state, model, mesh, videos)
    per_episode = evaluate.evaluate_cached(
        embeddings, videos.labels, way=config.fewshot.way, shot=config.fewshot.shot,
        queries=config.fewshot.queries, num_episodes=config.train.val_episodes,
        seed=config.seed + 1, scorers=(scorer,), lam=config.alignment.lam,
        bidirectional=config.alignment.bidirectional,
        episodes_per_batch=min(config.eval.episodes_per_batch, config.train.val_episodes),
        drop_small_classes=config.data.drop_small_classes,
        progress=False, head_embeddings=head_embeddings(config, state, embeddings),
    )
    return float(np.mean(per_episode[scorer]))


# ----------------------------------------------------------------------------------------------------
# The loop.


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (then saves and exits)."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _metrics_writer(workdir: str):
    if not is_chief():
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def _any_process(signal_name: str | None) -> str | None:
    """The signal name if any process received one (a collective: every process must call it)."""
    received = _gather(np.array([signal_name is not None]))
    return (signal_name or "a stop signal (on another process)") if received.any() else None


def _truncate_log(path: str, step: int) -> None:
    """Drop records after `step` (written before an interruption) so that a resumed log has each step once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def _log_line(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), validating and checkpointing on the way.

    Writes `workdir/checkpoints/` (Orbax), `workdir/tensorboard/`, `workdir/train_log.jsonl` (one JSON
    record per logged step) and `workdir/config.json`. Returns the final state.
    """
    from tam_jax.data.loader import TrainBatches
    from tam_jax.data.report import SkipReport

    validate(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config)
    if config.train.episodes_per_step % mesh.size:
        raise ValueError(
            f"config.train.episodes_per_step={config.train.episodes_per_step} must be a multiple of the "
            f"{mesh.size} devices it is sharded over; change it or config.mesh.num_devices."
        )
    report = SkipReport()
    train_data = prepare_split(config, "train", report)
    validating = config.train.val_every_steps > 0
    val_data = prepare_split(config, "val", report) if validating else None

    model = build_model(config)
    optimizer = make_optimizer(config)
    state = create_train_state(config, model, optimizer, mesh)
    manager = checkpoints.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every_steps,
    )
    state = manager.restore_latest(state)
    start_step = int(state.step)
    log_path = os.path.join(workdir, "train_log.jsonl")
    if is_chief():
        if start_step:
            print(f"Resuming from step {start_step} in {workdir}.")
        _truncate_log(log_path, start_step)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    episodes_per_process = config.train.episodes_per_step // jax.process_count()
    batches = TrainBatches(
        train_data.source, train_data.sampler, clip_spec(config),
        episodes_per_batch=episodes_per_process, start=start_step,
        num_batches=config.train.num_steps, num_workers=config.data.num_workers,
        num_threads=config.data.num_threads, prefetch=config.data.prefetch,
        process_index=jax.process_index(), process_count=jax.process_count(), report=report,
    )
    val_videos = load_eval_videos(config, val_data, report) if validating else None

    train_step = make_train_step(config, model, optimizer, mesh)
    writer = _metrics_writer(workdir)
    progress = _progress_bar(start_step, config.train.num_steps)
    last_time, last_step = time.perf_counter(), start_step
    try:
        with _StopSignal() as stop:
            for step in range(start_step, config.train.num_steps):
                batch = shard_batch(next(batches), mesh)
                state, metrics = train_step(state, batch)
                done = step + 1
                finished = done == config.train.num_steps
                logging_now = done % config.train.log_every_steps == 0 or finished
                # One reading of the flag per step, so a signal arriving mid-step is acted on (saved and
                # stopped) at the end of the next step rather than half-way through this one. Processes
                # must stop at the same step: with several, they agree at logging steps.
                stopping = stop.received
                if jax.process_count() > 1:
                    stopping = _any_process(stopping) if logging_now else None
                validating_now = validating and (done % config.train.val_every_steps == 0 or finished)
                saving_now = manager.should_save(done) or validating_now or finished or bool(stopping)
                if logging_now or saving_now:
                    metrics = jax.device_get(metrics)
                    if not all(math.isfinite(float(v)) for v in metrics.values()):
                        raise StopTraining(
                            f"Non-finite training metrics at step {done}: {metrics}. Stopping; the last "
                            f"good checkpoint in {manager.directory} is kept (latest: "
                            f"{manager.latest_step()}). Lower config.train.learning_rate or set "
                            "config.train.grad_clip_norm."
                        )
                if logging_now:
                    now = time.perf_counter()
                    rate = (done - last_step) * config.train.episodes_per_step / max(now - last_time, 1e-9)
                    last_time, last_step = now, done
                    record = {"step": done, **{k: float(v) for k, v in metrics.items()},
                              "episodes_per_second": rate}
                    if is_chief():
                        _log_line(log_path, record)
                        if writer is not None:
                            for key, value in record.items():
                                if key != "step":
                                    writer.add_scalar(f"train/{key}", value, done)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.2f}",
                                         eps=f"{rate:.1f}")
                val_accuracy = None
                if validating_now:
                    val_accuracy = validation_accuracy(
                        config, state, model, mesh, val_videos, config.alignment.method
                    )
                    if is_chief():
                        _log_line(log_path, {"step": done, "val_accuracy": val_accuracy})
                        if writer is not None:
                            writer.add_scalar("val/accuracy", val_accuracy, done)
                        progress.write(f"step {done}: validation accuracy {val_accuracy:.4f}")
                if saving_now:
                    manager.save(done, state, val_accuracy=val_accuracy, force=bool(stopping))
                progress.update(1)
                if stopping:
                    if is_chief():
                        progress.write(f"{stopping} received: saved step {done} and stopped.")
                    break
        if jax.process_count() > 1:
            # Replicated parameters must be identical on every process; a difference means a bug in
            # the data split or the step, and would silently corrupt the saved model.
            from jax.experimental import multihost_utils

            multihost_utils.assert_equal(_local_copy(state.params), "parameters differ between processes")
    finally:
        progress.close()
        batches.close()
        manager.close()  # waits for the last save to finish
        if writer is not None:
            writer.close()
        if len(report):  # each process reports the videos it checked or read
            _log.warning("%s", report.summary())
    return state


def _progress_bar(start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(initial=start, total=total, desc="training", unit="step", dynamic_ncols=True,
                disable=not is_chief())


# ----------------------------------------------------------------------------------------------------
# Evaluation of a trained run.


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Restore the best (or latest) checkpoint and evaluate every scorer of `eval_scorers` and every shot.

    Embeds every video of `config.eval.split` once, runs `config.eval.num_episodes` episodes per shot on
    the cached embeddings, writes `workdir/results.json` and prints the table. Returns the records.
    """
    from tam_jax.data.report import SkipReport

    validate(config, training=False)
    report = SkipReport()
    split = config.eval.split
    shots = csv_values(config.eval.shots, int) or (config.fewshot.shot,)
    split_data = prepare_split(config, split, report, shots=shots)
    mesh = make_mesh(config)
    model = build_model(config)
    target = abstract_train_state(config, model, make_optimizer(config), mesh)
    manager = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"))
    which = config.eval.checkpoint
    step = manager.best_step() if which == "best" else manager.latest_step()
    if step is None and which == "best":
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint in {manager.directory}: train first (--mode=train) with --workdir={workdir}."
        )
    state = manager.restore(step, target)
    manager.close()
    videos = load_eval_videos(config, split_data, report)
    embeddings = embed_eval_videos(config, state, model, mesh, videos)
    labels = videos.labels
    vectors = head_embeddings(config, state, embeddings)
    scorers = eval_scorers(config)
    records = []
    for shot in shots:
        per_scorer = evaluate.evaluate_cached(
            embeddings, labels, way=config.fewshot.way, shot=shot, queries=config.fewshot.queries,
            num_episodes=config.eval.num_episodes, seed=config.seed + 2, scorers=scorers,
            lam=config.alignment.lam, bidirectional=config.alignment.bidirectional,
            episodes_per_batch=config.eval.episodes_per_batch,
            class_names=split_data.source.class_names, progress=is_chief(), head_embeddings=vectors,
            drop_small_classes=config.data.drop_small_classes,
        )
        records += evaluate.result_records(per_scorer, split=split, way=config.fewshot.way, shot=shot)
    for record in records:
        record["checkpoint_step"] = int(step)
    if is_chief():
        evaluate.write_results(os.path.join(workdir, "results.json"), records)
        print(evaluate.format_results(records))
        if len(report):
            print(report.summary())
    return records
