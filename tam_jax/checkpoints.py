"""Training checkpoints with Orbax: periodic saves, the latest N kept plus the best by validation accuracy.

    DIR/<step>/state/   the whole TrainState (Orbax StandardSave), restored onto the current mesh, so a
                        checkpoint restores on another number of devices
    DIR/<step>/data/    {"next_batch": b}: the data position (the index of the next training batch)

Steps saved with a validation accuracy carry it as their Orbax metric; the best of them is always kept.
All processes call every method together (Orbax coordinates multi-host saves).

Also here: which step a run restores ("best, else latest"), finding the checkpoint a path names (a
workdir, its `checkpoints/` folder or one step), and restoring a trained embedder for inference without
building an optimiser.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers

_METRIC = "val_accuracy"
CHOICES = ("best", "latest")


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

    def step_to_restore(self, which: str = "best") -> int | None:
        """The step `which` names: "latest", or "best" by validation accuracy (the latest when no step has
        one); None when there is no checkpoint."""
        if which not in CHOICES:
            raise ValueError(f"Checkpoint choice {which!r} is not one of {', '.join(CHOICES)}.")
        best = self.best_step() if which == "best" else None
        return self.latest_step() if best is None else best

    def restore_saved(self, step: int, mesh: Mesh) -> dict:
        """Whatever the state at `step` holds, as a nested dict of arrays replicated over `mesh`: no target
        (and so no optimiser) is needed to read it."""
        metadata = self._manager.item_metadata(step)["state"]
        replicated = NamedSharding(mesh, P())
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), metadata)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        restored = self._manager.restore(step, args=args)
        return restored["state"]

    def restore_latest(self, target: Any) -> Any:
        """The latest state, or `target` itself when there is no checkpoint yet."""
        step = self.latest_step()
        return target if step is None else self.restore(step, target)

    def close(self) -> None:
        self._manager.close()


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
        step = manager.step_to_restore("best")
        manager.close()
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {directory}: train first (python -m tam_jax.main).")
    return workdir, directory, step


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config a workdir's `config.json` holds (renamed keys brought up to date)."""
    from tam_jax.configuration import upgrade_config

    with open(Path(workdir) / "config.json") as f:
        return upgrade_config(ml_collections.ConfigDict(json.load(f)))
