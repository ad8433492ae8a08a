"""Multi-host start-up and a real two-process training run on this machine (CPU, gloo, loopback)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tam_jax import hosts as distributed
from tests.helpers import REPO, flags_for, read_params, tiny_config


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "SLURM"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
        ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "Cloud TPU"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "1"}, "Kubernetes"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ],
)
def test_cluster_detection(environ, expected):
    assert distributed.cluster_detected(environ) == expected


def test_initialize_does_nothing_when_not_asked_and_checks_explicit_arguments():
    assert distributed.initialize("off", "127.0.0.1:1234", 2, 0) is False
    assert distributed.initialize("auto") is False or distributed.cluster_detected() is not None
    with pytest.raises(ValueError, match="--num_processes"):
        distributed.initialize("auto", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="distributed mode"):
        distributed.initialize("sometimes")


def run(command, env, timeout=420):
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.e2e
def test_two_processes_train_like_one_process_on_as_many_devices(tmp_path):
    config = tiny_config(num_steps=4)
    config.train.optimizer = "sgd"  # Adam's sign-like first steps would magnify reduction-order noise
    config.train.learning_rate = 0.01
    config.train.episodes_per_step = 4
    config.train.val_every_steps = 2
    config.train.val_episodes = 10
    # How it runs is the plan's, as in the demo: both processes' devices, and micro-batches that fit them.
    config.mesh.num_devices = 0
    config.train.episodes_per_device_step = config.train.embed_chunks = 0
    flags = ["--config=configs/demo.py", *flags_for(config)]
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    two = tmp_path / "two_processes"
    env = dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run(["bash", "launch/local.sh", "2", *flags, f"--workdir={two}"], env)
    assert json.loads((two / "plan.json").read_text())["num_devices"] == 4
    assert (two / "results.json").exists()  # the default mode evaluates the test split after training

    one = tmp_path / "one_process"
    env = dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    run([sys.executable, "-m", "tam_jax.main", *flags, "--mode=train", f"--workdir={one}"], env)

    config.mesh.num_devices = 1  # restore both onto one device: a checkpoint moves across device counts
    step_two, state_two = read_params(str(two), config)
    step_one, state_one = read_params(str(one), config)
    assert step_two == step_one == 4
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    jax.tree.map(close, state_two.params, state_one.params)
    val_two = [line for line in (two / "train_log.jsonl").read_text().splitlines() if "val_accuracy" in line]
    val_one = [line for line in (one / "train_log.jsonl").read_text().splitlines() if "val_accuracy" in line]
    assert len(val_two) == len(val_one) == 2


@pytest.mark.e2e
def test_a_failing_process_stops_the_others(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        ["bash", "launch/local.sh", "2", "--config=configs/demo.py", f"--workdir={tmp_path}",
         "--config.data.kind=frames"],  # no data root: every process fails at once
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "config.data.root" in result.stderr
