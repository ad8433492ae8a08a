"""Training checkpoints with Orbax: periodic saves, the latest N kept plus the best by validation accuracy.

    DIR/<step>/state/   the whole TrainState (Orbax StandardSave), restored onto the current mesh, so a
                        checkpoint restores on another number of devices
    DIR/<step>/data/    {"next_batch": b}: the data position (the index of the next training batch)

Steps saved with a validation accuracy carry it as their Orbax metric; the best of them is always kept.
All processes call every method together (Orbax coordinates multi-host saves).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_METRIC = "val_accuracy"


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
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, *, val_accuracy: float | None = None, force: bool = False):
        metrics = None if val_accuracy is None else {_METRIC: float(val_accuracy)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"next_batch": int(step)})
        )
        self._manager.save(step, args=args, metrics=metrics, force=force)

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
        if restored["data"]["next_batch"] != step:
            raise ValueError(
                f"Checkpoint {self.directory}/{step}: data position {restored['data']} does not match "
                "its step; the checkpoint is damaged. Delete that step's folder to resume from an earlier "
                "one."
            )
        return restored["state"]

    def restore_latest(self, target: Any) -> Any:
        """The latest state, or `target` itself when there is no checkpoint yet."""
        step = self.latest_step()
        return target if step is None else self.restore(step, target)

    def close(self) -> None:
        self._manager.close()
