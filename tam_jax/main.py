"""Command-line entry point: `python -m tam_jax.main --config=configs/NAME.py[:args] --workdir=DIR`.

`--mode=train` trains (resuming from DIR), `--mode=eval` evaluates the best (or latest) checkpoint in DIR,
`--mode=train_and_eval` (the default) does both, `--mode=plan` prints how training would run on this
machine (`tam_jax.plan`: devices, micro-batches, chunks, remat) and exits, reading no data. Any config
field can be overridden as `--config.a.b=value`. Multi-host runs start one such process per host (see
`tam_jax.hosts`).

Exit status: 0 when done; 143 (SIGTERM) or 130 (SIGINT) when a stop signal stopped training after saving
(no results are written; the same command resumes); 2 with one `error:` line for a flag the command line
cannot parse (an unknown `--config` key, a value of the wrong type, a config file that fails); 1 with one
`error:` line for any other mistake in the input (`tam_jax.errors`): a config value outside its domain, a
workdir that cannot be used or is in use, data that cannot make episodes, a plan that cannot run here,
checkpoints that cannot be restored or written, a non-finite loss; 70 for a bug in tam_jax (one line;
`TAM_JAX_TRACEBACK=1` shows the traceback).
"""

import sys

from absl import app, flags
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
    from tam_jax import log_setup
    from tam_jax.errors import run_command

    log_setup.setup()  # tam_jax's INFO messages on stderr; Orbax's and grain's INFO dropped

    sys.exit(run_command(lambda: run(_CONFIG.value, _WORKDIR.value, _MODE.value)))


def run(config, workdir: str, mode: str) -> int:
    """Check what can be checked at start (the config, the workdir), then do `mode`; the exit status."""
    from tam_jax import config_checks, eval_workdir, hosts, plan, train, workdir_lock

    config_checks.validate(config, training=mode != "eval", files=mode != "plan")
    if mode != "plan":
        workdir_lock.check_workdir(workdir, must_exist=mode == "eval" and not config.model.init_from)
    hosts.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if mode in ("train", "train_and_eval"):
        plan.check_settings(config)
    try:
        if mode == "plan":
            print(plan.plan_command(config, workdir))
        if mode in ("train", "train_and_eval"):
            train.train(config, workdir)
        if mode in ("eval", "train_and_eval"):
            eval_workdir.evaluate_workdir(config, workdir)
    except train.TrainingInterrupted as e:  # saved; training printed what happened and how to resume
        return e.exit_status
    return 0


if __name__ == "__main__":
    from tam_jax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
