"""Multi-host runs: start-up (`jax.distributed.initialize`), the device mesh, and the few collectives
the library needs (is this the chief, gather host arrays, agree on a flag, check replicas are equal).

One process per host (or per GPU), each running the same `python -m tam_jax.main` command. JAX's own
cluster detection supplies the coordinator, process count and process id under SLURM (`srun`), on Cloud TPU
VMs, on Kubernetes (indexed Jobs) and under MPI; elsewhere they are given explicitly
(`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, as `launch/local.sh` does).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from tam_jax.errors import FlagError

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
        raise FlagError(
            "--coordinator_address needs --num_processes and --process_id too (or leave all three out "
            "under SLURM, Cloud TPU or Kubernetes, where JAX finds them)."
        )
    # CPU devices need a collectives implementation to talk across processes; GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    return True


def is_chief() -> bool:
    """Whether this process writes files and prints progress (process 0)."""
    return jax.process_index() == 0


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D mesh named "data" over the first `num_devices` devices (0: all of them)."""
    devices = jax.devices()
    wanted = num_devices or len(devices)
    if wanted > len(devices):
        raise ValueError(
            f"config.mesh.num_devices={wanted} but only {len(devices)} devices are visible; lower it."
        )
    if jax.process_count() > 1 and wanted != len(devices):
        raise ValueError(
            f"config.mesh.num_devices={wanted}: with {jax.process_count()} processes every device takes "
            "part; set it to 0."
        )
    return Mesh(np.asarray(devices[:wanted]), ("data",))


def local_mesh(mesh: Mesh) -> Mesh:
    """The part of `mesh` on this process's devices, for work each process does alone."""
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return Mesh(np.asarray(devices), ("data",))


def local_copy(tree):
    """Host copies of replicated (possibly multi-process) arrays: this process's replica of each."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def gather(local: np.ndarray) -> np.ndarray:
    """Concatenate every process's equally sized `local` along axis 0 (identity on one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective: every process must call it)."""
    return bool(gather(np.array([bool(flag)])).any())


def assert_replicas_equal(tree, what: str) -> None:
    """Fail when a replicated pytree differs between processes (a bug that would corrupt a saved model)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.assert_equal(local_copy(tree), f"{what} differ between processes")
