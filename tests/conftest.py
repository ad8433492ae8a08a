"""Test-wide setup: 8 virtual CPU devices, so data-parallel code runs on 1 and on 8 devices in one process; a
compilation cache for the session; trained workdirs shared by the test files."""

import atexit
import importlib.util
import os
import shutil
import tempfile

import pytest

# Must happen before jax initialises its backends; other XLA flags a user set are kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# Most tests compile the same tiny training and evaluation steps, in this process and in the
# `python -m tam_jax...` processes they start (which inherit the environment, and pytest-xdist's workers too):
# a persistent compilation cache for this session compiles each once. Fresh for every session (nothing
# carries over from an older checkout); a cache directory set by the user is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="tam_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    # A size bound makes JAX lock the cache directory around each read and write (with `filelock`, which
    # it needs then): processes (xdist workers, the runs a test starts) never read a half-written entry.
    if importlib.util.find_spec("filelock") is not None:
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A finished tiny run of `tests.helpers.trained_config()` (checkpoints at steps 2 and 4), trained once
    per session. Tests only read it: one that writes to a workdir (trains on, evaluates, damages it)
    copies it first with shutil.copytree."""
    from tam_jax import train
    from tests.helpers import trained_config

    workdir = tmp_path_factory.mktemp("trained")
    train.train(trained_config(), str(workdir))
    return workdir


@pytest.fixture
def trained(trained_workdir):
    """(config, workdir) of the shared trained run; a fresh config for each test, which may change it."""
    from tests.helpers import trained_config

    return trained_config(), trained_workdir
