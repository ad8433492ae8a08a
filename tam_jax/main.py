"""Command-line entry point: `python -m tam_jax.main --config=configs/NAME.py[:args] --workdir=DIR`.

`--mode=train` trains (resuming from DIR), `--mode=eval` evaluates the best (or latest) checkpoint in DIR,
`--mode=train_and_eval` (the default) does both, `--mode=plan` prints how training would run on this
machine (`tam_jax.plan`: devices, micro-batches, chunks, remat) and exits, reading no data. Any config
field can be overridden as `--config.a.b=value`. Multi-host runs start one such process per host (see
`tam_jax.hosts`).

Exit status: 0 when done; 143 (SIGTERM) or 130 (SIGINT) when a stop signal stopped training after saving
(no results are written; the same command resumes); 1 with a one-line `error:` for a workdir in use by
another run, a plan that cannot run here, checkpoints that cannot be restored or written, or a
non-finite loss.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py:shot=5.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval", "plan"],
                            "What to run (plan: print the execution plan on this machine and exit).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-host start-up: auto (when a coordinator is given or SLURM/Cloud TPU/Kubernetes is detected), "
    "on, or off.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and grain log every save and read at INFO
    from tam_jax import evaluate, hosts, plan, train

    hosts.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    from tam_jax.checkpoints import CheckpointDamagedError, CheckpointWriteError
    from tam_jax.workdir_lock import WorkdirBusyError

    config = _CONFIG.value
    try:
        if _MODE.value == "plan":
            print(plan.plan_command(config, _WORKDIR.value))
        if _MODE.value in ("train", "train_and_eval"):
            train.train(config, _WORKDIR.value)
        if _MODE.value in ("eval", "train_and_eval"):
            evaluate.evaluate_checkpoint(config, _WORKDIR.value)
    except train.TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.exit_status)
    except (WorkdirBusyError, CheckpointDamagedError, CheckpointWriteError, train.StopTraining,
            plan.PlanError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
