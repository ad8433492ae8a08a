"""Interruptions and failures: hard kills at many points, damaged checkpoints, two runs on one workdir, a
full disk, and files written whole or not at all. A SIGTERM and its resume: tests/test_train.py."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tam_jax import checkpoints, eval_workdir, results, train
from tam_jax.files import atomic_write, write_text
from tam_jax.metrics_log import MetricsLog
from tam_jax.workdir_lock import WorkdirBusyError, hold_workdir
from tests.helpers import REPO, flags_for, read_params, small_config


def command(config, *, mode="train_and_eval"):
    return [sys.executable, "-m", "tam_jax.main", "--config=configs/demo.py", f"--mode={mode}",
            *flags_for(config)]


ENV = dict(os.environ, JAX_PLATFORMS="cpu")


# ----------------------------------------------------------------------------------------------------
# Files written whole.


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "results.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind
    with atomic_write(path, "wb") as f:
        f.write(b"new")
    assert path.read_text() == "new"


def test_results_and_support_caches_are_written_atomically(tmp_path, monkeypatch):
    from tam_jax.inference import SupportSet

    records = results.result_records({"tam": np.array([1.0, 0.0])}, split="test", way=5, shot=1)
    results.write_results(tmp_path / "results.json", records)
    support = SupportSet(("a",), np.zeros((1, 2, 3), np.float32), np.zeros(1, np.int64), ("a.mp4",), {})
    support.save(tmp_path / "support.npz")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def failing_replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        results.write_results(tmp_path / "results.json", records * 2)
    with pytest.raises(OSError):
        support.save(tmp_path / "support.npz")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ----------------------------------------------------------------------------------------------------
# The training log.


def test_a_resumed_log_drops_later_and_half_written_records(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "val_accuracy": 0.5}\n{"step": 3, "loss": 0.9}\n'
                   '{"step": 2, "lo')
    metrics = MetricsLog(str(tmp_path))
    metrics.start(2)
    metrics.write(3, {"loss": 0.8}, "train")
    metrics.close()
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {"step": 1, "loss": 1.0}, {"step": 2, "val_accuracy": 0.5}, {"step": 3, "loss": 0.8}]


@pytest.mark.e2e  # a fresh process: this one may have imported torch already
def test_tensorboard_is_written_without_importing_torch(tmp_path):
    script = (
        "import sys\n"
        "from tam_jax.metrics_log import MetricsLog\n"
        f"log = MetricsLog({str(tmp_path)!r})\n"
        "log.start(0)\n"
        "log.write(1, {'loss': 0.5}, 'train')\n"
        "log.close()\n"
        "assert 'torch' not in sys.modules, 'tensorboardX imported torch'\n"
        "import importlib.util\n"
        "if importlib.util.find_spec('torch') is not None:\n"
        "    import torch  # still importable afterwards\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert tensorboard_scalars(tmp_path / "tensorboard") == {"train/loss": [1]}


def tensorboard_scalars(directory: Path) -> dict[str, list[int]]:
    """tag -> steps shown by TensorBoard: events of every file, with a resumed run's purge_step applied."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            if offset + 16 + length > len(data):
                break  # a record cut short by a kill: TensorBoard skips it too
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    shown: dict[str, list[int]] = {}
    for event in events:
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            shown = {tag: [s for s in steps if s < event.step] for tag, steps in shown.items()}
        for value in event.summary.value:
            shown.setdefault(value.tag, []).append(event.step)
    return shown


# ----------------------------------------------------------------------------------------------------
# Hard kills.


def run_to_the_end(config, workdir, point=None, n=0):
    """Run the command, killed at the n-th `point` when given; returns the process's return code."""
    if point is None:
        args = [*command(config), f"--workdir={workdir}"]
    else:
        args = [sys.executable, "-m", "tests.kill_driver", point, str(n), "--", *command(config)[3:],
                f"--workdir={workdir}"]
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, timeout=600).returncode


