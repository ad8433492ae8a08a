"""Episodic training (Eq. 8): the data-parallel train step and the loop.

The state, optimiser and schedule are in `tam_jax.train_state`; every random choice is a function of
(config.seed, episode index), so the step alone fixes the data position and a resumed run sees exactly
the batches an uninterrupted one would have.

Parallelism: one `jax.jit` step over a 1-D `data` mesh; the episodes of a batch are sharded over devices,
parameters replicated.

Accumulation: a step's `train.episodes_per_step` episodes are processed as k micro-batches of
`devices * train.episodes_per_device_step` episodes, one after another in a `lax.scan` inside the jitted
step, so memory depends on the micro-batch, not on the episodes per step. The loss is the mean over all the
step's episodes and the gradient is its gradient (the mean of the micro-batches' mean-loss gradients), so
where the backbone's forward does not depend on the batch (frozen BatchNorm, `model.freeze_bn`) a step with
k micro-batches makes the same update as one micro-batch of all episodes. BatchNorm in training mode
normalises each micro-batch with that micro-batch's statistics (over all its devices: 1 device and 8 give
the same numbers for the same micro-batch), and the running statistics take k momentum updates per step,
one per micro-batch in order, as the paper's PyTorch training does with one forward at a time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tam_jax import checkpoints, evaluate, fewshot, frame_chunks, heads, hosts, memory_fit, models, progress
from tam_jax.configuration import validate
from tam_jax.data import pipeline
from tam_jax.files import write_text
from tam_jax.metrics_log import MetricsLog
from tam_jax.train_state import (
    TrainState,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    temperature,
)
from tam_jax.workdir_lock import hold_workdir

_log = logging.getLogger(__name__)


class StopTraining(Exception):
    """A NaN or infinite loss: the run stops and keeps its last good checkpoint."""


class TrainingInterrupted(Exception):
    """A stop signal (SIGTERM, SIGINT) arrived: the state was saved and training stopped early.

    `exit_status` is what `python -m tam_jax.main` exits with: 128 + the signal's number (143 for
    SIGTERM, 130 for SIGINT), as a shell reports a process ended by that signal. No results are written.
    """

    def __init__(self, signal_name: str, step: int):
        self.signal_name, self.step = signal_name, step
        number = getattr(signal.Signals, signal_name, signal.SIGTERM)
        self.exit_status = 128 + int(number)
        super().__init__(f"{signal_name} received: saved step {step} and stopped; run the same command to "
                         "resume.")


# ----------------------------------------------------------------------------------------------------
# The train step.


def embed_episode(params, batch_stats, batch: dict, *, model: models.FrameEmbedder, chunks: int = 1):
    """Frame features of every video of a batch (in the train step, a micro-batch) of episodes, in training
    mode; BatchNorm normalises with, and updates its running statistics from, this batch alone (with
    `chunks` > 1, each of `chunks` chunks of its videos, recomputed alone in the backward pass:
    `tam_jax.frame_chunks`, config.train.embed_chunks).

    Args:
      batch: {"support": uint8 `[E, way*shot, T, H, W, 3]`, "query": uint8 `[E, Nq, T, H, W, 3]`, ...}.

    Returns:
      (float32 `[E, way*shot + Nq, T, D]`, support videos first; the new BatchNorm statistics).
    """
    videos = jnp.concatenate([batch["support"], batch["query"]], axis=1)

    def apply(params, batch_stats, clips):
        features, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, clips, train=True, mutable=["batch_stats"]
        )
        return features, updates["batch_stats"]

    if chunks > 1:
        return frame_chunks.embed_in_chunks(apply, params["embedder"], batch_stats, videos, chunks)
    # Every frame of every video of the batch goes through the backbone in one call, so BatchNorm sees
    # the whole (micro-)batch, across devices.
    features, batch_stats = apply(params["embedder"], batch_stats, videos.reshape((-1,) + videos.shape[2:]))
    return features.reshape(*videos.shape[:2], *features.shape[1:]), batch_stats


def episode_logits(params, features: jax.Array, num_support: int, config: ml_collections.ConfigDict):
    """Eq. 8's logits of every query: features `[E, way*shot + Nq, T, D]` (support first) ->
    `[E, Nq, way]`, scored with `config.fewshot.scorer` (and its learned head, if any)."""
    head, head_query, head_support = heads.build_head(config), None, None
    if head is not None:  # TRN++ / CMN++: one embedding per video, [E, N, F] (tam_jax.heads)
        vectors = heads.video_embeddings(head, params["head"], features)
        head_query, head_support = vectors[:, num_support:], vectors[:, :num_support]
    distances = jax.vmap(
        functools.partial(
            fewshot.class_distances,
            way=config.fewshot.way,
            shot=config.fewshot.shot,
            method=config.fewshot.scorer,
            lam=config.alignment.lam,
            bidirectional=config.alignment.bidirectional,
        )
    )(features[:, num_support:], features[:, :num_support], head_query, head_support)
    return fewshot.logits_from_distances(distances, temperature(params, config))


def episode_loss(params, batch_stats, batch: dict, *, model: models.FrameEmbedder,
                 config: ml_collections.ConfigDict):
    """Mean Eq. 8 loss over a batch of episodes (`embed_episode`'s batch plus "query_labels" int `[E, Nq]`).

    Returns:
      (loss, (new batch_stats, {"loss", "accuracy"})); features, logits and loss are float32 whatever
      `model.dtype` computes the backbone in.
    """
    features, batch_stats = embed_episode(
        params, batch_stats, batch, model=model, chunks=config.train.get("embed_chunks", 1)
    )
    logits = episode_logits(params, features, batch["support"].shape[1], config)
    labels = batch["query_labels"]
    loss = fewshot.cross_entropy(logits, labels)
    chex.assert_type([features, logits, loss], jnp.float32)
    return loss, (batch_stats, {"loss": loss, "accuracy": fewshot.accuracy(logits, labels)})


def num_micro_batches(episodes_per_step: int, num_devices: int, episodes_per_device_step: int) -> int:
    """k, the micro-batches of a step: `episodes_per_step / (num_devices * episodes_per_device_step)`.

    Raises ValueError naming the config keys when it does not divide.
    """
    micro = num_devices * episodes_per_device_step
    if episodes_per_device_step < 1 or episodes_per_step % micro:
        raise ValueError(
            f"config.train.episodes_per_step={episodes_per_step} must be a multiple of {micro}: the "
            f"{num_devices} devices times config.train.episodes_per_device_step="
            f"{episodes_per_device_step} (the episodes each device embeds at once). Change "
            "train.episodes_per_step, train.episodes_per_device_step or mesh.num_devices."
        )
    return episodes_per_step // micro


def split_micro_batches(batch: dict, k: int) -> dict:
    """Every `[E, ...]` array of `batch` -> `[k, E / k, ...]`; micro-batch i holds episodes i, i+k, i+2k, ...

    The stride keeps each device's share of every micro-batch on that device: the episodes are sharded
    over devices in contiguous blocks, and a block of E / devices episodes is E / (k * devices) whole rows
    of the `[E / k, k]` view. It also makes the micro-batches a function of E and k alone, not of the
    number of devices.
    """
    episodes = jax.tree.leaves(batch)[0].shape[0]
    chex.assert_tree_shape_prefix(batch, (episodes,))
    if episodes % k:
        raise ValueError(f"{episodes} episodes do not split into {k} micro-batches.")
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((episodes // k, k) + x.shape[1:]), 0, 1), batch)


def accumulated_gradients(loss_fn, params, batch_stats, micro_batches: dict):
    """Mean gradient of `loss_fn` over the micro-batches, taken one micro-batch at a time (`lax.scan`).

    Args:
      loss_fn: `(params, batch_stats, micro_batch) -> (mean loss, (new batch_stats, metrics))`.
      micro_batches: `split_micro_batches`' output, every leaf `[k, episodes per micro-batch, ...]`.

    Returns:
      (gradients: the mean over micro-batches, float32 like the parameters; batch_stats after the k
      micro-batches in order; metrics: each the mean over micro-batches).
    """
    k = jax.tree.leaves(micro_batches)[0].shape[0]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def one(carry, micro_batch):
        grad_sum, stats = carry
        (_, (stats, metrics)), grads = grad_fn(params, stats, micro_batch)
        return (jax.tree.map(jnp.add, grad_sum, grads), stats), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, batch_stats), metrics = jax.lax.scan(one, (zeros, batch_stats), micro_batches)
    # Equal micro-batches of mean losses: the mean of their gradients is the gradient of the step's mean loss.
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return grads, batch_stats, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)


def make_train_step(config, model, optimizer, mesh: Mesh):
    """A jitted `(state, batch) -> (state, metrics)`, batch sharded over "data", state replicated.

    The batch's `train.episodes_per_step` episodes go through the backbone in micro-batches of
    `mesh.size * train.episodes_per_device_step` (module docstring: loss, gradients, BatchNorm).
    """
    k = num_micro_batches(config.train.episodes_per_step, mesh.size, config.train.episodes_per_device_step)
    # Each micro-batch stays sharded over "data": its episodes are embedded on the devices that hold them.
    micro_sharded = NamedSharding(mesh, P(None, "data"))

    def train_step(state: TrainState, batch: dict):
        loss_fn = functools.partial(episode_loss, model=model, config=config)
        if k == 1:  # no loop: XLA:CPU runs convolutions inside a scan about ten times slower
            (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, state.batch_stats, batch)
        else:
            micro_batches = jax.lax.with_sharding_constraint(split_micro_batches(batch, k), micro_sharded)
            grads, batch_stats, metrics = accumulated_gradients(
                loss_fn, state.params, state.batch_stats, micro_batches
            )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    return jax.jit(
        train_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host arrays (this process's episodes) -> global arrays sharded over "data" on the first axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


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


class _TrainMetrics:
    """Reads a logging step's metrics after the next step is dispatched (no stall at logging steps),
    checks they are finite, and writes them with the host-side learning rate and the speed."""

    def __init__(self, config, log: MetricsLog, bar, checkpoint_dir: str, start_step: int):
        self._config, self._log, self._bar, self._dir = config, log, bar, checkpoint_dir
        self._schedule = learning_rate_schedule(config)
        self._pending = None
        self._last_time, self._last_step = time.perf_counter(), start_step

    def defer(self, step: int, metrics: dict, *, write: bool = True) -> None:
        """Keep step `step`'s metrics to check (and, with `write`, to log) at the next `flush`."""
        self.flush()
        self._pending = (step, metrics, write)

    def flush(self) -> None:
        """Read, check and write the deferred metrics, if any. Raises StopTraining on a non-finite value."""
        if self._pending is None:
            return
        step, metrics, write = self._pending
        self._pending = None
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in metrics.values()):
            raise StopTraining(
                f"Non-finite training metrics at step {step}: {metrics}. Stopping; the last good "
                f"checkpoint in {self._dir} is kept. Lower config.train.learning_rate or set "
                "config.train.grad_clip_norm."
            )
        if not write:
            return
        now = time.perf_counter()
        episodes = (step - self._last_step) * self._config.train.episodes_per_step
        rate = episodes / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        # The rate of step `step` is the schedule's value at its starting step.
        record = {**metrics, "learning_rate": float(self._schedule(step - 1)), "episodes_per_second": rate}
        self._log.write(step, record, "train")
        self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                              eps=f"{rate:.1f}")


