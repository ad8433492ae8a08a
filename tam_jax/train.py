"""Episodic training (Eq. 8): the loop.

The step is in `tam_jax.train_step`, how it runs in `tam_jax.plan`, the state, optimiser and schedule in
`tam_jax.train_state`. Every random choice is a function of (config.seed, episode index), so the step alone
fixes the data position and a resumed run (on its stored plan) sees exactly the batches an uninterrupted
one would have.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import time

import jax
import ml_collections
from jax.sharding import Mesh

from tam_jax import checkpoints, evaluate, hosts, models, plan, progress
from tam_jax.config_checks import validate
from tam_jax.data import pipeline
from tam_jax.errors import UserError
from tam_jax.files import write_text
from tam_jax.metrics_log import MetricsLog
from tam_jax.train_state import TrainState, create_train_state, learning_rate_schedule, make_optimizer
from tam_jax.train_step import make_train_step, shard_batch
from tam_jax.workdir_lock import hold_workdir

_log = logging.getLogger(__name__)


class StopTraining(UserError):
    """A NaN or infinite loss: the run stops and keeps its last good checkpoint."""


class TrainingInterrupted(Exception):
    """A stop signal (SIGTERM, SIGINT) arrived: the state was saved and training stopped early.

    `exit_status` is what `python -m tam_jax.main` exits with: 128 + the signal's number (143 for
    SIGTERM, 130 for SIGINT), as a shell reports a process ended by that signal. No results are written.
    """

    def __init__(self, signum: signal.Signals, step: int):
        self.signum, self.step = signum, step
        self.exit_status = 128 + int(signum)
        super().__init__(f"{signum.name} received: saved step {step} and stopped; run the same command to "
                         "resume.")


# ----------------------------------------------------------------------------------------------------
# The loop.


class _StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (then saves and exits)."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _CompletedSteps:
    """Counts a step on the progress bar once its outputs are computed, not when it is dispatched, and
    keeps dispatch at most `ahead` steps ahead of completion, so the bar's rate and ETA are true ones.

    With `ahead=1` the next step is queued while one computes: the device never waits on the host."""

    def __init__(self, bar, ahead: int = 1):
        self._bar, self._ahead, self._queue = bar, ahead, collections.deque()

    def dispatched(self, outputs) -> None:
        """A step was dispatched with these outputs; blocks until only `ahead` steps are unfinished."""
        self._queue.append(outputs)
        while len(self._queue) > self._ahead:
            self._complete_oldest()

    def wait_all(self) -> None:
        while self._queue:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        jax.block_until_ready(self._queue.popleft())
        self._bar.update(1)


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
    """The initial (or resumed) state and its checkpoint manager; writes `config.json` (the planned one)."""
    state = create_train_state(config, model, optimizer, mesh)
    manager = checkpoints.CheckpointManager(
        os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every_steps,
    )
    try:
        state = manager.restore_latest(state)
    except BaseException:  # e.g. every checkpoint damaged: the caller gets no manager to close
        manager.close()
        raise
    start_step = int(state.step)
    log.start(start_step)
    if hosts.is_chief():
        if start_step:
            _log.info("Resuming from step %d in %s.", start_step, workdir)
        write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    return state, manager, start_step


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train (resuming from the latest checkpoint in `workdir`), validating and checkpointing on the way.

    Writes `workdir/checkpoints/` (Orbax), `workdir/tensorboard/`, `workdir/train_log.jsonl` (one JSON
    record per logged step), `workdir/config.json` (with the plan's values) and `workdir/plan.json`
    (`tam_jax.plan`, which a resumed run reuses). Returns the final state. Holds the workdir's lock
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
    report = SkipReport()
    # The data first (neither depends on the plan): every video of the train split and of the split the
    # final evaluation scores is counted and its first frame decoded, so a class without a readable video
    # stops the run here with a DataError, before planning compiles the step and before step 1.
    train_split = pipeline.prepare_split(config, "train", report)
    evaluate.prepare_eval_split(config, config.eval.split, report, evaluate.eval_shots(config))
    run_plan, mesh, compiled_step = plan.make_plan(config, workdir=workdir)
    progress.write(run_plan.line())
    config = run_plan.apply(config)
    model = models.build_embedder(config.model)
    validator = None
    if config.train.val_every_steps > 0:
        validator = evaluate.FewShotEvaluator.for_validation(config, mesh, model, report)
    optimizer = make_optimizer(config)
    log = MetricsLog(workdir)
    state, manager, start_step = _start(config, workdir, mesh, model, optimizer, log)
    plan.store_plan(workdir, run_plan)
    batches = pipeline.train_batches(config, train_split, report, start=start_step)
    # The plan's compiled step where it compiled one (a memory limit is known): no second compile.
    train_step = compiled_step or make_train_step(config, model, optimizer, mesh,
                                                  unroll=run_plan.unroll_loops)
    bar = progress.bar(config.train.num_steps, "training", "step", initial=start_step)
    completed = _CompletedSteps(bar)
    metrics_out = _TrainMetrics(config, log, bar, manager.directory, start_step)
    try:
        stopping = False  # stays False when the run is already finished (a rerun of a done command)
        with _StopSignal() as stop:
            for step in range(start_step, config.train.num_steps):
                state, metrics = train_step(state, shard_batch(next(batches), mesh))
                completed.dispatched(metrics)
                metrics_out.flush()  # the previous logging step's metrics, now that this step runs
                done = step + 1
                finished = done == config.train.num_steps
                logging_now = done % config.train.log_every_steps == 0 or finished
                # One reading of the flag per step, so a signal arriving mid-step is acted on (saved and
                # stopped) at the end of the next step rather than half-way through this one. Processes
                # must stop at the same step: with several, they agree at logging steps.
                stopping = stop.received is not None
                if jax.process_count() > 1:
                    stopping = hosts.any_process(stopping) if logging_now else False
                validating_now = validator is not None and (
                    done % config.train.val_every_steps == 0 or finished
                )
                saving_now = manager.should_save(done) or validating_now or finished or stopping
                if logging_now or saving_now:
                    metrics_out.defer(done, metrics, write=logging_now)
                if saving_now:
                    metrics_out.flush()  # never save a state whose loss is not finite
                val_accuracy = None
                if validating_now:
                    val_metrics = dict(validator.run(state))
                    log.write(done, {f"val_{name}": value for name, value in val_metrics.items()}, "val")
                    val_accuracy = val_metrics[validator.selection_metric]
                    progress.write(f"step {done}: validation {validator.selection_metric} {val_accuracy:.4f}")
                if saving_now:
                    log.flush()
                    manager.save(done, state, val_accuracy=val_accuracy, force=stopping)
                if stopping:
                    completed.wait_all()
                    what = stop.received.name if stop.received else "a stop signal on another process"
                    progress.write(f"{what} received: saved step {done} and stopped; run the same "
                                   "command to resume.")
                    break
            completed.wait_all()
            metrics_out.flush()
            if stopping:  # `finally` below waits for the save to complete before this propagates
                # Stopped for another process's signal: exit as SIGTERM, what a scheduler sends.
                raise TrainingInterrupted(stop.received or signal.SIGTERM, done)
        hosts.assert_replicas_equal(state.params, "parameters")
    finally:
        bar.close()
        batches.close()
        manager.close()  # waits for the last save to finish
        log.close()
        if len(report):  # each process reports the videos it checked or read
            _log.warning("%s", report.summary())
    return state
