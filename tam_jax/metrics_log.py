"""Where training writes its metrics: `train_log.jsonl` (one JSON record per line) and TensorBoard.

Only the chief process writes; on the others every method does nothing. A resumed run first drops what an
interrupted one wrote after the step it resumes from (`truncate_after`, including a half-written last
line) and tells TensorBoard to hide those steps (`purge_step`), so each step is recorded once.
"""

from __future__ import annotations

import json
import os
import sys

from tam_jax import hosts
from tam_jax.files import atomic_write


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX imports torch whenever it is installed (to accept torch tensors, which nothing here
    passes): 2-4 s at the start of every run on a machine that also has PyTorch. Unless torch is
    imported already, it is hidden for that one import and importable again afterwards.
    """
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """`workdir/train_log.jsonl` and `workdir/tensorboard/`, both keyed by step."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "train_log.jsonl")
        self._tensorboard_dir = os.path.join(workdir, "tensorboard")
        self._writer = None

    def start(self, step: int) -> None:
        """Begin writing after `step`: drop later records left by an interrupted run, open TensorBoard."""
        if not hosts.is_chief():
            return
        self._truncate_after(step)
        # purge_step: TensorBoard hides the events of steps >= it written before (by an interrupted run).
        self._writer = summary_writer_class()(self._tensorboard_dir, purge_step=step + 1)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # half a line: the run was killed while writing it
                    continue
                if line.endswith("\n") and record["step"] <= step:
                    kept.append(line)
        with atomic_write(self.path) as f:
            f.writelines(kept)

    def write(self, step: int, values: dict, prefix: str) -> None:
        """Append {"step": step, **values} to the log and each value to TensorBoard as `prefix/key` (a key
        that starts with `prefix_` loses it: "val_accuracy" -> "val/accuracy")."""
        if not hosts.is_chief():
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        except OSError as e:
            raise OSError(e.errno, f"Could not write the training log {self.path} ({e.strerror}). Training "
                          "stops; free disk space or fix the folder's permissions, then run the same command "
                          "to resume from the last complete checkpoint.") from e
        for key, value in values.items():
            self._writer.add_scalar(f"{prefix}/{key.removeprefix(prefix + '_')}", value, step)

    def flush(self) -> None:
        """Put TensorBoard's buffered events on disk: called before each checkpoint, so that a run killed
        after it loses no event of the steps it will resume after."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