def assert_same_run(workdir: Path, reference: Path, config):
    step, state = read_params(str(workdir), config)
    reference_step, reference_state = read_params(str(reference), config)
    assert step == reference_step == config.train.num_steps
    import jax

    jax.tree.map(np.testing.assert_array_equal, state.params, reference_state.params)
    drop = lambda r: {k: v for k, v in r.items() if k != "episodes_per_second"}
    read_log = lambda d: [drop(json.loads(line)) for line in (d / "train_log.jsonl").read_text().splitlines()]
    assert read_log(workdir) == read_log(reference)  # no duplicated, missing or half-written records
    results = lambda d: json.loads((d / "results.json").read_text())
    assert results(workdir) == results(reference)
    shown = tensorboard_scalars(workdir / "tensorboard")
    assert shown == tensorboard_scalars(reference / "tensorboard")
    assert all(len(steps) == len(set(steps)) for steps in shown.values())


KILL_POINTS = [("log", 3), ("checkpoint", 1), ("checkpoint_file", 3), ("step", 3), ("validation", 1),
               ("checkpoint", 2), ("results", 1), ("step", 4)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    config = small_config()
    workdir = tmp_path_factory.mktemp("reference")
    assert run_to_the_end(config, workdir) == 0
    return config, workdir


@pytest.mark.e2e
@pytest.mark.parametrize(("point", "n"), [("checkpoint_file", 3), ("log", 3)])
def test_a_hard_kill_then_the_same_command_ends_as_an_uninterrupted_run(reference_run, tmp_path, point, n):
    config, reference = reference_run
    assert run_to_the_end(config, tmp_path, point, n) == -signal.SIGKILL
    assert run_to_the_end(config, tmp_path) == 0
    assert_same_run(tmp_path, reference, config)


@pytest.mark.slow
@pytest.mark.e2e
def test_hard_kills_at_many_points_of_one_run(reference_run, tmp_path):
    """One workdir killed again and again, at a different point each time, then finished."""
    config, reference = reference_run
    for point, n in KILL_POINTS:
        code = run_to_the_end(config, tmp_path, point, n)
        assert code in (-signal.SIGKILL, 0), (point, n, code)
    assert run_to_the_end(config, tmp_path) == 0
    assert_same_run(tmp_path, reference, config)


# ----------------------------------------------------------------------------------------------------
# Damaged checkpoints.


# `trained` (tests/conftest.py): the session's finished tiny run, checkpoints at steps 2 and 4. Each test
# below copies it before changing anything.


def damage(step_dir: Path, how: str) -> None:
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    largest = files[-1]
    if how == "missing":
        largest.unlink()
    elif how == "garbage":
        largest.write_bytes(np.random.default_rng(0).bytes(largest.stat().st_size))
    elif how == "truncated":
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    elif how == "metadata":
        (step_dir / "state" / "_METADATA").write_text("{not json")


@pytest.mark.e2e  # the damaged run is then trained to its end
@pytest.mark.parametrize("how", ["missing", "garbage", "truncated", "metadata"])
def test_a_damaged_checkpoint_is_reported_and_the_previous_one_restored(trained, tmp_path, how, caplog):
    config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damage(workdir / "checkpoints" / "4", how)
    manager = checkpoints.CheckpointManager(str(workdir / "checkpoints"))
    target = read_params(str(source), config)[1]  # any state of the right structure
    state = manager.restore_latest(target)
    manager.close()
    assert int(state.step) == 2
    assert "skipped damaged step(s) 4" in caplog.text  # a warning of tam_jax.checkpoints
    assert not (workdir / "checkpoints" / "4").exists()  # moved aside, so the run can write step 4 again
    assert [p.name.split("-")[0] for p in (workdir / checkpoints.DAMAGED_DIR).iterdir()] == ["4"]
    # The run resumes from step 2 and ends where the undamaged run did.
    train.train(config, str(workdir))
    import jax

    jax.tree.map(np.testing.assert_array_equal, read_params(str(workdir), config)[1].params,
                 read_params(str(source), config)[1].params)


def test_evaluation_and_prediction_skip_a_damaged_checkpoint_and_none_good_stops(trained, tmp_path):
    from tam_jax.inference import load_trained_model

    config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    damage(workdir / "checkpoints" / "4", "garbage")
    records = eval_workdir.evaluate_workdir(config, str(workdir))
    assert {r["checkpoint_step"] for r in records} == {2}
    assert load_trained_model(workdir).step == 2
    with pytest.raises(checkpoints.CheckpointDamagedError, match="step 4"):  # named explicitly: not replaced
        load_trained_model(workdir / "checkpoints" / "4")
    damage(workdir / "checkpoints" / "2", "missing")
    with pytest.raises(checkpoints.CheckpointDamagedError, match=r"step 4: .*step 2: .*delete"):
        eval_workdir.evaluate_workdir(config, str(workdir))
    with pytest.raises(checkpoints.CheckpointDamagedError):
        train.train(config, str(workdir))
    assert (workdir / "checkpoints" / "4").exists()  # nothing moved when nothing could be restored


def test_a_checkpoint_of_another_model_is_not_loaded(trained, tmp_path):
    config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    other = small_config(num_steps=6)
    other.model.arch = "resnet18"
    other.data.image_size, other.data.resize = 24, 28
    with pytest.raises(checkpoints.CheckpointDamagedError, match="model.arch"):
        train.train(other, str(workdir))


def test_a_fingerprint_mismatch_is_damage(trained, tmp_path):
    config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    data = workdir / "checkpoints" / "4" / "data" / "metadata"
    position = json.loads(data.read_text())
    data.write_text(json.dumps({**position, "fingerprint": "0" * 64}))
    manager = checkpoints.CheckpointManager(str(workdir / "checkpoints"))
    with pytest.raises(ValueError, match="fingerprint"):
        manager.restore(4, read_params(str(source), config)[1])
    manager.close()


# ----------------------------------------------------------------------------------------------------
# One workdir, one run; a full disk.


HOLD = "import sys, time; from tam_jax.workdir_lock import hold_workdir\nwith hold_workdir(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(300)"


@pytest.mark.e2e
def test_a_second_run_on_a_live_workdir_stops_at_once_and_a_dead_runs_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    config = small_config()
    with pytest.raises(WorkdirBusyError, match=rf"in use by process {holder.pid} on .*another --workdir"):
        train.train(config, str(tmp_path))
    result = subprocess.run([*command(config), f"--workdir={tmp_path}"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and f"process {holder.pid}" in result.stderr
    holder.kill()  # a crashed run: SIGKILL leaves the lock file behind, but not the lock
    holder.wait()
    assert (tmp_path / "run.lock").exists()
    with hold_workdir(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


@pytest.mark.e2e  # a whole run from scratch, until its save at step 4 fails
def test_a_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from etils import epath

    config = small_config(num_steps=6)
    config.train.val_every_steps = 0
    original = epath.Path.write_text
    saves = []

    def write_text_until_full(self, *args, **kwargs):
        if "checkpoints/4" in str(self):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        saves.append(str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(epath.Path, "write_text", write_text_until_full)
    with pytest.raises(checkpoints.CheckpointWriteError, match=r"No space left.*step 2\) is intact"):
        train.train(config, str(tmp_path))
    monkeypatch.undo()
    assert saves  # the injection ran part-way through a save
    step, state = read_params(str(tmp_path), config)
    assert step == 2 and int(state.step) == 2


def test_running_a_finished_command_again_changes_nothing(trained, tmp_path):
    config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    state = train.train(config, str(workdir))  # nothing left to train: restore and return
    assert int(state.step) == config.train.num_steps
    assert (workdir / "train_log.jsonl").read_text() == (source / "train_log.jsonl").read_text()
