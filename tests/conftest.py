"""Test-wide setup: 8 virtual CPU devices, so data-parallel code runs on 1 and on 8 devices in one process; a
persistent compilation cache; trained workdirs shared by the test files and the workers."""

import gc
import os
import shutil
from pathlib import Path

import pytest

# Must happen before jax initialises its backends; other XLA flags a user set are kept.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

# Most tests compile the same tiny training and evaluation steps, in this process and in the
# `python -m tam_jax...` processes they start (which inherit the environment, and pytest-xdist's workers too):
# a persistent compilation cache compiles each once. It lives in the user's cache folder, so a rerun after
# an edit compiles only what the edit changed: JAX keys each entry by the program, its compile options,
# the devices and the JAX version, so a changed program never gets an old executable. Every program is
# cached, however quick its compile: the suite makes thousands of small ones. JAX's own size bound is off,
# because it lists the whole folder on every write (quadratic in the entries, minutes for this suite);
# `pytest_sessionstart` bounds the folder instead, once per run. For a cold run delete the folder; a
# JAX_COMPILATION_CACHE_DIR set by the user is used as it is.
TEST_COMPILATION_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tam_jax", "test_compilation_cache"
)
TEST_COMPILATION_CACHE_BYTES = 2 << 30
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = TEST_COMPILATION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def prune_least_recently_used(folder: str, max_bytes: int) -> None:
    """Deletes the files of `folder` least recently used (read or written) first, until it holds at most
    `max_bytes`."""
    if not os.path.isdir(folder):
        return
    entries = [(max(st.st_atime, st.st_mtime), st.st_size, entry.path)
               for entry in os.scandir(folder) if entry.is_file() for st in [entry.stat()]]
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        os.remove(path)
        total -= size


def pytest_sessionstart(session):
    """Bounds the tests' compilation cache, in the controlling process before any worker starts."""
    if not hasattr(session.config, "workerinput") and os.environ["JAX_COMPILATION_CACHE_DIR"] == (
            TEST_COMPILATION_CACHE):
        prune_least_recently_used(TEST_COMPILATION_CACHE, TEST_COMPILATION_CACHE_BYTES)


def pytest_sessionfinish(session):
    """Collects the run's garbage now, while pytest still reports what it raises, then freezes the objects
    left (JAX's caches hold about 500,000), so that pytest's five collections at exit do not walk them again.
    Those took a pytest-xdist worker past the 5 s execnet waits for it to end, and its interrupt then showed
    as a `PytestUnraisableExceptionWarning ... KeyboardInterrupt` at the end of the run."""
    gc.collect()
    gc.freeze()


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): one worker per core this process may use, at most 4. Each worker holds
    8 virtual devices and already compiles and runs on every core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


def pytest_collection_modifyitems(config, items):
    """Files with end-to-end tests first. A worker takes a whole file (`--dist loadfile`), in this order:
    the long files go out first and the short ones fill in at the end, instead of one long file running
    alone at the end while the other workers wait."""
    long_files = {item.path for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.path not in long_files)  # stable: each file keeps its own order


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, made by `build(folder)` once per test run and shared by every worker: the first
    to ask builds it while the others wait on a lock, then all read it. Tests must not change it (copy it
    first with shutil.copytree)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's own folder, above each worker's
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build left
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """A finished tiny run of `tests.helpers.trained_config()` (checkpoints at steps 2 and 4), trained once
    per test run (`built_once`). Tests only read it: one that writes to a workdir (trains on, evaluates,
    damages it) copies it first with shutil.copytree."""
    from tam_jax import train
    from tests.helpers import trained_config

    return built_once(tmp_path_factory, "trained", lambda folder: train.train(trained_config(), str(folder)))


@pytest.fixture
def trained(trained_workdir):
    """(config, workdir) of the shared trained run; a fresh config for each test, which may change it."""
    from tests.helpers import trained_config

    return trained_config(), trained_workdir
