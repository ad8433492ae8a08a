"""Training checkpoints with Orbax: periodic saves, the latest N kept plus the best by validation accuracy.

    DIR/<step>/state/   the whole TrainState (Orbax StandardSave), restored onto the current mesh, so a
                        checkpoint restores on another number of devices
    DIR/<step>/data/    {"next_batch": b, "fingerprint": f}: the data position (the index of the next
                        training batch) and a hash of the saved state, checked at every restore

Steps saved with a validation accuracy carry it as their Orbax metric; the best of them is always kept.
All processes call every method together (Orbax coordinates multi-host saves).

A checkpoint that cannot be restored (a missing, truncated or garbage file, another model's state, a
fingerprint that does not match) is never loaded: `restore_latest` says which step and why and falls back to
the newest good one, moving the damaged ones to `DIR/../damaged_checkpoints/` so that the run can save those
steps again; when no step is good it stops and says what to do. A failed write (full disk, read-only
folder) stops the run with `CheckpointWriteError`; Orbax writes each step to a temporary folder and renames
it when complete, so the last good checkpoint stays intact.

Also here: which step a run restores ("best, else latest"), finding the checkpoint a path names (a
workdir, its `checkpoints/` folder or one step), and restoring a trained embedder for inference without
building an optimiser.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers

from tam_jax.configuration import config_from_json
from tam_jax.errors import UserError

_METRIC = "val_accuracy"
CHOICES = ("best", "latest")  # or a step number (`is_step_choice`)
DAMAGED_DIR = "damaged_checkpoints"
_log = logging.getLogger(__name__)


class _WithoutMetricsNotice(logging.Filter):
    """Orbax warns at every save without a validation accuracy (most saves, by design); drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_WithoutMetricsNotice())


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint or support cache that does not fit the model it is used with; says what differs.

    Not damage: `CheckpointManager.restore_good` raises it at once instead of trying an earlier step.
    """


class CheckpointMissingError(UserError, LookupError):
    """The checkpoint asked for (a step number) was never saved; the message lists the saved steps."""


class CheckpointDamagedError(UserError, RuntimeError):
    """No checkpoint in a folder can be restored; the message lists each step and why, and what to do."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, unwritable folder); the last complete one is intact."""


def is_step_choice(which: str) -> bool:
    """Whether a checkpoint choice (`config.eval.checkpoint`) is a step number, e.g. "10"."""
    return str(which).isdigit()


def fingerprint(state: Any) -> str:
    """A hash of every array of a (replicated) state, independent of the pytree's container types and
    order, so a state restored into another structure (e.g. plain dicts) hashes the same."""
    digests = []
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(np.asarray(leaf))
        digests.append(hashlib.sha256(f"{array.dtype}{array.shape}".encode() + array.tobytes()).hexdigest())
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()