def _start(config, workdir: str, mesh: Mesh, model, optimizer, log: MetricsLog):
    """The initial (or resumed) state and its checkpoint manager; writes `config.json`."""
    state = create_train_state(config, model, optimizer, mesh)
    manager = checkpoints.CheckpointManager(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every_steps,
    )
    state = manager.restore_latest(state)
    start_step = int(state.step)
    log.start(start_step)
    if hosts.is_chief():
        if start_step:
            print(f"Resuming from step {start_step} in {workdir}.")
        write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    return state, manager, start_step


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), validating and checkpointing on the way.

    Writes `workdir/checkpoints/` (Orbax), `workdir/tensorboard/`, `workdir/train_log.jsonl` (one JSON
    record per logged step) and `workdir/config.json`. Returns the final state. Holds the workdir's lock
    (`tam_jax.workdir_lock`) while it runs. Raises TrainingInterrupted after saving when a stop signal
    arrives.
    """
    validate(config)
    with hold_workdir(workdir):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """`train` once the workdir is held. One function on purpose: the order of step, log, validate, save
    and stop reads top to bottom."""
    from tam_jax.data.report import SkipReport

    os.makedirs(workdir, exist_ok=True)
    mesh = hosts.make_mesh(config.mesh.num_devices)
    if config.train.episodes_per_step % mesh.size:
        raise ValueError(
            f"config.train.episodes_per_step={config.train.episodes_per_step} must be a multiple of the "
            f"{mesh.size} devices it is sharded over; change it or config.mesh.num_devices."
        )
    memory_fit.check_step_fits(config, mesh)  # micro-batches divide; the step fits where memory is reported
    report = SkipReport()
    train_split = pipeline.prepare_split(config, "train", report)
    model = models.build_embedder(config.model)
    validator = None
    if config.train.val_every_steps > 0:
        validator = evaluate.FewShotEvaluator.for_validation(config, mesh, model, report)
    optimizer = make_optimizer(config)
    log = MetricsLog(workdir)
    state, manager, start_step = _start(config, workdir, mesh, model, optimizer, log)
    batches = pipeline.train_batches(config, train_split, report, start=start_step)
    train_step = make_train_step(config, model, optimizer, mesh)
    bar = progress.bar(config.train.num_steps, "training", "step", initial=start_step)
    metrics_out = _TrainMetrics(config, log, bar, manager.directory, start_step)
    try:
        stopping = None  # stays None when the run is already finished (a rerun of a done command)
        with _StopSignal() as stop:
            for step in range(start_step, config.train.num_steps):
                state, metrics = train_step(state, shard_batch(next(batches), mesh))
                metrics_out.flush()  # the previous logging step's metrics, now that this step runs
                done = step + 1
                finished = done == config.train.num_steps
                logging_now = done % config.train.log_every_steps == 0 or finished
                # One reading of the flag per step, so a signal arriving mid-step is acted on (saved and
                # stopped) at the end of the next step rather than half-way through this one. Processes
                # must stop at the same step: with several, they agree at logging steps.
                stopping = stop.received
                if jax.process_count() > 1:
                    stopping = hosts.any_process(stopping) if logging_now else None
                validating_now = validator is not None and (
                    done % config.train.val_every_steps == 0 or finished
                )
                saving_now = manager.should_save(done) or validating_now or finished or bool(stopping)
                if logging_now or saving_now:
                    metrics_out.defer(done, metrics, write=logging_now)
                if saving_now:
                    metrics_out.flush()  # never save a state whose loss is not finite
                val_accuracy = None
                if validating_now:
                    val_accuracy = validator.accuracy(state)
                    log.write(done, {"val_accuracy": val_accuracy}, "val")
                    progress.write(f"step {done}: validation accuracy {val_accuracy:.4f}")
                if saving_now:
                    log.flush()
                    manager.save(done, state, val_accuracy=val_accuracy, force=bool(stopping))
                bar.update(1)
                if stopping:
                    progress.write(f"{stopping} received: saved step {done} and stopped.")
                    break
            metrics_out.flush()
            if stopping:  # `finally` below waits for the save to complete before this propagates
                raise TrainingInterrupted(stopping if stopping in signal.Signals.__members__ else "SIGTERM",
                                          done)
        hosts.assert_replicas_equal(state.params, "parameters")
    finally:
        bar.close()
        batches.close()
        manager.close()  # waits for the last save to finish
        log.close()
        if len(report):  # each process reports the videos it checked or read
            _log.warning("%s", report.summary())
    return state
