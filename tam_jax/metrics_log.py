"""Where training writes its metrics: `train_log.jsonl` (one JSON record per line) and TensorBoard.

Only the chief process writes; on the others every method does nothing.
"""

from __future__ import annotations

import json
import os

from tam_jax import hosts


class MetricsLog:
    """`workdir/train_log.jsonl` and `workdir/tensorboard/`, both keyed by step."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "train_log.jsonl")
        self._writer = None
        if hosts.is_chief():
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records after `step` (written before an interruption) so that a resumed log has each step
        once."""
        if not hosts.is_chief() or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, values: dict, prefix: str) -> None:
        """Append {"step": step, **values} to the log and each value to TensorBoard as `prefix/key` (a key
        that starts with `prefix_` loses it: "val_accuracy" -> "val/accuracy")."""
        if not hosts.is_chief():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            self._writer.add_scalar(f"{prefix}/{key.removeprefix(prefix + '_')}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