class CheckpointManager:
    """A thin wrapper of `ocp.CheckpointManager` for one `TrainState` and the data position."""

    def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000):
        self.directory = os.path.abspath(directory)  # Orbax needs absolute paths
        self.save_every = save_every
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=keep),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[_METRIC],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        # best_fn makes Orbax record each step's metrics (read back by `best_step`); which steps are kept
        # is the preservation policy's decision.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda metrics: metrics[_METRIC], best_mode="max", create=True
        )
        # Handlers named up front, so that reading an item's metadata needs no guess (and logs no warning).
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        _finish_event_loops_when_closed()
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, *, val_accuracy: float | None = None, force: bool = False):
        """Start saving `state` as `step` (asynchronously). Raises CheckpointWriteError when this or an
        earlier save failed."""
        metrics = None if val_accuracy is None else {_METRIC: float(val_accuracy)}
        position = {"next_batch": int(step), "fingerprint": fingerprint(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position))
        self._guard_write(step, lambda: self._manager.save(step, args=args, metrics=metrics, force=force))

    def _guard_write(self, step: int, write) -> None:
        try:
            self._manager.check_for_errors()
            write()
        except Exception as e:
            raise CheckpointWriteError(
                f"Could not write checkpoint step {step} (or finish an earlier one) in {self.directory}: "
                f"{e!r}. The last complete checkpoint ({self._complete_steps()}) is intact: free disk space "
                "or fix the folder's permissions, then run the same command to resume from it."
            ) from e

    def _complete_steps(self) -> str:
        steps = sorted(int(p.name) for p in Path(self.directory).iterdir() if p.name.isdigit())
        return f"step {steps[-1]}" if steps else "none yet"

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest validation accuracy (None when no step has one)."""
        scored = []
        for step in self._manager.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and _METRIC in metrics:
                scored.append((float(metrics[_METRIC]), step))
        return max(scored)[1] if scored else None

    def restore(self, step: int, target: Any) -> Any:
        """The state saved at `step`, laid out like `target` (shapes, dtypes and shardings)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        data = restored["data"]
        if data.get("next_batch") != step:
            raise ValueError(f"its data position {data} does not match its step")
        _check_fingerprint(restored["state"], data)
        return restored["state"]

    def step_to_restore(self, which: str = "best") -> int | None:
        """The step `which` names: "latest", "best" by validation accuracy (the latest when no step has
        one), or a step number (`is_step_choice`); None when there is no checkpoint. A step number that was
        not saved raises CheckpointMissingError listing the saved ones."""
        if is_step_choice(which):
            saved = self.all_steps()
            if int(which) not in saved:
                raise CheckpointMissingError(
                    f"config.eval.checkpoint={which}: {self.directory} holds no checkpoint of step {which}; "
                    f"saved steps: {', '.join(map(str, saved)) or 'none'}. Give one of them, best or latest."
                )
            return int(which)
        if which not in CHOICES:
            raise ValueError(f"Checkpoint choice {which!r} is not one of {', '.join(CHOICES)} or a step.")
        best = self.best_step() if which == "best" else None
        return self.latest_step() if best is None else best

    def fallback_order(self, which: str = "best") -> list[int]:
        """Every step, the one `which` names first, then the others from the newest; only that step when
        `which` is a step number (a step asked for is never replaced by another)."""
        first = self.step_to_restore(which)
        if first is None or is_step_choice(which):
            return [] if first is None else [first]
        return list(dict.fromkeys([first, *self.all_steps()[::-1]]))

    def restore_saved(self, step: int, mesh: Mesh) -> dict:
        """Whatever the state at `step` holds, as a nested dict of arrays replicated over `mesh`: no target
        (and so no optimiser) is needed to read it."""
        metadata = self._manager.item_metadata(step)["state"]
        replicated = NamedSharding(mesh, P())
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), metadata)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        _check_fingerprint(restored["state"], restored["data"])
        return restored["state"]

    def restore_latest(self, target: Any) -> Any:
        """The latest good state, or `target` itself when there is no checkpoint yet.

        Damaged steps are reported, moved aside (see the module docstring) and skipped; raises
        CheckpointDamagedError when every step is damaged.
        """
        return self.restore_good(self._manager.all_steps()[::-1], lambda step: self.restore(step, target),
                                 default=target)

    def restore_good(self, steps, restore, *, default: Any = None, move_aside: bool = True) -> Any:
        """`restore(step)` for the first of `steps` that restores; `default` when `steps` is empty.

        The damaged steps before it are logged and (with `move_aside`) moved to `damaged_checkpoints/`.
        A CheckpointMismatchError (a config that does not fit the checkpoint) is raised at once.
        """
        damaged = []
        for step in steps:
            try:
                restored = restore(step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # Orbax and tensorstore raise many types for a bad folder
                damaged.append((step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
                _log.warning("Checkpoint %s/%s cannot be restored (%s); trying an earlier one.",
                             self.directory, step, damaged[-1][1])
                continue
            if damaged and move_aside:
                self._move_aside([s for s, _ in damaged])
            if damaged:
                _log.warning("Restored checkpoint step %s: skipped damaged step(s) %s (see the warnings "
                             "above).", step, ", ".join(str(s) for s, _ in damaged))
            return restored
        if not damaged:
            return default
        details = "; ".join(f"step {s}: {why}" for s, why in damaged)
        raise CheckpointDamagedError(
            f"No checkpoint in {self.directory} can be restored ({details}). If the config changed since "
            "they were written (e.g. model.arch), use the old config or another --workdir; otherwise delete "
            f"{self.directory} to start training from scratch."
        )

    def _move_aside(self, steps) -> None:
        """Move damaged step folders to `damaged_checkpoints/` beside this folder (chief only), so that the
        resumed run can write those steps again; then every process re-reads the step list."""
        if jax.process_index() == 0:
            target = Path(self.directory).parent / DAMAGED_DIR
            target.mkdir(exist_ok=True)
            for step in steps:
                destination = target / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                shutil.move(os.path.join(self.directory, str(step)), destination)
                _log.warning("Moved damaged checkpoint step %s to %s.", step, destination)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tam_jax damaged checkpoints moved")
        self._manager.reload()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def close(self) -> None:
        """Wait for the last save to finish. Raises CheckpointWriteError when it failed."""
        try:
            self._guard_write(self.latest_step() or 0, self._manager.wait_until_finished)
        finally:
            self._manager.close()


class _FinishingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, closed, first cancels and awaits the tasks still on it (as `asyncio.run` does).

    Orbax runs a restore (or a save) in a new event loop and closes it as soon as it raises, without
    cancelling its other tasks: when one read of a damaged checkpoint fails, the reads of the other arrays
    stay pending on the closed loop, and the garbage collector closes them later, one "Exception ignored in:
    <coroutine object _read_array_index_and_device_put>" each; when a write fails (a full disk), TensorStore
    completes the others into the closed loop ("Exception ignored in: None ... Event loop is closed").
    """

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [task for task in asyncio.all_tasks(self) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                with contextlib.suppress(RuntimeError):  # another loop runs in this thread: close as asyncio
                    self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _FinishingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _FinishingEventLoop()


def _finish_event_loops_when_closed() -> None:
    """From now on, new event loops are `_FinishingEventLoop`s, so that a failed Orbax restore or save leaves
    no read or write behind (also those of Orbax's background save threads). Only over asyncio's own
    policy: a process that set another one (uvloop's, say) keeps it."""
    if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
        asyncio.set_event_loop_policy(_FinishingPolicy())


def _check_fingerprint(state: Any, data: dict) -> None:
    """Raise ValueError when a restored state does not hash to what was saved (checkpoints written before
    fingerprints were recorded are not checked)."""
    saved = data.get("fingerprint")
    if saved is not None and fingerprint(state) != saved:
        raise ValueError("its arrays do not match the fingerprint saved with them (a corrupted file)")


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
        try:
            step = manager.step_to_restore("best")
        finally:
            manager.close()
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {directory}: train first (python -m tam_jax.main).")
    return workdir, directory, step


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config a workdir's `config.json` holds, over the defaults (`config_from_json`)."""
    with open(Path(workdir) / "config.json") as f:
        return config_from_json(json.load(f))
