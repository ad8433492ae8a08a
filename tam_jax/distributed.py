"""Multi-host start-up: `jax.distributed.initialize` when the environment or the command line asks for it.

One process per host (or per GPU), each running the same `python -m tam_jax.main` command. JAX's own
cluster detection supplies the coordinator, process count and process id under SLURM (`srun`), on Cloud TPU
VMs, on Kubernetes (indexed Jobs) and under MPI; elsewhere they are given explicitly
(`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, as `launch/local.sh` does).
"""

from __future__ import annotations

import os

import jax

MODES = ("auto", "on", "off")


def cluster_detected(environ=os.environ) -> str | None:
    """The name of the multi-process launcher visible in the environment, or None."""
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1"))) > 1:
        return "SLURM"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU"
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        return "Kubernetes"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Start JAX's multi-controller runtime if asked; returns whether it was started.

    mode "off": never; "on": always (JAX detects the cluster unless the address etc. are given);
    "auto": when an address is given or a cluster launcher is detected. Must run before any other JAX
    call touches a device.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r} is not one of {', '.join(MODES)}.")
    explicit = coordinator_address is not None
    if mode == "off" or (mode == "auto" and not explicit and cluster_detected() is None):
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "--coordinator_address needs --num_processes and --process_id too (or leave all three out "
            "under SLURM, Cloud TPU or Kubernetes, where JAX finds them)."
        )
    # CPU devices need a collectives implementation to talk across processes; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True
